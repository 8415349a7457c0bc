"""The model registry on real `peflow pretrain` runs: each run registers a version of
peflow-core and moves `candidate`; evaluations move `champion` only when the key metric
improves; `models:/peflow-core@champion` loads the champion checkpoint's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from peflow import cli, registry, runner, tracking

pytestmark = pytest.mark.slow

KEY = registry.KEY_METRIC
# Two optimizer steps of the 32 px `test` model: seconds per run, distinct weights per seed.
TINY = ["--preset", "test", "--steps", "2", "--global-batch", "8", "--eval-splits", "", "--no-progress",
        "--threads", "1"]


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    return uri


def _pretrain(corpus: Path, out: Path, seed: int) -> tuple[Path, str]:
    """`peflow pretrain` in-process; returns the output folder and evaluate's digest of it."""
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--data", str(corpus), "--out", str(out), "--seed", str(seed), *TINY])
    assert e.value.code == 0
    return out, runner.fingerprint(out, what="checkpoint")


def _aliases(client: Any) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(registry.CORE).aliases.items()}


def test_candidate_and_champion_follow_training_and_evaluation(tiny_corpus: Path, tmp_path: Path,
                                                               tracking_uri: str) -> None:
    import mlflow
    import torch

    from peflow.models.pe import load_model

    client = mlflow.MlflowClient(tracking_uri)
    outs, digests = {}, {}
    for i in (1, 2):
        outs[i], digests[i] = _pretrain(tiny_corpus, tmp_path / f"r{i}" / "pretrain", seed=i)
        mv = registry.find_version(registry.CORE, digests[i])
        assert mv is not None and str(mv.version) == str(i)
        assert registry.CANDIDATE in mv.aliases
    assert _aliases(client) == {"candidate": "2"}
    runs = mlflow.search_runs(experiment_names=["peflow"], output_format="list")
    v1 = client.get_model_version(registry.CORE, "1")
    assert v1.tags["peflow.preset"] == "test" and v1.tags["peflow.recipe"] == "pe-adamw"  # the test preset's
    assert v1.tags["peflow.run_id"] == v1.run_id and v1.run_id in {r.info.run_id for r in runs}

    first = registry.record_evaluation(digests[1], {KEY: 0.5, "zeroshot/test/top5": 0.9})
    assert first["promoted"] and (first["version"], first["champion"], first["candidate"]) == ("1", "1", "2")
    assert first["previous_champion"] is None and first["reason"] is None
    assert client.get_model_version(registry.CORE, "1").tags[registry.metric_tag(KEY)] == "0.5"

    lower = registry.record_evaluation(digests[2], {KEY: 0.4})
    assert not lower["promoted"] and (lower["champion"], lower["champion_value"]) == ("1", 0.5)
    assert _aliases(client) == {"candidate": "2", "champion": "1"}

    outs[3], digests[3] = _pretrain(tiny_corpus, tmp_path / "r3" / "pretrain", seed=3)
    assert _aliases(client) == {"candidate": "3", "champion": "1"}
    higher = registry.record_evaluation(digests[3], {KEY: 0.6})
    assert higher["promoted"] and higher["champion"] == "3"
    assert (higher["previous_champion"], higher["previous_champion_value"]) == ("1", 0.5)
    assert "champion (was v1" in registry.describe(higher)

    tie = registry.record_evaluation(digests[2], {KEY: 0.6})
    assert not tie["promoted"] and tie["champion"] == "3"
    official = registry.record_evaluation("0" * 64, {KEY: 0.99})
    assert not official["registered"] and not official["promoted"] and "not a version" in official["reason"]
    missing = registry.record_evaluation(digests[1], {"retrieval/i2t/R1": 0.99})
    assert not missing["promoted"] and missing["reason"] == f"no value for {KEY}"
    assert _aliases(client) == {"candidate": "3", "champion": "3"}

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_model(outs[3]).eval().encode_image(x)
        assert not torch.allclose(load_model(outs[1]).eval().encode_image(x), expected)  # so the check can fail
        champion = mlflow.pytorch.load_model(f"models:/{registry.CORE}@champion").eval()
        torch.testing.assert_close(champion.encode_image(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(registry.load_champion().eval().encode_image(x), expected, rtol=0, atol=1e-6)

    # Lower-is-better keys (a loss) promote the smaller value; same logged models, another name.
    for i in (1, 2):
        registry.register(client.get_model_version(registry.CORE, str(i)).source, "peflow-lower",
                          tags={registry.DIGEST_TAG: digests[i]})
    kw = {"name": "peflow-lower", "key": "loss", "higher_is_better": False}
    assert registry.record_evaluation(digests[1], {"loss": 2.0}, **kw)["promoted"]
    assert not registry.record_evaluation(digests[2], {"loss": 3.0}, **kw)["promoted"]
    assert registry.record_evaluation(digests[2], {"loss": 1.0}, **kw)["champion"] == "2"


def test_training_goes_on_without_a_registry(tmp_path: Path, tracking_uri: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry that cannot be reached warns; the model is still logged and the stage succeeds."""
    import mlflow

    from peflow.models.pe import build_model, save_model
    model = build_model("test")
    save_model(model, tmp_path / "model", extra={"recipe": "pe"})
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "no-registry://here")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("no-registry")  # not the active experiment id of an earlier test's store
    with pytest.warns(UserWarning, match="model not registered"), mlflow.start_run() as run:
        registry.log_and_register(model, registry.CORE, digest="0" * 64, tags={})
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    with pytest.warns(UserWarning, match="registry not updated"):
        result = registry.record_evaluation("0" * 64, {KEY: 0.5})
    assert result["reason"].startswith("registry unavailable") and not result["promoted"]
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    assert mlflow.MlflowClient(tracking_uri).search_registered_models() == []
