"""MLflow tracking shared by every stage: one child run per stage.

The orchestrator (Airflow, `peflow run`) opens a parent run per pipeline run
and hands its id to stages through `PEFLOW_PARENT_RUN_ID`; a stage run alone
makes a top-level run. The tracking URI comes from `MLFLOW_TRACKING_URI`; when
unset, a local SQLite store beside the stage's output is used, never a
network default.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from peflow.io import dvc_md5

PARENT_ENV = "PEFLOW_PARENT_RUN_ID"
DEFAULT_EXPERIMENT = "peflow"


def tracking_uri(out_dir: str | Path) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(out_dir).resolve().parent / "mlruns"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def set_experiment(uri: str, name: str) -> Any:
    """Point MLflow at `uri` and experiment `name`, creating it if needed.

    With a local SQLite store, artifacts go beside the database (MLflow's own
    default would be `./mlruns` under whatever folder the process runs in).
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        artifacts = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # created concurrently
            mlflow.create_experiment(name, artifact_location=artifacts.resolve().as_uri())
    return mlflow.set_experiment(name)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    out_dir: str | Path,
    config: Mapping[str, Any],
    inputs: Mapping[str, str] | None = None,
    experiment: str | None = None,
    tags: Mapping[str, str] | None = None,
    datasets: Mapping[str, str | Path] | None = None,
) -> Iterator[Any]:
    """Start the stage's MLflow run (child of the pipeline run when there is one).

    Logs the whole config as params, the content digest of every input as
    `input.<name>.digest`, and for every dataset folder read its DVC hash (the
    md5 DVC records in dvc.lock) as `dvc.<name>.md5` with its path; yields the
    active run.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    set_experiment(tracking_uri(out_dir), experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    parent = os.environ.get(PARENT_ENV) or None
    all_tags = {"peflow.stage": stage, **dict(tags or {})}
    all_tags.update({f"input.{k}.digest": v for k, v in (inputs or {}).items()})
    for name, path in (datasets or {}).items():
        if Path(path).exists():
            all_tags[f"dvc.{name}.md5"] = dvc_md5(path)
            all_tags[f"dvc.{name}.path"] = str(Path(path).resolve())
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None, tags=all_tags) as run:
        params = {k: ("" if v is None else v) for k, v in _flatten(config).items()}
        mlflow.log_params(params)
        yield run
