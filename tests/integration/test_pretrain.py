"""`peflow pretrain` end to end: a 2-process torchrun run killed after a checkpoint and
resumed equals the uninterrupted run step for step; a short run learns above chance."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, offline_env

# Tiny but real: micro model, 2 processes, progressive resolution and mask regularization on.
# --force: the killed run has the full run's key, and would otherwise be reused from the store.
TINY = ["--force", "--preset", "test", "--model", "micro", "--recipe", "pe", "--steps", "8", "--global-batch", "16", "--resolutions",
        "16:0.5,32:0.5", "--checkpoint-every", "2", "--eval-splits", "", "--no-log-model", "--no-progress"]


def _torchrun(corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}",
           "-m", "peflow.cli", "pretrain", "--data", str(corpus), "--out", str(out), *TINY, *extra]
    env = offline_env(MLFLOW_TRACKING_URI=f"sqlite:///{out.parent / 'mlflow.db'}", OMP_NUM_THREADS="1",
                      PYTHONPATH=str(ROOT))
    log = open(out.parent / f"{out.name}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    rc = proc.wait(timeout)
    assert rc == 0, (out.parent / f"{out.name}.log").read_text()[-4000:]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(len(rows)))
    return [r["loss"] for r in rows]


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tiny_corpus: Path, tmp_path: Path) -> None:
    full = tmp_path / "full" / "pretrain"
    full.parent.mkdir()
    _finish(_torchrun(tiny_corpus, full), full)

    killed = tmp_path / "killed" / "pretrain"
    killed.parent.mkdir()
    proc = _torchrun(tiny_corpus, killed)
    ckpt = killed.with_name("pretrain.ckpt")
    deadline = time.monotonic() + 180
    while not (ckpt / "step-00000004").is_dir():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists()  # nothing half-written in OUT
    steps_before = len((ckpt / "history.jsonl").read_text().splitlines())
    assert steps_before < 8

    _finish(_torchrun(tiny_corpus, killed), killed)
    a, b = _losses(full), _losses(killed)
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert {"model.safetensors", "model.json", "metrics.json", "loss.png"} <= set(manifest["outputs"])
    metrics = json.loads((killed / "metrics.json").read_text())
    assert all(isinstance(v, float) for v in metrics.values()) and metrics["train/steps"] == 8


@pytest.mark.slow
def test_short_run_fits_the_tiny_corpus_and_logs_to_mlflow(tiny_corpus: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Single process, in-process stage run: 150 micro steps on the tiny corpus (120 images).

    The tiny corpus is too small to generalise from (zero-shot stays at chance there); the
    held-out accuracy check needs the nano corpus: see `test_nano_zero_shot_above_chance`."""
    import mlflow

    from peflow import runner
    from peflow.models.pe import load_model
    from peflow.stages.pretrain import Config

    out = tmp_path / "pretrain"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runner.execute("pretrain", Config(data=str(tiny_corpus), out=str(out), model="micro", recipe="vanilla", steps=150,
                                      global_batch=24, lr=2e-3, resolutions="32:1", eval_splits="train,val,test",
                                      threads=2, progress=False))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zeroshot/chance_top1"] == pytest.approx(1 / 12)
    assert metrics["train/final_clip_loss"] < 0.5 * math.log(24), metrics  # fits the pairs (chance: ln 24)
    assert load_model(out).visual.trunk.patch_embed.patch_size == (8, 8)

    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["peflow"], output_format="list")[0]
    assert run.data.params["model"] == "micro" and run.data.tags["input.data.digest"]
    assert run.data.tags["dvc.data.md5"].endswith(".dir")
    assert run.data.metrics["zeroshot/train/top1"] == pytest.approx(metrics["zeroshot/train/top1"])
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 150
    assert {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id)} >= {"loss.png", "checkpoint"}


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_one(tiny_corpus: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compile` (torch.compile of forward + loss, inductor on CPU) gives the eager run's losses."""
    from torch._dynamo.utils import counters

    from peflow import runner
    from peflow.stages.pretrain import Config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}" / "pretrain"
        counters.clear()
        runner.execute("pretrain", Config(data=str(tiny_corpus), out=str(out), model="micro", recipe="pe", steps=4,
                                          global_batch=16, resolutions="32:1", eval_splits="", log_model=False,
                                          progress=False, threads=2, compile=compiled))
        losses[compiled] = _losses(out)
        # the compiled run really went through dynamo (and the eager one did not)
        assert (counters["stats"]["unique_graphs"] > 0) == compiled, dict(counters["stats"])
    assert len(losses[True]) == 4
    for eager, comp in zip(losses[False], losses[True]):
        assert comp == pytest.approx(eager, rel=1e-3), losses


@pytest.fixture(scope="module")
def nano_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The nano corpus (about 50 s on 2 cores), or $PEFLOW_NANO_CORPUS when set."""
    if os.environ.get("PEFLOW_NANO_CORPUS"):
        return Path(os.environ["PEFLOW_NANO_CORPUS"])
    from peflow import runner
    from peflow.stages import synth

    out = tmp_path_factory.mktemp("nano") / "synth"
    return Path(runner.execute("synth", synth.Config(out=str(out), corpus="nano", seed=0)).out)


@pytest.mark.slow
def test_nano_learns_held_out_zero_shot_above_chance(nano_corpus: Path, tmp_path: Path) -> None:
    """A few minutes of 2-process training on the nano corpus: zero-shot top-1 on the
    held-out val and test splits well above chance: the 12 shape categories (chance 1/12)
    at least 2.5x, the primary object's colour (10 classes) at least 5x.

    Measured (vanilla recipe, 1000 steps of 64, 2 processes, 171 s of training): shape test
    31.6%, val 24.2% (held-out 28.4%, 3.4x chance); colour test 83.0%, val 84.8% (8.4x
    chance, majority class 17%). The full nano budget is in docs/pretraining.md."""
    out = tmp_path / "pretrain"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}", "-m", "peflow.cli", "pretrain",
           "--data", str(nano_corpus), "--out", str(out), "--recipe", "vanilla", "--steps", "1000",
           "--eval-splits", "val,test", "--no-log-model", "--no-progress"]
    env = offline_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(ROOT))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=1200)
    metrics = json.loads((out / "metrics.json").read_text())
    chance = metrics["zeroshot/chance_top1"]
    assert chance == pytest.approx(1 / 12)
    # Held-out accuracy over val + test (900 images) against what a chance-level model can
    # reach: more than 3 binomial standard deviations above chance (p < 0.002).
    sizes = json.loads((nano_corpus / "card.json").read_text())["splits"]["image"]
    n = sizes["val"] + sizes["test"]
    held_out = (metrics["zeroshot/val/top1"] * sizes["val"] + metrics["zeroshot/test/top1"] * sizes["test"]) / n
    # At least 2.5x chance, and far outside what a chance-level model reaches (3 binomial std).
    assert held_out >= max(2.5 * chance, chance + 3 * math.sqrt(chance * (1 - chance) / n)), metrics
    # The colour label set (the primary object's colour, 10 classes): at least 5x chance.
    colour = sum(metrics[f"zeroshot_colour/{s}/top1"] * sizes[s] for s in ("val", "test")) / n
    assert metrics["zeroshot_colour/chance_top1"] == pytest.approx(1 / 10)
    assert colour >= 5 * metrics["zeroshot_colour/chance_top1"], metrics
    assert colour > max(metrics[f"zeroshot_colour/{s}/majority_top1"] for s in ("val", "test")) + 0.3, metrics
