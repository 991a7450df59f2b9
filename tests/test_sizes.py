import pytest

from specontext_compiler.errors import SpecontextError
from specontext_compiler.sizes import parse_tokens


@pytest.mark.parametrize("text,tokens", [("131072", 131072), ("128k", 131072), ("128K", 131072),
                                         ("1M", 1048576), ("1m", 1048576), (4096, 4096), ("0.5k", 512)])
def test_parses_token_counts(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["12q", "", "-5", "0", "k", "1.5", "abc"])
def test_refuses_malformed_counts_naming_the_option(text):
    with pytest.raises(SpecontextError, match="--max-len .* write it as 131072, 128k or 1M"):
        parse_tokens(text)
