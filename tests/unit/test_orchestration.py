"""Pipeline-run plumbing without training: variant tasks (the recipe and the engine
ablation, the ablation ladder's members), their options and folders, metric names in the pipeline run, and the HTML report."""

import html
import re

import pytest

from peflow import ladder, orchestration, presets, stages
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
                   "finetune-video_metadata", "evaluate_metadata", "pretrain_ladder", "evaluate_ladder"]


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


def test_ladder_is_one_variant_of_nine_members_each_one_step_up(tmp_path):
    cfg = _cfg(tmp_path, ladder=True)
    cfgs = orchestration.resolve(cfg)
    steps = [s.name for s in ladder.STEPS]
    assert [t.label for t in orchestration.instances(cfg) if t.variant] == [
        f"{stage}_ladder[{s}]" for s in steps for stage in ("pretrain", "evaluate")]
    pre = {s: cfgs[f"pretrain_ladder[{s}]"] for s in steps}
    main = cfgs["pretrain"]
    assert pre["baseline"].recipe == "vanilla" and pre["baseline"].resolutions == "40:1"
    assert pre["baseline"].global_batch == main.global_batch // 2 and not pre["baseline"].rope
    assert pre["baseline"].pool == "cls"
    assert pre["progressive"].resolutions == "32:0.5,40:0.5" and pre["progressive"].recipe == "vanilla+progressive"
    assert pre["batch"].global_batch == main.global_batch
    assert pre["lamb"].recipe == "vanilla+progressive+lamb"
    assert pre["highres"].resolutions == main.resolutions
    assert pre["rope"].rope and pre["rope"].pool == "cls" and pre["attnpool"].pool == "attn"
    assert pre["augment"].recipe == "vanilla+progressive+lamb+augment"
    # the top step is the paper's PE recipe (LAMB); the preset's short-run recipe differs only in the optimizer
    assert pre["maskreg"].recipe == "pe" and main.recipe == "pe-adamw"
    assert {k: v for k, v in vars(pre["maskreg"]).items() if k not in ("out", "recipe")} == \
        {k: v for k, v in vars(main).items() if k not in ("out", "recipe")}
    # a run of the PE recipe itself has the same config: the same output key (reused, not retrained)
    pe_run = orchestration.resolve(_cfg(tmp_path, ladder=True, recipe="pe"))
    assert {k: v for k, v in vars(pe_run["pretrain_ladder[maskreg]"]).items() if k != "out"} == \
        {k: v for k, v in vars(pe_run["pretrain"]).items() if k != "out"}
    assert pre["lamb"].out == str(tmp_path / "run" / "ladder" / "lamb" / "pretrain")
    ev = cfgs["evaluate_ladder[lamb]"]
    assert ev.checkpoint == pre["lamb"].out and ev.probe_tasks == "cls" and not ev.video and ev.lang == ""
    assert {t.id for t in orchestration.Task("evaluate", "ladder", "rope").upstream} == {"pretrain_ladder", "validate"}


def test_ladder_member_must_be_named_and_known(tmp_path):
    with pytest.raises(ConfigError, match="name a member"):
        orchestration.run_stage("pretrain", _cfg(tmp_path, ladder=True), variant="ladder")
    with pytest.raises(ValueError, match="no member 'sgd'"):
        orchestration.run_stage("pretrain", _cfg(tmp_path, ladder=True), variant="ladder", member="sgd")
    assert _cfg(tmp_path).members("ladder") == [] and _cfg(tmp_path, ablation=True).members("ablation") == ["ablation"]


def test_ladder_resolutions_scale_onto_the_patch_grid():
    assert ladder.scaled("48:0.5,64:0.5", 2 / 3, 8) == "32:0.5,40:0.5"
    assert ladder.scaled("98:0.42,154:0.33,224:0.17,336:0.08", 2 / 3, 14) == "70:0.42,98:0.33,154:0.17,224:0.08"
    assert ladder.scaled("16:0.5,24:0.5", 0.5, 8) == "16:1"  # at least 2 patches; equal sizes merge


def test_presets_derive_from_nano_and_every_config_checks():
    nano, test = presets.nano(), presets.test()
    assert nano.config("pretrain").steps == 1200 and test.config("pretrain").steps == 20
    assert test.config("pretrain").recipe == nano.config("pretrain").recipe == "pe-adamw"
    assert presets.b16().config("pretrain").model == "pe-core-b16" and presets.b16().nodes == "1x8"
    assert {presets.get(n).config("pretrain").recipe for n in ("b16", "l14", "g14")} == {"pe"}  # LAMB
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
    assert spec["recipe"]["enum"] == [None, "pe", "vanilla", "pe-adamw"]


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


def test_report_shows_the_ladder_as_one_table_beside_the_papers(tmp_path):
    cfg = _cfg(tmp_path, ladder=True)
    summaries = [{"stage": "evaluate", "task": "evaluate", "variant": None, "recipe": "pe",
                  "out": str(tmp_path / "e"), "ran": True, "seconds": 1.0, "metrics": {"zeroshot/test/top1": 0.2}}]
    for i, step in enumerate(("baseline", "lamb")):
        version = f"ladder/{step}"
        summaries += [
            {"stage": "pretrain", "task": "pretrain_ladder", "variant": version, "member": step, "recipe": "x",
             "out": str(tmp_path / step / "p"), "ran": True, "seconds": 9.0,
             "metrics": {"train/seconds": 100.0, "train/model_flops_per_s": 2e12}},
            {"stage": "evaluate", "task": "evaluate_ladder", "variant": version, "member": step, "recipe": None,
             "out": str(tmp_path / step / "e"), "ran": True, "seconds": 1.0,
             "metrics": {"zeroshot/test/top1": 0.3 + i / 10, "zeroshot/robustness_avg": 0.15,
                         "probe/cls/best_layer": 4, "probe/cls/best": 0.5, "probe/cls/last": 0.4}}]
    page = build_report(cfg, "abc", summaries)
    assert "<h2>The ablation ladder (paper Tab. 26)</h2>" in page
    rows = re.findall(r"<tr>(<td>\d [^<]*</td>.*?)</tr>", page)
    cells = [re.findall(r"<td>([^<]*)</td>", r) for r in rows]
    assert [c[0] for c in cells] == ["1 baseline (vanilla CLIP)", "4 + LAMB"]
    assert cells[1][1:3] == ["0.400", "0.150"] and cells[0][5] == "4 (0.500) / 0.400" and cells[0][6] == "200.0"
    assert cells[0][-4:] == ["78.9", "75.3", "14", "1.0"] and cells[1][-3] == "76.9"  # the paper's column
    assert "ladder/lamb" not in re.search(r"<h2>Key metrics</h2>(.*?)</table>", page, re.S).group(1)


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
