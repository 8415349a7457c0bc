"""Byte-deterministic WebDataset shard writing.

`tarfile` with fixed metadata (mtime 0, uid/gid 0, empty owner names, mode
0644, ustar format) and entries in a fixed order, so the same samples always
give the same tar bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, compact separators, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class ShardWriter:
    """Writes samples into `dir/shard-000000.tar`, `shard-000001.tar`, ... of at most `maxcount` each."""

    def __init__(self, directory: str | Path, maxcount: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.maxcount = max(1, maxcount)
        self.shards: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _next(self) -> None:
        self.close()
        path = self.dir / f"shard-{len(self.shards):06d}.tar"
        self.shards.append(path)
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def write(self, key: str, entries: dict[str, bytes]) -> None:
        """Add one sample: `entries` maps extension ("jpg", "json", "mask.png") to bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key must not contain '.' or '/': {key!r}")
        if self._tar is None or self._count >= self.maxcount:
            self._next()
        assert self._tar is not None
        for ext in sorted(entries):
            data = entries[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
