"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Session fixtures publish into a store of their own, never the checkout's `.run/store`, and
    push no dataset into the checkout's DVC cache."""
    saved = {k: os.environ.get(k) for k in ("PEFLOW_STORE", "PEFLOW_DVC_REPO")}
    os.environ["PEFLOW_STORE"] = str(tmp_path_factory.mktemp("session-store"))
    os.environ["PEFLOW_DVC_REPO"] = ""  # datasets are pushed to no DVC repo (not the checkout's), unless a test says
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets an empty output store (peflow.store), so no test reuses another's outputs."""
    path = tmp_path / "store"
    monkeypatch.setenv("PEFLOW_STORE", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in corpus at preset `test` (32 px; 120 train / 24 val / 24 test images, 24 per
    shift split, 20/8/8 videos of 16 frames; two train shards), generated once per session
    in about a second. Treat it as read-only."""
    from peflow import runner
    from peflow.stages import synth

    out = tmp_path_factory.mktemp("corpus") / "synth"
    runner.execute("synth", synth.Config(out=str(out), corpus="test", seed=0, workers=1))
    return out


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An isolated, migrated Airflow home (SQLite) for code run with `tests.dags.airflow_home.run_py`."""
    from tests.dags.airflow_home import make_airflow_env

    return make_airflow_env(tmp_path_factory.mktemp("airflow"))


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 for the session, with this process's AWS variables pointing at it
    (child processes inherit them); yields those variables."""
    from peflow.io import environ
    from tests.s3_server import env_for, moto_server

    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint, environ(env_for(endpoint)):
        yield env_for(endpoint)


@pytest.fixture
def bucket(s3_env: dict[str, str]) -> str:
    """A fresh, empty S3 bucket on the session's moto server."""
    from tests.s3_server import new_bucket

    return new_bucket()
