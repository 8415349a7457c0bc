"""Corpus factories for the validation tests: a copy of a clean corpus (the
`tiny_corpus` fixture) with known damage (corrupt jpg, truncated mp4, empty caption,
invalid UTF-8 caption, unknown label, duplicate key), each with the
quarantine reasons it must produce.

The damage is done with `tarfile` directly (not with peflow's writers), so the
fixture does not share code with what it tests.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

#: (kind, split, shard, sample index in shard, damage) -> the reasons validate must give
DAMAGE = (
    ("image", "train", "shard-000000.tar", 3, "corrupt_jpg", ["media_undecodable"]),
    ("image", "train", "shard-000000.tar", 7, "empty_caption", ["caption_missing"]),
    ("image", "train", "shard-000001.tar", 2, "invalid_utf8_caption", ["caption_not_utf8"]),
    ("image", "test", "shard-000000.tar", 5, "unknown_label", ["label_unknown"]),
    ("video", "train", "shard-000000.tar", 4, "truncated_mp4", ["media_undecodable"]),
    ("video", "val", "shard-000000.tar", 1, "empty_caption_fields", ["caption_missing"]),
)
#: a copy of image/train/shard-000000.tar sample 10 appended to image/val: the copy is quarantined
DUPLICATE = ("image", "train", "shard-000000.tar", 10, "val", ["duplicate_key"])


def _read(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def _write(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _keys(members: list[tuple[str, bytes]]) -> list[str]:
    return list(dict.fromkeys(name.split(".", 1)[0] for name, _ in members))


def _damage(entries: dict[str, bytes], how: str) -> dict[str, bytes]:
    if how == "corrupt_jpg":
        data = entries["jpg"]
        return {**entries, "jpg": data[:20] + bytes(b ^ 0x5A for b in data[20:])}
    if how == "empty_caption":
        return {**entries, "txt": b"   "}
    if how == "invalid_utf8_caption":
        return {**entries, "txt": b"a red circle \xff\xfe on the left"}
    if how == "unknown_label":
        meta = json.loads(entries["json"])
        meta["label"] = "dodecahedron"
        return {**entries, "json": json.dumps(meta).encode()}
    if how == "truncated_mp4":
        return {**entries, "mp4": entries["mp4"][: len(entries["mp4"]) // 2]}
    if how == "empty_caption_fields":
        meta = json.loads(entries["json"])
        meta.update(title="", description=" ", human_caption=None, model_caption=None)
        return {**entries, "json": json.dumps(meta).encode()}
    raise ValueError(how)


def _samples(members: list[tuple[str, bytes]]) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        out.setdefault(key, {})[ext] = data
    return out


def _flatten(samples: dict[str, dict[str, bytes]], order: list[str]) -> list[tuple[str, bytes]]:
    return [(f"{k}.{ext}", samples[k][ext]) for k in order for ext in sorted(samples[k])]


def make_bad_corpus(clean: Path, out: Path) -> list[dict]:
    """Copy `clean` to `out` and damage it; returns the expected quarantine:
    [{"kind", "split", "shard", "key", "reasons"}] (shard relative to `out`)."""
    shutil.copytree(clean, out)
    expected = []
    for kind, split, shard, index, how, reasons in DAMAGE:
        path = out / kind / split / shard
        members = _read(path)
        order = _keys(members)
        samples = _samples(members)
        key = order[index]
        samples[key] = _damage(samples[key], how)
        _write(path, _flatten(samples, order))
        expected.append({"kind": kind, "split": split, "shard": f"{kind}/{split}/{shard}", "key": key,
                         "reasons": reasons})
    kind, split, shard, index, into, reasons = DUPLICATE
    src = _read(out / kind / split / shard)
    key = _keys(src)[index]
    dst = sorted((out / kind / into).glob("*.tar"))[-1]
    _write(dst, _read(dst) + [(n, d) for n, d in src if n.split(".", 1)[0] == key])
    expected.append({"kind": kind, "split": into, "shard": f"{kind}/{into}/{dst.name}", "key": key,
                     "reasons": reasons})
    return expected


def shard_samples(root: Path) -> dict[tuple[str, str], list[tuple[str, dict[str, bytes]]]]:
    """{(kind, split): [(key, entries)] in shard order} of a corpus folder."""
    out: dict[tuple[str, str], list[tuple[str, dict[str, bytes]]]] = {}
    for kind in ("image", "video"):
        for split_dir in sorted(p for p in (root / kind).iterdir() if p.is_dir()):
            items = out.setdefault((kind, split_dir.name), [])
            for path in sorted(split_dir.glob("*.tar")):
                members = _read(path)
                samples = _samples(members)
                items.extend((k, samples[k]) for k in _keys(members))
    return out
