"""Offline checks of the Kubernetes manifests in infra/ against the KubeRay v1.7.0 CRDs.

Every ``apiVersion: ray.io/v1`` document (including the RayJob kept as a string in the fallback CronJob's
ConfigMap) is validated with ``jsonschema`` against its CRD's ``openAPIV3Schema``, after turning that
Kubernetes "structural schema" into a strict JSON Schema: object schemas without
``x-kubernetes-preserve-unknown-fields`` are closed (``additionalProperties: false``, which is what the API
server's pruning would silently do to an unknown field), ``x-kubernetes-int-or-string`` becomes
integer-or-string, ``nullable`` admits null, ``int32``/``int64`` formats get their ranges, and list-map /
set lists must not repeat keys. CEL rules (``x-kubernetes-validations``) cannot be evaluated here; the
operator-side rules that matter for these manifests are checked by hand below.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CRD_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "kuberay-crds"

if not CRD_DIR.is_dir():
    pytest.skip(
        f"KubeRay CRDs not found at {CRD_DIR} (the shared/kuberay-crds folder next to the "
        "repository); cannot validate infra/ offline",
        allow_module_level=True,
    )

RAY_API = "ray.io/v1"
SECRET_NAME = "cna-dist-s3"
MINE_ENTRYPOINT = "python jobs/mine_circuit.py manifests/qwen2.5-72b-instruct-refusal.yaml"
NIGHTLY_ENTRYPOINT = "python jobs/nightly_refresh.py manifests/nightly.yaml --report s3://cna-circuits/nightly-reports/"
PLAIN_KINDS = {"CronJob", "ConfigMap", "Secret", "ServiceAccount", "Role", "RoleBinding"}
# KubeRay v1.7 operator limits (controllers/ray/utils/constant.go): RayCluster names <= 53 characters,
# RayJob names <= 53 - 6; a RayCronJob's RayJobs are named "<cronjob>-<5 chars>".
MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME = 53, 47
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it


# ---------------------------------------------------------------------------------------------- loading


def _load_documents() -> list[tuple[str, dict]]:
    """(id, document) for every YAML document in infra/*.yaml, plus YAML documents held in ConfigMaps."""
    out: list[tuple[str, dict]] = []
    for path in sorted(INFRA.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path.name} document {i} is not a mapping"
            out.append((f"{path.name}#{i}", doc))
            if doc.get("kind") == "ConfigMap":
                for key, value in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        for j, inner in enumerate(yaml.safe_load_all(value)):
                            if isinstance(inner, dict) and "apiVersion" in inner:
                                out.append((f"{path.name}#{i}/data/{key}#{j}", inner))
    return out


DOCS = _load_documents()
RAY_DOCS = [(doc_id, doc) for doc_id, doc in DOCS if doc.get("apiVersion") == RAY_API]
PLAIN_DOCS = [(doc_id, doc) for doc_id, doc in DOCS if doc.get("apiVersion") != RAY_API]


def _ids(pairs: list[tuple[str, Any]]) -> list[str]:
    return [doc_id for doc_id, _ in pairs]


def _of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(doc_id, doc) for doc_id, doc in DOCS if doc.get("kind") == kind]


def _the(kind: str, *, api: str | None = None) -> dict:
    found = [doc for _, doc in _of_kind(kind) if api is None or doc.get("apiVersion") == api]
    assert len(found) == 1, f"expected exactly one {kind} in infra/, found {len(found)}"
    return found[0]


def _job_spec(doc: dict) -> dict:
    """The RayJob spec of a RayJob, or of a RayCronJob's jobTemplate (a RayJobSpec in v1.7)."""
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else _job_spec(doc)["rayClusterSpec"]


CLUSTER_SPECS = [
    (doc_id, _cluster_spec(doc))
    for doc_id, doc in RAY_DOCS
    if doc.get("kind") in ("RayCluster", "RayJob", "RayCronJob")
]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container is the first one


_UNITS = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity ("180Gi", "500m", 4, "161061273600") as a number."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?)([KMGTPE]i|[mkMGTPE]?)", str(value))
    assert match, f"not a resource quantity: {value!r}"
    return float(match[1]) * _UNITS[match[2]]


# ------------------------------------------------------------------------------------ schema transform

INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SUBSCHEMA_KEYS = ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not")
DROPPED_KEYS = ("x-kubernetes-validations", "default", "description", "example")  # not checkable offline

OBJECT_META = {  # the API server's own ObjectMeta, closed, in place of the CRD's bare `metadata: {type: object}`
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 253},
        "generateName": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    },
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
}


def k8s_to_jsonschema(node: Any) -> Any:
    """Kubernetes structural schema -> strict JSON Schema (see the module docstring)."""
    if isinstance(node, list):
        return [k8s_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = _convert_keys(node)
    _int_or_string(out)
    _nullable(out)
    _int_range(out)
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    _embedded_resource(out)
    preserve = out.get("x-kubernetes-preserve-unknown-fields") is True
    if out.get("type") == "object" and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def _convert_keys(node: dict) -> dict[str, Any]:
    """Every key but the unverifiable ones, subschemas converted, the rest (enum, type, ...) as they are."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED_KEYS:
            continue
        if key in SUBSCHEMA_MAPS:
            out[key] = {name: k8s_to_jsonschema(sub) for name, sub in value.items()}
        elif key in SUBSCHEMA_KEYS and isinstance(value, (dict, list)):
            out[key] = k8s_to_jsonschema(value)
        else:
            out[key] = value
    return out


def _int_or_string(out: dict[str, Any]) -> None:
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])


def _nullable(out: dict[str, Any]) -> None:
    if out.pop("nullable", False):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]


def _int_range(out: dict[str, Any]) -> None:
    if out.get("type") == "integer" and out.get("format") in INT_RANGES:
        low, high = INT_RANGES[out["format"]]
        out["minimum"] = max(out.get("minimum", low), low)
        out["maximum"] = min(out.get("maximum", high), high)


def _embedded_resource(out: dict[str, Any]) -> None:
    """An embedded resource gets apiVersion, kind and the API server's ObjectMeta, unless anything goes."""
    if (
        out.get("x-kubernetes-embedded-resource") is True
        and out.get("x-kubernetes-preserve-unknown-fields") is not True
    ):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", k8s_to_jsonschema(OBJECT_META))


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict) -> Any:
    """x-kubernetes-list-type: map -- no two items may share the key fields (e.g. two volumes "dshm")."""
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(item.get(k) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(
                    f"items {seen[key]} and {i} repeat the list-map key {dict(zip(keys, key, strict=True))}"
                )
            seen[key] = i


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


@cache
def crd_schemas() -> dict[str, dict]:
    """kind -> raw v1 openAPIV3Schema, for every CRD in the shared folder."""
    schemas: dict[str, dict] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=FAST_LOADER):  # ~3 MB of YAML
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            for version in crd["spec"]["versions"]:
                if version["name"] == "v1":
                    schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


@cache
def validator_for(kind: str) -> Any:
    raw = copy.deepcopy(crd_schemas()[kind])
    raw["properties"]["metadata"] = OBJECT_META
    raw["required"] = sorted({*raw.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    schema = k8s_to_jsonschema(raw)
    K8sValidator.check_schema(schema)
    return K8sValidator(schema)


def errors_of(doc: dict) -> list[str]:
    errors = validator_for(doc["kind"]).iter_errors(doc)
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(errors, key=lambda e: list(map(str, e.absolute_path)))
    ]


# ------------------------------------------------------------------------------------------- the tests


def test_crds_and_documents_present():
    assert {"RayCluster", "RayJob", "RayCronJob"} <= set(crd_schemas())
    kinds = sorted(doc["kind"] for _, doc in RAY_DOCS)
    # RayCluster; RayJob (mine) + RayJob (in the fallback ConfigMap); RayCronJob
    assert kinds == ["RayCluster", "RayCronJob", "RayJob", "RayJob"], kinds
    assert any("/data/" in doc_id for doc_id, _ in RAY_DOCS), "the ConfigMap's RayJob was not found"
    assert {doc["kind"] for _, doc in PLAIN_DOCS} == PLAIN_KINDS


@pytest.mark.slow  # whole documents against the 3 MB of CRDs: ~2-3 s each, ~9 s together
@pytest.mark.parametrize("doc_id, doc", RAY_DOCS, ids=_ids(RAY_DOCS))
def test_ray_document_validates_against_crd(doc_id, doc):
    assert doc["kind"] in crd_schemas(), f"{doc_id}: no CRD for kind {doc['kind']}"
    errors = errors_of(doc)
    assert not errors, f"{doc_id} does not validate against the KubeRay v1.7.0 CRD:\n" + "\n".join(errors)


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


MUTATIONS = {
    "rayStartParam": lambda d: _rename(d["spec"]["headGroupSpec"], "rayStartParams", "rayStartParam"),
    "replica": lambda d: _rename(d["spec"]["workerGroupSpecs"][0], "replicas", "replica"),
    "volumeMount": lambda d: _rename(_ray_container(d["spec"]["workerGroupSpecs"][0]), "volumeMounts", "volumeMount"),
    "enableInTreeAutoScaling": lambda d: _rename(d["spec"], "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
    "lables": lambda d: _rename(d["metadata"], "labels", "lables"),
}


@pytest.mark.parametrize("typo", list(MUTATIONS))
def test_misspelled_field_fails_validation(typo):
    """Proves the closed-object transform: the API server would silently drop these fields."""
    doc = copy.deepcopy(_the("RayCluster"))
    assert not errors_of(doc)
    MUTATIONS[typo](doc)
    errors = errors_of(doc)
    assert errors, f"a RayCluster with the misspelt field {typo!r} still validated"
    assert any(typo in e and "Additional properties" in e for e in errors), errors


BAD_VALUES = {
    "minReplicas as a string": lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas="0"),
    "rayStartParams value not a string": lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    "memory quantity with a bad unit": lambda d: _ray_container(d["spec"]["workerGroupSpecs"][0])["resources"][
        "limits"
    ].update(memory="600GB"),
    "int32 overflow": lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas=2**31),
    "duplicate volume name": lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["volumes"].append(
        {"name": "dshm", "emptyDir": {}}
    ),
    "upscalingMode not in the enum": lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_fail_validation(case):
    doc = copy.deepcopy(_the("RayCluster"))
    BAD_VALUES[case](doc)
    assert errors_of(doc), f"{case}: still validated"


def test_int_or_string_quantities_accept_both():
    doc = copy.deepcopy(_the("RayCluster"))
    limits = _ray_container(doc["spec"]["workerGroupSpecs"][0])["resources"]["limits"]
    limits.update({"cpu": 48, "nvidia.com/gpu": 4, "memory": "600Gi"})
    assert not errors_of(doc)


def test_all_cluster_specs_are_the_same():
    """RayJob / RayCronJob / fallback RayJob carry the RayCluster's spec unchanged (no drift)."""
    reference = _the("RayCluster")["spec"]
    for doc_id, spec in CLUSTER_SPECS:
        assert spec == reference, f"{doc_id}: rayClusterSpec differs from infra/raycluster.yaml's spec"


@pytest.mark.parametrize("doc_id, spec", CLUSTER_SPECS, ids=_ids(CLUSTER_SPECS))
def test_cluster_shape(doc_id, spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert spec["enableInTreeAutoscaling"] is True
    assert isinstance(spec.get("autoscalerOptions"), dict) and spec["autoscalerOptions"]
    workers = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(workers) == {"gpu-replica", "cpu-reduce"}
    gpu = workers["gpu-replica"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 8)
    assert gpu.get("replicas", 0) == 0
    cpu_limits = _ray_container(workers["cpu-reduce"])["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu_limits, "cpu-reduce must not ask for GPUs"


@pytest.mark.parametrize("doc_id, spec", CLUSTER_SPECS, ids=_ids(CLUSTER_SPECS))
def test_gpu_group_is_one_72b_replica_per_pod(doc_id, spec):
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-replica")
    container = _ray_container(gpu)
    resources = container["resources"]
    assert quantity(resources["limits"]["nvidia.com/gpu"]) == 4
    assert quantity(resources.get("requests", {}).get("nvidia.com/gpu", 4)) == 4
    assert 40 <= quantity(resources["limits"]["cpu"]) <= 64
    assert 512 * 2**30 <= quantity(resources["limits"]["memory"]) <= 768 * 2**30
    volumes = {v["name"]: v for v in gpu["template"]["spec"]["volumes"]}
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1, "the GPU worker needs a /dev/shm mount for the Ray object store"
    empty_dir = volumes[shm[0]["name"]].get("emptyDir") or {}
    assert empty_dir.get("medium") == "Memory", "/dev/shm must be a memory-backed emptyDir"
    shm_size = quantity(empty_dir["sizeLimit"])
    store = gpu["rayStartParams"].get("object-store-memory")
    if store is not None:
        assert quantity(store) <= shm_size, "object-store-memory does not fit in /dev/shm"
    assert shm_size < quantity(resources["limits"]["memory"]), "/dev/shm counts against the memory limit"


@pytest.mark.parametrize("doc_id, spec", CLUSTER_SPECS, ids=_ids(CLUSTER_SPECS))
def test_every_ray_pod_has_cache_shm_and_s3_secret(doc_id, spec):
    images = set()
    for name, group in _groups(spec):
        pod = group["template"]["spec"]
        container = _ray_container(group)
        images.add(container["image"])
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("CNA_DIST_CACHE", {}).get("value") == "/cache", f"{name}: CNA_DIST_CACHE"
        assert "/cache" in mounts, f"{name}: no volume mounted at /cache"
        cache_volume = volumes[mounts["/cache"]]
        assert "emptyDir" in cache_volume or "hostPath" in cache_volume, f"{name}: /cache is not local"
        assert "/dev/shm" in mounts, f"{name}: no /dev/shm volume"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        refs = [src["secretRef"]["name"] for src in container.get("envFrom", []) if "secretRef" in src]
        secret_key_refs = [
            e["valueFrom"]["secretKeyRef"]["name"] for e in env.values() if "secretKeyRef" in e.get("valueFrom", {})
        ]
        assert SECRET_NAME in refs + secret_key_refs, f"{name}: S3 credentials not taken from {SECRET_NAME}"
    assert len(images) == 1, f"head and workers should run one image, got {images}"


SECRET_ENV = re.compile(r"^AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)$|SECRET|PASSWORD|TOKEN")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
PLACEHOLDER = "REPLACE_ME"


def _walk(node: Any, path: str = ""):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


@pytest.mark.parametrize("doc_id, doc", DOCS, ids=_ids(DOCS))
def test_no_inline_secret_values(doc_id, doc):
    if doc.get("kind") == "Secret":
        assert "example" in doc_id, f"{doc_id}: only the example Secret belongs in infra/"
        assert doc["metadata"].get("annotations", {}).get("cna-dist/example") == "true"
        values = {**doc.get("stringData", {}), **doc.get("data", {})}
        assert values and all(v == PLACEHOLDER for v in values.values()), f"{doc_id}: non-placeholder value"
        return
    for path, node in _walk(doc):
        if isinstance(node, str):
            assert not AWS_KEY_ID.search(node), f"{doc_id}{path}: looks like an AWS access key id"
        if not isinstance(node, dict):
            continue
        is_env_var = isinstance(node.get("name"), str) and ("value" in node or "valueFrom" in node)
        if is_env_var and SECRET_ENV.search(node["name"]):
            assert "value" not in node, f"{doc_id}{path}: inline value for {node['name']}"
            assert "secretKeyRef" in node["valueFrom"], f"{doc_id}{path}: {node['name']} not from a Secret"
        for key, value in node.items():
            assert not (key.startswith("AWS_") and isinstance(value, str)), (
                f"{doc_id}{path}.{key}: inline AWS setting outside the example Secret"
            )


def test_no_credentials_in_files():
    for path in sorted(INFRA.rglob("*")):
        if path.is_file():
            text = path.read_text()
            assert not AWS_KEY_ID.search(text), f"{path}: looks like an AWS access key id"
            assert not re.search(r"aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}", text, re.I), path


@pytest.mark.parametrize("doc_id, doc", PLAIN_DOCS, ids=_ids(PLAIN_DOCS))
def test_plain_kubernetes_documents_are_well_formed(doc_id, doc):
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], doc_id
    assert doc.get("kind") in PLAIN_KINDS, f"{doc_id}: unexpected kind {doc.get('kind')}"
    assert isinstance(doc.get("metadata"), dict) and doc["metadata"].get("name"), f"{doc_id}: metadata.name"
    assert DNS1035.match(doc["metadata"]["name"]) or doc["kind"] == "Secret", doc_id
    expected_api = {
        "CronJob": "batch/v1",
        "ConfigMap": "v1",
        "Secret": "v1",
        "ServiceAccount": "v1",
        "Role": "rbac.authorization.k8s.io/v1",
        "RoleBinding": "rbac.authorization.k8s.io/v1",
    }
    assert doc["apiVersion"] == expected_api[doc["kind"]], doc_id


def test_entrypoints():
    mine = _mine_rayjob()
    assert _job_spec(mine)["entrypoint"] == MINE_ENTRYPOINT
    nightly = [doc for _, doc in RAY_DOCS if doc["kind"] in ("RayJob", "RayCronJob") and doc is not mine]
    assert len(nightly) == 2
    for doc in nightly:
        assert _job_spec(doc)["entrypoint"] == NIGHTLY_ENTRYPOINT
    for _, doc in RAY_DOCS:
        if doc["kind"] != "RayCluster":
            script, listed = _job_spec(doc)["entrypoint"].split()[1:3]
            assert script in ("jobs/mine_circuit.py", "jobs/nightly_refresh.py"), script
            assert (REPO / script).is_file() and (REPO / listed).is_file(), (script, listed)


def _mine_rayjob() -> dict:
    found = [doc for doc_id, doc in RAY_DOCS if doc["kind"] == "RayJob" and doc_id.startswith("rayjob-mine")]
    assert len(found) == 1
    return found[0]


def test_mine_rayjob_lifecycle():
    spec = _mine_rayjob()["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 0
    assert spec["activeDeadlineSeconds"] > 0


def test_nightly_schedules_agree_and_runs_cannot_overlap():
    cron = _the("RayCronJob")
    fallback = _the("CronJob")
    assert cron["spec"]["schedule"] == fallback["spec"]["schedule"] == "0 2 * * *"
    assert cron["spec"]["timeZone"] == fallback["spec"]["timeZone"] == "UTC"
    assert fallback["spec"]["concurrencyPolicy"] == "Forbid"
    cron_spec_schema = crd_schemas()["RayCronJob"]["properties"]["spec"]["properties"]
    if "concurrencyPolicy" in cron_spec_schema:
        assert cron["spec"].get("concurrencyPolicy") == "Forbid"
    # v1.7 has no concurrencyPolicy: each RayJob must end (deadline x attempts) before the next night
    for doc in (cron, _embedded_rayjob()):
        job = _job_spec(doc)
        assert job["activeDeadlineSeconds"] * (job.get("backoffLimit", 0) + 1) < 24 * 3600
        assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"


def _embedded_rayjob() -> dict:
    found = [doc for doc_id, doc in RAY_DOCS if "/data/" in doc_id]
    assert len(found) == 1
    return found[0]


def test_fallback_cronjob_creates_the_configmap_rayjob():
    rayjob = _embedded_rayjob()
    assert "name" not in rayjob["metadata"] and rayjob["metadata"]["generateName"].endswith("-")
    assert len(rayjob["metadata"]["generateName"]) + 5 <= MAX_RAYJOB_NAME
    cronjob, configmap = _the("CronJob"), _the("ConfigMap")
    account, role, binding = _the("ServiceAccount"), _the("Role"), _the("RoleBinding")
    rules = [r for r in role["rules"] if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"]]
    assert rules and {"create", "get", "list"} <= set(rules[0]["verbs"])
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"]} in [
        {k: s[k] for k in ("kind", "name")} for s in binding["subjects"]
    ]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert pod["spec"]["restartPolicy"] in ("Never", "OnFailure")
    container = pod["spec"]["containers"][0]
    argv = [*container.get("command", []), *container.get("args", [])]
    assert "create" in argv and "-f" in argv and "apply" not in argv, "generateName needs kubectl create"
    target = argv[argv.index("-f") + 1]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mount = next(m for m in container["volumeMounts"] if target.startswith(m["mountPath"].rstrip("/") + "/"))
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert target.rsplit("/", 1)[1] in configmap["data"]
    # the CronJob's pod template, checked against the (closed) core/v1 PodTemplateSpec schema in the CRD
    pod_schema = crd_schemas()["RayCluster"]["properties"]["spec"]["properties"]["headGroupSpec"]["properties"][
        "template"
    ]
    pod_errors = [e.message for e in K8sValidator(k8s_to_jsonschema(pod_schema)).iter_errors(pod)]
    assert not pod_errors, pod_errors


@pytest.mark.parametrize("doc_id, doc", RAY_DOCS, ids=_ids(RAY_DOCS))
def test_kuberay_operator_rules(doc_id, doc):
    """Rules the v1.7 operator enforces at reconcile time (utils/validation.go), not in the CRD schema."""
    meta = doc["metadata"]
    name = meta.get("name") or meta["generateName"] + "x" * 5
    limit = {"RayCluster": MAX_RAYCLUSTER_NAME, "RayJob": MAX_RAYJOB_NAME, "RayCronJob": MAX_RAYJOB_NAME - 6}[
        doc["kind"]
    ]
    assert len(name) <= limit and DNS1035.match(name), f"{doc_id}: name {name!r}"
    if doc["kind"] != "RayCluster":
        job = _job_spec(doc)
        if job.get("ttlSecondsAfterFinished", 0) > 0:
            assert job.get("shutdownAfterJobFinishes"), "ttlSecondsAfterFinished needs shutdownAfterJobFinishes"
        assert job.get("activeDeadlineSeconds", 1) > 0 and job.get("backoffLimit", 0) >= 0
        assert job.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
        if "runtimeEnvYAML" in job:
            assert isinstance(yaml.safe_load(job["runtimeEnvYAML"]), dict)
        if doc["kind"] == "RayCronJob":
            assert len(doc["spec"]["schedule"].split()) == 5
    spec = _cluster_spec(doc)
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    assert len(names) == len(set(names)), "worker group names must be unique"
    for group_name, group in _groups(spec):
        params = group.get("rayStartParams", {})
        assert "labels" not in params, f"{group_name}: use the group's labels field"
        if group.get("resources"):
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(params), group_name
        assert group["template"]["spec"]["containers"], f"{group_name}: no container"
        if group_name != "head":
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group_name
            assert not (spec.get("enableInTreeAutoscaling") and group.get("suspend")), group_name


def test_dockerfile():
    text = (INFRA / "Dockerfile").read_text()
    ray_version = _the("RayCluster")["spec"]["rayVersion"]
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms == [f"rayproject/ray:{ray_version}-py311-gpu"], froms
    assert "grep -v '^torch==' constraints.txt" in text
    assert re.search(r"pip install -c \S+ /app", text)
    assert re.search(r"^COPY\b.*\s\.\s+/app\s*$", text, re.M)
    assert re.search(r"^WORKDIR\s+/app\s*$", text, re.M)
    assert not re.search(r"^\s*(ENV|ARG)\b.*AWS_", text, re.M), "no AWS settings baked into the image"


def test_helm_values_enable_raycronjob():
    values = yaml.safe_load((INFRA / "helm" / "kuberay-operator-values.yaml").read_text())
    gates = {g["name"]: g["enabled"] for g in values["featureGates"]}
    assert gates.get("RayCronJob") is True


def test_closed_schema_keeps_open_maps_open():
    """Sanity of the transform: map-typed fields (labels, rayStartParams) still take arbitrary keys."""
    doc = copy.deepcopy(_the("RayCluster"))
    doc["metadata"]["labels"]["any-key.example.com/x"] = "y"
    doc["spec"]["workerGroupSpecs"][1]["rayStartParams"]["metrics-export-port"] = "8080"
    assert not errors_of(doc)


def test_every_cluster_turns_token_auth_on():
    for doc_id, doc in RAY_DOCS:
        assert _cluster_spec(doc).get("authOptions") == {"mode": "token"}, doc_id
