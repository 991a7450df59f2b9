"""The package installs as one namespace, and the runtime imports without the compiler's deps."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_packages_list_matches_folders_on_disk():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    for package in config["packages"]:
        parts = package.split(".")
        folder = None
        for depth in range(len(parts), 0, -1):
            prefix = ".".join(parts[:depth])
            if prefix in mapping:
                folder = ROOT / mapping[prefix] / Path(*parts[depth:])
                break
        folder = folder or ROOT / Path(*parts)
        assert (folder / "__init__.py").is_file(), f"{package} -> {folder} has no __init__.py"
    on_disk = {p.parent.name for p in (ROOT / "runtime").rglob("__init__.py")}
    assert "kernels" in on_disk


def test_runtime_imports_without_compiler_dependencies(tmp_path):
    code = ("import sys, specontext_compiler.runtime.engine, specontext_compiler.runtime.ops;"
            "bad = {'pulp', 'networkx', 'typer', 'rich', 'passes', 'runtime', 'cost_models'} & set(sys.modules);"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_no_generic_top_level_modules_outside_the_repo(tmp_path):
    for name in ("passes", "runtime", "cost_models"):
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True)
        assert result.returncode != 0, f"`import {name}` works outside the repo"
