"""The output store: every stage output ever published, by output key (like DVC's run cache).

`<root>/<stage>/<key>/` holds a hard-linked copy of a published stage output
(a plain copy where hard links cannot be made); any later run that needs that
stage with the same key (config, input digests, code version) reuses it
instead of running the stage again, in whatever output folder it runs.
Entries are immutable: they are built in a staging folder and renamed into
place. Root: `$PEFLOW_STORE`, else `$PEFLOW_HOME/store` (`.run/store`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from peflow import io


def root() -> Path:
    """The store's folder."""
    if os.environ.get("PEFLOW_STORE"):
        return Path(os.environ["PEFLOW_STORE"]).resolve()
    return Path(os.environ.get("PEFLOW_HOME", ".run")).resolve() / "store"


def entry(stage: str, key: str) -> Path:
    return root() / stage / key


def find(stage: str, key: str) -> Path | None:
    """The stored output of `stage` with `key`, or None."""
    path = entry(stage, key)
    return path if (path / io.MANIFEST).is_file() else None


def link_tree(src: Path, dest: Path) -> None:
    """Recreate the files of `src` under the existing folder `dest`, hard-linked where possible."""
    for p in sorted(src.rglob("*")):
        target = dest / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target)
        except OSError:
            shutil.copy2(p, target)


def put(out: str | Path, stage: str, key: str) -> Path:
    """Add the published output folder `out` to the store (no-op when the key is there already)."""
    dest = entry(stage, key)
    if find(stage, key) is not None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_output_dir(dest) as staging:
        link_tree(Path(out), staging)
    return dest


def materialize(stored: Path, out: str | Path) -> Path:
    """Publish a stored output at `out` (atomically replacing what is there)."""
    with io.atomic_output_dir(out) as staging:
        link_tree(stored, staging)
    return Path(out)
