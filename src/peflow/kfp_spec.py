"""The stage graph as a Kubeflow Pipelines file needs it, as JSON, without importing kfp.

kfp cannot live in the main environment (its pins clash with the Airflow
Kubernetes provider's and torchx's: docs/kubeflow.md), so the Kubeflow
pipeline is made in two steps. Here, from the stage registry and a pipeline
preset: per stage its name, the command its container runs, its upstream
stages and its resources, and the pipeline parameters those commands name as
`{parameter}`. Then `kfp/compile.py`, in the KFP environment, compiles that
JSON to a KFP v2 pipeline (`make kfp` runs both).

    python -m peflow.kfp_spec nano --out build/kfp/pe_pipeline.json

In-process stages run `peflow <stage> --preset {preset} --out {root}/<stage>
--<input> {root}/<upstream> ...`, the wiring dvc.yaml has
(`peflow.pipeline.stage_opts`). A distributed stage's container is a small
launcher: `peflow launch <stage> --scheduler kubernetes -j {nodes} --image
{image} ... -- <the same options>` submits the stage's TorchX component as a
Volcano job (one pod per node, torchrun in each, the registry's resources
per node) and waits for it, as the Airflow DAG does at scale.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peflow import presets, stages
from peflow.pipeline import stage_opts

FORMAT = "peflow-kfp-spec/1"
PIPELINE = "pe-pipeline"
IMAGE = "peflow:latest"
ROOT = "/mnt/peflow/runs/pe-pipeline"
#: The container of a distributed stage only submits the TorchX job and follows its logs.
LAUNCHER_RESOURCES: Mapping[str, int] = {"cpu": 1, "gpu": 0, "memMB": 2048}


def parameters(preset: str, *, root: str = ROOT, image: str = IMAGE) -> dict[str, dict[str, str]]:
    """The pipeline parameters (all strings), with defaults: the run options that make sense on Kubeflow."""
    pipeline = presets.get(preset)
    return {
        "preset": {"default": preset,
                   "description": f"pipeline preset: every stage's config ({', '.join(presets.names())})"},
        "root": {"default": root, "description": "pipeline root: each stage writes ROOT/<stage>/ (a path on the "
                                                 "volume every task mounts, or an s3:// URI)"},
        "image": {"default": image, "description": "container image holding peflow (k8s/Dockerfile), for every task "
                                                   "and every TorchX pod"},
        "nodes": {"default": pipeline.nodes, "description": "nodes x processes per node of the distributed stages "
                                                            "(TorchX -j)"},
        "queue": {"default": "default", "description": "Volcano queue of the distributed stages' jobs"},
        "namespace": {"default": "default", "description": "Kubernetes namespace of the distributed stages' jobs"},
    }


def node_resources(stage: stages.Stage, gpu: int | None = None) -> dict[str, int]:
    """Per-node resources of a distributed stage: the registry's, GPUs overridden by `gpu` when given."""
    res = {"cpu": int(stage.resources.get("cpu", 2)), "gpu": int(stage.resources.get("gpu", 0)),
           "memMB": int(stage.resources.get("memMB", 8192))}
    if gpu is not None:
        if gpu < 0:
            raise ValueError(f"gpu: {gpu} is not a GPU count (0 or more)")
        res["gpu"] = gpu
    return res


def command(stage: stages.Stage, gpu: int | None = None) -> list[str]:
    """The command of a stage's container, with `{parameter}` where a pipeline parameter goes."""
    opts = stage_opts(stage, "{root}", "{preset}")
    if not stage.distributed:
        return ["peflow", stage.name, *opts]
    res = node_resources(stage, gpu)
    return ["peflow", "launch", stage.name, "--scheduler", "kubernetes", "-j", "{nodes}", "--image", "{image}",
            "--queue", "{queue}", "--namespace", "{namespace}", "--cpu", str(res["cpu"]), "--gpu", str(res["gpu"]),
            "--memMB", str(res["memMB"]), "--", *opts]


def stage_entry(stage: stages.Stage, gpu: int | None = None) -> dict[str, Any]:
    """One stage of the spec: the task's command, upstream stages and container resources."""
    entry: dict[str, Any] = {
        "name": stage.name, "summary": stage.summary, "distributed": stage.distributed,
        "upstream": list(stage.needs), "command": command(stage, gpu),
        "resources": dict(LAUNCHER_RESOURCES) if stage.distributed else node_resources(stage),
    }
    if stage.distributed:
        entry["node_resources"] = node_resources(stage, gpu)
    return entry


def spec(preset: str = "nano", *, root: str = ROOT, image: str = IMAGE, gpu: int | None = None) -> dict[str, Any]:
    """The whole spec: format, pipeline name and description, parameters, stages in run order."""
    return {
        "format": FORMAT,
        "pipeline": PIPELINE,
        "description": f"peflow: train, align and evaluate Perception Encoder vision encoders "
                       f"({len(stages.all_stages())} stages; compiled from the stage registry, preset {preset})",
        "parameters": parameters(preset, root=root, image=image),
        "stages": [stage_entry(s, gpu) for s in stages.all_stages()],
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peflow.kfp_spec", description="Write the stage graph as the JSON "
                                "kfp/compile.py compiles to a Kubeflow pipeline.")
    p.add_argument("preset", nargs="?", default="nano", help=f"default preset: {', '.join(presets.names())}")
    p.add_argument("--out", default="-", help="JSON file to write ('-': standard output)")
    p.add_argument("--root", default=ROOT, help="default pipeline root")
    p.add_argument("--image", default=IMAGE, help="default container image")
    p.add_argument("--gpu", type=int, default=None, help="GPUs per node of the distributed stages "
                   "(default: the registry's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m peflow.kfp_spec [PRESET] [--out FILE]`; exit 2 on an unknown preset."""
    a = parser().parse_args(argv)
    try:
        text = json.dumps(spec(a.preset, root=a.root, image=a.image, gpu=a.gpu), indent=2) + "\n"
    except ValueError as e:
        print(f"peflow.kfp_spec: {e}", file=sys.stderr)
        return 2
    if a.out == "-":
        sys.stdout.write(text)
    else:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
