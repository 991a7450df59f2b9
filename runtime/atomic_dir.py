"""Publish a directory atomically, next to where it goes, without ever removing what is not ours.

A plan directory (and the GGUF conversion cache) is built in a staging directory beside its final
path and then swapped in with one rename, so a reader sees the old whole directory or the new
whole directory, never a mix, never nothing:

- no directory there yet (or an empty one): `rename(staging, final)`; rename refuses a non-empty
  target, so a directory that appeared meanwhile is never clobbered;
- an existing directory that `may_replace` accepts: Linux's `renameat2(RENAME_EXCHANGE)` swaps the
  two in one step, then the staging name (now holding the old content) is removed. Where the OS or
  file system has no exchange, the old directory is moved aside and the new one moved in under an
  advisory lock, and an interrupted swap is rolled back.

Staging names carry the writer's PID (`.NAME.tmp-PID-XXXX`), so a later writer removes what a
killed writer left behind, and only that: names of other shapes are never touched.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import secrets
import sys
from pathlib import Path
from typing import Callable, Iterator

_STAGING = "tmp"   # a directory being written, or (after an exchange) the old one being removed
_ASIDE = "old"     # the old directory moved aside by the fallback swap

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class DirectoryInUse(Exception):
    """A path that may not be replaced; the message is the reason, worded to follow \"... to PATH: \"."""


def publish_dir(final: Path, write_into: Callable[[Path], None], *,
                may_replace: Callable[[Path], bool], keep_existing: bool = False) -> Path:
    """Build a directory with `write_into(staging)` and publish it at `final` atomically.

    keep_existing: when `final` already exists (e.g. a cache another process filled first),
    keep it and discard what was built. Otherwise an existing non-empty `final` is replaced only
    if `may_replace(final)`; else DirectoryInUse is raised before anything is written.
    """
    final = Path(final).absolute()
    if not keep_existing:
        check_replaceable(final, may_replace)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    staging = _new_dir(final, _STAGING)
    try:
        write_into(staging)
        if not _move_into_place(staging, final):
            if keep_existing:
                return final
            check_replaceable(final, may_replace)
            _replace(staging, final)
    finally:
        _remove_tree(staging)
    return final


def check_replaceable(final: Path, may_replace: Callable[[Path], bool]) -> None:
    """Raise DirectoryInUse unless `final` is absent, an empty directory, or one `may_replace` accepts.

    Another writer may swap `final` while it is looked at: a path that vanishes or changes inode
    mid-check is looked at again, never judged from a half-seen state.
    """
    for _ in range(100):
        try:
            before = os.lstat(final)
        except (FileNotFoundError, NotADirectoryError):     # absent (or under a file: the caller says so)
            return
        if stat.S_ISLNK(before.st_mode) or not stat.S_ISDIR(before.st_mode):
            raise DirectoryInUse("it exists and is not a directory")
        cwd = Path.cwd().absolute()
        if final == cwd or final in cwd.parents:
            raise DirectoryInUse("it is the current directory or contains it")
        try:
            if not any(final.iterdir()) or may_replace(final):
                return
        except FileNotFoundError:
            continue
        if _inode(final) == before.st_ino:
            raise DirectoryInUse("it is a non-empty directory that specontext did not write")
    raise DirectoryInUse("it keeps changing while being checked")


def nearest_existing(path: Path) -> Path:
    """The path itself if it exists, else its closest existing ancestor (where a mkdir -p starts)."""
    path = Path(path).absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def _inode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except (FileNotFoundError, NotADirectoryError):
        return None


def remove_leftovers(final: Path) -> None:
    """Remove staging directories of writers that died mid-swap; restore an old one moved aside."""
    for path in final.parent.glob(f".{final.name}.*-*-*"):
        kind, pid = _parse_name(final, path)
        if kind is None or _alive(pid):
            continue
        if kind == _ASIDE and not final.exists():
            _move(path, final)           # the writer died between its two renames
        else:
            _remove_tree(path)


def _move_into_place(staging: Path, final: Path) -> bool:
    """rename(staging, final) when nothing non-empty is there; False if something is."""
    try:
        _move(staging, final)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            return False
        raise


def _replace(staging: Path, final: Path) -> None:
    """Swap staging and final in one step where the OS can; else a locked two-rename swap."""
    if _exchange(staging, final):
        return                           # staging now holds the old content; the caller removes it
    with _lock(final):
        aside = _new_dir(final, _ASIDE)
        os.rmdir(aside)                  # only the unique name is wanted
        try:
            _move(final, aside)
            # False when a writer that found no directory published into the gap: its copy stands.
            _move_into_place(staging, final)
        except BaseException:
            if not final.exists() and aside.exists():
                _move(aside, final)      # put the old directory back before the error goes up
            raise
        _remove_tree(aside)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False                     # old kernel or a file system without exchange
    raise OSError(code, os.strerror(code), str(second))


def _move(source: Path, destination: Path) -> None:
    os.rename(source, destination)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _lock(final: Path) -> Iterator[None]:
    """An advisory lock beside `final` that serializes the fallback swap between processes."""
    try:
        import fcntl
    except ImportError:                  # no flock: the swap is still rolled back on error
        yield
        return
    with open(final.parent / f".{final.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _new_dir(final: Path, kind: str) -> Path:
    """A new directory beside `final` named `.NAME.KIND-PID-XXXXXXXX`.

    Made with plain mkdir, so it gets the mode mkdir gives under the user's umask (a plan is
    readable by the group like the files in it), not mkdtemp's private 0700.
    """
    while True:
        path = final.parent / f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _parse_name(final: Path, path: Path) -> tuple[str | None, int]:
    rest = path.name[len(final.name) + 2:]          # after ".NAME."
    kind, _, tail = rest.partition("-")
    pid, _, _ = tail.partition("-")
    if kind not in (_STAGING, _ASIDE) or not pid.isdigit() or not path.is_dir():
        return None, 0
    return kind, int(pid)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True                      # this process's own swap is still on the stack
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC
