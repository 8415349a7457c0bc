"""The Kubernetes deployment in `k8s/`, rendered and validated offline.

`python -m peflow.k8s render [--out FILE]` prints the objects `kubectl apply -k k8s/` applies, as one
multi-document YAML. It reads `k8s/kustomization.yaml` and does what kustomize does for the fields
that file uses (`resources`, `namespace`, `labels`, `images`, `secretGenerator` from env files with
`generatorOptions.disableNameSuffixHash`), in kustomize's output order; any other field is refused.
A secret whose `secrets/<name>.env` is missing is rendered from the committed
`secrets/<name>.env.example` (empty values), with a note on stderr.

`python -m peflow.k8s validate [FILE ...]` validates every object (of the rendered set, or of the
given YAML files, e.g. a `peflow launch --dryrun` Volcano Job): core kinds against the Kubernetes
1.33 schemas bundled with kubernetes-validate (strict: an unknown field is an error), Volcano kinds
against the CRDs vendored in `k8s/schemas/volcano/`, made strict the same way, with their metadata
checked as ObjectMeta; without files it also validates `k8s/airflow/values.yaml` against the
Airflow chart's `values.schema.json`. Errors name the object and the field; the exit code is 1.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
KUBERNETES_VERSION = "1.33"
SUPPORTED_FIELDS = frozenset(
    {"apiVersion", "kind", "namespace", "labels", "resources", "images", "generatorOptions", "secretGenerator"})

# kustomize's "legacy" output order: these kinds first (in this order), these last, any other kind
# in between by group_version_kind; within a kind by namespace, then name.
ORDER_FIRST = ("Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
               "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
               "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
               "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget")
ORDER_LAST = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
# Built-in cluster-scoped kinds; kustomize cannot know a CRD's scope, so it namespaces those too.
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass", "PersistentVolume",
                            "PriorityClass", "CustomResourceDefinition", "IngressClass", "RuntimeClass",
                            "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"})
# Where `labels: [{includeTemplates: true}]` also puts the labels.
TEMPLATE_LABEL_PATHS = {
    "Deployment": [("spec", "template")], "ReplicaSet": [("spec", "template")],
    "DaemonSet": [("spec", "template")], "StatefulSet": [("spec", "template"), ("spec", "volumeClaimTemplates")],
    "Job": [("spec", "template")], "ReplicationController": [("spec", "template")],
    "CronJob": [("spec", "jobTemplate"), ("spec", "jobTemplate", "spec", "template")],
}


class ManifestError(ValueError):
    """A manifest that cannot be rendered or does not validate; the message names it and why."""


def object_name(obj: dict[str, Any]) -> str:
    """`Kind namespace/name` (or `Kind name` when cluster-scoped or not namespaced)."""
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if isinstance(meta, dict) and meta.get("namespace") else ""
    name = meta.get("name", "?") if isinstance(meta, dict) else "?"
    return f"{obj.get('kind', '?')} {ns}{name}"


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a file, skipping empty ones."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d:
            raise ManifestError(f"{path}: a document is not a Kubernetes object")
    return docs


# -- rendering ---------------------------------------------------------------------------------------

def load_kustomization(root: Path) -> dict[str, Any]:
    """`root/kustomization.yaml`, refusing fields this renderer does not implement."""
    path = root / "kustomization.yaml"
    k = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(k) - SUPPORTED_FIELDS)
    if unknown:
        raise ManifestError(f"{path}: kustomize field(s) {unknown} are not implemented by peflow.k8s render "
                            f"(supported: {sorted(SUPPORTED_FIELDS)}); use `kubectl kustomize`")
    return k


def parse_env_file(path: Path) -> dict[str, str]:
    """An env file as kustomize reads it: KEY=VALUE lines, the value kept literally; blank and `#` lines skipped."""
    data: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or any(c.isspace() for c in key):
            raise ManifestError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        data[key] = value
    return data


def generate_secret(spec: dict[str, Any], root: Path, *, examples: bool | None, notes: list[str]) -> dict[str, Any]:
    """The Secret of a `secretGenerator` entry with `envs` files (or their `.example` templates)."""
    unknown = sorted(set(spec) - {"name", "envs", "type"})
    if unknown or not spec.get("envs"):
        raise ManifestError(f"secretGenerator {spec.get('name')!r}: only `envs` files are implemented (got {unknown})")
    data: dict[str, str] = {}
    for rel in spec["envs"]:
        path, example = root / rel, root / f"{rel}.example"
        use_example = examples is True or (examples is None and not path.is_file())
        if use_example:
            if not example.is_file():
                raise ManifestError(f"secretGenerator {spec['name']!r}: neither {path} nor {example} exists")
            notes.append(f"Secret {spec['name']}: rendered from {example.relative_to(root)} (empty values); "
                         f"copy it to {rel} and fill it in")
        for key, value in parse_env_file(example if use_example else path).items():
            data[key] = base64.b64encode(value.encode()).decode()
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": spec["name"]},
            "type": spec.get("type", "Opaque"), "data": data}


def set_namespace(obj: dict[str, Any], namespace: str) -> None:
    """kustomize's `namespace`: every object but the built-in cluster-scoped kinds gets it."""
    if obj["kind"] not in CLUSTER_SCOPED:
        obj.setdefault("metadata", {})["namespace"] = namespace


def bind_subjects(objs: list[dict[str, Any]]) -> None:
    """A (Cluster)RoleBinding subject naming a ServiceAccount of the set, without a namespace, gets that
    account's namespace (kustomize's name references)."""
    accounts = {o["metadata"]["name"]: o["metadata"].get("namespace") for o in objs if o["kind"] == "ServiceAccount"}
    for o in objs:
        if o["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        for s in o.get("subjects") or []:
            if s.get("kind") == "ServiceAccount" and not s.get("namespace") and accounts.get(s.get("name")):
                s["namespace"] = accounts[s["name"]]


def _at(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def add_labels(obj: dict[str, Any], pairs: dict[str, str], *, include_templates: bool) -> None:
    """kustomize's `labels` entry: metadata labels, and pod (and claim) templates with includeTemplates."""
    obj.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
    if not include_templates:
        return
    for path in TEMPLATE_LABEL_PATHS.get(obj["kind"], []):
        target = _at(obj, path)
        for t in target if isinstance(target, list) else [target] if isinstance(target, dict) else []:
            t.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    """name, tag, digest of an image reference."""
    image, _, digest = image.partition("@")
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1:], digest or None
    return image, None, digest or None


def set_images(node: Any, images: list[dict[str, str]]) -> None:
    """kustomize's `images`: rewrite the `image` of every container and init container that names one."""
    if isinstance(node, list):
        for item in node:
            set_images(item, images)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for c in value:
                if isinstance(c, dict) and isinstance(c.get("image"), str):
                    c["image"] = _new_image(c["image"], images)
        set_images(value, images)


def _new_image(image: str, images: list[dict[str, str]]) -> str:
    name, tag, digest = _split_image(image)
    for rule in images:
        if rule.get("name") == name:
            new_name = rule.get("newName", name)
            if rule.get("digest"):
                return f"{new_name}@{rule['digest']}"
            if "newTag" in rule:
                return f"{new_name}:{rule['newTag']}"
            return new_name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    return image


def _gvk(obj: dict[str, Any]) -> str:
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    return f"{group or '~G'}_{version or '~V'}_{obj.get('kind') or '~K'}"


def legacy_order(obj: dict[str, Any]) -> tuple[int, str, str, str]:
    """kustomize's legacy sort key."""
    kind = obj["kind"]
    rank = ORDER_FIRST.index(kind) - len(ORDER_FIRST) if kind in ORDER_FIRST else (
        1 + ORDER_LAST.index(kind) if kind in ORDER_LAST else 0)
    meta = obj.get("metadata") or {}
    return rank, _gvk(obj) if rank == 0 else "", meta.get("namespace", ""), meta.get("name", "")


def render(root: Path = K8S_DIR, *, examples: bool | None = None, notes: list[str] | None = None) -> list[dict]:
    """The objects of `root/kustomization.yaml`, as `kubectl kustomize root` builds them.

    examples: True renders every secret from its `.env.example` template; None (default) only those
    whose `.env` file is missing; False requires the `.env` files.
    """
    notes = [] if notes is None else notes
    k = load_kustomization(root)
    objs = [o for rel in k.get("resources", []) for o in load_documents(root / rel)]
    if k.get("secretGenerator") and not (k.get("generatorOptions") or {}).get("disableNameSuffixHash"):
        raise ManifestError("secretGenerator without generatorOptions.disableNameSuffixHash: name hashes are not "
                            "implemented")
    objs += [generate_secret(s, root, examples=examples, notes=notes) for s in k.get("secretGenerator", [])]
    for o in objs:
        if k.get("namespace"):
            set_namespace(o, k["namespace"])
        for entry in k.get("labels", []):
            if entry.get("includeSelectors"):
                raise ManifestError("labels.includeSelectors is not implemented")
            add_labels(o, entry.get("pairs", {}), include_templates=bool(entry.get("includeTemplates")))
        set_images(o, k.get("images", []))
    bind_subjects(objs)
    return sorted(objs, key=legacy_order)


def dump(objs: Iterable[dict[str, Any]]) -> str:
    """One multi-document YAML."""
    return yaml.safe_dump_all(list(objs), sort_keys=True, default_flow_style=False)


# -- validation --------------------------------------------------------------------------------------

def strict(schema: Any) -> Any:
    """An OpenAPI v3 CRD schema as the API server's strict field validation applies it: an object with
    `properties` admits no other field (unless it preserves unknown fields); `nullable` admits null."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


@functools.lru_cache(maxsize=None)
def _kubernetes_definitions(version: str) -> Any:
    """kubernetes-validate's strict definitions (ObjectMeta and friends) for a minor version, as a resource."""
    import importlib.resources

    from referencing import Resource

    path = importlib.resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json")
    return Resource.from_contents(json.loads(path.read_text()))


@functools.lru_cache(maxsize=None)
def crd_schemas(directory: Path = K8S_DIR / "schemas" / "volcano") -> dict[tuple[str, str], tuple[str, dict]]:
    """(apiVersion, kind) -> (label, strict schema) for every served version of the CRDs in a folder."""
    out: dict[tuple[str, str], tuple[str, dict]] = {}
    for path in sorted(directory.glob("*.yaml")):
        for crd in load_documents(path):
            spec = crd["spec"]
            for v in spec["versions"]:
                if v.get("served", True):
                    schema = strict(v["schema"]["openAPIV3Schema"])
                    schema["properties"]["metadata"] = {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/"
                                                                "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
                    label = f"CRD {crd['metadata']['name']} {v['name']}, strict"
                    out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = (label, schema)
    return out


def _where(error: Any) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    return f" at {path}" if path else ""


def validate_object(obj: dict[str, Any], version: str = KUBERNETES_VERSION) -> str:
    """Validate one object; returns the schema it validated against, raises ManifestError naming it."""
    import jsonschema
    import kubernetes_validate
    from referencing import Registry

    if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
        raise ManifestError(f"{object_name(obj) if isinstance(obj, dict) else obj!r}: no apiVersion/kind")
    crd = crd_schemas().get((obj["apiVersion"], obj["kind"]))
    if crd is not None:
        label, schema = crd
        registry = Registry().with_resource("https://kubernetes.io/api/_definitions.json",
                                            _kubernetes_definitions(version))
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema, registry=registry).iter_errors(obj))
        if error is not None:
            raise ManifestError(f"{object_name(obj)}: {error.message}{_where(error)} ({label})")
        return label
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise ManifestError(f"{object_name(obj)}: {e.message}{_where(e)} (Kubernetes {version}, strict)") from None
    except kubernetes_validate.SchemaNotFoundError:
        raise ManifestError(f"{object_name(obj)}: no schema for {obj['apiVersion']} {obj['kind']} (neither "
                            f"Kubernetes {version} nor a vendored CRD)") from None
    return f"Kubernetes {version} ({obj['apiVersion']} {obj['kind']}, strict)"


def validate_all(objs: Iterable[dict[str, Any]]) -> tuple[list[tuple[str, str]], list[str]]:
    """(object, schema) for every valid object, and one error line for every invalid one."""
    ok, errors = [], []
    for obj in objs:
        try:
            ok.append((object_name(obj), validate_object(obj)))
        except ManifestError as e:
            errors.append(str(e))
    return ok, errors


def validate_values(values: Path = K8S_DIR / "airflow" / "values.yaml",
                    schema: Path = K8S_DIR / "schemas" / "airflow-chart" / "values.schema.json") -> list[str]:
    """Error lines of Helm values against a chart's values.schema.json (JSON Schema draft 7)."""
    import jsonschema

    data = yaml.safe_load(values.read_text()) or {}
    validator = jsonschema.Draft7Validator(json.loads(schema.read_text()))
    return [f"{values.name}: {e.message}{_where(e)} (Airflow chart values.schema.json)"
            for e in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))]


# -- command line ------------------------------------------------------------------------------------

def _objects_of(files: list[str]) -> Iterator[dict[str, Any]]:
    for f in files:
        yield from load_documents(Path(f))


def main(argv: list[str] | None = None) -> int:
    """`python -m peflow.k8s render|validate`: 0 when all is well, 1 on invalid objects, 2 when nothing renders."""
    p = argparse.ArgumentParser(prog="python -m peflow.k8s", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="print the objects `kubectl apply -k k8s/` applies")
    r.add_argument("--dir", type=Path, default=K8S_DIR, help="the kustomization folder (default: k8s/)")
    r.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")
    v = sub.add_parser("validate", help="validate the rendered set and the Airflow values, or YAML files")
    v.add_argument("files", nargs="*", help="YAML files to validate instead of the rendered set")
    v.add_argument("--dir", type=Path, default=K8S_DIR, help="the kustomization folder (default: k8s/)")
    a = p.parse_args(argv)
    notes: list[str] = []
    try:
        objs = list(_objects_of(a.files)) if getattr(a, "files", None) else render(a.dir, notes=notes)
    except (ManifestError, OSError, yaml.YAMLError) as e:
        print(f"peflow.k8s: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if a.command == "render":
        text = dump(objs)
        if a.out is None:
            sys.stdout.write(text)
        else:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(text)
            print(f"wrote {len(objs)} objects to {a.out}", file=sys.stderr)
        return 0
    ok, errors = validate_all(objs)
    if not a.files:
        values_errors = validate_values(a.dir / "airflow" / "values.yaml",
                                        a.dir / "schemas" / "airflow-chart" / "values.schema.json")
        errors += values_errors
        if not values_errors:
            ok.append(("Helm values airflow/values.yaml", "Airflow chart 1.22.0 values.schema.json"))
    for name, schema in ok:
        print(f"ok     {name:<48} {schema}")
    for e in errors:
        print(f"error  {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
