"""`peflow validate` end to end on real shards: clean corpus, bad corpus below
the threshold (quarantine, clean copy keeps every good sample), bad corpus
above it (exit 2, readable reason, nothing published); data in its own
layouts (an img2dataset-style flat folder of handwritten digits without a
card, the PE Video Dataset's train/ and test/ folders) validated into the
canonical layout; a folder without shards refused, naming the layouts."""

from __future__ import annotations

import json

import pytest

from peflow import cli
from peflow.stages.validate import rejected_dir
from tests.unit.test_data_layouts import image_shard, make_img2dataset_folder, make_pvd_hub, write_tar
from tests.validation_fixtures import make_bad_corpus, shard_samples

@pytest.fixture(scope="module")
def corpora(tiny_corpus, tmp_path_factory):
    bad = tmp_path_factory.mktemp("validate_stage") / "bad"
    return tiny_corpus, bad, make_bad_corpus(tiny_corpus, bad)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One MLflow store for the module (creating a SQLite store takes seconds), its artifacts in
    the temporary folder too (a SQLite store's default artifact root is ./mlruns)."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "validate-tests")
        mp.setenv("GX_ANALYTICS_ENABLED", "False")
        mlflow.MlflowClient(uri).create_experiment("validate-tests", artifact_location=(root / "artifacts").as_uri())
        yield uri


def _validate(*args: str) -> None:
    try:
        cli.main(["validate", *args])
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def test_clean_corpus_passes_whole(corpora, tracking, tmp_path):
    clean, _, _ = corpora
    out = tmp_path / "val"
    _validate("--data", str(clean), "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    assert report["quarantined"] == 0 and report["passed"] == report["total"] > 0 and report["accepted"]
    assert (out / "quarantine.jsonl").read_text() == ""
    assert shard_samples(out) == shard_samples(clean)  # same samples, same bytes, same order
    card_in, card_out = (json.loads((p / "card.json").read_text()) for p in (clean, out))
    assert card_out["splits"] == card_in["splits"] and card_out["categories"] == card_in["categories"]
    assert (out / "data_docs" / "index.html").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validate/total"] == report["total"] and metrics["validate/failure_rate"] == 0.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "validate" and manifest["inputs"]["data"]

    import mlflow

    runs = mlflow.search_runs(experiment_names=["validate-tests"], output_format="list")
    assert runs[0].data.metrics["validate/total"] == report["total"]
    names = {a.path for a in mlflow.MlflowClient(tracking).list_artifacts(runs[0].info.run_id)}
    assert {"report.json", "quarantine.jsonl", "data_docs"} <= names

    from peflow.data.formats import iter_image_text, shard_paths

    val = list(iter_image_text(shard_paths(out, "val")))  # the readers take it as a corpus
    assert len(val) == card_in["splits"]["image"]["val"]


def test_bad_corpus_below_threshold_quarantines_and_keeps_the_rest(corpora, tracking, tmp_path):
    clean, bad, expected = corpora
    out = tmp_path / "val"
    _validate("--data", str(bad), "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    assert report["quarantined"] == len(expected) and report["accepted"]
    assert report["failure_rate"] == pytest.approx(len(expected) / report["total"])
    got = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted((q["shard"], q["key"], tuple(q["reasons"])) for q in got) == sorted(
        (e["shard"], e["key"], tuple(e["reasons"])) for e in expected)
    want_counts: dict[str, int] = {}
    for e in expected:
        for r in e["reasons"]:
            want_counts[r] = want_counts.get(r, 0) + 1
    assert report["reasons"] == want_counts
    # every good sample kept, bytes unchanged: the clean input minus the damaged keys (the duplicate's
    # first occurrence is good and stays)
    damaged = {(e["kind"], e["key"]) for e in expected if e["reasons"] != ["duplicate_key"]}
    want = {ks: [(k, v) for k, v in items if (ks[0], k) not in damaged] for ks, items in shard_samples(clean).items()}
    assert shard_samples(out) == want
    card = json.loads((out / "card.json").read_text())
    assert card["splits"]["image"]["train"] == len(want[("image", "train")])


def test_bad_corpus_above_threshold_fails_readably(corpora, tracking, tmp_path, capsys):
    _, bad, expected = corpora
    out = tmp_path / "val"
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", "--data", str(bad), "--out", str(out), "--max-failure-rate", "0.01"])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "above max_failure_rate 1.0%" in err and "media_undecodable 2" in err
    assert f"{len(expected)} of" in err and str(rejected_dir(out) / "report.json") in err
    assert not out.exists()  # nothing published
    report = json.loads((rejected_dir(out) / "report.json").read_text())
    assert not report["accepted"] and report["quarantined"] == len(expected)
    assert (rejected_dir(out) / "data_docs" / "index.html").is_file()


def _members(path) -> list[tuple[str, bytes]]:
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def _samples(paths) -> list[tuple[str, dict[str, bytes]]]:
    """[(key, {ext: bytes})] of tar shards, in order."""
    out: dict[str, dict[str, bytes]] = {}
    for path in paths:
        for name, data in _members(path):
            key, _, ext = name.partition(".")
            out.setdefault(key, {})[ext] = data
    return list(out.items())


def test_img2dataset_flat_folder_validates_into_the_canonical_layout(tracking, tmp_path):
    from peflow.data import formats
    from peflow.train.data import ShardIndex

    data = make_img2dataset_folder(tmp_path / "digits", shards=2, per_shard=10)  # no card.json, no labels
    (data / "LICENSE.txt").write_text("handwritten digits: scikit-learn's copy of the UCI data set\n")
    extra = _members(image_shard(tmp_path / "extra.tar", 20, 2))  # samples 20 and 21, 3 members each
    write_tar(data / "00002.tar", extra[:3] + [(n, b"  " if n.endswith(".txt") else d) for n, d in extra[3:]])
    out = tmp_path / "val"
    _validate("--data", str(data), "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    assert (report["total"], report["passed"], report["quarantined"]) == (22, 21, 1) and report["accepted"]
    assert report["reasons"] == {"caption_missing": 1} and list(report["by_split"]) == ["image/train"]
    [q] = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert (q["shard"], q["key"], q["reasons"]) == ("00002.tar", "000000021", ["caption_missing"])
    # canonical output, re-sharded with the input's shard size (10); img2dataset's sidecars are not carried
    assert formats.corpus_layout(out) == "canonical"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == [
        "image/train/shard-000000.tar", "image/train/shard-000001.tar", "image/train/shard-000002.tar"]
    assert not list(out.glob("0000*")) and (out / "LICENSE.txt").is_file()
    card = json.loads((out / "card.json").read_text())
    assert card["name"] == "digits" and card["splits"] == {"image": {"train": 21}} and "categories" not in card
    kept = [s for s in _samples(sorted(data.glob("*.tar"))) if s[0] != "000000021"]
    assert _samples(sorted((out / "image" / "train").glob("*.tar"))) == kept  # good samples, same bytes and order
    index = ShardIndex.from_corpus(out, "train")
    assert len(index) == 21 and index.get(20)[1].startswith("a handwritten digit ")


def test_pvd_hub_layout_validates_into_video_splits(tracking, tmp_path):
    from peflow.data import formats

    data = make_pvd_hub(tmp_path / "pvd")
    out = tmp_path / "val"
    _validate("--data", str(data), "--out", str(out), "--suites", "video,captions")
    report = json.loads((out / "report.json").read_text())
    assert (report["total"], report["passed"]) == (7, 7) and report["accepted"]
    assert sorted(report["by_split"]) == ["video/test", "video/train"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == [
        "video/test/shard-000000.tar", "video/train/shard-000000.tar", "video/train/shard-000001.tar"]
    assert (out / "README.md").is_file() and not (out / "train").exists() and not (out / "test").exists()
    assert json.loads((out / "card.json").read_text())["splits"] == {"video": {"test": 2, "train": 5}}
    videos = list(formats.iter_video(formats.shard_paths(out, "train", kind="video"), num_frames=2))
    assert [v["video_id"] for v in videos] == ["vid_a0", "vid_a1", "vid_a2", "vid_b0", "vid_b1"]


def test_folder_without_shards_is_refused_naming_the_layouts(tracking, tmp_path, capsys):
    data = tmp_path / "nothing"
    (data / "sub").mkdir(parents=True)
    (data / "00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", "--data", str(data), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    for part in (str(data), "splits.json", "image/<split>/*.tar", "<split>/*.tar (e.g. train/, test/)",
                 "*.tar directly in the folder"):
        assert part in err
    assert not (tmp_path / "out").exists()


def test_manifest_folder_kind_without_suite_is_copied_unchanged(tracking, tmp_path):
    from tests.unit.test_data_layouts import video_shard

    data = tmp_path / "mixed"
    image_shard(data / "img" / "digits-a.tar", 0, 6)
    image_shard(data / "img" / "digits-b.tar", 6, 6)
    clips = video_shard(data / "clips" / "c.tar", ["v0", "v1"])
    (data / "splits.json").write_text(json.dumps({"train": ["img/digits-a.tar", "clips/*.tar"],
                                                  "val": "img/digits-b.tar"}))
    out = tmp_path / "val"
    _validate("--data", str(data), "--out", str(out), "--suites", "image")
    report = json.loads((out / "report.json").read_text())
    assert (report["total"], report["passed"]) == (12, 12) and sorted(report["by_split"]) == ["image/train",
                                                                                             "image/val"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == [
        "image/train/shard-000000.tar", "image/val/shard-000000.tar", "video/train/shard-000000.tar"]
    assert (out / "video" / "train" / "shard-000000.tar").read_bytes() == clips.read_bytes()  # not validated
    assert not (out / "splits.json").exists() and not (out / "img").exists() and not (out / "clips").exists()
    card = json.loads((out / "card.json").read_text())
    assert card["splits"] == {"image": {"train": 6, "val": 6}} and card["shards"]["video"] == {"train": 1}
