"""The Kubernetes manifests in k8s/: rendered as `kubectl apply -k k8s/` would, every object validated
offline against the real schemas, and the security properties the deployment promises."""

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from peflow import k8s

NAMESPACE = "peflow"
WORKER_RULES = {
    ("batch.volcano.sh", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("batch.volcano.sh", "jobs/status"): {"get"},
    ("", "pods"): {"create", "get", "list", "watch", "delete"},
    ("", "pods/log"): {"get"},
}
POD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return k8s.render(examples=True)


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_the_rendered_set_has_each_expected_object(objects):
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("Namespace", "peflow"),
        ("ServiceAccount", "peflow-airflow-worker"), ("ServiceAccount", "peflow-airflow-scheduler"),
        ("ServiceAccount", "peflow-training"),
        ("Role", "peflow-airflow-worker"), ("RoleBinding", "peflow-airflow-worker"),
        ("Queue", "peflow-training"), ("PersistentVolumeClaim", "peflow-checkpoints"),
        ("Deployment", "mlflow"), ("Service", "mlflow"), ("StatefulSet", "postgres"), ("Service", "postgres"),
        ("Secret", "peflow-postgres"), ("Secret", "peflow-s3"), ("Secret", "peflow-airflow"),
        ("ConfigMap", "peflow-settings"),
    } <= names
    assert all(o["metadata"].get("namespace") == NAMESPACE for o in objects if o["kind"] != "Namespace")
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "peflow" for o in objects)
    assert by_kind(objects, "PersistentVolumeClaim")["peflow-checkpoints"]["spec"]["accessModes"] == ["ReadWriteMany"]
    (mlflow,) = by_kind(objects, "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"]
    assert mlflow["image"] == "registry.example.com/peflow-mlflow:0.1.0"  # kustomization.yaml `images`


def test_every_object_validates_against_its_schema(objects):
    ok, errors = k8s.validate_all(objects)
    assert errors == []
    schemas = dict(ok)
    assert schemas["Queue peflow/peflow-training"].startswith("CRD queues.scheduling.volcano.sh v1beta1")
    assert schemas["Deployment peflow/mlflow"].startswith("Kubernetes 1.33")


def test_airflow_values_validate_against_the_chart_schema():
    assert k8s.validate_values() == []


def test_the_chart_schema_rejects_a_bad_value(tmp_path):
    values = yaml.safe_load((k8s.K8S_DIR / "airflow" / "values.yaml").read_text())
    values["executor"] = "Kubernetes"
    values["workers"]["kubernetes"]["resources"] = "big"
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    errors = k8s.validate_values(path)
    assert any("at executor" in e for e in errors) and any("at workers.kubernetes.resources" in e for e in errors)


def test_rbac_is_namespaced_and_grants_only_the_listed_rights(objects):
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles, bindings = by_kind(objects, "Role"), by_kind(objects, "RoleBinding")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in roles["peflow-airflow-worker"]["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames/nonResourceURLs tricks
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == WORKER_RULES
    for role in roles.values():
        flat = [x for r in role["rules"] for key in ("apiGroups", "resources", "verbs") for x in r[key]]
        assert "*" not in flat and role["metadata"]["namespace"] == NAMESPACE
    for name, binding in bindings.items():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    training = by_kind(objects, "ServiceAccount")["peflow-training"]
    assert training["automountServiceAccountToken"] is False
    assert all(s["name"] != "peflow-training" for b in bindings.values() for s in b["subjects"])


def effective_security(pod: dict, container: dict) -> dict:
    return {**pod.get("securityContext", {}), **container.get("securityContext", {})}


def assert_locked_down(sc: dict, where: str) -> None:
    assert sc.get("runAsNonRoot") is True and isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, where
    assert sc.get("allowPrivilegeEscalation") is False, where
    assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
    assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where


def test_every_container_has_requests_limits_and_a_non_root_security_context(objects):
    containers = 0
    for o in objects:
        if o["kind"] not in POD_KINDS:
            continue
        pod = o["spec"]["template"]["spec"]
        assert pod.get("automountServiceAccountToken") is False, k8s.object_name(o)  # no API use
        for c in pod.get("initContainers", []) + pod["containers"]:
            where = f"{k8s.object_name(o)} container {c['name']}"
            assert_locked_down(effective_security(pod, c), where)
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), where
            containers += 1
    assert containers >= 2


def test_the_airflow_pods_run_non_root_with_resources():
    values = yaml.safe_load((k8s.K8S_DIR / "airflow" / "values.yaml").read_text())
    assert_locked_down({**values["securityContexts"]["pod"], **values["securityContexts"]["containers"]}, "airflow")
    assert_locked_down(values["dags"]["gitSync"]["securityContexts"]["container"], "git-sync")
    for part in ("scheduler", "apiServer", "dagProcessor", "triggerer", "migrateDatabaseJob"):
        assert set(values[part]["resources"]) == {"requests", "limits"}, part
    assert set(values["workers"]["kubernetes"]["resources"]) == {"requests", "limits"}
    assert values["allowPodLaunching"] is False and values["multiNamespaceMode"] is False
    assert values["workers"]["kubernetes"]["serviceAccount"] == {"create": False, "name": "peflow-airflow-worker"}


def test_secret_templates_carry_no_values(objects):
    examples = sorted((k8s.K8S_DIR / "secrets").glob("*.env.example"))
    assert len(examples) == 3
    for path in examples:
        assert set(k8s.parse_env_file(path).values()) == {""}, path
    for secret in by_kind(objects, "Secret").values():
        assert secret["data"] and set(secret["data"].values()) == {""}, secret["metadata"]["name"]
    assert "*.env" in (k8s.K8S_DIR / "secrets" / ".gitignore").read_text().split()


def test_a_broken_object_is_rejected_with_an_error_naming_it(objects):
    deployment = copy.deepcopy(by_kind(objects, "Deployment")["mlflow"])
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(k8s.ManifestError, match=r"Deployment peflow/mlflow: .* at spec\.replicas"):
        k8s.validate_object(deployment)
    queue = copy.deepcopy(by_kind(objects, "Queue")["peflow-training"])
    queue["spec"]["weight"] = "heavy"
    with pytest.raises(k8s.ManifestError, match=r"Queue peflow/peflow-training: .* at spec\.weight"):
        k8s.validate_object(queue)
    queue["spec"] = {"weight": 1, "capacity": {"cpu": 1}}  # a typo: `capability`
    with pytest.raises(k8s.ManifestError, match="'capacity' was unexpected"):
        k8s.validate_object(queue)
    with pytest.raises(k8s.ManifestError, match="no schema for example.com/v1 Widget"):
        k8s.validate_object({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def test_the_command_line_validates_and_reports_errors(tmp_path, capsys):
    assert k8s.main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "Queue peflow/peflow-training" in out and "Helm values airflow/values.yaml" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: web}]}\n")
    assert k8s.main(["validate", str(bad)]) == 1
    assert "Service s: " in capsys.readouterr().err
    out_file = tmp_path / "k8s.yaml"
    assert k8s.main(["render", "--out", str(out_file)]) == 0
    assert len([d for d in yaml.safe_load_all(out_file.read_text()) if d]) == len(k8s.render(examples=None))


def copy_with_env_files(tmp_path: Path) -> Path:
    root = tmp_path / "k8s"
    shutil.copytree(k8s.K8S_DIR, root, ignore=shutil.ignore_patterns("*.env"))
    for example in (root / "secrets").glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    return root


def test_unimplemented_kustomize_fields_are_refused(tmp_path):
    root = copy_with_env_files(tmp_path)
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    (root / "kustomization.yaml").write_text(yaml.safe_dump({**kustomization, "patches": []}))
    with pytest.raises(k8s.ManifestError, match=r"\['patches'\] are not implemented"):
        k8s.render(root)


def test_an_env_file_line_without_a_value_is_an_error(tmp_path):
    path = tmp_path / "x.env"
    path.write_text("# comment\nA=1\nB\n")
    with pytest.raises(k8s.ManifestError, match=r"x.env:3: expected KEY=VALUE"):
        k8s.parse_env_file(path)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its built-in kustomize)")
def test_render_is_what_kubectl_kustomize_builds(tmp_path):
    root = copy_with_env_files(tmp_path)
    built = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True, check=True).stdout
    assert k8s.render(root, examples=False) == [d for d in yaml.safe_load_all(built) if d]
