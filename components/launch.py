"""Launch a stage's TorchX component through the TorchX runner API.

Used by `peflow launch` (as `python -m components.launch`) and by the Airflow
DAG. Local launches stream every replica's log lines to `echo` while waiting;
`dryrun` returns the scheduler request (for kubernetes: the Volcano Job YAML)
without touching a cluster.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torchx.specs as specs
from torchx.components.dist import parse_nnodes
from torchx.runner import get_runner

SCHEDULERS = ("local_cwd", "kubernetes")

#: The cluster a deployment launches on, from the launcher's environment (the Airflow workers get them
#: from k8s/config.yaml): TorchX kubernetes scheduler options and component arguments.
CLUSTER_ENV = {"namespace": "PEFLOW_K8S_NAMESPACE", "queue": "PEFLOW_K8S_QUEUE",
               "service_account": "PEFLOW_K8S_SERVICE_ACCOUNT"}
IMAGE_ENV, MOUNTS_ENV, FORWARD_ENV = "PEFLOW_IMAGE", "PEFLOW_K8S_MOUNTS", "PEFLOW_K8S_ENV"
#: Launcher variables every training pod gets on kubernetes (tracking, the parent run, storage places,
#: the S3 endpoint); credentials never: pods get them from their service account's cloud role or a
#: credentials file on the volume (AWS_SHARED_CREDENTIALS_FILE, listed in PEFLOW_K8S_ENV).
FORWARDED = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "PEFLOW_PARENT_RUN_ID", "PEFLOW_HOME", "PEFLOW_STORE",
             "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def free_port() -> int:
    """A free TCP port on this host, so concurrent launches never share a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_app(stage: str, stage_args: list[str], *, scheduler: str = "local_cwd", **component_args: Any
              ) -> specs.AppDef:
    """The AppDef of a registered stage: the generic component (`components/stage.py:stage`); on kubernetes
    with the deployment's image, volumes and forwarded variables (`cluster_args`) unless given."""
    from components.stage import stage as component

    if scheduler == "kubernetes":
        component_args = {**cluster_args(), **component_args}
    return component(*stage_args, name=stage, **component_args)


def cluster_args() -> dict[str, Any]:
    """Component arguments from the launcher's environment: image ($PEFLOW_IMAGE), mounts
    ($PEFLOW_K8S_MOUNTS, ';'-separated TorchX mount specs) and env (FORWARDED plus $PEFLOW_K8S_ENV's names)."""
    out: dict[str, Any] = {}
    if os.environ.get(IMAGE_ENV):
        out["image"] = os.environ[IMAGE_ENV]
    if os.environ.get(MOUNTS_ENV):
        # TorchX's parse_mounts reads one flat list of key=value tokens, each mount starting at its type=
        out["mounts"] = [t.strip() for m in os.environ[MOUNTS_ENV].split(";") for t in m.split(",") if t.strip()]
    names = [*FORWARDED, *(n.strip() for n in os.environ.get(FORWARD_ENV, "").split(",") if n.strip())]
    env = {n: os.environ[n] for n in names if os.environ.get(n)}
    if env:
        out["env"] = env
    return out


def scheduler_cfg(scheduler: str, *, queue: str | None, namespace: str | None, log_dir: str | None
                  ) -> dict[str, Any]:
    """The scheduler's run options; on kubernetes, queue/namespace/service account default to the
    deployment's (CLUSTER_ENV), else TorchX's `default`."""
    if scheduler == "kubernetes":
        given = {"queue": queue, "namespace": namespace, "service_account": None}
        cfg = {k: v or os.environ.get(CLUSTER_ENV[k]) for k, v in given.items()}
        cfg["queue"], cfg["namespace"] = cfg["queue"] or "default", cfg["namespace"] or "default"
        return {k: v for k, v in cfg.items() if v}
    if scheduler == "local_cwd":
        return {"log_dir": log_dir} if log_dir else {}
    raise ValueError(f"unknown scheduler {scheduler!r}; known: {SCHEDULERS}")


def dryrun(stage: str, stage_args: list[str], *, scheduler: str, queue: str | None = None,
           namespace: str | None = None, **component_args: Any) -> str:
    """The scheduler request as text (for kubernetes, the Volcano Job YAML)."""
    app = build_app(stage, stage_args, scheduler=scheduler, **component_args)
    with get_runner() as runner:
        info = runner.dryrun(app, scheduler, cfg=scheduler_cfg(scheduler, queue=queue, namespace=namespace,
                                                               log_dir=None), workspace=None)
    return str(info)


def run(
    stage: str,
    stage_args: list[str],
    *,
    scheduler: str = "local_cwd",
    log_dir: str | None = None,
    queue: str | None = None,
    namespace: str | None = None,
    echo: Callable[[str], None] = lambda line: print(line, flush=True),
    **component_args: Any,
) -> specs.AppStatus:
    """Run the stage's component, stream its logs, wait; raise on failure."""
    component_args.setdefault("rdzv_port", free_port())
    app = build_app(stage, stage_args, scheduler=scheduler, **component_args)
    if scheduler == "local_cwd":
        # Replicas run `bash -c torchrun ...`: resolve torchrun from this interpreter's env.
        bindir = str(Path(sys.executable).parent)
        for role in app.roles:
            role.env["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
            # every "node" shares this host's cores: one thread per core, no oversubscription
            _, nnodes, nproc, _ = parse_nnodes(component_args.get("j", "1x1"))
            role.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (nnodes * nproc)))
    cfg = scheduler_cfg(scheduler, queue=queue, namespace=namespace, log_dir=log_dir)
    if scheduler == "local_cwd" and any(role.resource.gpu > 0 for role in app.roles):
        cfg["auto_set_cuda_visible_devices"] = True  # several "nodes" on one GPU host: split its GPUs
    with get_runner() as runner:
        handle = runner.run(app, scheduler, cfg=cfg, workspace=None)
        echo(f"launched {handle}")
        tails = [
            threading.Thread(target=_tail, args=(runner, handle, role.name, k, echo), daemon=True)
            for role in app.roles
            for k in range(role.num_replicas)
        ]
        for t in tails:
            t.start()
        status = runner.wait(handle, wait_interval=1)
        for t in tails:
            t.join(timeout=10)
    if status is None:
        raise RuntimeError(f"{handle}: the scheduler lost the app")
    if status.state != specs.AppState.SUCCEEDED:
        raise RuntimeError(f"{stage} failed on {scheduler}: {status.state.name}\n{status.format()}")
    return status


def _tail(runner: Any, handle: str, role: str, k: int, echo: Callable[[str], None]) -> None:
    try:
        for line in runner.log_lines(handle, role, k, should_tail=True):
            echo(f"[{role}/{k}] {line.rstrip()}")
    except Exception as e:  # a replica that never started has no log; wait() reports why
        echo(f"[{role}/{k}] (log unavailable: {e})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="peflow launch", description=__doc__)
    p.add_argument("stage")
    p.add_argument("-j", default="2x1", help="{nnodes}x{nproc_per_node}")
    p.add_argument("--scheduler", default="local_cwd", choices=SCHEDULERS)
    p.add_argument("--dryrun", action="store_true")
    p.add_argument("--image", default=None)
    p.add_argument("--gpu", type=int, default=None)
    p.add_argument("--cpu", type=int, default=None)
    p.add_argument("--memMB", type=int, default=None)
    p.add_argument("--resource", default=None, help="a named resource per node (components/resources.py or "
                   "TorchX's); default: the --preset's, else the stage's")
    p.add_argument("--queue", default=None, help="Volcano queue (default: $PEFLOW_K8S_QUEUE, else 'default')")
    p.add_argument("--namespace", default=None, help="namespace (default: $PEFLOW_K8S_NAMESPACE, else 'default')")
    p.add_argument("--log-dir", default=None)
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:split])
    stage_args = argv[split + 1:]
    comp = {k: v for k, v in dict(j=a.j, image=a.image, gpu=a.gpu, cpu=a.cpu, memMB=a.memMB, h=a.resource).items()
            if v is not None}
    try:
        if a.dryrun:
            print(dryrun(a.stage, stage_args, scheduler=a.scheduler, queue=a.queue, namespace=a.namespace,
                         **comp))
        else:
            run(a.stage, stage_args, scheduler=a.scheduler, log_dir=a.log_dir, queue=a.queue,
                namespace=a.namespace, **comp)
    except ValueError as e:  # a configuration the launch refuses: exit 2, as `peflow <stage>` does
        print(f"peflow launch: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"peflow launch: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
