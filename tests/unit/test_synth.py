"""The `synth` stage: layout, determinism, ground truth consistency, shifts, QA."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from peflow import cli, runner
from peflow.data import formats
from peflow.data.synth import presets, vocab
from peflow.stages import synth

VARYING: set[str] = set()  # nothing: every file, manifest included, is a function of (preset, seed)


def _synth(out: Path, **kw) -> Path:
    """A fresh `test` corpus (forced: never reused from the store)."""
    cfg = synth.Config(out=str(out), corpus="test", **kw)
    return Path(runner.execute("synth", cfg, force=True).out)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _entries(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["synth", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--preset" in out and "--seed" in out and "--out" in out


def test_cli_writes_the_layout(tmp_path):
    out = tmp_path / "corpus"
    with pytest.raises(SystemExit) as e:  # click exits 0 after a successful command
        cli.main(["synth", "--preset", "test", "--out", str(out), "--seed", "3", "--workers", "1"])
    assert e.value.code == 0
    for name in ("manifest.json", "card.md", "card.json", "metrics.json"):
        assert (out / name).is_file(), name
    p = presets.test()
    for split, n in p.image_counts().items():
        shards = sorted((out / "image" / split).glob("shard-*.tar"))
        assert shards and shards[0].name == "shard-000000.tar"
        names = [n for s in shards for n in _entries(s)]
        keys = sorted({n.split(".", 1)[0] for n in names})
        assert keys == [f"{split}-{i:07d}" for i in range(n)]
        assert {n.split(".", 1)[1] for n in names} == {"jpg", "txt", "json", "mask.png", "depth.png"}
    for split, n in p.video_counts().items():
        names = [n for s in sorted((out / "video" / split).glob("*.tar")) for n in _entries(s)]
        assert {n.split(".", 1)[1] for n in names} == {"mp4", "json", "masks.npy"}
        assert len(names) == 3 * n
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "synth" and manifest["counts"]["image/train"] == p.train_images
    assert "image/train/shard-000001.tar" in manifest["outputs"]  # 120 train images, 64 per shard


def test_same_seed_same_bytes_any_workers(tiny_corpus, tmp_path):
    again = _synth(tmp_path / "again", seed=0, workers=2)
    a, b = _files(tiny_corpus), _files(again)
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k] != b[k] and k not in VARYING]
    assert differing == []


def test_different_seed_different_data(tiny_corpus, tmp_path):
    other = _synth(tmp_path / "other", seed=1, workers=1)
    a, b = _files(tiny_corpus), _files(other)
    for k in a:
        if k.endswith(".tar"):
            assert a[k] != b[k], k


def test_tar_metadata_is_fixed(tiny_corpus):
    with tarfile.open(tiny_corpus / "image" / "val" / "shard-000000.tar") as t:
        members = t.getmembers()
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert [m.name for m in members][:5] == sorted(m.name for m in members[:5])


@pytest.mark.parametrize("bad", [dict(corpus="huge"), dict(image_size=33), dict(image_size=8),
                                 dict(human_caption_fraction=1.5), dict(num_frames=1), dict(workers=0)])
def test_bad_values_are_value_errors(tmp_path, bad):
    with pytest.raises(ValueError) as e:
        runner.execute("synth", synth.Config(out=str(tmp_path / "x"), **{"corpus": "test", **bad}))
    assert str(list(bad.values())[0]) in str(e.value)
    assert not (tmp_path / "x").exists()


def test_image_override(tmp_path):
    cfg = synth.Config(out=str(tmp_path / "x"), corpus="test", image_size=48, num_frames=20)
    p = synth.corpus_preset(cfg)
    assert (p.image_size, p.num_frames, p.train_images) == (48, 20, presets.test().train_images)


def test_presets_derive_from_nano():
    nano, small, full = presets.nano(), presets.small(), presets.full()
    assert (nano.image_size, nano.num_frames, nano.train_images) == (64, 16, 24000)
    assert small.image_size == 128 and small.train_images == 10 * nano.train_images
    assert full.image_size == 224 and full.num_frames == 32 and full.train_videos == 100 * nano.train_videos


def test_card(tiny_corpus):
    card = formats.load_card(tiny_corpus)
    assert card["preset"] == "test" and card["seed"] == 0 and card["image_size"] == 32
    assert card["splits"]["image"] == presets.test().image_counts()
    assert len(card["categories"]) >= 10 and len(card["colours"]) >= 8 and len(card["actions"]) >= 8
    assert card["human_caption_fraction"] == 0.5
    metrics = json.loads((tiny_corpus / "metrics.json").read_text())
    assert metrics == {"synth/images": sum(card["splits"]["image"].values()),
                       "synth/videos": sum(card["splits"]["video"].values())}


@pytest.mark.parametrize("split", vocab.IMAGE_SPLITS)
def test_images_agree_with_their_scene_graph(tiny_corpus, split):
    categories = formats.label_names(tiny_corpus)
    samples = list(formats.iter_image_text(formats.shard_paths(tiny_corpus, split), with_dense=True))
    assert len(samples) == presets.test().image_counts()[split]
    for s in samples:
        m, mask = s["meta"], s["mask"]
        objs = m["objects"]
        assert s["image"].size == (32, 32) and s["caption"]
        assert m["label"] == objs[0]["category"] and categories[m["label_id"]] == m["label"]
        assert m["shift"] == (split.removeprefix("shift_") if split.startswith("shift_") else None)
        ids = set(np.unique(mask).tolist()) - {0}
        assert ids == set(range(1, len(objs) + 1)), s["key"]
        for i, o in enumerate(objs, start=1):
            ys, xs = np.nonzero(mask == i)
            assert o["visible_pixels"] == len(xs)
            assert o["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert np.all(s["depth"][mask == i] == round(255 * o["depth"]))
        assert np.all(s["depth"][mask == 0] == 255)
        # the label is learnable: the primary is the largest visible object
        assert objs[0]["visible_pixels"] == max(o["visible_pixels"] for o in objs), s["key"]
        assert any(w in s["caption"].lower() for w in vocab.SHAPE_WORDS[m["label"]]), s["caption"]


def test_shift_splits_share_the_label_space(tiny_corpus):
    def labels(split):
        return {s["meta"]["label"] for s in formats.iter_image_text(formats.shard_paths(tiny_corpus, split))}

    train = labels("train")
    assert train == set(vocab.CATEGORIES)
    for shift in vocab.SHIFTS:
        assert labels(f"shift_{shift}") == train


def test_shift_styles(tiny_corpus):
    def split(name):
        return list(formats.iter_image_text(formats.shard_paths(tiny_corpus, name), with_dense=True))

    for s in split("shift_sketch"):  # line drawings: white paper, no colour
        img = np.asarray(s["image"], dtype=int)
        assert np.abs(img.max(-1) - img.min(-1)).mean() < 12
        assert np.median(img[s["mask"] == 0]) > 240
    for s in split("shift_rendition"):
        assert all(o["colour"] in vocab.RENDITION_COLOURS for o in s["meta"]["objects"])
    assert np.mean([len(s["meta"]["objects"]) for s in split("shift_clutter")]) >= 3.5
    assert np.mean([abs(s["meta"]["objects"][0]["angle"]) for s in split("shift_pose")]) > 60


def test_image_qa_matches_json(tiny_corpus):
    for s in formats.iter_image_text(formats.shard_paths(tiny_corpus, "val")):
        m, objs = s["meta"], s["meta"]["objects"]
        by_type = {}
        for qa in m["qa"]:
            assert set(qa) == {"question", "answer", "type"} and len(qa["answer"].split()) == 1
            by_type.setdefault(qa["type"], qa["answer"])
        assert by_type["count"] == str(len(objs))
        assert by_type["colour"] == objs[0]["colour"]
        assert by_type["shape"] == m["label"]
        assert by_type["position"] == objs[0]["position"]


@pytest.mark.parametrize("split", vocab.VIDEO_SPLITS)
def test_videos(tiny_corpus, split):
    p = presets.test()
    videos = list(formats.iter_video(formats.shard_paths(tiny_corpus, split, kind="video"), with_masks=True))
    assert len(videos) == p.video_counts()[split]
    for v in videos:
        m = v["meta"]
        assert v["frames"].shape == (p.num_frames, 32, 32, 3) and v["frames"].dtype == np.uint8
        assert v["masks"].shape == (p.num_frames, 32, 32)
        assert v["video_id"] == v["key"] and v["category"] in vocab.ACTIONS
        assert formats.label_names(tiny_corpus, "video")[m["label_id"]] == v["category"]
        assert "model_caption" in m and v["model_caption"] is None
        assert m["title"] and m["description"] and (m["num_frames"], m["fps"]) == (p.num_frames, p.fps)
        for t, mask in enumerate(v["masks"]):  # every object visible in every frame
            assert set(np.unique(mask).tolist()) - {0} == set(range(1, len(m["objects"]) + 1)), (v["key"], t)
        answers = {}
        for qa in m["qa"]:
            answers.setdefault(qa["type"], qa["answer"])  # colour: first the start colour
        assert answers["action"] == vocab.ACTION_BY_NAME[v["category"]].answer
        assert answers["count"] == str(len(m["objects"])) and answers["shape"] == m["objects"][0]["category"]
        assert answers["colour"] == m["objects"][0]["colour"]


def test_video_actions_are_visible(tiny_corpus):
    """The actor's mask moves/grows/turns the way the label says."""
    for v in formats.iter_video(formats.shard_paths(tiny_corpus, "train", kind="video"), with_masks=True):
        actor = v["masks"] == 1
        area = actor.sum((1, 2))
        ys, xs = np.indices(actor.shape[1:])
        cx = (actor * xs).sum((1, 2)) / area
        cy = (actor * ys).sum((1, 2)) / area
        a = v["category"]
        if a == "move left":
            assert cx[-1] < cx[0] - 8
        elif a == "move right":
            assert cx[-1] > cx[0] + 8
        elif a == "move up":
            assert cy[-1] < cy[0] - 8
        elif a == "move down":
            assert cy[-1] > cy[0] + 8
        elif a == "grow":
            assert area[-1] > 3 * area[0]
        elif a == "shrink":
            assert area[0] > 3 * area[-1]
        elif a == "change colour":
            f = v["frames"].astype(int)
            assert np.abs(f[0][actor[0]].mean(0) - f[-1][actor[-1]].mean(0)).max() > 40
        elif a == "rotate":
            assert max((actor[0] != later).sum() for later in actor[1:]) > 10


def test_human_caption_fraction(tiny_corpus):
    metas = [v["meta"] for split in vocab.VIDEO_SPLITS
             for v in formats.iter_video(formats.shard_paths(tiny_corpus, split, kind="video"), num_frames=1)]
    with_caption = [m for m in metas if m["human_caption"] is not None]
    train = [m for m in metas if m["split"] == "train"]
    assert 0.4 <= sum(m["human_caption"] is not None for m in train) / len(train) <= 0.6
    assert all(m["human_caption"] for m in metas if m["split"] != "train")  # held-out: always (PVD bench)
    for m in with_caption:
        assert m["objects"][0]["category"] in m["human_caption"] and len(m["human_caption"].split()) >= 12


def test_masks_npy_is_plain_uint8(tiny_corpus):
    entries = _entries(tiny_corpus / "video" / "val" / "shard-000000.tar")
    arr = np.load(io.BytesIO(entries["val-0000000.masks.npy"]), allow_pickle=False)
    assert arr.dtype == np.uint8 and arr.ndim == 3


def test_categories_have_typical_colours_that_shifts_take_away(tiny_corpus):
    """Ordinary images use the category's typical colour often (a real but unreliable
    cue); sketches have no colour and renditions use another palette."""
    typical = hits = 0
    for s in formats.iter_image_text(formats.shard_paths(tiny_corpus, "train")):
        primary = s["meta"]["objects"][0]
        typical += 1
        hits += primary["colour"] == vocab.TYPICAL_COLOUR[primary["category"]]
    assert 0.4 < hits / typical < 0.8
    for s in formats.iter_image_text(formats.shard_paths(tiny_corpus, "shift_sketch")):
        assert s["meta"]["objects"][0]["colour"] == "black"
    for s in formats.iter_image_text(formats.shard_paths(tiny_corpus, "shift_rendition")):
        assert s["meta"]["objects"][0]["colour"] not in vocab.COLOURS
