"""Datasets a run makes go into DVC: the cache of the project's DVC repo and its default remote.

After a dataset stage (registry entry `dataset=True`: synth, validate) publishes
its output, the stage runner calls `push`: the folder is hashed as DVC hashes it
(the `<md5>.dir` the runs record as `dvc.<name>.md5`), committed to the repo's
DVC cache and pushed to its default remote, and a pointer file
`<output>.dvc` (the same `outs:` entry `dvc add` writes) is written beside the
output folder. Any user of that repo then gets the dataset of any run back:

    cp $PEFLOW_HOME/runs/<run>/validate.dvc data/validate.dvc && dvc pull data/validate.dvc

The DVC repo is `$PEFLOW_DVC_REPO` (empty: push nothing), else the folder
holding `.dvc/` above the working directory, else the peflow checkout; with
none, or with no default remote, nothing is pushed and the stage goes on (the
dataset is still in the output store).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def dvc_root() -> Path | None:
    """The DVC repo datasets are pushed to, or None (`PEFLOW_DVC_REPO=""` turns pushing off)."""
    if "PEFLOW_DVC_REPO" in os.environ:
        value = os.environ["PEFLOW_DVC_REPO"]
        return Path(value) if value and (Path(value) / ".dvc").is_dir() else None
    checkout = Path(__file__).resolve().parents[2]
    for folder in (Path.cwd(), *Path.cwd().parents, checkout):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def pointer(md5: str, name: str, *, size: int, nfiles: int) -> dict[str, Any]:
    """The `.dvc` file of a folder, as `dvc add` writes it."""
    return {"outs": [{"md5": md5, "size": size, "nfiles": nfiles, "hash": "md5", "path": name}]}


def push(path: str | Path, *, root: Path | None = None) -> str | None:
    """Commit the folder `path` to the DVC cache of `root` (default: `dvc_root()`), push it to the
    repo's default remote and write `<path>.dvc`; returns the md5 (`<md5>.dir`), or None when
    there is no repo or remote to push to."""
    import yaml
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.tree import Tree
    from dvc_data.hashfile.transfer import transfer
    from dvc_objects.fs.local import LocalFileSystem

    if os.environ.get("DVC_STAGE"):  # inside `dvc repro`: DVC caches and pushes this output itself
        return None
    root = root or dvc_root()
    if root is None:
        return None
    path = Path(path).resolve()
    with Repo(str(root)) as repo:
        if not repo.config["core"].get("remote"):
            log.warning("DVC repo %s has no default remote: %s not pushed", root, path)
            return None
        cache = repo.cache.local
        staging, meta, obj = build(cache, str(path), LocalFileSystem(), "md5")
        transfer(staging, cache, {obj.hash_info}, shallow=False, hardlink=True)
        # the folder's .dir object and every file object it lists, as `dvc push` collects them
        ids = {obj.hash_info, *(oid for _, _, oid in obj)} if isinstance(obj, Tree) else {obj.hash_info}
        result = repo.cloud.push(ids)
        if result.failed:
            raise RuntimeError(f"dvc push of {path} failed for {len(result.failed)} object(s)")
    md5 = obj.hash_info.value
    doc = pointer(md5, path.name, size=meta.size or 0, nfiles=meta.nfiles or 0)
    from peflow.io import write_text_atomic

    write_text_atomic(path.with_name(path.name + ".dvc"), yaml.safe_dump(doc, sort_keys=False))
    return md5
