"""Local services for the embedded default, on 127.0.0.1: `mlflow server`
(SQLite; artifacts proxied to a local folder, or to `$PEFLOW_MLFLOW_ARTIFACTS`,
e.g. an `s3://` URI with the endpoint and credentials in the AWS variables) and `airflow standalone` (SQLite, simple auth
manager with a generated admin password, the repo's `dags/`).

`python -m peflow.services up|down|status`. Each service runs in its own
process group with its pid, log and data under $PEFLOW_HOME (default `.run/`),
so `down` stops exactly the processes `up` started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("PEFLOW_HOME", ".run")).resolve()


@dataclasses.dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    health_url: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def pidfile(self) -> Path:
        return home() / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return home() / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 120.0) -> None:
        """Start the service (unless it runs already) and wait until it is healthy."""
        self.wait(self.launch(), timeout)

    def launch(self) -> subprocess.Popen | None:
        """Start the service without waiting for it (None: it runs already); `wait` then waits for it."""
        if self.pid() is not None and self.healthy():
            print(f"{self.name}: already running (pid {self.pid()})")
            return None
        home().mkdir(parents=True, exist_ok=True)
        log = open(self.logfile, "ab")
        proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        self.pidfile.write_text(str(proc.pid))
        return proc

    def wait(self, proc: subprocess.Popen | None, timeout: float = 120.0) -> None:
        """Wait until the service `launch` started answers its health check."""
        if proc is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {proc.returncode}; see {self.logfile}")
            if self.healthy():
                print(f"{self.name}: up at {self.health_url.rsplit('/', 1)[0]} (pid {proc.pid})")
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f}s; see {self.logfile}")

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        # children that outlive the leader (airflow standalone's workers) go too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        print(f"{self.name}: stopped (pid {pid})")


def mlflow_port() -> int:
    return int(os.environ.get("PEFLOW_MLFLOW_PORT", "5000"))


def mlflow_uri() -> str:
    return f"http://127.0.0.1:{mlflow_port()}"


def mlflow_artifacts() -> str:
    """Where the MLflow server stores the artifacts it proxies: $PEFLOW_MLFLOW_ARTIFACTS (a folder or an
    `s3://` URI), else $PEFLOW_HOME/mlflow/artifacts."""
    return os.environ.get("PEFLOW_MLFLOW_ARTIFACTS") or str(home() / "mlflow" / "artifacts")


def mlflow_service() -> Service:
    root = home() / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    return Service(
        name="mlflow",
        argv=[
            exe, "server", "--host", "127.0.0.1", "--port", str(mlflow_port()),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", mlflow_artifacts(),
            "--workers", "1",
        ],
        health_url=f"{mlflow_uri()}/health",
        env={"MLFLOW_DISABLE_TELEMETRY": "true"},
    )


REPO = Path(__file__).resolve().parents[2]


def airflow_port() -> int:
    return int(os.environ.get("PEFLOW_AIRFLOW_PORT", "8080"))


def airflow_url() -> str:
    return f"http://127.0.0.1:{airflow_port()}"


def airflow_home() -> Path:
    return home() / "airflow"


def airflow_env() -> dict[str, str]:
    """The environment of the local Airflow (and of its tasks)."""
    ah = airflow_home()
    return {
        "AIRFLOW_HOME": str(ah),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(airflow_port()),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{airflow_url()}/execution/",
        "AIRFLOW__USAGE_DATA_COLLECTION__ENABLED": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{ah / 'airflow.db'}",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "MLFLOW_TRACKING_URI": mlflow_uri(),
        "PEFLOW_HOME": str(home()),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def airflow_service() -> Service:
    airflow_home().mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("airflow"))
    return Service(name="airflow", argv=[exe, "standalone"], health_url=f"{airflow_url()}/api/v2/version",
                   env=airflow_env())


def airflow_password(user: str = "admin", timeout: float = 60) -> str:
    """The admin password `airflow standalone` generated (simple auth manager)."""
    path = airflow_home() / "simple_auth_manager_passwords.json.generated"
    deadline = time.monotonic() + timeout
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    return json.loads(path.read_text())[user]


def services() -> list[Service]:
    return [mlflow_service(), airflow_service()]


def main(argv: list[str] | None = None) -> int:
    cmd = (argv if argv is not None else sys.argv[1:]) or ["status"]
    if cmd[0] == "up":
        for s in services():
            s.start(timeout=300)
        print(f"Airflow UI: {airflow_url()}  (login admin / {airflow_password()})")
        print(f"MLflow UI:  {mlflow_uri()}")
    elif cmd[0] == "down":
        for s in reversed(services()):
            s.stop()
    elif cmd[0] == "status":
        for s in services():
            state = "up" if s.pid() and s.healthy() else "down"
            print(f"{s.name}: {state}")
    else:
        print(f"usage: python -m peflow.services up|down|status (got {cmd[0]!r})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
