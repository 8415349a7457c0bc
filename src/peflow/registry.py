"""The MLflow model registry: every trained model is a version of a registered model.

Two aliases per registered model (MLflow aliases are unique per model: setting
one moves it):

- `candidate`: the newest registered version; the training stage moves it.
- `champion`: the best evaluated version by a key metric (default
  `zeroshot/test/top1`); `record_evaluation` moves it only when a version
  beats the champion (a tie keeps the champion).

A version is found by the content digest of its checkpoint folder (tag
`peflow.checkpoint_digest`), the digest the evaluate stage records as its
checkpoint input. Load the champion with `load_champion()` or
`mlflow.pytorch.load_model("models:/peflow-core@champion")`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

CORE = "peflow-core"
CANDIDATE = "candidate"
CHAMPION = "champion"
DIGEST_TAG = "peflow.checkpoint_digest"
KEY_METRIC = "zeroshot/test/top1"


def metric_tag(key: str) -> str:
    """The model-version tag holding an evaluation metric: `metric.<key>`."""
    return f"metric.{key}"


def _client(tracking_uri: str | None = None) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _quoted(value: str) -> str:
    if "'" in value:
        raise ValueError(f"quote in registry search value {value!r}")
    return f"'{value}'"


def register(model_uri: str, name: str, *, tags: Mapping[str, str]) -> Any:
    """Register the logged model at `model_uri` (`ModelInfo.model_uri`, `models:/m-...`) as a new
    version of `name` (created if needed) with `tags`, in the current tracking URI's registry;
    returns the ModelVersion."""
    import mlflow

    return mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})


def log_and_register(model: Any, name: str, *, digest: str, tags: Mapping[str, str]) -> Any | None:
    """Log `model` to the active MLflow run as a pytorch model and register it as a new version of
    `name` (alias `candidate`), tagged with the digest of its checkpoint folder (what an evaluation
    records as its checkpoint input). Pickled (pt2 export would trace the model); requirements
    pinned (no environment inference, offline). Without a model registry it warns and goes on: the
    stage's output is complete either way. Returns the ModelVersion or None."""
    import mlflow.pytorch

    info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                    pip_requirements=["torch", "open_clip_torch", "timm"],
                                    metadata={"peflow_preset": str(getattr(model, "peflow_preset", ""))})
    try:
        version = register(info.model_uri, name, tags={DIGEST_TAG: digest, **tags})
        set_candidate(version.name, version.version)
        return version
    except Exception as e:  # noqa: BLE001 -- the model is trained and saved: never fail the stage here
        # A warning, not logging: importing mlflow.pytorch calls logging.basicConfig(level=ERROR).
        warnings.warn(f"model not registered ({type(e).__name__}: {e}); the stage output is complete",
                      stacklevel=2)
        return None


def set_candidate(name: str, version: str | int, *, tracking_uri: str | None = None) -> None:
    """Point alias `candidate` of `name` at `version` (moving it from the previous one)."""
    _client(tracking_uri).set_registered_model_alias(name, CANDIDATE, str(version))


def find_version(name: str, checkpoint_digest: str, *, tracking_uri: str | None = None) -> Any | None:
    """The newest version of `name` tagged with this checkpoint digest, or None (also when
    `name` is not registered). The result carries its aliases."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    by_name = f"name = {_quoted(name)}"
    try:
        found = client.search_model_versions(f"{by_name} AND tags.`{DIGEST_TAG}` = {_quoted(checkpoint_digest)}")
    except MlflowException:  # a store without tag search: filter here
        found = [v for v in client.search_model_versions(by_name) if v.tags.get(DIGEST_TAG) == checkpoint_digest]
    if not found:
        return None
    newest = max(found, key=lambda v: int(v.version))
    # Search results from the SQL store leave `aliases` empty; a get fills them in.
    return client.get_model_version(name, str(newest.version))


def _metric(version: Any, key: str) -> float | None:
    value = version.tags.get(metric_tag(key))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def record_evaluation(checkpoint_digest: str, metrics: Mapping[str, Any], *, name: str = CORE,
                      key: str = KEY_METRIC, higher_is_better: bool = True, run_id: str | None = None,
                      tracking_uri: str | None = None) -> dict[str, Any]:
    """Record an evaluation of a checkpoint in the registry and move `champion` if it won.

    Tags the version registered for `checkpoint_digest` with `metric.<key>` (and
    `peflow.eval_run_id` when given), then points alias `champion` at it when
    there is no champion yet, the champion has no `metric.<key>`, or the new
    value beats the champion's (ties keep the champion). Never raises for a
    checkpoint that is not registered (e.g. an official one), a missing key
    metric or an unavailable registry: the result says so (`reason`).

    Returns: name, key, value, registered, version, promoted, champion,
    champion_value, candidate, previous_champion, previous_champion_value,
    reason (None when recorded); versions as strings.
    """
    from mlflow.exceptions import MlflowException

    value = metrics.get(key)
    result: dict[str, Any] = {
        "name": name, "key": key, "value": None if value is None else float(value), "registered": False,
        "version": None, "promoted": False, "champion": None, "champion_value": None, "candidate": None,
        "previous_champion": None, "previous_champion_value": None, "reason": None,
    }
    try:
        mv = find_version(name, checkpoint_digest, tracking_uri=tracking_uri)
        if mv is None:
            result["reason"] = f"checkpoint {checkpoint_digest[:12]} is not a version of {name}"
            return result
        client = _client(tracking_uri)
        version = str(mv.version)
        result.update(registered=True, version=version)
        aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
        champion = aliases.get(CHAMPION)
        champion_value = None if champion is None else _metric(client.get_model_version(name, champion), key)
        result.update(candidate=aliases.get(CANDIDATE), champion=champion, champion_value=champion_value,
                      previous_champion=champion, previous_champion_value=champion_value)
        if run_id:
            client.set_model_version_tag(name, version, "peflow.eval_run_id", run_id)
        if value is None or math.isnan(float(value)):
            result["reason"] = f"no value for {key}"
            return result
        value = float(value)
        client.set_model_version_tag(name, version, metric_tag(key), repr(value))
        if champion == version:
            result["champion_value"] = value
            return result
        if champion_value is None or (value > champion_value if higher_is_better else value < champion_value):
            client.set_registered_model_alias(name, CHAMPION, version)
            result.update(promoted=True, champion=version, champion_value=value)
    except (MlflowException, OSError) as e:
        warnings.warn(f"model registry not updated for {name}: {e}", stacklevel=2)
        result["reason"] = f"registry unavailable: {e}"
    return result


def describe(result: Mapping[str, Any]) -> str:
    """One line about a `record_evaluation` result, for a stage's log."""
    if result["reason"]:
        return f"registry: {result['reason']}"
    line = f"registry: {result['name']} v{result['version']} {result['key']}={result['value']:.4g}"
    if result["promoted"]:
        prev = result["previous_champion"]
        was = f" (was v{prev}, {result['previous_champion_value']})" if prev else ""
        return f"{line} -> champion{was}"
    return f"{line}; champion stays v{result['champion']} ({result['champion_value']})"


def load_champion(name: str = CORE, *, tracking_uri: str | None = None) -> Any:
    """The champion of `name` as a torch module (`models:/<name>@champion`)."""
    import mlflow.pytorch

    uri = f"models:/{name}@{CHAMPION}"
    if not tracking_uri:
        return mlflow.pytorch.load_model(uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pytorch.load_model(uri)
    finally:
        mlflow.set_tracking_uri(previous)
