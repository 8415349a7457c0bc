"""The training loader (determinism, rank sharding, resume) and checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from peflow.models.pe import build_model, get_tokenizer
from peflow.train import checkpoint, optim, recipe
from peflow.train.data import ShardIndex, TrainLoader


def _loader(corpus: Path, rank: int = 0, world: int = 1, seed: int = 0) -> TrainLoader:
    return TrainLoader(ShardIndex.from_corpus(corpus, "train"), global_batch=16, rank=rank, world_size=world,
                       seed=seed, recipe=recipe.pe(), tokenizer=get_tokenizer("micro"))


def test_order_is_a_function_of_seed_and_step_and_ranks_split_the_global_batch(tiny_corpus: Path) -> None:
    one = _loader(tiny_corpus)
    assert len(one.index) == 120 and one.steps_per_epoch == 7
    im, tok = one.batch(3, 32)
    assert im.shape == (16, 3, 32, 32) and tok.shape == (16, 32)
    again_im, again_tok = _loader(tiny_corpus).batch(3, 32)  # a fresh loader (a resume) sees the same batch
    assert torch.equal(im, again_im) and torch.equal(tok, again_tok)
    halves = [_loader(tiny_corpus, r, 2).batch(3, 32) for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), im)  # same global batch for any process count
    assert torch.equal(torch.cat([h[1] for h in halves]), tok)
    assert not torch.equal(_loader(tiny_corpus, seed=1).batch(3, 32)[0], im)
    assert one.position(7) == {"epoch": 1, "batch": 0}
    assert not torch.equal(one.batch(7, 32)[0], one.batch(0, 32)[0])  # a new epoch reshuffles


def test_loader_rejects_batches_it_cannot_split(tiny_corpus: Path) -> None:
    index = ShardIndex.from_corpus(tiny_corpus, "train")
    with pytest.raises(ValueError, match="not divisible"):
        TrainLoader(index, global_batch=15, rank=0, world_size=2, seed=0, recipe=recipe.pe(), tokenizer=None)
    with pytest.raises(ValueError, match="larger than the training set"):
        TrainLoader(index, global_batch=1024, rank=0, world_size=1, seed=0, recipe=recipe.pe(), tokenizer=None)


def test_checkpoint_round_trip_restores_everything_and_keeps_the_last_k(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("micro")
    opt = optim.build_optimizer(model, recipe.pe(), 1e-3)
    sched = optim.build_scheduler(opt, warmup_steps=2, total_steps=10)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    for step in (1, 2, 3):
        random.seed(step), np.random.seed(step), torch.manual_seed(step)
        checkpoint.save(tmp_path, step, model=model, optimizer=opt, scheduler=sched,
                        extra={"data_position": {"epoch": 0, "batch": step}}, rank=0, world_size=1,
                        barrier=lambda: None, keep=2)
    expect = (random.random(), np.random.rand(), torch.rand(1))
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [2, 3]
    assert not list(tmp_path.glob(".step-*"))

    fresh = build_model("micro")
    opt2 = optim.build_optimizer(fresh, recipe.pe(), 1e-3)
    sched2 = optim.build_scheduler(opt2, warmup_steps=2, total_steps=10)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    trainer = checkpoint.load(checkpoint.latest(tmp_path), model=fresh, optimizer=opt2, scheduler=sched2,
                              rank=0, world_size=1)
    assert trainer["step"] == 3 and trainer["data_position"] == {"epoch": 0, "batch": 3}
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
