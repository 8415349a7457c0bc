"""A real S3-speaking server for the tests: moto's server (`python -m moto.server`) on 127.0.0.1.

`s3_env` (conftest) starts one per session and points every AWS client of the
session and its child processes at it through the standard variables
(`AWS_ENDPOINT_URL`, `MLFLOW_S3_ENDPOINT_URL`, dummy credentials). Tests make
their own bucket (`new_bucket`), so none sees another's objects.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(log: Path, timeout: float = 60.0) -> Iterator[str]:
    """Run moto's S3 server on a free port of 127.0.0.1; yields its endpoint URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not up after {timeout:.0f}s; see {log}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def env_for(endpoint: str) -> dict[str, str]:
    """The environment that points boto3, s3fs, DVC and MLflow at `endpoint`."""
    return {**ENV, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}


def new_bucket(prefix: str = "peflow") -> str:
    """A fresh bucket on the session's server (the environment names it); returns its name."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
