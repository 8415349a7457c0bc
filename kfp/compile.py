"""Compile peflow's stage graph to a Kubeflow Pipelines v2 pipeline file.

Runs only in the KFP environment (`.venv-kfp`, `requirements/kfp.txt`) and
imports kfp and the standard library, never peflow: the stage graph comes in
as the JSON that `python -m peflow.kfp_spec PRESET` writes from the stage
registry in the main environment (`make kfp` runs both).

    python kfp/compile.py build/kfp/pe_pipeline.json --out build/kfp/pe_pipeline.yaml

One container task per stage runs the command the spec lists (`peflow <stage>
...`, or `peflow launch <stage> --scheduler kubernetes ...` for a distributed
stage), after the tasks of its upstream stages; the spec's parameters
(preset, root, image, nodes, queue, namespace) become pipeline parameters and
its resources the tasks' CPU, memory and accelerator requests and limits.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kfp import compiler, dsl

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
#: The parameter naming the container image of every task (set per task at run time).
IMAGE = "image"
GPU_RESOURCE = "nvidia.com/gpu"
KUBECONFIG_DIR = "/etc/peflow/kubeconfig"


def load_spec(path: str | Path) -> dict[str, Any]:
    """The spec `peflow.kfp_spec` wrote; raise ValueError when it is not one."""
    spec = json.loads(Path(path).read_text())
    if not isinstance(spec, dict) or not str(spec.get("format", "")).startswith("peflow-kfp-spec/"):
        raise ValueError(f"{path}: not a peflow KFP spec (python -m peflow.kfp_spec writes one)")
    return spec


def used_parameters(command: Sequence[str], known: Mapping[str, Any]) -> list[str]:
    """The pipeline parameters a command refers to (`{root}/validate` -> root), in order of first use."""
    names = [m for arg in command for m in PLACEHOLDER.findall(arg)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"command {' '.join(command)!r} names unknown parameter(s) {unknown}")
    return list(dict.fromkeys(names))


def fill(arg: str, values: Mapping[str, Any]) -> str:
    """One command argument with each `{name}` replaced by the KFP placeholder of that component input."""
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), arg)


def _signature(names: Sequence[str], defaults: Mapping[str, str] | None = None) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([
        inspect.Parameter(n, kind, annotation=str, default=(defaults or {}).get(n, inspect.Parameter.empty))
        for n in names])


def stage_component(stage: Mapping[str, Any], parameters: Mapping[str, Any], image: str) -> Any:
    """The container component of one stage: its inputs are the parameters its command names."""
    command = list(stage["command"])
    names = used_parameters(command, parameters)

    def component(*values: Any) -> dsl.ContainerSpec:
        by_name = dict(zip(names, values))
        return dsl.ContainerSpec(image=image, command=[fill(a, by_name) for a in command[:1]],
                                 args=[fill(a, by_name) for a in command[1:]])

    component.__name__ = stage["name"].replace("-", "_")
    component.__doc__ = stage.get("summary") or stage["name"]
    component.__signature__ = _signature(names)  # type: ignore[attr-defined]
    return dsl.container_component(component)


def set_resources(task: Any, resources: Mapping[str, int]) -> None:
    """CPU, memory (MB, as TorchX counts it) and GPUs of a task's container: requests equal limits."""
    cpu, mem = str(resources["cpu"]), f"{int(resources['memMB'])}M"
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(mem).set_memory_limit(mem)
    if int(resources.get("gpu", 0)) > 0:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(int(resources["gpu"]))


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` options as a mapping; raise ValueError on one without `=`."""
    env: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def task_env(opts: argparse.Namespace) -> dict[str, str]:
    """Every task's environment: with a shared volume, PEFLOW_HOME on it (the output store every task reuses
    from), then the `--env` options."""
    env = {"PEFLOW_HOME": f"{opts.mount_path}/home"} if opts.pvc else {}
    env.update(parse_env(opts.env))
    return env


def _platform(task: Any, distributed: bool, opts: argparse.Namespace) -> None:
    """Kubernetes settings of a task (kfp-kubernetes): the shared volume, the S3 credentials and, for a
    distributed stage's launcher, the kubeconfig TorchX submits the Volcano job with."""
    kubeconfig = opts.kubeconfig_secret if distributed else ""
    if not (opts.pvc or opts.aws_secret or kubeconfig):
        return
    from kfp import kubernetes

    if opts.pvc:
        kubernetes.mount_pvc(task, pvc_name=opts.pvc, mount_path=opts.mount_path)
    if opts.aws_secret:
        kubernetes.use_secret_as_env(task, secret_name=opts.aws_secret, secret_key_to_env={
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    if kubeconfig:
        # TorchX 0.7's kubernetes scheduler reads a kubeconfig file only (no in-cluster config).
        kubernetes.use_secret_as_volume(task, secret_name=kubeconfig, mount_path=KUBECONFIG_DIR)
        task.set_env_variable("KUBECONFIG", f"{KUBECONFIG_DIR}/config")


def _add_task(stage: Mapping[str, Any], component: Any, params: Mapping[str, Any], tasks: dict[str, Any],
              opts: argparse.Namespace) -> None:
    """Add one stage's task to the pipeline being built: inputs, image, resources, env, platform, edges."""
    used = used_parameters(stage["command"], params)
    task = component(**{n: params[n] for n in used})
    task.set_display_name(stage["name"]).set_container_image(params[IMAGE]).set_caching_options(False)
    set_resources(task, stage["resources"])
    for key, value in task_env(opts).items():
        task.set_env_variable(key, value)
    if opts.retries:
        task.set_retry(opts.retries)
    _platform(task, bool(stage.get("distributed")), opts)
    ups = [tasks[u] for u in stage["upstream"]]
    if ups:
        task.after(*ups)
    tasks[stage["name"]] = task


def build_pipeline(spec: Mapping[str, Any], opts: argparse.Namespace) -> Any:
    """The `@dsl.pipeline` of the spec: one container task per stage, `.after()` its upstream stages."""
    parameters = dict(spec["parameters"])
    defaults = {name: str(p["default"]) for name, p in parameters.items()}
    if opts.image:
        defaults[IMAGE] = opts.image
    if opts.root:
        defaults["root"] = opts.root
    components = {s["name"]: stage_component(s, parameters, defaults[IMAGE]) for s in spec["stages"]}
    names = list(parameters)

    def pipeline(*values: Any) -> None:
        params = dict(zip(names, values))
        tasks: dict[str, Any] = {}
        for stage in spec["stages"]:
            _add_task(stage, components[stage["name"]], params, tasks, opts)

    pipeline.__name__ = spec["pipeline"].replace("-", "_")
    pipeline.__doc__ = _doc(spec["description"], parameters)
    pipeline.__signature__ = _signature(names, defaults)  # type: ignore[attr-defined]
    return dsl.pipeline(pipeline, name=spec["pipeline"])


def _doc(description: str, parameters: Mapping[str, Any]) -> str:
    """A docstring KFP reads the pipeline's and its parameters' descriptions from."""
    args = "\n".join(f"    {n}: {p['description']}" for n, p in parameters.items())
    return f"{description}\n\nArgs:\n{args}\n"


def compile_spec(spec_path: str | Path, out: str | Path, opts: argparse.Namespace) -> Path:
    """Compile the spec at `spec_path` to the KFP pipeline YAML `out`; returns `out`."""
    spec = load_spec(spec_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(spec, opts), package_path=str(out))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kfp/compile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="the stage graph JSON (python -m peflow.kfp_spec PRESET --out FILE)")
    p.add_argument("--out", default="build/kfp/pe_pipeline.yaml", help="the pipeline YAML to write")
    p.add_argument("--image", default=None, help="default of the image parameter (else the spec's: peflow:latest)")
    p.add_argument("--root", default=None, help="default of the root parameter (else the spec's)")
    p.add_argument("--pvc", default="peflow", help="PersistentVolumeClaim mounted in every task ('' for none, "
                                                   "e.g. with s3:// roots)")
    p.add_argument("--mount-path", default="/mnt/peflow", help="where the PVC is mounted")
    p.add_argument("--aws-secret", default="", help="Kubernetes Secret whose AWS_ACCESS_KEY_ID and "
                                                    "AWS_SECRET_ACCESS_KEY keys become every task's env")
    p.add_argument("--kubeconfig-secret", default="peflow-kubeconfig",
                   help="Kubernetes Secret with a `config` key (a kubeconfig) mounted in the distributed stages' "
                        "launchers, for TorchX to submit Volcano jobs ('' for none)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable of every task (repeatable), e.g. MLFLOW_TRACKING_URI=http://mlflow:5000")
    p.add_argument("--retries", type=int, default=0, help="KFP retries per task (training resumes from its "
                                                          "last checkpoint)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    try:
        out = compile_spec(opts.spec, opts.out, opts)
    except (OSError, ValueError, KeyError) as e:
        print(f"kfp/compile.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(load_spec(opts.spec)['stages'])} tasks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
