"""Corpus layouts `peflow.data.formats.find_corpus` resolves, on data built here
with tarfile, PIL and PyAV (not with peflow's synth or shard writer):

- an img2dataset-style flat folder (`00000.tar`, `00001.tar` of jpg/txt/json,
  with the `00000_stats.json` and `00000.parquet` img2dataset writes beside
  them) of scikit-learn's handwritten digits;
- flat folders whose splits come from the shard names or a splits.json;
- the PE Video Dataset's hub layout: `train/` and `test/` folders of mp4+json
  shards directly under the root;
- the canonical `<kind>/<split>/*.tar` layout, and the errors for folders
  that fit no layout.

The builders are imported by tests/integration/test_validate_stage.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from peflow.data import formats


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def digit_images(n: int, side: int = 32) -> list[tuple[Image.Image, int]]:
    """n (RGB image, digit) pairs: scikit-learn's 8x8 handwritten digits upscaled to `side`
    pixels, or, without scikit-learn, digits drawn with PIL's default font."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        from PIL import ImageDraw

        out = []
        for i in range(n):
            im = Image.new("L", (side, side), 0)
            ImageDraw.Draw(im).text((side // 3, side // 4), str(i % 10), fill=255)
            out.append((im.convert("RGB"), i % 10))
        return out
    digits = load_digits()
    out = []
    for img, target in zip(digits.images[:n], digits.target[:n]):
        im = Image.fromarray((img * (255 / 16)).astype(np.uint8), mode="L").resize((side, side), Image.BICUBIC)
        out.append((im.convert("RGB"), int(target)))
    return out


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_shard(path: Path, first: int, count: int, key_prefix: str = "") -> Path:
    """One img2dataset-style shard: `<key>.jpg`, `<key>.txt`, `<key>.json` per sample."""
    members = []
    for i, (im, digit) in enumerate(digit_images(first + count)[first:], start=first):
        key = f"{key_prefix}{i:09d}"
        caption = f"a handwritten digit {digit}"
        meta = {"key": key, "caption": caption, "status": "success", "width": im.width, "height": im.height}
        members += [(f"{key}.jpg", _jpeg(im)), (f"{key}.txt", caption.encode()),
                    (f"{key}.json", json.dumps(meta).encode())]
    return write_tar(path, members)


def make_img2dataset_folder(root: Path, shards: int = 2, per_shard: int = 12) -> Path:
    """`root/00000.tar`, ... with img2dataset's per-shard `_stats.json` and `.parquet` beside them."""
    for s in range(shards):
        image_shard(root / f"{s:05d}.tar", s * per_shard, per_shard, key_prefix="")
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        (root / f"{s:05d}.parquet").write_bytes(b"PAR1 not read by peflow PAR1")
    return root


def mp4(num_frames: int = 6, side: int = 32, fps: int = 8, seed: int = 0) -> bytes:
    """A tiny H.264 mp4 made with PyAV: a bright square moving over noise."""
    import av

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            arr = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
            arr[4 + i:12 + i, 4 + i:12 + i] = 230
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def video_shard(path: Path, keys: list[str], num_frames: int = 6) -> Path:
    """A PE Video Dataset style shard: `<key>.mp4` + `<key>.json`."""
    members = []
    for i, key in enumerate(keys):
        meta = {"video_id": key, "human_caption": f"a square slides across the frame, clip {i}",
                "model_caption": f"a white square moves diagonally over grey noise ({i})",
                "category": "Object Motion", "num_frames": num_frames}
        members += [(f"{key}.json", json.dumps(meta).encode()), (f"{key}.mp4", mp4(num_frames, seed=i))]
    return write_tar(path, members)


def make_pvd_hub(root: Path) -> Path:
    """`root/train/*.tar` (2 shards) and `root/test/*.tar` (1 shard) of mp4+json, plus a README."""
    video_shard(root / "train" / "train_0000.tar", ["vid_a0", "vid_a1", "vid_a2"])
    video_shard(root / "train" / "train_0001.tar", ["vid_b0", "vid_b1"])
    video_shard(root / "test" / "test_0000.tar", ["vid_c0", "vid_c1"])
    (root / "README.md").write_text("PE Video Dataset style hub layout (test data)\n")
    return root


def _names(splits: dict[str, list[str]], root: Path) -> dict[str, list[str]]:
    return {s: [Path(p).relative_to(root).as_posix() for p in ps] for s, ps in splits.items()}


def test_img2dataset_flat_folder_is_one_train_split_and_reads(tmp_path):
    root = make_img2dataset_folder(tmp_path / "digits", shards=2, per_shard=5)
    assert formats.corpus_layout(root) == "flat"
    assert _names(formats.find_shards(root, "image"), root) == {"train": ["00000.tar", "00001.tar"]}
    assert list(formats.find_corpus(root)) == ["image"]  # parquet and _stats.json are not shards
    samples = list(formats.iter_image_text(formats.shard_paths(root, "train")))
    assert len(samples) == 10 and samples[0]["key"] == "000000000"
    assert all(s["caption"].startswith("a handwritten digit ") and s["image"].size == (32, 32) for s in samples)
    with pytest.raises(FileNotFoundError, match=r"no video shards under .*digits.*it holds image: train"):
        formats.find_shards(root, "video")
    with pytest.raises(FileNotFoundError, match="no image split 'test'.*its image splits: train; layout: flat"):
        formats.shard_paths(root, "test")


def test_split_words_in_flat_shard_names(tmp_path):
    root = tmp_path / "named"
    for name in ("train-0000.tar", "train-0001.tar", "laion_val_0000.tar", "test.0000.tar"):
        image_shard(root / name, 0, 2)
    assert formats.split_words("laion-validation-0003.tar") == ["validation"]
    assert formats.split_words("contest-0000.tar") == [] and formats.split_words("00000.tar") == []
    assert _names(formats.find_shards(root), root) == {
        "test": ["test.0000.tar"], "train": ["train-0000.tar", "train-0001.tar"], "val": ["laion_val_0000.tar"]}
    image_shard(root / "00007.tar", 0, 2)  # names a split for some shards only: refused, not guessed
    with pytest.raises(formats.LayoutError, match=r"named.*some do not \(00007.tar\).*splits.json"):
        formats.find_shards(root)
    (root / "00007.tar").rename(root / "train-test-0.tar")
    with pytest.raises(formats.LayoutError, match="more than one split"):
        formats.find_shards(root)


def test_splits_manifest_wins_and_is_checked(tmp_path):
    root = tmp_path / "manifest"
    for name in ("part-000.tar", "part-001.tar", "part-002.tar", "holdout/h-000.tar"):
        image_shard(root / name, 0, 2)
    (root / "part-000.parquet").write_bytes(b"x")
    manifest = root / "splits.json"
    manifest.write_text(json.dumps({"train": ["part-00[01].tar"], "val": "holdout/*", "test": "part-{002..002}.tar"}))
    assert formats.corpus_layout(root) == "manifest"
    assert _names(formats.find_shards(root), root) == {
        "test": ["part-002.tar"], "train": ["part-000.tar", "part-001.tar"], "val": ["holdout/h-000.tar"]}
    bad = {
        "matches no .tar": {"train": "nothing-*.tar"},
        "is in split 'train' and in 'val'": {"train": "part-*.tar", "val": "part-000.tar"},
        "must be relative": {"train": str(root / "part-000.tar")},
        "not a plain name": {"a/b": "part-000.tar"},
        "expected a pattern or a list": {"train": 3},
    }
    for message, spec in bad.items():
        manifest.write_text(json.dumps(spec))
        with pytest.raises(formats.LayoutError, match=message):
            formats.find_corpus(root)
    manifest.write_text("{not json")
    with pytest.raises(formats.LayoutError, match="not valid JSON"):
        formats.find_corpus(root)


def test_pvd_hub_split_folders_are_video_splits(tmp_path):
    root = make_pvd_hub(tmp_path / "pvd")
    assert formats.corpus_layout(root) == "split_folders"
    assert _names(formats.find_shards(root, "video"), root) == {
        "test": ["test/test_0000.tar"], "train": ["train/train_0000.tar", "train/train_0001.tar"]}
    with pytest.raises(FileNotFoundError, match="no image shards.*it holds video: test, train"):
        formats.find_shards(root, "image")
    [v0, v1] = list(formats.iter_video(formats.shard_paths(root, "test", kind="video"), num_frames=4))
    assert v0["video_id"] == "vid_c0" and v0["frames"].shape == (4, 32, 32, 3) and v1["category"] == "Object Motion"
    # a split folder given directly (what iter_video always read) is one flat split
    assert _names(formats.find_shards(root / "train", "video"), root / "train") == {
        "train": ["train_0000.tar", "train_0001.tar"]}


def test_kind_is_peeked_and_an_undecidable_shard_follows_its_split(tmp_path):
    root = tmp_path / "mixed"
    image_shard(root / "img" / "a.tar", 0, 2)
    video_shard(root / "vid" / "b.tar", ["k0"])
    write_tar(root / "vid" / "c.tar", [])  # empty: no member to peek at
    assert [formats.shard_kind(root / p) for p in ("img/a.tar", "vid/b.tar", "vid/c.tar")] == ["image", "video", None]
    found = formats.find_corpus(root)
    assert {k: _names(v, root) for k, v in found.items()} == {
        "image": {"img": ["img/a.tar"]}, "video": {"vid": ["vid/b.tar", "vid/c.tar"]}}
    write_tar(root / "other" / "d.tar", [("notes.md", b"# no media here")])
    with pytest.raises(formats.LayoutError, match=r"d.tar: cannot tell whether it holds images or videos"):
        formats.find_corpus(root)


def test_canonical_layout_kind_from_folder_and_errors_name_the_layouts(tmp_path):
    root = tmp_path / "canon"
    image_shard(root / "image" / "train" / "shard-000000.tar", 0, 2)
    image_shard(root / "image" / "val" / "shard-000000.tar", 2, 2)
    write_tar(root / "video" / "train" / "shard-000000.tar", [])  # the folder says video; nothing is peeked
    (root / "image" / "empty").mkdir()
    (root / "train").mkdir()  # not a split folder: the canonical layout wins
    image_shard(root / "train" / "ignored.tar", 0, 1)
    assert formats.corpus_layout(root) == "canonical"
    found = formats.find_corpus(root)
    assert {k: _names(v, root) for k, v in found.items()} == {
        "image": {"train": ["image/train/shard-000000.tar"], "val": ["image/val/shard-000000.tar"]},
        "video": {"train": ["video/train/shard-000000.tar"]}}
    assert formats.shard_paths(root, "val") == found["image"]["val"]

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "00000.parquet").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as e:
        formats.find_corpus(empty)
    for part in (str(empty), "splits.json", "image/<split>/*.tar", "<split>/*.tar", "*.tar directly"):
        assert part in str(e.value)
    with pytest.raises(FileNotFoundError, match="no corpus folder"):
        formats.find_corpus(tmp_path / "missing")
    both = tmp_path / "both"
    image_shard(both / "00000.tar", 0, 1)
    image_shard(both / "extra" / "00000.tar", 0, 1)
    with pytest.raises(formats.LayoutError, match=r"both directly in it \(00000.tar, ...\) and in folders extra/"):
        formats.find_corpus(both)


def test_train_shard_index_reads_the_flat_folder(tmp_path):
    from peflow.train.data import ShardIndex

    root = make_img2dataset_folder(tmp_path / "digits", shards=2, per_shard=4)
    index = ShardIndex.from_corpus(root, "train")
    assert len(index) == 8 and [p.name for p in index.shards] == ["00000.tar", "00001.tar"]
    image, caption = index.get(5)
    assert image.size == (32, 32) and caption.startswith("a handwritten digit ")


def test_eval_splits_read_any_layout(tmp_path):
    from peflow.evaluate.features import eval_splits

    root = tmp_path / "named"
    for name in ("train-0.tar", "test-0.tar"):
        image_shard(root / name, 0, 1)
    assert eval_splits(root) == ["test"]
    with pytest.raises(ValueError, match=r"no image split 'test' \(its image splits: train"):
        eval_splits(make_img2dataset_folder(tmp_path / "digits", shards=1, per_shard=1))
