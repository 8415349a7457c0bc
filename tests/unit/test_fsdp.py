"""FSDP2 and activation checkpointing in the trainer (peflow.train.parallel), on CPU with gloo.

Two spawned ranks train the golden `pe` pretraining plan (test model, LAMB, mask regularization,
progressive resolution, two micro-batches per rank) once under DDP and three times under FSDP:
uninterrupted, killed after step 4 and resumed, and with activation checkpointing. The module
fixture runs them all in one spawn; the tests read its results.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from peflow.train import checkpoint, parallel
from peflow.train.trainer import HISTORY, Dist
from tests.golden import make_pretrain_golden as golden
from tests.helpers import ROOT, free_port

STOP_AT = 4  #: the step whose batch the interrupted run never gets (its newest checkpoint: step 3)


class _Stop(Exception):
    """Raised on every rank from `batch`, as a kill of the whole job would stop it."""


def _plan(corpus: Path, ckpt_dir: Path, **changes: Any) -> Any:
    return dataclasses.replace(golden.plan_for("pe", corpus, ckpt_dir), micro_batch=4, **changes)


def _train(plan: Any, dist: Dist, *, stop_at: int | None = None) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    from peflow.train.loop import objective
    from peflow.train.trainer import fit

    obj = objective(plan)
    if stop_at is not None:
        batch = obj.batch

        def stopping(step: int) -> Any:
            if step == stop_at:
                raise _Stop
            return batch(step)

        obj.batch = stopping  # type: ignore[method-assign]
    return fit(obj, plan, dist, progress=False)


def _rank(rank: int, port: int, corpus: Path, root: Path, out: Mapping[str, Any]) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=120))  # a failing rank must not hang
    dist = Dist(rank=rank, world_size=2)
    try:
        _, ddp = _train(_plan(corpus, root / "ddp"), dist)
        model, fsdp = _train(_plan(corpus, root / "fsdp", parallelism="fsdp"), dist)
        with pytest.raises(_Stop):
            _train(_plan(corpus, root / "cut", parallelism="fsdp"), dist, stop_at=STOP_AT)
        _, resumed = _train(_plan(corpus, root / "cut", parallelism="fsdp"), dist)
        _, ac = _train(_plan(corpus, root / "ac", parallelism="fsdp", activation_checkpointing=True), dist)
        if rank == 0:
            out.update(ddp=golden.rows(ddp), fsdp=golden.rows(fsdp), resumed=golden.rows(resumed),
                       ac=golden.rows(ac), model_type=type(model).__name__,
                       model_sharded=parallel.is_sharded(model), state={k: v.clone() for k, v in
                                                                        model.state_dict().items()})
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fsdp")
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        torch.multiprocessing.start_processes(_rank, args=(free_port(), tiny_corpus, root, out), nprocs=2,
                                              start_method="spawn")
        return {"root": root, **dict(out)}


def _max_diff(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float:
    return max(abs(x[key] - y[key]) for x, y in zip(a, b))


@pytest.mark.slow
def test_fsdp_losses_match_ddp(runs: dict[str, Any]) -> None:
    """Sharded blocks, gathered root and the whole-model scalar give DDP's numbers (to float rounding)."""
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == list(range(6))
    for key in ("loss", "clip_loss", "mask_reg_loss", "logit_scale"):
        assert _max_diff(fsdp, ddp, key) < 1e-5, (key, fsdp, ddp)  # measured: 1e-6 at most
    assert [r["lr"] for r in fsdp] == [r["lr"] for r in ddp]
    assert [r["resolution"] for r in fsdp] == [16, 16, 16, 32, 32, 32]
    assert fsdp[-1]["loss"] != fsdp[0]["loss"]  # it trains


@pytest.mark.slow
def test_an_interrupted_fsdp_run_resumes_exactly(runs: dict[str, Any]) -> None:
    """Killed after step 4 (newest checkpoint 3), the rerun continues onto the uninterrupted run, bit for bit."""
    assert runs["resumed"] == runs["fsdp"]
    on_disk = (runs["root"] / "cut" / HISTORY).read_text().splitlines()
    assert len(on_disk) == 6


@pytest.mark.slow
def test_activation_checkpointing_under_fsdp_changes_nothing(runs: dict[str, Any]) -> None:
    assert runs["ac"] == runs["fsdp"]


@pytest.mark.slow
def test_fsdp_checkpoints_hold_the_full_model_and_fit_returns_it_plain(runs: dict[str, Any]) -> None:
    """The checkpoint's model.safetensors is the full trained model (loads into a plain one); rank 0 gets
    back the plain architecture with the same weights; trainer.pt keys the optimizer by parameter name."""
    from safetensors.torch import load_file

    from peflow.models.pe import build_model

    last = checkpoint.latest(runs["root"] / "fsdp")
    assert last is not None and last.name == "step-00000006"
    saved = load_file(str(last / checkpoint.MODEL_FILE))
    plain = build_model("test")
    plain.load_state_dict(saved, strict=True)
    assert runs["model_type"] == "CustomTextCLIP" and not runs["model_sharded"]
    assert set(runs["state"]) == set(saved)
    assert all(torch.equal(runs["state"][k], saved[k]) for k in saved)
    trainer = torch.load(last / checkpoint.TRAINER_FILE, weights_only=True)
    assert trainer["optimizer_layout"] == checkpoint.BY_NAME
    assert "logit_scale" in trainer["optimizer"]["state"]
    assert (last / "rng-rank00001.pt").is_file()


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    """One forward and backward of the test model's CLIP loss, with and without recomputation: equal gradients."""
    from peflow.models.pe import build_model
    from peflow.train.losses import clip_forward, contrastive_loss

    torch.manual_seed(0)
    plain = build_model("test")
    recomputed = build_model("test")
    recomputed.load_state_dict(plain.state_dict())
    assert parallel.apply_activation_checkpointing(recomputed) == 4 + 2  # vision blocks + text blocks
    g = torch.Generator().manual_seed(1)
    images, tokens = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 1000, (6, 32), generator=g)
    loss_fn = contrastive_loss()
    for model in (plain, recomputed):
        clip_forward(model, images, tokens, loss_fn).total.backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    assert all(torch.equal(grads[n], p.grad) for n, p in recomputed.named_parameters())
    assert set(recomputed.state_dict()) == set(plain.state_dict())  # names unchanged


def test_transformer_blocks_are_the_towers_blocks() -> None:
    from peflow.models.pe import build_model

    model = build_model("test")
    blocks = parallel.transformer_blocks(model)
    assert blocks == [*model.visual.trunk.blocks, *model.text.transformer.resblocks]


def test_fsdp_without_a_process_group_is_a_clear_error(tiny_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="parallelism 'fsdp' needs a process group"):
        _train(_plan(tiny_corpus, tmp_path, parallelism="fsdp"), Dist())
    with pytest.raises(ValueError, match="parallelism must be one of"):
        _train(_plan(tiny_corpus, tmp_path, parallelism="zero3"), Dist())


@pytest.mark.slow
def test_the_gpu_check_bench_runs_its_tiny_cpu_mode(tmp_path: Path) -> None:
    """`bench/gpu_check.py --tiny`: both paths (DDP; FSDP with activation checkpointing) through the trainer,
    MFU against the matmul peak measured in the same run, the JSON written."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["tiny"] and doc["matmul_peak_tflops"] > 0
    ddp, fsdp = doc["checks"]
    assert (ddp["parallelism"], fsdp["parallelism"], fsdp["activation_checkpointing"]) == ("ddp", "fsdp", True)
    for r in (ddp, fsdp):
        assert r["optimizer"] == "FusedLamb" and r["samples_per_s"] > 0 and r["model_gflops_per_sample"] > 0
        assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / doc["matmul_peak_tflops"])
    assert fsdp["foreach"] and fsdp["hfu"] == pytest.approx(4 / 3 * fsdp["mfu"])
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path / "x.json")], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "no CUDA device" in proc.stderr and not (tmp_path / "x.json").exists()
