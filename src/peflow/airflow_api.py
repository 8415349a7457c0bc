"""A small client for Airflow 3's REST API (`/api/v2`) with the simple auth
manager's JWT login: trigger a DAG run and follow its task instances.

Talks HTTP only: the library never imports Airflow itself.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

TERMINAL = {"success", "failed"}


class AirflowAPI:
    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base = base_url.rstrip("/")
        self.username, self.password = username, password
        self._token: str | None = None

    def _request(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"Airflow API {method} {path}: HTTP {e.code}: {detail}") from None

    def token(self) -> str:
        if self._token is None:
            r = self._request("POST", "/auth/token", {"username": self.username, "password": self.password},
                              auth=False)
            self._token = r["access_token"]
        return self._token

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self._request("PATCH", path, body)

    def wait_for_dag(self, dag_id: str, timeout: float = 300) -> dict[str, Any]:
        """Wait until the DAG processor has parsed `dag_id`; fail on its import errors."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            errors = self.get("/api/v2/importErrors").get("import_errors", [])
            if errors:
                raise RuntimeError("DAG import errors: " + "; ".join(e.get("stack_trace", "")[-500:] for e in errors))
            try:
                return self.get(f"/api/v2/dags/{dag_id}")
            except RuntimeError as e:
                if "HTTP 404" not in str(e):
                    raise
            time.sleep(2)
        raise TimeoutError(f"DAG {dag_id} not parsed after {timeout:.0f}s")

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        dag = self.get(f"/api/v2/dags/{dag_id}")
        if dag.get("is_paused"):
            self.patch(f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self.post(f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{urllib.request.quote(run_id, safe='')}")

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 1200, poll: float = 3.0) -> dict[str, Any]:
        """Poll a DAG run until it ends (or `timeout`); returns the run."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.dag_run(dag_id, run_id)
            if run["state"] in TERMINAL or time.monotonic() > deadline:
                return run
            time.sleep(poll)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """The XCom value a task pushed (its return value by default); of a mapped task, instance `map_index`'s."""
        rid = urllib.request.quote(run_id, safe="")
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{rid}/taskInstances/{task_id}/xcomEntries/{key}"
                        f"?map_index={map_index}")["value"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        rid = urllib.request.quote(run_id, safe="")
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{rid}/taskInstances")["task_instances"]
