"""`peflow validate` end to end on real shards: clean corpus, bad corpus below
the threshold (quarantine, clean copy keeps every good sample), bad corpus
above it (exit 2, readable reason, nothing published)."""

from __future__ import annotations

import json

import pytest

from peflow import cli
from peflow.stages.validate import rejected_dir
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
