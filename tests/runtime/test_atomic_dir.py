"""Atomic publication of plan directories: concurrent writers, an interrupt at every step, dead writers."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specontext_compiler.runtime import atomic_dir
from specontext_compiler.runtime.atomic_dir import publish_dir
from specontext_compiler.runtime.plan import is_plan_dir

WRITES_PER_PROCESS = 150


def plan_files(tag: str) -> dict[str, str]:
    """A stand-in plan: plan.json with the schema's shape and two files that must match its tag."""
    plan = {"schema_version": [1, 0], "producer": {"specontext": "test"}, "segments": [], "tag": tag}
    return {"plan.json": json.dumps(plan), "decode_graph.py": f"# {tag}\n", "kernels/k.py": f"# {tag}\n"}


def write(final: Path, tag: str) -> Path:
    def write_into(staging: Path) -> None:
        for rel, text in plan_files(tag).items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text(text)
    return publish_dir(final, write_into, may_replace=is_plan_dir)


def assert_whole_plan(final: Path, tags: set[str]) -> None:
    tag = json.loads((final / "plan.json").read_text())["tag"]
    assert tag in tags
    assert (final / "decode_graph.py").read_text() == f"# {tag}\n"
    assert (final / "kernels" / "k.py").read_text() == f"# {tag}\n"


def leftovers(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir() if p.name.startswith(f".{final.name}.")
                  and not p.name.endswith(".lock"))


def run_two_writers(target, *args) -> None:
    """Run target(*args, tag, errors) in two processes (tags a and b); fail on any error they report."""
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    writers = [context.Process(target=target, args=(*args, tag, errors)) for tag in "ab"]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    assert [p.exitcode for p in writers] == [0, 0]
    assert errors.empty(), errors.get()


def _writer(final: str, use_exchange: bool, tag: str, errors) -> None:
    if not use_exchange:
        atomic_dir._exchange = lambda first, second: False
    try:
        for i in range(WRITES_PER_PROCESS):
            write(Path(final), f"{tag}-{i}")
    except BaseException as exc:          # reported to the parent, which fails the test
        errors.put(f"{tag}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "locked-fallback"])
def test_two_processes_replacing_one_plan(tmp_path, use_exchange):
    final = tmp_path / "plan"
    write(final, "first")
    run_two_writers(_writer, str(final), use_exchange)
    assert_whole_plan(final, {f"{t}-{WRITES_PER_PROCESS - 1}" for t in "ab"})
    assert leftovers(final) == []


STEPS = ["_move", "_exchange", "_remove_tree"]


def _interrupting(real, after: bool):
    """Wrap a step so that it raises KeyboardInterrupt, before or after doing its work."""
    def step(*args):
        if after:
            real(*args)
        raise KeyboardInterrupt
    return step


@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "locked-fallback"])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("after", [False, True], ids=["before-step", "after-step"])
@pytest.mark.parametrize("nth", [1, 2])
def test_interrupt_at_every_step_of_a_replace(tmp_path, monkeypatch, use_exchange, step, after, nth):
    final = tmp_path / "plan"
    write(final, "old")
    if not use_exchange:
        monkeypatch.setattr(atomic_dir, "_exchange", lambda first, second: False)
    real, calls = getattr(atomic_dir, step), []

    def counted(*args):
        calls.append(args)
        if len(calls) == nth:
            return _interrupting(real, after)(*args)
        return real(*args)

    monkeypatch.setattr(atomic_dir, step, counted)
    try:
        write(final, "new")
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert_whole_plan(final, {"old", "new"})
    if step == "_remove_tree":
        # Interrupted while deleting the old copy: the next writer (a new process) deletes the rest.
        monkeypatch.setattr(atomic_dir, "_alive", lambda pid: False)
        atomic_dir.remove_leftovers(final)
        assert_whole_plan(final, {"old", "new"})
    assert leftovers(final) == []


def test_interrupt_while_writing_the_new_plan(tmp_path):
    final = tmp_path / "plan"
    write(final, "old")

    def write_into(staging: Path) -> None:
        (staging / "plan.json").write_text("{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_dir(final, write_into, may_replace=is_plan_dir)
    assert_whole_plan(final, {"old"})
    assert leftovers(final) == []


def test_a_killed_writers_leftovers_are_cleaned_by_the_next_writer(tmp_path):
    final = tmp_path / "plan"
    write(final, "old")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f".plan.tmp-{dead}-abc").mkdir()
    (tmp_path / f".plan.tmp-{dead}-abc" / "plan.json").write_text("{}")
    (tmp_path / "plan.tmp-keep").mkdir()               # not our name shape: never touched
    write(final, "new")
    assert_whole_plan(final, {"new"})
    assert leftovers(final) == []
    assert (tmp_path / "plan.tmp-keep").is_dir()


def test_a_plan_moved_aside_by_a_killed_writer_is_restored(tmp_path):
    final = tmp_path / "plan"
    write(final, "old")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    os.rename(final, tmp_path / f".plan.old-{dead}-xyz")   # killed between its two renames
    atomic_dir.remove_leftovers(final)
    assert_whole_plan(final, {"old"})


def _cache_writer(final: str, tag: str, errors) -> None:
    def write_into(staging: Path) -> None:
        (staging / "model.safetensors").write_bytes(tag.encode() * 1000)
    try:
        for _ in range(20):
            publish_dir(Path(final), write_into, may_replace=lambda _: False, keep_existing=True)
    except BaseException as exc:
        errors.put(f"{tag}: {type(exc).__name__}: {exc}")


def test_two_processes_filling_one_cache(tmp_path):
    """The GGUF conversion cache: the first writer wins, the other drops its copy, no staging is left."""
    final = tmp_path / "cache" / "smollm2-abc"
    run_two_writers(_cache_writer, str(final))
    assert (final / "model.safetensors").read_bytes() in (b"a" * 1000, b"b" * 1000)
    assert leftovers(final) == []


def test_a_file_at_the_path_is_never_replaced(tmp_path):
    final = tmp_path / "plan"
    final.write_text("mine")
    with pytest.raises(atomic_dir.DirectoryInUse):
        write(final, "new")
    assert final.read_text() == "mine"
    assert leftovers(final) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)])
def test_a_published_directory_follows_the_umask_like_mkdir(tmp_path, umask, mode):
    """mkdtemp's private 0700 is not kept: under the usual umask the group can read a plan."""
    previous = os.umask(umask)
    try:
        final = publish_dir(tmp_path / "plan", lambda d: (d / "plan.json").write_text("{}"),
                            may_replace=lambda _: False)
    finally:
        os.umask(previous)
    assert final.stat().st_mode & 0o777 == mode
