"""DVC round trip: `dvc repro` the synth stage in a fresh git repo, `dvc push`
to a local remote, clone, `dvc pull`, and get the same bytes back."""

import shutil
import subprocess

import pytest
import yaml

from peflow import io, pipeline
from tests.helpers import BIN, ROOT, offline_env

pytestmark = pytest.mark.slow


def sh(*args, cwd, env):
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_repro_push_pull_from_a_clean_clone(tmp_path):
    env = offline_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                      GIT_COMMITTER_EMAIL="t@t")
    repo, clone, remote = tmp_path / "repo", tmp_path / "clone", tmp_path / "remote"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo, env=env)
    sh(BIN / "dvc", "init", "-q", cwd=repo, env=env)
    sh(BIN / "dvc", "remote", "add", "-d", "local", remote, cwd=repo, env=env)
    sh(BIN / "dvc", "config", "parsing.bool", "boolean_optional", cwd=repo, env=env)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"] = {"corpus": "test", "seed": 3}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "dvc.yaml").write_text(pipeline.render_dvc_yaml(repo / "params.yaml"))
    shutil.copytree(ROOT / "src", repo / "src")  # the stage's code deps

    sh(BIN / "dvc", "repro", "synth", cwd=repo, env=env)
    made = io.tree_hashes(repo / "data" / "synth", exclude=())
    assert any(k.startswith("image/train/") for k in made)
    assert "data/synth" in (repo / "dvc.lock").read_text()
    assert "synth" in (repo / "data" / ".gitignore").read_text()
    # a second repro with nothing changed does no work
    assert "didn't change" in sh(BIN / "dvc", "repro", "synth", cwd=repo, env=env)

    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "corpus", cwd=repo, env=env)
    sh(BIN / "dvc", "push", "synth", cwd=repo, env=env)

    sh("git", "clone", "-q", repo, clone, cwd=tmp_path, env=env)
    assert not (clone / "data" / "synth").exists()
    sh(BIN / "dvc", "pull", "synth", cwd=clone, env=env)
    assert io.tree_hashes(clone / "data" / "synth", exclude=()) == made
    assert "up to date" in sh(BIN / "dvc", "status", "synth", cwd=clone, env=env).lower()


def test_a_runs_dataset_is_pushed_and_pulled_back(tmp_path, tiny_corpus, monkeypatch):
    """A dataset stage's output goes into the DVC repo's cache and remote; its pointer file brings
    it back with `dvc pull` in another clone of the repo."""
    from peflow import runner
    from peflow.stages import validate

    env = offline_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                      GIT_COMMITTER_EMAIL="t@t")
    repo, other, remote = tmp_path / "repo", tmp_path / "other", tmp_path / "remote"
    for r in (repo, other):
        r.mkdir()
        sh("git", "init", "-q", cwd=r, env=env)
        sh(BIN / "dvc", "init", "-q", cwd=r, env=env)
        sh(BIN / "dvc", "remote", "add", "-d", "local", remote, cwd=r, env=env)
    monkeypatch.setenv("PEFLOW_DVC_REPO", str(repo))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "run" / "validate"
    runner.execute("validate", validate.Config(data=str(tiny_corpus), out=str(out)))
    pointer = yaml.safe_load((tmp_path / "run" / "validate.dvc").read_text())
    (entry,) = pointer["outs"]
    assert entry["md5"] == io.dvc_md5(out) and entry["md5"].endswith(".dir") and entry["path"] == "validate"
    assert (remote / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]).is_file()

    import mlflow

    run = mlflow.search_runs(experiment_names=["peflow"], output_format="list",
                             filter_string="tags.`peflow.stage` = 'validate'")[0]
    assert run.data.tags["dvc.output.md5"] == entry["md5"]

    (other / "data").mkdir()
    shutil.copy(tmp_path / "run" / "validate.dvc", other / "data" / "validate.dvc")
    sh(BIN / "dvc", "pull", "data/validate.dvc", cwd=other, env=env)
    assert io.tree_hashes(other / "data" / "validate", exclude=()) == io.tree_hashes(out, exclude=())
