"""`s3://` URIs wherever a stage input or output path goes.

A stage never works on S3 directly: the stage runner pulls a remote input
folder into a local cache and runs the stage into a local staging folder,
then publishes it to its `s3://` output on success. Publishing is atomic for
readers: a peflow output is published when its `manifest.json` is there, and
the manifest is removed first and uploaded last, so a reader sees the old
output, no output, or the whole new one, never a mix (the manifest lists
every file with its SHA-256). A remote folder without a manifest (a corpus
someone uploaded) is read as it is, its digest taken from the object
listing (key, size, ETag).

Training shards can also be streamed instead of pulled: `open_binary` gives a
seekable file over ranged GETs (peflow.train.data reads shards by offset),
and `expand` lists the shards a glob or brace pattern names.

The endpoint, region and credentials come from the environment as for any
AWS client (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3` for an S3-compatible
server such as MinIO or moto, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`). The local cache is `$PEFLOW_HOME/remote/<bucket>/<key>`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from peflow import io

SCHEME = "s3://"
#: Beside a pulled folder: the URI and remote digest it was pulled from.
PULLED = ".remote.json"


def is_remote(path: Any) -> bool:
    """Whether `path` is an `s3://` URI (the only remote scheme peflow reads and writes)."""
    return isinstance(path, str) and path.startswith(SCHEME)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """`base` joined with `parts`: '/'-joined for a URI, os.path.join for a local path."""
    base = os.fspath(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def name(path: str | os.PathLike[str]) -> str:
    """The last part of a path or URI."""
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def local_path(uri: str) -> Path:
    """Where the local copy of `uri` lives (pulled inputs, staged outputs)."""
    home = Path(os.environ.get("PEFLOW_HOME", ".run")).resolve()
    return home / "remote" / uri.removeprefix(SCHEME).strip("/")


def localize(path: str) -> str:
    """A local path for `path`: itself when local, its local copy's path when remote."""
    return str(local_path(path)) if is_remote(path) else path


def filesystem() -> Any:
    """The S3 filesystem (s3fs) with the environment's endpoint; listings are never cached,
    so what another process wrote is seen at once."""
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False, skip_instance_cache=True)


def _key(uri: str) -> str:
    return uri.removeprefix(SCHEME).rstrip("/")


def _stamp(info: dict[str, Any]) -> str:
    """What identifies an object's content in a listing: size and ETag."""
    return f"{int(info.get('size') or 0)}:{str(info.get('ETag', '')).strip(chr(34))}"


def listing(uri: str, fs: Any = None) -> dict[str, str]:
    """Every object under the folder `uri`: relative path -> its size and ETag (`_stamp`)."""
    fs = fs or filesystem()
    root = _key(uri)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {k[len(root) + 1:]: _stamp(v)
            for k, v in sorted(found.items()) if v.get("type") != "directory" and k.startswith(root + "/")}


def read_bytes(uri: str, fs: Any = None) -> bytes | None:
    """The bytes of the object `uri`, or None when there is none."""
    fs = fs or filesystem()
    try:
        with fs.open(_key(uri), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_json(uri: str, fs: Any = None) -> Any:
    """The JSON object at `uri`, or None when there is none."""
    data = read_bytes(uri, fs)
    return None if data is None else json.loads(data)


def manifest(uri: str, fs: Any = None) -> dict[str, Any] | None:
    """The published manifest of the folder `uri`, or None (not published)."""
    return read_json(join(uri, io.MANIFEST), fs)


def digest(uri: str, fs: Any = None) -> str:
    """The content digest of a remote input: a peflow folder's `output_digest` (as
    `io.dataset_digest` gives for a local one), else one hash of the listing (path, size, ETag)
    of the folder, or of the objects a glob/brace pattern names. FileNotFoundError when nothing is there."""
    fs = fs or filesystem()
    if any(c in uri for c in "*?[{"):
        return io.digest({u: _stamp(fs.info(_key(u))) for u in expand(uri, fs)})
    m = manifest(uri, fs)
    if m is not None and "output_digest" in m:
        return m["output_digest"]
    rows = listing(uri, fs)
    if not rows:
        if fs.exists(_key(uri)):  # a single object
            return hashlib.sha256(_stamp(fs.info(_key(uri))).encode()).hexdigest()
        raise FileNotFoundError(f"{uri}: no such object or folder")
    return io.digest(rows)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside `path`: processes on one host (torchrun replicas) pull it one at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pull(uri: str, fs: Any = None) -> Path:
    """The folder (or single object, e.g. a checkpoint file) `uri` as a local copy at `local_path(uri)`,
    downloaded unless the copy there was pulled from the same content; the download is atomic.
    FileNotFoundError when absent."""
    fs = fs or filesystem()
    dest = local_path(uri)
    want = digest(uri, fs)
    marker = dest.with_name(dest.name + PULLED)
    with _locked(dest):
        if dest.exists() and marker.is_file() and io.read_json(marker).get("digest") == want:
            return dest
        objects = listing(uri, fs)
        if not objects:  # one object: a file
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
            fs.get_file(_key(uri), str(tmp))
            os.replace(tmp, dest)
            io.write_json_atomic(marker, {"uri": uri, "digest": want})
            return dest
        with io.atomic_output_dir(dest) as staging:
            for rel in objects:
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{_key(uri)}/{rel}", str(target))
        io.write_json_atomic(marker, {"uri": uri, "digest": want})
    return dest


def publish(local: str | Path, uri: str, fs: Any = None) -> None:
    """Upload the folder `local` to `uri`, replacing what is there: the old manifest goes first,
    then every file but the manifest is uploaded, objects the new output does not have are
    removed, and the manifest is uploaded last (what makes the output published)."""
    fs = fs or filesystem()
    local, root = Path(local), _key(uri)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(f"{root}/{io.MANIFEST}")
    for rel in files:
        if rel != io.MANIFEST:
            fs.put_file(str(local / rel), f"{root}/{rel}")
    stale = [f"{root}/{rel}" for rel in listing(uri, fs) if rel not in files]
    if stale:
        fs.rm(stale)
    if io.MANIFEST in files:
        fs.put_file(str(local / io.MANIFEST), f"{root}/{io.MANIFEST}")
    marker = local.with_name(local.name + PULLED)
    if local == local_path(uri) and (local / io.MANIFEST).is_file():  # the local copy is that content now
        io.write_json_atomic(marker, {"uri": uri, "digest": io.dataset_digest(local)})


def upload_file(path: str | Path, uri: str, fs: Any = None) -> None:
    """One local file to the object `uri`."""
    (fs or filesystem()).put_file(str(path), _key(uri))


def exists(uri: str, fs: Any = None) -> bool:
    """Whether `uri` is an object or a folder holding objects."""
    fs = fs or filesystem()
    return bool(fs.exists(_key(uri)) or listing(uri, fs))


def expand(pattern: str, fs: Any = None) -> list[str]:
    """The object URIs a brace pattern ('s3://b/c/{000..009}.tar', kept in order) or a glob
    ('s3://b/c/*.tar', sorted) names; FileNotFoundError when a glob matches nothing."""
    if "{" in pattern:
        import braceexpand

        return [u for p in braceexpand.braceexpand(pattern) for u in expand(p, fs)]
    if not any(c in pattern for c in "*?["):
        return [pattern]
    fs = fs or filesystem()
    found = sorted(SCHEME + k for k in fs.glob(_key(pattern)))
    if not found:
        raise FileNotFoundError(f"no objects match {pattern!r}")
    return found


def tar_shards(uri: str, fs: Any = None) -> list[str]:
    """The `*.tar` objects under the folder `uri`, sorted."""
    return [join(uri, rel) for rel in listing(uri, fs) if rel.endswith(".tar")]


def open_binary(uri: str, fs: Any = None) -> BinaryIO:
    """A seekable binary file over the object `uri` (ranged GETs, read-ahead blocks)."""
    return (fs or filesystem()).open(_key(uri), "rb", block_size=1 << 22, cache_type="readahead")
