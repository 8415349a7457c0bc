"""Readers: the built-in corpus, LAION-style image-text shards, PE Video Dataset tars, bad data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from peflow.data import formats
from peflow.data.synth.video import encode_mp4


def _tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def _image_bytes(fmt: str, size=(40, 30), colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _frames(t=20, h=32, w=48) -> np.ndarray:
    """Frames whose index can be read back from their brightness."""
    return np.stack([np.full((h, w, 3), 10 + 12 * i, np.uint8) for i in range(t)])


def test_shard_paths_forms(tiny_corpus, tmp_path):
    train = formats.shard_paths(tiny_corpus, "train")
    assert [Path(p).name for p in train] == ["shard-000000.tar", "shard-000001.tar"]
    assert formats.shard_paths(tiny_corpus / "image", "train") == train
    assert formats.shard_paths(tiny_corpus / "image" / "train") == train
    assert formats.shard_paths(str(tiny_corpus / "image" / "train" / "*.tar")) == train
    assert formats.shard_paths(str(tiny_corpus / "image" / "train" / "shard-{000000..000001}.tar")) == train
    assert formats.shard_paths(train) == train
    assert len(formats.shard_paths(tiny_corpus, "train", kind="video")) == 2
    assert formats.shard_paths("pipe:cat x.tar") == ["pipe:cat x.tar"]
    with pytest.raises(FileNotFoundError, match="nope"):
        formats.shard_paths(tiny_corpus, "nope")
    with pytest.raises(FileNotFoundError):
        formats.shard_paths(str(tmp_path / "*.tar"))


def test_laion_style_shard(tmp_path):
    shard = _tar(tmp_path / "laion-000.tar", [
        ("000000000.jpg", _image_bytes("JPEG")), ("000000000.txt", b"a red square "),
        ("000000001.png", _image_bytes("PNG")),
        ("000000001.json", json.dumps({"caption": "from json", "url": "http://x", "width": 40}).encode()),
        ("000000002.webp", _image_bytes("WEBP")), ("000000002.txt", "caf\u00e9 \u2603".encode()),
    ])
    samples = list(formats.iter_image_text([shard]))
    assert [s["key"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert [s["caption"] for s in samples] == ["a red square", "from json", "caf\u00e9 \u2603"]
    assert samples[0]["meta"] == {} and samples[1]["meta"]["url"] == "http://x"
    for s in samples:
        assert s["image"].mode == "RGB" and s["image"].size == (40, 30)
    with pytest.raises(formats.CorruptSampleError, match="mask.png"):
        next(formats.iter_image_text(shard, with_dense=True))


def test_builtin_dense_targets(tiny_corpus):
    s = next(formats.iter_image_text(formats.shard_paths(tiny_corpus, "val"), with_dense=True))
    assert s["mask"].dtype == np.uint8 and s["mask"].shape == (32, 32) and s["depth"].shape == (32, 32)
    assert s["key"] == "val-0000000" and s["meta"]["key"] == s["key"]


def test_pvd_style_video_shard(tmp_path):
    frames = _frames()
    meta = {"video_id": "abc123", "human_caption": None, "model_caption": "a video", "category": "Hand Actions"}
    shard = _tar(tmp_path / "pvd.tar", [("clip_0.mp4", encode_mp4(frames, 30)),
                                         ("clip_0.json", json.dumps(meta).encode())])
    [v] = list(formats.iter_video(shard))
    assert v["frames"].shape == (20, 32, 48, 3) and v["video_id"] == "abc123" and v["key"] == "clip_0"
    assert (v["model_caption"], v["category"], v["human_caption"]) == ("a video", "Hand Actions", None)
    [v8] = list(formats.iter_video(shard, num_frames=8))
    idx = [int(i * 19 / 7) for i in range(8)]
    assert idx[0] == 0 and idx[-1] == 19
    np.testing.assert_array_equal(v8["frames"], v["frames"][idx])
    brightness = v8["frames"].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(brightness, frames[idx].mean(axis=(1, 2, 3)), atol=3)
    with pytest.raises(formats.CorruptSampleError, match="masks.npy"):
        next(formats.iter_video(shard, with_masks=True))


def test_decode_video_and_indices():
    data = encode_mp4(_frames(t=16, h=16, w=16), 8)
    assert formats.decode_video(data).shape == (16, 16, 16, 3)
    assert formats.decode_video(data, 4).shape == (4, 16, 16, 3)
    assert formats.frame_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 15]
    assert formats.frame_indices(16, 1) == [7]
    assert formats.frame_indices(4, 8) == [0, 0, 0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        encode_mp4(_frames(t=2, h=15, w=16), 8)


def test_builtin_video_masks_follow_sampling(tiny_corpus):
    shards = formats.shard_paths(tiny_corpus, "val", kind="video")
    full = next(formats.iter_video(shards, with_masks=True))
    sub = next(formats.iter_video(shards, num_frames=4, with_masks=True))
    idx = formats.frame_indices(len(full["frames"]), 4)
    np.testing.assert_array_equal(sub["masks"], full["masks"][idx])
    np.testing.assert_array_equal(sub["frames"], full["frames"][idx])


def test_corrupt_sample_names_shard_and_key(tmp_path):
    shard = _tar(tmp_path / "bad.tar", [
        ("a.jpg", _image_bytes("JPEG")), ("a.txt", b"ok"),
        ("b.jpg", b"this is not a jpeg"), ("b.txt", b"broken"),
        ("c.jpg", _image_bytes("JPEG")), ("c.txt", b"ok too"),
    ])
    with pytest.raises(formats.CorruptSampleError) as e:
        list(formats.iter_image_text(shard))
    assert "bad.tar" in str(e.value) and "'b'" in str(e.value)
    assert [s["key"] for s in formats.iter_image_text(shard, on_error="skip")] == ["a", "c"]
    with pytest.raises(ValueError, match="on_error"):
        list(formats.iter_image_text(shard, on_error="ignore"))


def test_corrupt_video_and_json(tmp_path):
    shard = _tar(tmp_path / "badv.tar", [("v.mp4", b"\x00" * 100), ("v.json", b"{}"),
                                         ("w.mp4", encode_mp4(_frames(4, 16, 16), 8)), ("w.json", b"{not json")])
    with pytest.raises(formats.CorruptSampleError, match=r"badv\.tar.*'v'"):
        list(formats.iter_video(shard))
    assert list(formats.iter_video(shard, on_error="skip")) == []


def test_truncated_tar_is_a_clear_error(tiny_corpus, tmp_path):
    data = (tiny_corpus / "image" / "val" / "shard-000000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 3 + 100])
    with pytest.raises(formats.CorruptSampleError, match="cut.tar"):
        list(formats.iter_image_text(str(cut)))


def test_card_and_label_names(tiny_corpus, tmp_path):
    assert formats.label_names(tiny_corpus)[:3] == ["circle", "square", "triangle"]
    assert "rotate" in formats.label_names(tiny_corpus, "video")
    with pytest.raises(FileNotFoundError, match="card.json"):
        formats.load_card(tmp_path)
    with pytest.raises(ValueError):
        formats.label_names(tiny_corpus, "audio")
