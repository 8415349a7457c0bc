"""The generic trainer: pretraining's golden losses and resume, and a plugged-in toy objective
(history columns, checkpoints, the step hook, accumulation, exact resume, two processes)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from peflow.train import checkpoint
from peflow.train.objectives import Batch, Objective
from peflow.train.trainer import HISTORY, Dist, TrainSettings, fit
from tests.golden import make_pretrain_golden as golden
from tests.helpers import free_port


class _Stop(Exception):
    """Raised from `on_step` to interrupt a run, as a kill would."""


def _stop_at(step: int) -> Any:
    def hook(row: Mapping[str, Any]) -> None:
        if row["step"] == step:
            raise _Stop

    return hook


def _golden(case: str) -> list[dict[str, Any]]:
    return json.loads(golden.GOLDEN.read_text())["cases"][case]


def _assert_rows_equal(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for k in golden.KEYS:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (k, got, want)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(golden.CASES))
def test_pretraining_reproduces_the_golden_losses(case: str, tiny_corpus: Path, tmp_path: Path) -> None:
    """`peflow.train.loop.train` on the golden plans gives the recorded per-step numbers."""
    _assert_rows_equal(golden.run_case(case, tiny_corpus, tmp_path / "ckpt"), _golden(case))


@pytest.mark.slow
def test_interrupted_pretraining_resumes_onto_the_golden_losses(tiny_corpus: Path, tmp_path: Path) -> None:
    """Stopped after step 3 (newest checkpoint: step 3), a rerun drops the extra history row and
    continues from the checkpoint onto the golden numbers (accumulation, masks, resolution switch)."""
    from peflow.train.loop import train

    plan = golden.plan_for("pe", tiny_corpus, tmp_path / "ckpt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the golden run
    try:
        with pytest.raises(_Stop):
            train(plan, Dist(), on_step=_stop_at(3), progress=False)
        assert [s for s, _ in checkpoint.step_dirs(plan.ckpt_dir)] == [3]
        assert len((plan.ckpt_dir / HISTORY).read_text().splitlines()) == 4
        replayed: list[int] = []
        _, history = train(plan, Dist(), on_step=lambda r: replayed.append(r["step"]), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert replayed == list(range(6))
    _assert_rows_equal(golden.rows(history), _golden("pe"))
    on_disk = [json.loads(line) for line in (plan.ckpt_dir / HISTORY).read_text().splitlines()]
    _assert_rows_equal(golden.rows(on_disk), _golden("pe"))


class _Regression(Objective):
    """A toy objective: linear regression with per-row noise, a function of (seed, step, global row)."""

    name = "toy"
    loss_columns = ("loss", "mse", "l2")
    rows, features = 48, 4

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(self.rows, self.features, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1

    def build_model(self, dist: Dist) -> torch.nn.Module:
        return torch.nn.Linear(self.features, 1)

    def setup(self, model: torch.nn.Module, settings: TrainSettings, dist: Dist) -> None:
        self.seed, self.global_batch = settings.seed, settings.global_batch
        self.local, self.rank = settings.global_batch // dist.world_size, dist.rank

    def build_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr)

    def batch(self, step: int) -> Batch:
        first = step * self.global_batch + self.rank * self.local
        idx = torch.arange(first, first + self.local) % self.rows
        return self.x[idx], self.y[idx], idx

    def loss(self, model: torch.nn.Module, micro: Batch, *, step: int, row0: int
             ) -> Mapping[str, torch.Tensor | float]:
        x, y, _ = micro
        rows = torch.arange(row0, row0 + len(y), dtype=torch.float32)  # global rows of the micro-batch
        noisy = y + 0.05 * torch.sin(12.9898 * rows + 78.233 * step + self.seed)
        mse = F.mse_loss(model(x).squeeze(-1), noisy)
        l2 = model.weight.pow(2).sum()
        return {"loss": mse + 1e-3 * l2, "mse": mse, "l2": l2}

    def after_step(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            model.bias.clamp_(-1.0, 1.0)

    def data_position(self, step: int) -> dict[str, int]:
        return {"row": step * self.global_batch % self.rows}

    def step_metrics(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        return {"weight_norm": float(model.weight.detach().norm())}

    def flops_per_sample(self, model: torch.nn.Module, step: int) -> float:
        return 6.0 * self.features


def _settings(ckpt_dir: Path, **kw: Any) -> TrainSettings:
    base = dict(ckpt_dir=ckpt_dir, steps=8, global_batch=8, lr=0.05, warmup_steps=2, seed=3, checkpoint_every=3,
                keep_checkpoints=2)
    return TrainSettings(**{**base, **kw})


def _losses(history: list[dict[str, Any]]) -> list[float]:
    return [r["loss"] for r in history]


def test_a_plugged_in_objective_gets_its_columns_checkpoints_and_hook(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    model, history = fit(_Regression(), _settings(tmp_path), Dist(), on_step=seen.append, progress=False)
    assert seen == history and [r["step"] for r in history] == list(range(8))
    assert list(history[0]) == ["step", "loss", "mse", "l2", "lr", "weight_norm", "samples_per_s",
                                "model_flops_per_s", "step_s"]
    assert history[-1]["loss"] < history[0]["loss"]
    r = history[-1]
    assert r["model_flops_per_s"] == pytest.approx(r["samples_per_s"] * 24) and r["samples_per_s"] > 0
    assert r["loss"] == pytest.approx(r["mse"] + 1e-3 * r["l2"], rel=1e-6)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [6, 8]  # every 3 steps and the last; keep 2
    state = torch.load(checkpoint.latest(tmp_path) / checkpoint.TRAINER_FILE, weights_only=True)
    assert {"optimizer", "scheduler", "step", "world_size", "data_position"} <= set(state)
    assert state["step"] == 8 and state["data_position"] == {"row": 16}
    assert [json.loads(line) for line in (tmp_path / HISTORY).read_text().splitlines()] == history
    assert -1.0 <= model.bias.item() <= 1.0


def test_micro_batches_accumulate_to_the_full_batch_step(tmp_path: Path) -> None:
    _, whole = fit(_Regression(), _settings(tmp_path / "whole"), Dist(), progress=False)
    _, micro = fit(_Regression(), _settings(tmp_path / "micro", micro_batch=2), Dist(), progress=False)
    assert _losses(micro) == pytest.approx(_losses(whole), rel=1e-5)


def test_an_interrupted_run_resumes_exactly(tmp_path: Path) -> None:
    _, full = fit(_Regression(), _settings(tmp_path / "full", micro_batch=4), Dist(), progress=False)
    with pytest.raises(_Stop):
        fit(_Regression(), _settings(tmp_path / "cut", micro_batch=4), Dist(), on_step=_stop_at(4), progress=False)
    _, resumed = fit(_Regression(), _settings(tmp_path / "cut", micro_batch=4), Dist(), progress=False)
    assert [r["step"] for r in resumed] == list(range(8))
    assert _losses(resumed) == _losses(full)  # bit for bit
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full]


def test_the_progress_bar_is_labelled_with_the_objective_name(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    fit(_Regression(), _settings(tmp_path, steps=2), Dist(), progress=True)
    out = capsys.readouterr().out
    assert "toy" in out and "pretrain" not in out


def _rank(rank: int, port: int, ckpt_dir: Path, out: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _, history = fit(_Regression(), _settings(ckpt_dir, micro_batch=2), Dist(rank=rank, world_size=2),
                         progress=False)
        out[rank] = history
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path: Path) -> None:
    """The same global batch over 2 gloo ranks (per-rank micro-batches, gradient all-reduce) as in one."""
    _, one = fit(_Regression(), _settings(tmp_path / "one", micro_batch=2), Dist(), progress=False)
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        torch.multiprocessing.start_processes(_rank, args=(free_port(), tmp_path / "two", out), nprocs=2,
                                              start_method="spawn")
        res = dict(out)
    assert res[1] == []  # history lives on rank 0
    assert _losses(res[0]) == pytest.approx(_losses(one), rel=1e-5)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path / "two")] == [6, 8]
    assert (tmp_path / "two" / "step-00000008" / "rng-rank00001.pt").is_file()
