"""Layer-by-layer probes: on constructed features each probe finds the layer
that holds its target and scores near chance on noise; on the tiny corpus the
whole analysis (and the evaluate stage with probes on) writes every metric,
`layers.json` and `layers.png`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peflow.evaluate import probes
from peflow.evaluate.probes import ProbeFeatures, mean_iou, patch_targets, score_layers, summarise

C = 4  # classes of the constructed problems


@pytest.fixture(autouse=True)
def one_thread():
    """Small problems: one torch thread is as fast as two, and far faster on a busy machine
    (OpenMP threads waiting on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _features(pooled: dict[int, torch.Tensor], labels: torch.Tensor, **kw) -> ProbeFeatures:
    return ProbeFeatures(pooled=pooled, patches=kw.pop("patches", {}), labels=labels,
                         captions=[f"caption {i}" for i in range(len(labels))], **kw)


def _split(n: int, g: torch.Generator) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Layer 1: noise; layer 2: the label linearly (class means 5 sqrt(2) apart, unit noise);
    layer 3: the label more weakly (a quarter of the separation). Shapes [n, 16]."""
    y = torch.randint(0, C, (n,), generator=g)
    means = 5.0 * torch.eye(C, 16)
    noise = lambda: torch.randn(n, 16, generator=g)  # noqa: E731
    return {1: noise(), 2: means[y] + noise(), 3: 0.25 * means[y] + noise()}, y


def test_cls_probe_finds_the_layer_that_holds_the_label():
    g = torch.Generator().manual_seed(0)
    (x_tr, y_tr), (x_te, y_te) = _split(400, g), _split(400, g)
    per_layer = score_layers(_features(x_tr, y_tr), _features(x_te, y_te), tasks=["cls"], num_classes=C)
    s1, s2, s3 = per_layer["cls"]
    assert s2 > 0.95
    assert abs(s1 - 1 / C) < 0.1  # chance
    assert s1 + 0.1 < s3 < s2
    m = summarise(per_layer, [1, 2, 3])
    assert m["probe/cls/best_layer"] == 2.0 and m["probe/cls/best"] == s2 and m["probe/cls/last"] == s3
    assert set(m) == {f"probe/cls/layer_{i}" for i in (1, 2, 3)} | {f"probe/cls/{k}" for k in ("best_layer", "best",
                                                                                            "last")}


def _dense_split(rows: int, g: torch.Generator) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Patch rows [rows, 16]: layer 1 noise; layer 2 holds the class (background 0 or 1..C)
    and the depth linearly; layer 3 holds only the depth."""
    seg = torch.randint(0, C + 1, (rows,), generator=g)
    depth = 10 + 5 * torch.rand(rows, generator=g)
    depth_dir = F.normalize(torch.ones(16), dim=0)
    means = 3.0 * torch.eye(C + 1, 16)
    noise = lambda s: s * torch.randn(rows, 16, generator=g)  # noqa: E731
    return ({1: noise(1.0), 2: means[seg] + depth[:, None] * depth_dir + noise(0.3),
             3: depth[:, None] * depth_dir + noise(0.3)}, seg, depth)


def test_dense_probes_find_the_layer_that_holds_class_and_depth():
    g = torch.Generator().manual_seed(1)
    splits = []
    for rows in (1500, 1000):
        patches, seg, depth = _dense_split(rows, g)
        pooled = {k: torch.zeros(4, 16) for k in patches}  # unused by the dense probes
        splits.append(_features(pooled, torch.zeros(4, dtype=torch.long), patches=patches, seg=seg, depth=depth))
    per_layer = score_layers(*splits, tasks=["seg", "depth"], num_classes=C)
    seg1, seg2, seg3 = per_layer["seg"]
    assert seg2 > 0.9
    assert seg1 < 0.25 and seg3 < 0.25  # chance mIoU with 5 balanced classes is about 1/9
    d1, d2, d3 = per_layer["depth"]
    assert d2 > 0.9 and d3 > 0.9
    assert abs(d1) < 0.05  # noise explains no variance
    m = summarise(per_layer, [1, 2, 3])
    assert m["probe/seg/best_layer"] == 2.0 and m["probe/seg/last"] == seg3
    assert m["probe/depth/best_layer"] in (2.0, 3.0)


def test_lang_probe_finds_the_layer_that_maps_onto_the_captions():
    g = torch.Generator().manual_seed(2)
    E, n_train, n_test = 24, 400, 100
    text = torch.randn(n_train + n_test, E, generator=g)
    A = torch.randn(E, 32, generator=g)  # features are a linear image of the caption embedding
    noise = torch.randn(n_train + n_test, 32, generator=g)
    layers = {1: noise, 2: text @ A + 0.1 * noise}
    tr = _features({k: v[:n_train] for k, v in layers.items()}, torch.zeros(n_train, dtype=torch.long),
                   text_emb=text[:n_train])
    te = _features({k: v[n_train:] for k, v in layers.items()}, torch.zeros(n_test, dtype=torch.long),
                   text_emb=text[n_train:])
    r1, r2 = score_layers(tr, te, tasks=["lang"], num_classes=C)["lang"]
    assert r2 > 0.9
    assert r1 < 0.05  # chance 0.01


def test_mean_iou_counts_present_classes_only():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert mean_iou(y, y, 4) == 1.0  # class 3 absent: not averaged in
    pred = torch.tensor([0, 0, 1, 2, 2, 2])  # class 1: 1/2, class 2: 2/3
    assert mean_iou(pred, y, 4) == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)
    assert mean_iou(torch.full_like(y, 3), y, 4) == 0.0


def test_patch_targets_take_the_majority_class_and_mean_depth():
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 1  # object 1 fills the top-left patch
    mask[4:, 4:7] = 2  # object 2 covers 3/4 of the bottom-right patch
    mask[:4, 4:5] = 2  # ... and 1/4 of the top-right one (background wins there)
    depth = np.arange(64, dtype=np.uint8).reshape(8, 8)
    seg, d = patch_targets(mask, depth, [5, 7], (2, 2), num_classes=12)
    assert seg.tolist() == [1 + 5, 0, 0, 1 + 7]  # row-major patch order, 1 + label id
    assert d.tolist() == pytest.approx([depth[:4, :4].mean(), depth[:4, 4:].mean(), depth[4:, :4].mean(),
                                        depth[4:, 4:].mean()])


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    from peflow.models import build_model

    torch.manual_seed(0)
    return build_model("test").eval()


def _check_result(result: probes.ProbeResult, tasks: tuple[str, ...], n_layers: int) -> None:
    assert list(result.per_layer) == list(tasks) and result.layers == list(range(1, n_layers + 1))
    for t in tasks:
        assert len(result.per_layer[t]) == n_layers
        for i in range(1, n_layers + 1):
            score = result.metrics[f"probe/{t}/layer_{i}"]
            assert (-1.0 if t == "depth" else 0.0) <= score <= 1.0, (t, i, score)
        assert result.metrics[f"probe/{t}/best_layer"] in range(1, n_layers + 1)
        assert result.metrics[f"probe/{t}/best"] == max(result.per_layer[t])
        assert result.metrics[f"probe/{t}/last"] == result.per_layer[t][-1]
    assert all(k.split("/")[1] in tasks for k in result.metrics)


def test_run_probes_end_to_end(tiny_corpus, tiny_model, tmp_path):
    from peflow.models import get_tokenizer

    result = probes.run_probes(tiny_model, tiny_corpus, tokenizer=get_tokenizer("test"), probe_train=64,
                               probe_test=24, batch_size=32)
    _check_result(result, probes.TASKS, n_layers=4)
    assert result.notes == []
    assert result.counts == {"probe_images/train": 64, "probe_images/test": 24,
                             "probe_patches/train": 64 * 16, "probe_patches/test": 24 * 16}  # 4x4 grid, 16 kept
    assert result.chance == {"cls": 1 / 12, "lang": 1 / 24}
    png = probes.plot_layers(result, tmp_path / "layers.png", title="test")
    assert png.stat().st_size > 5000
    table = json.loads(probes.write_layers_json(result, tmp_path / "layers.json").read_text())
    assert table["layers"] == [1, 2, 3, 4] and table["tasks"]["seg"]["scores"] == result.per_layer["seg"]
    # deterministic: the same inputs give the same numbers
    again = probes.run_probes(tiny_model, tiny_corpus, tokenizer=get_tokenizer("test"), probe_train=64,
                              probe_test=24, batch_size=32, tasks=("seg", "cls"))
    assert again.per_layer == {t: result.per_layer[t] for t in ("seg", "cls")}


def _copy_without_dense(src: Path, dst: Path) -> Path:
    """The corpus's train and test splits with mask.png and depth.png left out (a non-built-in corpus)."""
    for split in ("train", "test"):
        (dst / "image" / split).mkdir(parents=True)
        for shard in sorted((src / "image" / split).glob("*.tar")):
            with tarfile.open(shard) as tin, tarfile.open(dst / "image" / split / shard.name, "w") as tout:
                for member in tin:
                    if not member.name.endswith((".mask.png", ".depth.png")):
                        tout.addfile(member, io.BytesIO(tin.extractfile(member).read()))
    (dst / "card.json").write_text((src / "card.json").read_text())
    return dst


def test_probes_skip_dense_tasks_without_dense_targets(tiny_corpus, tiny_model, tmp_path):
    from peflow.models import get_tokenizer

    corpus = _copy_without_dense(tiny_corpus, tmp_path / "plain")
    assert not probes.has_dense_targets(corpus, "test") and probes.has_dense_targets(tiny_corpus, "test")
    result = probes.run_probes(tiny_model, corpus, tokenizer=get_tokenizer("test"), probe_train=32, probe_test=16)
    _check_result(result, ("cls", "lang"), n_layers=4)
    assert len(result.notes) == 1 and "seg and depth" in result.notes[0]
    with pytest.raises(ValueError, match="none of the probe tasks"):
        probes.run_probes(tiny_model, corpus, tokenizer=get_tokenizer("test"), tasks=("seg",))
    with pytest.raises(ValueError, match="unknown probe tasks"):
        probes.run_probes(tiny_model, corpus, tokenizer=get_tokenizer("test"), tasks=("cls", "ocr"))


def _peflow(*argv: str) -> int:
    from peflow import cli

    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code


def test_evaluate_stage_runs_the_probes(tiny_corpus, tiny_model, tmp_path, monkeypatch, capsys):
    import mlflow

    from peflow.models import save_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PEFLOW_PARENT_RUN_ID", raising=False)
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model, ckpt)
    out = tmp_path / "evaluate"
    assert _peflow("evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_corpus), "--out", str(out),
                   "--splits", "test", "--batch-size", "32", "--probe-train", "48", "--probe-test", "24",
                   "--threads", "1", "--experiment", "test-probes") == 0
    console = capsys.readouterr().out
    for t in probes.TASKS:
        assert f"probe/{t}: best layer" in console
    metrics = json.loads((out / "metrics.json").read_text())
    assert "zeroshot/test/top1" in metrics
    for t in probes.TASKS:
        assert {f"probe/{t}/layer_{i}" for i in range(1, 5)} | {f"probe/{t}/best_layer"} <= set(metrics)
    table = json.loads((out / "layers.json").read_text())
    assert table["tasks"]["depth"]["scores"] == [metrics[f"probe/depth/layer_{i}"] for i in range(1, 5)]
    assert (out / "layers.png").stat().st_size > 5000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["probe_images/train"] == 48
    assert {"layers.png", "layers.json"} <= set(manifest["outputs"])
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("test-probes").experiment_id])[0]
    assert run.data.metrics == pytest.approx(metrics)
    assert {"layers.png", "layers.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    # a corpus without dense targets: seg and depth skipped with a note, the rest still runs
    plain = _copy_without_dense(tiny_corpus, tmp_path / "plain")
    assert _peflow("evaluate", "--checkpoint", str(ckpt), "--data", str(plain), "--out", str(tmp_path / "e2"),
                   "--batch-size", "32", "--probe-train", "32", "--probe-test", "16",
                   "--threads", "1", "--experiment", "test-probes") == 0
    assert "skipped the seg and depth probes" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert "probe/cls/best_layer" in metrics and not any(k.startswith("probe/seg/") for k in metrics)

    # --no-probes: no probe metrics or files; bad task names are a usage error
    assert _peflow("evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_corpus), "--out", str(tmp_path / "e3"),
                   "--splits", "test", "--no-probes", "--threads", "1", "--experiment", "test-probes") == 0
    assert not any(k.startswith("probe/") for k in json.loads((tmp_path / "e3" / "metrics.json").read_text()))
    assert not (tmp_path / "e3" / "layers.png").exists()
    assert _peflow("evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_corpus), "--out", str(tmp_path / "e4"),
                   "--probe-tasks", "cls,ocr") == 2
    assert "ocr" in capsys.readouterr().err


def test_probe_metrics_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    assert "## Layer-by-layer probes" in doc
    for name in ("probe/<task>/layer_<i>", "probe/<task>/best_layer", "probe/<task>/best", "probe/<task>/last",
                 "layers.png", "layers.json", *probes.TASKS):
        assert name in doc, name
