"""The locked environment boots the real Airflow API server and serves /api/v2/version."""

import json
import subprocess
import urllib.request

import pytest

from tests.helpers import BIN, ROOT, free_port, offline_env, stop, wait_http

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_api_server_boots_and_serves_version(tmp_path):
    home = tmp_path / "airflow"
    env = offline_env(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
    )
    subprocess.run([BIN / "airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    port = free_port()
    log = tmp_path / "api-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [BIN / "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/api/v2/version"
        assert wait_http(url, proc, timeout=300, log=log) == 200
        with urllib.request.urlopen(url) as r:
            version = json.load(r)["version"]
        assert version.startswith("3.")
    finally:
        stop(proc)
