from pathlib import Path

import pytest

from specontext_compiler.errors import SpecontextError
from specontext_compiler.sizes import parse_batch, parse_tokens


@pytest.mark.parametrize("text,tokens", [("131072", 131072), ("128k", 131072), ("128K", 131072),
                                         ("1M", 1048576), ("1m", 1048576), (4096, 4096), ("0.5k", 512)])
def test_parses_token_counts(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["12q", "", "-5", "0", "k", "1.5", "abc"])
def test_refuses_malformed_counts_naming_the_option(text):
    with pytest.raises(SpecontextError, match="--max-len .* write it as 131072, 128k or 1M"):
        parse_tokens(text)


@pytest.mark.parametrize("value,batch", [("4", 4), (" 12 ", 12), (3, 3), ("auto", "auto"), ("AUTO", "auto")])
def test_parses_batch_sizes(value, batch):
    assert parse_batch(value) == batch


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "x", "", 0, -3, True])
def test_refuses_a_batch_that_is_not_a_request_count(value):
    with pytest.raises(SpecontextError, match="--batch .* positive integer or 'auto'"):
        parse_batch(value)


def test_the_cli_driver_and_planner_share_the_batch_rule(monkeypatch):
    """compile_model and plan_residency refuse a bad batch with parse_batch's message, before work."""
    from specontext_compiler import driver
    from specontext_compiler.cost_models.ilp import plan_residency
    from specontext_compiler.cost_models.workload import Workload
    with pytest.raises(SpecontextError, match="--batch '0' is not a request count"):
        driver.compile_model("tiny-llama", max_len=2048, batch="0", out="/nonexistent/never-written")
    with pytest.raises(SpecontextError, match="--batch 0 is not a request count"):
        plan_residency(None, Workload(max_len=2048, prompt_len=128), None, batch=0)


def test_library_and_cli_default_plan_directories_agree():
    from specontext_compiler.driver import default_plan_dir
    assert default_plan_dir("models/My Model/", "h100") == Path("plans/My-Model-h100")
    assert default_plan_dir("tiny-llama", "a100", "gpus/lab-h200.toml") == Path("plans/tiny-llama-lab-h200")
