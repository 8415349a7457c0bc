"""The stage graph as DVC sees it, generated from the stage registry.

`dvc.yaml` is rendered from `peflow.stages.STAGES` and `params.yaml`
(`python -m peflow.pipeline > dvc.yaml`, or `make dvc-yaml`); a test checks
the committed file matches, so the DVC graph cannot drift from the DAG or CLI.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from peflow import stages

DATA_ROOT = "data"


def load_params(path: str | Path = "params.yaml") -> dict[str, dict[str, Any]]:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def dvc_stage(stage: stages.Stage, params: dict[str, Any]) -> dict[str, Any]:
    """One `dvc.yaml` stage: the same `peflow <stage>` command a user types."""
    out = f"{DATA_ROOT}/{stage.name}"
    # Distributed stages run through their TorchX component, as in the DAG.
    if stage.distributed:
        cmd = ["peflow", "launch", stage.name, "-j", "${launch.j}", "--", "--out", out]
    else:
        cmd = ["peflow", stage.name, "--out", out]
    deps = [f"src/peflow/stages/{stage.name}.py", *stage.code]
    for option, upstream in stage.inputs:
        cmd += [f"--{option.replace('_', '-')}", f"{DATA_ROOT}/{upstream}"]
    deps += [f"{DATA_ROOT}/{up}" for up in stage.needs]
    for key in sorted(params.get(stage.name, {})):
        cmd += [f"--{key.replace('_', '-')}", "${%s.%s}" % (stage.name, key)]
    entry: dict[str, Any] = {"cmd": " ".join(cmd), "deps": deps}
    entry["params"] = [k for k in ("launch", stage.name) if k in params and (k != "launch" or stage.distributed)]
    if not entry["params"]:
        del entry["params"]
    entry["outs"] = [out]
    return entry


def dvc_yaml(params: dict[str, Any]) -> dict[str, Any]:
    return {"stages": {s.name: dvc_stage(s, params) for s in stages.STAGES}}


def render_dvc_yaml(params_path: str | Path = "params.yaml") -> str:
    header = "# Generated from peflow.stages by `make dvc-yaml`; do not edit by hand.\n"
    return header + yaml.safe_dump(dvc_yaml(load_params(params_path)), sort_keys=False)


if __name__ == "__main__":
    sys.stdout.write(render_dvc_yaml(sys.argv[1] if len(sys.argv) > 1 else "params.yaml"))
