"""DAG policy: every DAG imports cleanly, has no cycles, and every task has
retries and a timeout; pe_pipeline has a task per registered stage and a Params form."""

import json

from peflow import orchestration, stages
from tests.dags.airflow_home import run_py

CHECK = r"""
import json
from airflow.dag_processing.dagbag import DagBag
bag = DagBag()
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    dag.check_cycle() if hasattr(dag, "check_cycle") else None
    out["dags"][dag_id] = {
        "catchup": dag.catchup, "tags": sorted(dag.tags), "params": dict(dag.params.dump()),
        "param_meta": {k: {**dag.params.get_param(k).schema,
                                 "description": dag.params.get_param(k).description} for k in dag.params},
        "tasks": {t.task_id: {"retries": t.retries, "timeout": t.execution_timeout.total_seconds()
                              if t.execution_timeout else None,
                              "upstream": sorted(t.upstream_task_ids), "mapped": "Mapped" in type(t).__name__,
                              "max_active": getattr(t, "max_active_tis_per_dagrun", None),
                              "trigger_rule": str(t.trigger_rule)} for t in dag.tasks},
    }
print("RESULT" + json.dumps(out))
"""


def _bag(env):
    r = run_py(CHECK, env)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_dags_import_cleanly_with_policy(airflow_env):
    bag = _bag(airflow_env)
    assert bag["errors"] == {}
    assert "pe_pipeline" in bag["dags"]
    for dag_id, dag in bag["dags"].items():
        assert dag["catchup"] is False, dag_id
        assert dag["tags"], dag_id
        for tid, t in dag["tasks"].items():
            assert t["timeout"] and t["timeout"] > 0, f"{dag_id}.{tid} has no execution_timeout"
            if tid not in ("end_run",):
                assert t["retries"] >= 1, f"{dag_id}.{tid} has no retries"

    dag = bag["dags"]["pe_pipeline"]
    trained = {}
    for t in orchestration.tasks():
        # the stages' dependency graph: a task waits for exactly the tasks whose outputs it reads
        want = {"start_run", *(u.id for u in t.upstream)}
        if t.variant:
            want.add(f"{t.variant}_members")  # mapped over the variant's members in this run
        distributed = stages.get(t.stage).distributed
        if distributed and t.stage in trained:
            want.add(trained[t.stage])  # one training at a time: each variant's after the one before
        trained[t.stage] = t.id
        task = dag["tasks"][t.id]
        assert set(task["upstream"]) == want, t.id
        assert task["mapped"] == bool(t.variant), t.id  # a variant's tasks are the stage tasks, mapped
        # a variant that is off (skipped) must not skip the next variant's training chained after it
        assert task["trigger_rule"].lower().endswith("none_failed" if t.variant else "all_success"), t.id
        if t.variant:
            assert task["max_active"] == (1 if distributed else 2), t.id
    assert set(dag["tasks"]["end_run"]["upstream"]) == {t.id for t in orchestration.tasks()} | {"start_run"}
    assert set(orchestration.params_spec()) == set(dag["params"])
    for name, schema in dag["param_meta"].items():
        assert schema.get("title") and schema.get("description"), name
