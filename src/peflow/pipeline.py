"""The stage graph as DVC sees it, generated from the stage registry and a pipeline preset.

`params.yaml` holds the preset's stage configs (the fields that can change a
stage's output, hyphenated as on the command line) and `dvc.yaml` one stage
per registered stage whose command unpacks its params section (`${pretrain}`
becomes `--steps 2000 --lr 0.001 ...`; `.dvc/config` sets
`parsing.bool = boolean_optional` so false flags become `--no-...`).
`python -m peflow.pipeline [PRESET]` (or `make dvc-yaml`) writes both; a test
checks the committed files match, so the DVC graph cannot drift from the DAG
or the CLI.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

from peflow import presets, runner, stages
from peflow.config import in_key

DATA_ROOT = "data"
HEADER = "# Generated from peflow.presets and peflow.stages by `make dvc-yaml`; do not edit by hand.\n"


def load_params(path: str | Path = "params.yaml") -> dict[str, dict[str, Any]]:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def stage_params(stage: stages.Stage, cfg: Any) -> dict[str, Any]:
    """The fields of a stage config DVC tracks: those in the output key, without wiring and unset values."""
    wiring = {runner.OUT, *(f for f, _ in stage.inputs)}
    return {f.name.replace("_", "-"): getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if in_key(f) and f.name not in wiring and getattr(cfg, f.name) not in (None, "")}


def params(preset: str = "nano") -> dict[str, Any]:
    """`params.yaml`: the preset's stage configs, and the distributed stages' nodes x processes."""
    pipeline = presets.get(preset)
    out: dict[str, Any] = {"preset": preset, "launch": {"j": pipeline.nodes}}
    for s in stages.all_stages():
        out[s.name] = stage_params(s, pipeline.config(s.name))
    return out


def stage_opts(stage: stages.Stage, root: str, preset: str) -> list[str]:
    """A stage's wiring as `peflow <stage>` options: the preset, its folder `root/<stage>`, and each input's
    upstream folder `root/<upstream>` (dvc.yaml and the Kubeflow pipeline, peflow.kfp_spec, share it)."""
    opts = ["--preset", preset, "--out", f"{root}/{stage.name}"]
    for field, upstream in stage.inputs:
        opts += [f"--{field.replace('_', '-')}", f"{root}/{upstream}"]
    return opts


def dvc_stage(stage: stages.Stage, params: dict[str, Any]) -> dict[str, Any]:
    """One `dvc.yaml` stage: the same `peflow <stage>` command a user types."""
    out = f"{DATA_ROOT}/{stage.name}"
    opts = stage_opts(stage, DATA_ROOT, "${preset}")
    if params.get(stage.name):
        opts.append("${%s}" % stage.name)
    # Distributed stages run through their TorchX component, as in the DAG.
    cmd = ["peflow", "launch", stage.name, "-j", "${launch.j}", "--", *opts] if stage.distributed else \
        ["peflow", stage.name, *opts]
    deps = [stage.module.replace(".", "/").replace("peflow/", "src/peflow/", 1) + ".py", *stage.code]
    deps += [f"{DATA_ROOT}/{up}" for up in stage.needs]
    entry: dict[str, Any] = {"cmd": " ".join(cmd), "deps": deps,
                             "params": ["preset", *(["launch"] if stage.distributed else []),
                                        *([stage.name] if params.get(stage.name) else [])],
                             "outs": [out]}
    return entry


def dvc_yaml(params: dict[str, Any]) -> dict[str, Any]:
    return {"stages": {s.name: dvc_stage(s, params) for s in stages.all_stages()}}


def render_params(preset: str = "nano") -> str:
    return HEADER + yaml.safe_dump(params(preset), sort_keys=False)


def render_dvc_yaml(params_path: str | Path = "params.yaml") -> str:
    return HEADER + yaml.safe_dump(dvc_yaml(load_params(params_path)), sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    """`python -m peflow.pipeline [PRESET]`: write params.yaml and dvc.yaml in this folder."""
    argv = sys.argv[1:] if argv is None else argv
    Path("params.yaml").write_text(render_params(argv[0] if argv else "nano"))
    Path("dvc.yaml").write_text(render_dvc_yaml("params.yaml"))


if __name__ == "__main__":
    main()
