"""Atomic outputs, hashes and the per-stage manifest.

Every stage writes into a fresh sibling folder and renames it into place only
when complete, so a killed stage never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
METRICS = "metrics.json"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_hashes(root: str | Path, *, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """SHA-256 of every file under `root`, keyed by POSIX relative path, sorted."""
    root = Path(root)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = file_sha256(p)
    return out


def digest(hashes: Mapping[str, str]) -> str:
    """One hash for a whole folder, from its per-file hashes."""
    h = hashlib.sha256()
    for rel, sha in sorted(hashes.items()):
        h.update(f"{rel}\0{sha}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set environment variables for the block (a None value leaves that variable as it is),
    then restore them. Child processes started inside the block inherit them."""
    values = {k: v for k, v in values.items() if v is not None}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out`.

    On an exception (or Ctrl-C) the staging folder is removed and `out` is left
    exactly as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.with_name(f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(
    out_dir: str | Path,
    *,
    stage: str,
    config: Mapping[str, Any],
    key: str | None = None,
    inputs: Mapping[str, str] | None = None,
    counts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `manifest.json`: stage, output key, config, input hashes, counts and output hashes."""
    out_dir = Path(out_dir)
    outputs = tree_hashes(out_dir)
    manifest = {
        "stage": stage,
        "key": key,
        "config": dict(config),
        "inputs": dict(inputs or {}),
        "counts": dict(counts or {}),
        "outputs": outputs,
        "output_digest": digest(outputs),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def dataset_digest(path: str | Path) -> str:
    """The content digest of a dataset folder (its manifest's, or computed)."""
    path = Path(path)
    mpath = path / MANIFEST
    if mpath.is_file():
        m = read_json(mpath)
        if "output_digest" in m:
            return m["output_digest"]
    return digest(tree_hashes(path))


def dvc_md5(path: str | Path) -> str:
    """The hash DVC records for `path` (`<md5>.dir` for a folder), as in dvc.lock.

    Computed with DVC's own hashing (dvc-data), without a DVC repo or cache.
    """
    import tempfile

    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, obj = build(HashFileDB(fs, tmp), str(Path(path).resolve()), fs, "md5", dry_run=True)
    return obj.hash_info.value
