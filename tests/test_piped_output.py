"""Output piped to a file or another program keeps every table cell whole (rich would assume 80
columns and cut cells to "retriev…")."""
import os
import subprocess
import sys

from specontext_compiler import compile_model


def _specontext(*args: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | env
    return subprocess.run([sys.executable, "-m", "specontext_compiler", *args], capture_output=True, text=True,
                          env=environment, check=True).stdout


def test_piped_tables_are_full_width(tmp_path):
    compile_model("tiny-llama", max_len=2048, out=tmp_path / "plan")
    piped = _specontext("inspect", str(tmp_path / "plan"))
    assert "…" not in piped and "retrieval ms" in piped and "H2D MB/step" in piped
    narrow = _specontext("inspect", str(tmp_path / "plan"), COLUMNS="60")     # a width the user set holds
    assert max(len(line) for line in narrow.splitlines()) <= 60
