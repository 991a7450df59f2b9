"""The plan's integrity record: manifest.json, the sha256 of every file the compiler wrote.

A plan directory holds code that runs at bind time (decode_graph.py, kernels/*.py) and the numbers
that size the KV store (plan.json). The manifest lists a digest for each of them, plan.json
included, and a digest of that list, so an edited, truncated, swapped or deleted file is refused
by `load_plan` before anything in the plan is read or run. It guards against accidents and stale
edits, not against someone who rewrites the manifest on purpose (that needs a signature).
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
from pathlib import Path, PurePosixPath
from typing import Any

from specontext_compiler.errors import PlanError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "specontext-plan-manifest/1"
PLAN_FILE = "plan.json"


def plan_manifest(plan_json: str, files: dict[str, str | bytes]) -> dict[str, str]:
    """{MANIFEST_FILE: text} for a plan about to be written: plan.json's text plus `files`.

    Text is hashed as UTF-8, the encoding the plan writer uses; the caller adds the returned
    entry to `files` before writing the directory.
    """
    digests = {rel: _sha256(_as_bytes(content)) for rel, content in files.items() if rel != MANIFEST_FILE}
    digests[PLAN_FILE] = _sha256(_as_bytes(plan_json))
    listing = dict(sorted(digests.items()))
    record = {"format": MANIFEST_FORMAT, "files": listing, "sha256": _listing_digest(listing)}
    return {MANIFEST_FILE: json.dumps(record, indent=2) + "\n"}


def verify_plan_files(directory: str | Path) -> list[str]:
    """Refuse (PlanError, one line) a plan directory whose files differ from its manifest.

    Returns the files the manifest lists (paths relative to the plan directory)."""
    directory = Path(directory)
    listing = _read_manifest(directory)
    for rel, expected in listing.items():
        path = directory / _safe_relative(rel, directory)
        if not path.is_file():
            raise PlanError(f"{path} is missing from the plan (listed in {MANIFEST_FILE}); "
                            "recompile the plan with `specontext compile`")
        if _sha256(path.read_bytes()) != expected:
            raise PlanError(f"{path} was changed after compilation (its sha256 differs from {MANIFEST_FILE}); "
                            "recompile the plan with `specontext compile`")
    return list(listing)


def spec_for_verified_source(module_name: str, path: str | Path, sha256: str):
    """An import spec that compiles exactly the bytes whose digest is sha256, never a __pycache__ copy.

    A cached .pyc is trusted by Python on the source's size and mtime alone, so a planted one would
    run in place of the checked file; and the file could change between the check and the import.
    """
    loader = _VerifiedSourceLoader(module_name, str(path), sha256)
    return importlib.util.spec_from_file_location(module_name, str(path), loader=loader)


class _VerifiedSourceLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname: str, path: str, sha256: str):
        super().__init__(fullname, path)
        self.sha256 = sha256

    def path_stats(self, path):
        raise OSError("plan code is compiled from its checked source, not from a bytecode cache")

    def get_data(self, path):
        data = super().get_data(path)
        if path == self.path and _sha256(data) != self.sha256:
            raise PlanError(f"{path} changed while the plan was loading; recompile the plan with `specontext compile`")
        return data


def _read_manifest(directory: Path) -> dict[str, str]:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise PlanError(f"{directory} has no {MANIFEST_FILE} (the record of what the compiler wrote); "
                        "it was removed or the plan predates it: recompile the plan with `specontext compile`")
    try:
        record = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    listing = record.get("files") if isinstance(record, dict) else None
    if (not isinstance(listing, dict) or record.get("format") != MANIFEST_FORMAT
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in listing.items())):
        raise PlanError(f"{path} is corrupted or of an unknown format; recompile the plan with `specontext compile`")
    if record.get("sha256") != _listing_digest(listing):
        raise PlanError(f"{path} was changed after compilation (its own digest does not match its list); "
                        "recompile the plan with `specontext compile`")
    if PLAN_FILE not in listing:
        raise PlanError(f"{path} does not cover {PLAN_FILE}; recompile the plan with `specontext compile`")
    return listing


def _safe_relative(rel: str, directory: Path) -> PurePosixPath:
    """A manifest entry must name a file inside the plan directory."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise PlanError(f"{directory / MANIFEST_FILE} names {rel!r}, outside the plan directory; "
                        "recompile the plan with `specontext compile`")
    return pure


def _listing_digest(listing: dict[str, Any]) -> str:
    return _sha256(json.dumps(listing, sort_keys=True, separators=(",", ":")).encode())


def _as_bytes(content: str | bytes) -> bytes:
    if not isinstance(content, (str, bytes)):
        raise TypeError(f"a plan file's content must be str or bytes, not {type(content).__name__}")
    return content if isinstance(content, bytes) else content.encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
