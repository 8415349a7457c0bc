import subprocess
import sys

import pytest

from peflow import cli, stages


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for s in stages.all_stages():
        assert s.name in out


@pytest.mark.parametrize("stage", stages.names())
def test_stage_help_shows_every_config_field_and_the_preset(stage, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(stages.get(stage).config_cls):
        assert "--" + f.name.replace("_", "-") in out
    assert "--preset" in out and "--force" in out


def test_console_script_runs():
    exe = [sys.executable, "-m", "peflow.cli", "--help"]
    r = subprocess.run(exe, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "synth" in r.stdout


@pytest.mark.parametrize(("argv", "says"), [
    (["synth", "--corpus", "no-such-corpus"], "synth.corpus: 'no-such-corpus' is not one of"),
    (["synth", "--preset", "no-such-preset"], "preset: 'no-such-preset' is not one of"),
    (["pretrain", "--steps", "0", "--data", "D"], "pretrain.steps: must be >= 1"),
    (["pretrain", "--data", "/nowhere"], "data /nowhere: does not exist"),
    (["evaluate", "--data", "/nowhere"], "evaluate.checkpoint: required"),
    (["run", "--preset", "huge"], "preset: 'huge' is not one of"),
])
def test_bad_value_is_a_one_line_error(tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
