"""Reading shards for validation: every shard of a corpus (in any layout
`peflow.data.formats.find_corpus` resolves), its raw samples through
webdataset (the same grouping into samples the readers in
`peflow.data.formats` use), and a structural check that catches what
webdataset's stream reader passes over quietly: a shard cut off mid-way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from peflow.data.formats import KINDS


def find_shards(root: Path, kinds: Sequence[str] = KINDS) -> list[tuple[str, str, str]]:
    """(kind, split, shard path relative to root) of every shard of `kinds`, in kind/split/name order.

    Any layout `peflow.data.formats.find_corpus` resolves (canonical, split folders, a flat folder
    of shards, a splits.json manifest); FileNotFoundError when there is no shard of `kinds`."""
    from peflow.data.formats import find_corpus

    root = Path(root)
    return [(kind, split, Path(path).relative_to(root).as_posix())
            for kind, splits in find_corpus(root, kinds).items()
            for split, paths in splits.items() for path in paths]


def iter_raw(path: str, *, check: bool = True) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """(raw webdataset sample, None) in shard order; a read error ends with (None, error text).

    webdataset's stream reader stops quietly at a cut-off member, so with
    `check` a local shard's structure is also checked (`tar_error`)."""
    import webdataset as wds

    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False  # end this shard: what follows the error cannot be trusted

    for raw in wds.tarfile_to_samples(handler=stop)([{"url": path}]):
        yield raw, None
    if errors:
        e = errors[0]
        yield None, f"{type(e).__name__}: {e.args[0] if e.args else e}"
    elif check and os.path.isfile(path) and (error := tar_error(path)):
        yield None, error


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # base-256 (GNU) for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.rstrip(b"\0 ").strip() or b"0", 8)


def tar_error(path: str) -> str | None:
    """Why a local tar file is cut off or malformed, or None.

    Walks the 512-byte headers by their size fields (no member is read). A tar
    ends with two zero blocks; without them a shard cut at a member boundary
    would look complete, so their absence counts as truncation."""
    size = os.path.getsize(path)
    pos = 0
    with open(path, "rb") as f:
        while True:
            f.seek(pos)
            block = f.read(512)
            if len(block) < 512:
                return f"truncated: no end-of-archive marker ({size} bytes, header expected at byte {pos})"
            if not any(block):
                rest = f.read(512)
                return None if len(rest) == 512 and not any(rest) else (
                    f"truncated: incomplete end-of-archive marker at byte {pos}")
            try:
                n = _octal(block[124:136])
            except ValueError:
                return f"corrupt tar header at byte {pos}"
            pos += 512 + -(-n // 512) * 512
            if pos > size:
                name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                return f"truncated: {name} needs {pos} bytes, the file has {size}"
