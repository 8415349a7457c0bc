"""An isolated Airflow home (SQLite, migrated once per session) for DAG tests.

Airflow reads its configuration at import time, so DAG tests run their Airflow
code in a child process with this environment (`run_py`). The `airflow_env`
fixture itself is in tests/conftest.py, so tests outside tests/dags use it too.
"""

import subprocess

from tests.helpers import BIN, ROOT, offline_env


def make_airflow_env(home) -> dict:
    env = offline_env(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        PEFLOW_HOME=str(home / "peflow"),
        PEFLOW_STORE=str(home / "peflow" / "store"),  # its own output store, shared by nothing else
    )
    subprocess.run([BIN / "airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    return env


def run_py(code: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    return r
