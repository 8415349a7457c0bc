"""S3 everywhere a path goes, against a real S3-speaking server (moto's, on 127.0.0.1):
publish and pull, stage inputs and outputs as `s3://` URIs through the runner, training
shards streamed from S3, the DVC remote on S3, MLflow artifacts proxied to S3, and a
whole `test`-preset pipeline run with an `s3://` data source and outputs."""

from __future__ import annotations

import shutil
import subprocess

import boto3
import pytest

from peflow import io, remote, runner
from tests.helpers import BIN, free_port, offline_env

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Local copies of remote folders go under this test's own PEFLOW_HOME."""
    monkeypatch.setenv("PEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def keys(bucket: str, prefix: str = "") -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def folder(path, files: dict[str, bytes]):
    path.mkdir(parents=True)
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    io.write_manifest(path, stage="t", config={})
    return path


def test_publish_replaces_and_pull_round_trips(tmp_path, bucket):
    uri = f"s3://{bucket}/runs/r/out"
    v1 = folder(tmp_path / "v1", {"a.txt": b"a", "sub/b.bin": bytes(100)})
    remote.publish(v1, uri)
    assert keys(bucket) == ["runs/r/out/a.txt", "runs/r/out/manifest.json", "runs/r/out/sub/b.bin"]
    assert remote.digest(uri) == io.dataset_digest(v1)

    pulled = remote.pull(uri)
    assert io.tree_hashes(pulled, exclude=()) == io.tree_hashes(v1, exclude=())
    # the second pull downloads nothing: the local copy was pulled from the same content
    before = (pulled / "a.txt").stat().st_ino
    assert remote.pull(uri) == pulled and (pulled / "a.txt").stat().st_ino == before

    # a new version replaces the old: stale objects go, the manifest names the new content
    v2 = folder(tmp_path / "v2", {"sub/b.bin": bytes(50), "c.txt": b"c"})
    remote.publish(v2, uri)
    assert keys(bucket) == ["runs/r/out/c.txt", "runs/r/out/manifest.json", "runs/r/out/sub/b.bin"]
    assert io.tree_hashes(remote.pull(uri), exclude=()) == io.tree_hashes(v2, exclude=())


def test_a_single_object_input_is_pulled_as_a_file(tmp_path, bucket):
    """A file input (an official checkpoint in S3) comes back as a local file, fingerprinted by its ETag."""
    boto3.client("s3").put_object(Bucket=bucket, Key="ckpt/PE-Core.pt", Body=b"weights")
    uri = f"s3://{bucket}/ckpt/PE-Core.pt"
    path = remote.pull(uri)
    assert path.is_file() and path.read_bytes() == b"weights" and remote.pull(uri) == path
    assert runner.fingerprint(uri, what="init_from") == remote.digest(uri)


def test_an_unpublished_folder_is_no_output(tmp_path, bucket):
    """Objects without a manifest (a publish cut short before its last upload) are not an up-to-date
    output: the runner's key check finds nothing there."""
    uri = f"s3://{bucket}/cut"
    boto3.client("s3").put_object(Bucket=bucket, Key="cut/model.safetensors", Body=b"half")
    assert remote.manifest(uri) is None and runner._existing_key(uri) is None
    with pytest.raises(FileNotFoundError):
        remote.digest(f"s3://{bucket}/nothing-here")


def test_stages_read_and_write_s3(tmp_path, bucket, tiny_corpus):
    """synth publishes to s3://, validate reads s3:// and publishes to s3://; a second run is up to date
    (its key is read from the remote manifest); a missing s3 input is an InputError."""
    from peflow.config import InputError
    from peflow.stages import synth, validate

    corpus, clean = f"s3://{bucket}/run/synth", f"s3://{bucket}/run/validate"
    made = runner.execute("synth", synth.Config(out=corpus, corpus="test", seed=0, workers=1))
    assert made.ran and made.out == corpus and remote.digest(corpus) == io.dataset_digest(tiny_corpus)
    checked = runner.execute("validate", validate.Config(data=corpus, out=clean))
    assert checked.ran and "run/validate/manifest.json" in keys(bucket, "run/validate/")
    assert checked.metrics == remote.read_json(f"{clean}/metrics.json")
    again = runner.execute("validate", validate.Config(data=corpus, out=clean))
    assert not again.ran and again.reused == "up-to-date" and again.key == checked.key
    assert again.metrics == checked.metrics
    with pytest.raises(InputError, match="does not exist"):
        runner.execute("validate", validate.Config(data=f"s3://{bucket}/absent", out=f"s3://{bucket}/x"))


def test_training_streams_shards_from_s3(tmp_path, bucket, tiny_corpus):
    """The loader reads shards from S3 by ranged GETs (the same samples as from disk), and a few
    pretraining steps train on them: `train_shards` stays an s3:// pattern (streamed, not pulled)."""
    from peflow.stages import pretrain
    from peflow.train.data import ShardIndex

    corpus = f"s3://{bucket}/corpus"
    remote.publish(tiny_corpus, corpus)
    local, streamed = ShardIndex.from_corpus(tiny_corpus, "train"), ShardIndex.from_corpus(corpus, "train")
    assert [e.key for e in streamed.entries] == [e.key for e in local.entries]
    image, caption = streamed.get(7)
    assert (image.tobytes(), caption) == (local.get(7)[0].tobytes(), local.get(7)[1])
    pattern = f"{corpus}/image/train/*.tar"
    assert len(remote.expand(pattern)) == 2

    out = tmp_path / "pretrain"
    cfg = pretrain.Config(data=str(tiny_corpus), train_shards=pattern, out=str(out), model="test", steps=3,
                          global_batch=8, resolutions="32:1.0", eval_splits="", log_model=False, progress=False)
    done = runner.execute("pretrain", cfg)
    assert done.ran and (out / "model.safetensors").is_file() and done.metrics["train/final_loss"] > 0
    assert not (remote.local_path(corpus)).exists()  # streamed: no local copy was made
    manifest = io.read_json(out / io.MANIFEST)
    assert manifest["inputs"]["train_shards"] == remote.digest(pattern)


def sh(*args, cwd, env):
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_dvc_remote_on_s3(tmp_path, bucket, tiny_corpus, s3_env, monkeypatch):
    """A dataset stage's output is pushed to a DVC remote on S3 and pulled back in another clone."""
    from peflow import datasets

    env = offline_env(**s3_env)
    repo, other = tmp_path / "repo", tmp_path / "other"
    for r in (repo, other):
        r.mkdir()
        sh("git", "init", "-q", cwd=r, env=env)
        sh(BIN / "dvc", "init", "-q", cwd=r, env=env)
        sh(BIN / "dvc", "remote", "add", "-d", "s3", f"s3://{bucket}/dvc", cwd=r, env=env)
        sh(BIN / "dvc", "remote", "modify", "s3", "endpointurl", s3_env["AWS_ENDPOINT_URL"], cwd=r, env=env)
    data = tmp_path / "run" / "synth"
    shutil.copytree(tiny_corpus, data)
    md5 = datasets.push(data, root=repo)
    assert md5 is not None and md5.endswith(".dir")
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in keys(bucket, "dvc/")

    (other / "data").mkdir()
    shutil.copy(tmp_path / "run" / "synth.dvc", other / "data" / "synth.dvc")
    sh(BIN / "dvc", "pull", "data/synth.dvc", cwd=other, env=env)
    assert io.tree_hashes(other / "data" / "synth", exclude=()) == io.tree_hashes(data, exclude=())


def test_mlflow_artifacts_proxied_to_s3(tmp_path, bucket, monkeypatch):
    """A real `mlflow server` that proxies artifacts to S3: a client logs and loads an artifact through
    the server (no S3 credentials used by the client), and the object lands in the bucket."""
    import mlflow

    from peflow import services

    port = free_port()
    monkeypatch.setenv("PEFLOW_MLFLOW_PORT", str(port))
    monkeypatch.setenv("PEFLOW_MLFLOW_ARTIFACTS", f"s3://{bucket}/mlflow")
    server = services.mlflow_service()
    assert f"s3://{bucket}/mlflow" in server.argv
    server.start(timeout=180)
    try:
        mlflow.set_tracking_uri(services.mlflow_uri())
        mlflow.set_experiment("s3-proxy")
        (tmp_path / "note.txt").write_text("through the proxy")
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(tmp_path / "note.txt"), artifact_path="notes")
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        got = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="notes/note.txt",
                                                  dst_path=str(tmp_path / "back"))
        assert open(got).read() == "through the proxy"
        assert any(k.endswith("/artifacts/notes/note.txt") for k in keys(bucket, "mlflow/"))
    finally:
        server.stop()


def test_pipeline_run_with_s3_data_source_and_outputs(tmp_path, bucket, tiny_corpus):
    """`peflow run --preset test` reading its corpus from s3:// and writing every stage to s3://
    (distributed stages through TorchX, 2 processes): every stage is published, then a rerun of
    evaluate reuses every upstream output from S3."""
    from peflow import orchestration

    source, out = f"s3://{bucket}/corpus", f"s3://{bucket}/runs/r1"
    remote.publish(tiny_corpus, source)
    cfg = orchestration.RunConfig(out=out, preset="test", data_source=source)
    summaries = orchestration.run_pipeline(cfg)
    ran = [s["stage"] for s in summaries if s["ran"]]
    assert ran == [n for n in orchestration.stages.names() if n != "synth"]
    for name in ran:
        assert remote.manifest(f"{out}/{name}") is not None, name
    assert "runs/r1/report.html" in keys(bucket, "runs/r1/")
    assert "zeroshot/test/top1" in summaries[-1]["metrics"]

    again = orchestration.run_pipeline(orchestration.RunConfig(out=out, preset="test", data_source=source,
                                                               stage="evaluate"))
    assert all(s["reused"] == "up-to-date" for s in again[1:-1]) and again[-1]["ran"]
    assert again[-1]["metrics"] == summaries[-1]["metrics"]
