"""Local services for the embedded default: `mlflow server` on 127.0.0.1.

`python -m peflow.services up|down|status`. Each service runs in its own
process group with its pid, log and data under $PEFLOW_HOME (default `.run/`),
so `down` stops exactly the processes `up` started.
"""

from __future__ import annotations

import dataclasses
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
        if self.pid() is not None and self.healthy():
            print(f"{self.name}: already running (pid {self.pid()})")
            return
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
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        print(f"{self.name}: stopped (pid {pid})")


def mlflow_port() -> int:
    return int(os.environ.get("PEFLOW_MLFLOW_PORT", "5000"))


def mlflow_uri() -> str:
    return f"http://127.0.0.1:{mlflow_port()}"


def mlflow_service() -> Service:
    root = home() / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    return Service(
        name="mlflow",
        argv=[
            exe, "server", "--host", "127.0.0.1", "--port", str(mlflow_port()),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--workers", "1",
        ],
        health_url=f"{mlflow_uri()}/health",
        env={"MLFLOW_DISABLE_TELEMETRY": "true"},
    )


def services() -> list[Service]:
    return [mlflow_service()]


def main(argv: list[str] | None = None) -> int:
    cmd = (argv if argv is not None else sys.argv[1:]) or ["status"]
    if cmd[0] == "up":
        for s in services():
            s.start()
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
