import subprocess
import sys

import pytest

from peflow import cli, stages


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for s in stages.STAGES:
        assert s.name in out


@pytest.mark.parametrize("stage", [s.name for s in stages.STAGES])
def test_stage_help_shows_every_config_field(stage, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(stages.get(stage).config_cls):
        assert "--" + f.name.replace("_", "-") in out


def test_console_script_runs():
    exe = [sys.executable, "-m", "peflow.cli", "--help"]
    r = subprocess.run(exe, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "synth" in r.stdout


def test_bad_value_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["synth", "--preset", "no-such-preset", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "no-such-preset" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
