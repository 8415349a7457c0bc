"""Pipeline-run plumbing without training: ablation tasks, their options and
folders, metric names in the pipeline run, and the HTML report."""

import html
import re

import pytest

from peflow import orchestration
from peflow.run_report import build_report, metric_rows


def _cfg(tmp_path, **kw):
    return orchestration.RunConfig(out=str(tmp_path / "run"), **kw)


def test_ablation_reruns_recipe_stages_and_their_downstream():
    assert orchestration.ablation_stages() == ("pretrain", "evaluate")
    ids = [t.id for t in orchestration.tasks()]
    assert ids == ["synth", "validate", "pretrain", "evaluate", "pretrain_ablation", "evaluate_ablation"]


def test_ablation_argv_swaps_recipe_and_reads_its_own_upstream(tmp_path):
    cfg = _cfg(tmp_path, recipe="pe", ablation=True)
    run = tmp_path / "run"
    pre = orchestration.stage_argv("pretrain", cfg, orchestration.ABLATION)
    assert pre[pre.index("--recipe") + 1] == "vanilla"
    assert pre[pre.index("--out") + 1] == str(run / "ablation" / "pretrain")
    assert pre[pre.index("--data") + 1] == str(run / "validate")  # shared upstream
    ev = orchestration.stage_argv("evaluate", cfg, orchestration.ABLATION)
    assert ev[ev.index("--checkpoint") + 1] == str(run / "ablation" / "pretrain")
    assert ev[ev.index("--data") + 1] == str(run / "validate")
    main = orchestration.stage_argv("pretrain", cfg)
    assert main[main.index("--recipe") + 1] == "pe" and main[main.index("--out") + 1] == str(run / "pretrain")
    vanilla_first = _cfg(tmp_path, recipe="vanilla", ablation=True)
    argv = orchestration.stage_argv("pretrain", vanilla_first, orchestration.ABLATION)
    assert argv[argv.index("--recipe") + 1] == "pe"


def test_ablation_task_needs_the_flag_and_recipe_is_checked(tmp_path):
    with pytest.raises(ValueError, match="no ablation"):
        orchestration.run_stage("pretrain", _cfg(tmp_path), variant=orchestration.ABLATION)
    with pytest.raises(ValueError, match="recipe"):
        _cfg(tmp_path, recipe="clip")


def test_metric_key_prefixes_stage_and_variant():
    main = {"stage": "evaluate", "variant": None}
    abl = {"stage": "evaluate", "variant": "ablation"}
    assert orchestration.metric_key(main, "zeroshot/test/top1") == "evaluate/zeroshot/test/top1"
    assert orchestration.metric_key(abl, "zeroshot/test/top1") == "ablation/evaluate/zeroshot/test/top1"


def _png(path, colour):
    from PIL import Image

    Image.new("RGB", (8, 8), colour).save(path)


def test_report_puts_recipes_side_by_side(tmp_path):
    cfg = _cfg(tmp_path, recipe="pe", ablation=True)
    outs = {}
    for task in ("validate", "pretrain", "evaluate", "ablation/pretrain", "ablation/evaluate"):
        outs[task] = tmp_path / "run" / task
        outs[task].mkdir(parents=True)
    _png(outs["evaluate"] / "layers.png", "red")
    _png(outs["ablation/evaluate"] / "layers.png", "blue")
    summaries = [
        {"stage": "validate", "task": "validate", "variant": None, "recipe": "pe", "out": str(outs["validate"]),
         "ran": True, "seconds": 1.0, "metrics": {"failure_rate": 0.0}},
        {"stage": "evaluate", "task": "evaluate", "variant": None, "recipe": "pe", "out": str(outs["evaluate"]),
         "ran": True, "seconds": 2.0,
         "metrics": {"zeroshot/test/top1": 0.30, "probe/cls/best_layer": 4, "probe/cls/best": 0.5}},
        {"stage": "evaluate", "task": "evaluate_ablation", "variant": "ablation", "recipe": "vanilla",
         "out": str(outs["ablation/evaluate"]), "ran": True, "seconds": 2.0,
         "metrics": {"zeroshot/test/top1": 0.25, "probe/cls/best_layer": 6, "probe/cls/best": 0.6}},
    ]
    page = build_report(cfg, "abc123", summaries)
    assert "main (pe)" in page and "ablation (vanilla)" in page
    row = re.search(r"<td>evaluate/zeroshot/test/top1</td>(.*?)</tr>", page).group(1)
    assert re.findall(r'class="([^"]+)">([^<]+)<', row) == [("num best", "0.3"), ("num", "0.25")]
    layer = re.search(r"<td>evaluate/probe/cls/best_layer</td>(.*?)</tr>", page).group(1)
    assert "best" not in layer  # a layer index is not a score
    assert page.count("data:image/png;base64,") == 2
    assert html.escape(str(outs["ablation/evaluate"] / "layers.png")) in page
    values = {None: {"evaluate/probe/seg/best": 1.0, "pretrain/train/final_loss": 2.0, "other/x": 1.0}}
    assert metric_rows(values) == ["evaluate/probe/seg/best", "pretrain/train/final_loss"]
