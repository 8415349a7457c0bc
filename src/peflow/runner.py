"""The stage runner: what every stage repeats, in one place.

A stage module is its `Config` and `run(cfg, out) -> Result`: it writes its
files into `out` (a staging folder) and returns its metrics. The runner,
around it:

1. checks the config (`ConfigError` naming the field) and every input the
   user handed it (`InputError` naming the file): exit 2, no traceback;
2. fingerprints the inputs and computes the stage's output key from its
   config, the inputs' fingerprints and its code version (like DVC's run cache);
3. skips the stage when its output folder holds that key, or reuses the
   output of any earlier run with that key from the store (`peflow.store`);
4. otherwise opens the stage's MLflow child run (config as params, input
   digests, DVC hashes of the folders read), runs the stage into a staging
   folder, writes `metrics.json` and `manifest.json`, logs metrics and
   artifacts, registers the model (`candidate`) or ranks it (`champion`),
   renames the folder into place and adds it to the store.

Inputs and outputs may be `s3://` URIs (peflow.remote): a remote input is
fingerprinted by its published digest and pulled into a local cache (a field
marked `stream=True` is handed to the stage as the URI, for loaders that
stream shards), a remote output is staged in the local cache and published
on success, its manifest last.

Under torchrun every rank calls `execute`; only rank 0 tracks and publishes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peflow import io, remote, stages, store
from peflow.config import ConfigError, InputError, check_config, key_dict
from peflow.stages.base import Result

#: Fields of a stage config that are wiring, not configuration: where it writes.
OUT = "out"


@dataclasses.dataclass
class Outcome:
    """What happened to one stage: ran, or reused (`up-to-date` or `store`)."""

    stage: str
    out: str
    key: str
    ran: bool
    reused: str | None
    seconds: float
    metrics: dict[str, Any]


def input_fields(stage: stages.Stage, cfg: Any) -> dict[str, str]:
    """field -> path of every input of `cfg`: the registry's inputs and fields marked `input=True`."""
    names = [f for f, _ in stage.inputs]
    names += [f.name for f in dataclasses.fields(cfg) if f.metadata.get("input") and f.name not in names]
    return {n: getattr(cfg, n) for n in names if getattr(cfg, n)}


def fingerprint(path: str | Path, *, what: str) -> str:
    """The content digest of an input: a folder's (its manifest's, when it has one) or a file's SHA-256;
    for an `s3://` URI, its published digest (`peflow.remote.digest`)."""
    if remote.is_remote(path):
        try:
            return remote.digest(str(path))
        except FileNotFoundError:
            raise InputError(f"{what} {path}: does not exist") from None
        except OSError as e:
            raise InputError(f"{what} {path}: cannot be read ({e})") from None
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {path}: does not exist")
    try:
        return io.file_sha256(p) if p.is_file() else io.dataset_digest(p)
    except OSError as e:
        raise InputError(f"{what} {path}: cannot be read ({e.strerror or e})") from None


_CODE: dict[str, str] = {}


def code_version(stage: stages.Stage) -> str:
    """SHA-256 of the stage module's source and of its `code` paths (the sources its output depends on)."""
    if stage.name in _CODE:
        return _CODE[stage.name]
    package = Path(__file__).resolve().parent
    module_file = Path(stage.load().__file__)
    files = {module_file}
    for rel in stage.code:
        p = package / Path(rel).relative_to("src/peflow") if rel.startswith("src/peflow") else Path(rel)
        files.update(p.rglob("*.py") if p.is_dir() else [p] if p.is_file() else [])
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    _CODE[stage.name] = h.hexdigest()
    return _CODE[stage.name]


def key_config(stage: stages.Stage, cfg: Any) -> dict[str, Any]:
    """The config fields that can change the output (`opt(key=...)`), less the wiring (out, inputs):
    what the output key hashes and the manifest records."""
    paths = set(input_fields(stage, cfg)) | {OUT}
    return {k: v for k, v in key_dict(cfg).items() if k not in paths}


def output_key(stage: stages.Stage, cfg: Any, inputs: Mapping[str, str]) -> str:
    """The key of the output `cfg` makes from `inputs`: config (less wiring), input digests, code."""
    doc = {"stage": stage.name, "config": key_config(stage, cfg), "inputs": dict(sorted(inputs.items())),
           "code": code_version(stage)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def check(stage: stages.Stage, cfg: Any) -> None:
    """The checks that need nothing on disk: the config's fields, `validate()`, and the wiring set."""
    check_config(cfg, where=stage.name)
    if not getattr(cfg, OUT, ""):
        raise ConfigError(f"{stage.name}.out: an output folder is required")
    for field, upstream in stage.inputs:
        if not getattr(cfg, field, "") and field not in stage.optional:
            raise ConfigError(f"{stage.name}.{field}: required (the {upstream} stage's output, or a path)")


def _existing_key(out: str | Path) -> str | None:
    if remote.is_remote(out):
        return (remote.manifest(str(out)) or {}).get("key")
    path = Path(out) / io.MANIFEST
    if not path.is_file():
        return None
    try:
        return io.read_json(path).get("key")
    except (OSError, ValueError):
        return None


def localize(stage: stages.Stage, cfg: Any) -> Any:
    """`cfg` as the stage runs it: remote inputs pulled into the local cache (fields marked
    `stream=True` stay URIs) and a remote output pointed at its local staging copy."""
    streamed = {f.name for f in dataclasses.fields(cfg) if f.metadata.get("stream")}
    changes = {name: str(remote.pull(value)) for name, value in input_fields(stage, cfg).items()
               if remote.is_remote(value) and name not in streamed}
    if remote.is_remote(cfg.out):
        changes[OUT] = remote.localize(cfg.out)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _key(stage: stages.Stage, cfg: Any) -> tuple[str, dict[str, str]]:
    inputs = {name: fingerprint(path, what=name) for name, path in input_fields(stage, cfg).items()}
    return output_key(stage, cfg, inputs), inputs


def reuse(stage: stages.Stage | str, cfg: Any) -> Outcome | None:
    """The stage's output for `cfg` without running it: its output folder when it holds this key,
    else the store's entry (published at `cfg.out`); None when neither has it."""
    stage = stages.get(stage) if isinstance(stage, str) else stage
    check(stage, cfg)
    return _reuse(stage, cfg, _key(stage, cfg)[0], time.monotonic())


def _reuse(stage: stages.Stage, cfg: Any, key: str, t0: float) -> Outcome | None:
    out = cfg.out
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if _existing_key(out) == key:
        how = "is up to date"
    elif (found := store.find(stage.name, key)) is not None:
        if rank0:
            store.materialize(found, remote.localize(out))
            if remote.is_remote(out):
                remote.publish(remote.localize(out), out)
        how = f"reused from the store ({found})"
    else:
        return None
    if rank0:
        print(f"peflow {stage.name}: output {key[:12]} {how} -> {out}")
    reused = "up-to-date" if how == "is up to date" else "store"
    return Outcome(stage.name, str(out), key, False, reused, time.monotonic() - t0, _metrics(out))


def published(stage: stages.Stage, out: str | Path) -> Outcome:
    """What a launched stage (TorchX replicas) published at `out`, read from its manifest."""
    key = _existing_key(out)
    if key is None:
        raise RuntimeError(f"{stage.name}: the launch ended but published no output at {out}")
    return Outcome(stage.name, str(out), key, True, None, 0.0, _metrics(out))


def execute(stage: stages.Stage | str, cfg: Any, *, force: bool = False) -> Outcome | None:
    """Run one stage (or reuse its output unless `force`); see the module docstring.
    Returns None on ranks > 0."""
    stage = stages.get(stage) if isinstance(stage, str) else stage
    t0 = time.monotonic()
    check(stage, cfg)
    key, inputs = _key(stage, cfg)
    if not force and (outcome := _reuse(stage, cfg, key, t0)) is not None:
        return outcome
    module = stage.load()
    local = localize(stage, cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        module.run(local, None)
        return None
    metrics, run_id = _run_tracked(stage, module, cfg, local, inputs, key)
    store.put(local.out, stage.name, key)
    if stage.dataset:
        _push_dataset(local.out, run_id)
    if remote.is_remote(cfg.out):
        remote.publish(local.out, cfg.out)
        if Path(local.out + ".dvc").is_file():
            remote.upload_file(local.out + ".dvc", cfg.out.rstrip("/") + ".dvc")
        print(f"peflow {stage.name}: published {cfg.out}")
    return Outcome(stage.name, str(cfg.out), key, True, None, time.monotonic() - t0, metrics)


def _metrics(out: str | Path) -> dict[str, Any]:
    if remote.is_remote(out):
        return remote.read_json(remote.join(out, io.METRICS)) or {}
    out = Path(out)
    return io.read_json(out / io.METRICS) if (out / io.METRICS).is_file() else {}


def _run_tracked(stage: stages.Stage, module: Any, cfg: Any, local: Any, inputs: dict[str, str], key: str
                 ) -> tuple[dict[str, float], str]:
    """Run the stage (`local`: its config with local paths) into a staging folder inside its MLflow run;
    the run records `cfg` as the user gave it."""
    import mlflow

    from peflow import tracking

    config = dataclasses.asdict(cfg)
    datasets = {n: p for n, p in input_fields(stage, local).items() if Path(p).is_dir()}
    with tracking.stage_run(stage.name, out_dir=local.out, config=config, inputs=inputs, datasets=datasets,
                            tags={"peflow.output_key": key}) as run, io.atomic_output_dir(local.out) as staging:
        result = module.run(local, staging)
        if not isinstance(result, Result):
            raise TypeError(f"{stage.module}.run returned {type(result).__name__}, not runner.Result")
        io.write_json_atomic(staging / io.METRICS, result.metrics)
        manifest = io.write_manifest(staging, stage=stage.name, key=key,
                                     config={**key_config(stage, cfg), **result.resolved},
                                     inputs=inputs, counts=result.counts)
        if result.tags:
            mlflow.set_tags(result.tags)
        mlflow.log_metrics({k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))})
        for name in result.artifacts if result.artifacts is not None else _default_artifacts(staging):
            path = staging / name
            (mlflow.log_artifacts(str(path), artifact_path=name) if path.is_dir()
             else mlflow.log_artifact(str(path)))
        _registry(stage, result, manifest, inputs, run.info.run_id)
    return result.metrics, run.info.run_id


def _push_dataset(out: str, run_id: str) -> None:
    """A dataset output into DVC (peflow.datasets); its md5 on the stage run as `dvc.output.md5`.
    A push that fails warns: the output is published and in the store either way."""
    import warnings

    from mlflow import MlflowClient

    from peflow import datasets

    try:
        md5 = datasets.push(out)
    except Exception as e:  # noqa: BLE001  (a remote that cannot be reached must not undo the stage)
        warnings.warn(f"dataset {out} not pushed to DVC ({type(e).__name__}: {e})", stacklevel=2)
        return
    if md5 is not None:
        MlflowClient().set_tag(run_id, "dvc.output.md5", md5)
        print(f"dvc: {out} -> {md5} (pushed; pointer {out}.dvc)")


def _default_artifacts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".json") and p.name != io.MANIFEST)


def _registry(stage: stages.Stage, result: Result, manifest: dict[str, Any], inputs: Mapping[str, str],
              run_id: str) -> None:
    """Model registration (`candidate`) and ranking (`champion`): the stage's registry fields decide."""
    from peflow import registry

    if stage.model_name and result.model is not None:
        registry.log_and_register(result.model, stage.model_name, digest=manifest["output_digest"],
                                  tags={"peflow.run_id": run_id, **result.tags})
    if stage.evaluates and stage.champion_metric and "checkpoint" in inputs:
        outcome = registry.record_evaluation(inputs["checkpoint"], result.metrics, name=stage.evaluates,
                                             key=stage.champion_metric, run_id=run_id)
        print(f"peflow {stage.name}: {registry.describe(outcome)}")
