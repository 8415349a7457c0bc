"""Pipeline-run plumbing without training: variant tasks (the recipe and the engine
ablation), their options and folders, metric names in the pipeline run, and the HTML report."""

import html
import re

import pytest

from peflow import orchestration, presets, stages
from peflow.config import ConfigError
from peflow.run_report import build_report, metric_rows


def _cfg(tmp_path, **kw):
    return orchestration.RunConfig(out=str(tmp_path / "run"), **kw)


def test_variants_rerun_their_roots_and_what_reads_them():
    assert stages.get_variant("ablation").stages() == ["pretrain", "evaluate"]  # `only`: not the video chain
    assert stages.get_variant("metadata").stages() == ["finetune-video", "evaluate"]
    ids = [t.id for t in orchestration.tasks()]
    assert ids == ["synth", "validate", "pretrain", "train-captioner", "caption", "validate-captions",
                   "finetune-video", "align-lang", "align-spatial", "evaluate", "pretrain_ablation",
                   "evaluate_ablation",
                   "finetune-video_metadata", "evaluate_metadata"]


def test_engine_ablation_finetunes_on_web_text_and_evaluates_its_own_model(tmp_path):
    run = tmp_path / "run"
    cfgs = orchestration.resolve(_cfg(tmp_path, engine_ablation=True))
    assert "pretrain_ablation" not in cfgs
    ft, ev = cfgs["finetune-video_metadata"], cfgs["evaluate_metadata"]
    assert ft.captions == "metadata" and cfgs["finetune-video"].captions == "engine"
    assert ft.data == str(run / "validate-captions") and ft.out == str(run / "metadata" / "finetune-video")
    assert ev.video_checkpoint == str(run / "metadata" / "finetune-video") and ev.checkpoint == str(run / "pretrain")


def test_recipe_ablation_leaves_the_video_model_it_does_not_remake_out(tmp_path):
    cfgs = orchestration.resolve(_cfg(tmp_path, ablation=True))
    assert cfgs["evaluate_ablation"].video_checkpoint == ""  # the main video model stems from the main recipe
    assert cfgs["evaluate_ablation"].lang == "" and cfgs["evaluate_ablation"].spatial == ""  # so do the aligned ones
    assert cfgs["evaluate"].lang == str(tmp_path / "run" / "align-lang")
    assert cfgs["evaluate"].spatial == str(tmp_path / "run" / "align-spatial")
    assert cfgs["evaluate"].video_checkpoint == str(tmp_path / "run" / "finetune-video")
    up = {t.id for t in orchestration.Task("evaluate", "ablation").upstream}
    assert up == {"pretrain_ablation", "validate"}


def test_ablation_config_swaps_recipe_and_reads_its_own_upstream(tmp_path):
    run = tmp_path / "run"
    cfgs = orchestration.resolve(_cfg(tmp_path, recipe="pe", ablation=True))
    pre, ev = cfgs["pretrain_ablation"], cfgs["evaluate_ablation"]
    assert pre.recipe == "vanilla" and pre.out == str(run / "ablation" / "pretrain")
    assert pre.data == str(run / "validate")  # shared upstream
    assert ev.checkpoint == str(run / "ablation" / "pretrain") and ev.data == str(run / "validate")
    assert cfgs["pretrain"].recipe == "pe" and cfgs["pretrain"].out == str(run / "pretrain")
    vanilla_first = orchestration.resolve(_cfg(tmp_path, recipe="vanilla", ablation=True))
    assert vanilla_first["pretrain_ablation"].recipe == "pe"
    argv = orchestration.config_argv(pre)
    assert argv[argv.index("--recipe") + 1] == "vanilla" and "--log-model" in argv and "--no-compile" in argv


def test_ablation_task_needs_the_flag_and_recipe_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="no ablation variant"):
        orchestration.run_stage("pretrain", _cfg(tmp_path), variant=orchestration.ABLATION)
    with pytest.raises(ConfigError, match="recipe"):
        _cfg(tmp_path, recipe="clip")


def test_presets_derive_from_nano_and_every_config_checks():
    nano, test = presets.nano(), presets.test()
    assert nano.config("pretrain").steps == 1200 and test.config("pretrain").steps == 20
    assert test.config("pretrain").recipe == nano.config("pretrain").recipe == "pe"
    assert presets.b16().config("pretrain").model == "pe-core-b16" and presets.b16().nodes == "1x8"
    assert presets.l14().config("pretrain").global_batch == 131_072
    for name in presets.names():
        for t, cfg in orchestration.resolve(orchestration.RunConfig(out="/x", preset=name)).items():
            assert cfg.out.startswith("/x/"), t


@pytest.mark.parametrize(("kw", "names"), [
    (dict(preset="huge"), ["preset", "'huge'", "nano"]),
    (dict(overrides="pretrain.stepz=3"), ["pretrain", "stepz", "steps"]),
    (dict(overrides="pretrain.steps=0"), ["pretrain.steps", ">= 1"]),
    (dict(overrides="pretrain.model=gigantic"), ["pretrain.model", "'gigantic'", "pe-core-b16"]),
    (dict(overrides="evaluate.probe_tasks=cls,nope"), ["overrides", "'nope'"]),
    (dict(overrides="pretrain.resolutions=33:1"), ["pretrain", "33", "patch size"]),
    (dict(overrides="validate.max_failure_rate=2"), ["validate", "max_failure_rate"]),
    (dict(overrides="nowhere.x=1"), ["unknown stage", "'nowhere'"]),
    (dict(stage="pretrain,fly"), ["stage", "'fly'"]),
    (dict(steps=0), ["steps", ">= 1"]),
])
def test_bad_preset_or_field_fails_before_any_stage_naming_it(tmp_path, kw, names):
    with pytest.raises(ConfigError) as e:
        orchestration.resolve(_cfg(tmp_path, **kw))
    for name in names:
        assert name in str(e.value), (name, str(e.value))
    assert not (tmp_path / "run").exists()


def test_params_form_offers_presets_and_optional_overrides():
    spec = orchestration.params_spec()
    assert spec["preset"]["enum"] == presets.names() and spec["preset"]["default"] == "nano"
    assert spec["steps"]["type"] == ["null", "integer"] and spec["steps"]["default"] is None
    assert spec["recipe"]["enum"] == [None, "pe", "vanilla"]


def test_unselected_stage_without_an_earlier_output_is_a_config_error(tmp_path):
    cfg = _cfg(tmp_path, preset="test", stage="evaluate", data_source=str(tmp_path))
    with pytest.raises(ConfigError, match="validate is not selected"):
        orchestration.run_stage("validate", cfg)


def test_metric_key_prefixes_stage_and_variant():
    main = {"stage": "evaluate", "variant": None}
    abl = {"stage": "evaluate", "variant": "ablation"}
    assert stages.metric_key(main, "zeroshot/test/top1") == "evaluate/zeroshot/test/top1"
    assert stages.metric_key(abl, "zeroshot/test/top1") == "ablation/evaluate/zeroshot/test/top1"


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


def test_report_tables_of_the_alignment_stages():
    from peflow.compare import direction
    from peflow.run_report import dense_table, qa_table

    main = {"evaluate/lang/chosen/qa/image/colour": 0.37, "evaluate/lang/last/qa/image/colour": 0.33,
            "evaluate/lang/chosen/qa/image/colour_majority": 0.16, "evaluate/dense/core_last/seg_miou": 0.2,
            "evaluate/dense/core_best/seg_miou": 0.21, "evaluate/dense/core_best/seg_layer": 3.0,
            "evaluate/dense/spatial_last/track_j": 0.36}
    assert qa_table(main) == [["image colour", "0.37", "0.33", "0.16"]]
    rows = dense_table(main)
    assert [r[0] for r in rows] == ["PE-core, last layer", "PE-core, best intermediate layer", "PE spatial, last layer"]
    assert rows[1][1] == "0.21 (layer 3)" and rows[2][4] == "0.36" and rows[0][2] == "—"
    assert direction("evaluate/dense/core_last/depth_rmse") == -1 and direction("evaluate/lang/chosen/layer") == 0
