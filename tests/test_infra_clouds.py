"""infra/gke and infra/aks: the mine RayJob with its data in GCS (Workload Identity) and Azure Blob Storage (Entra
Workload ID), validated against the KubeRay v1.7.0 CRDs as tests/test_infra.py validates infra/*.yaml, with no key in
any manifest, every pod running as the federated ServiceAccount, and no drift from infra/rayjob-mine.yaml beyond the
identity, the manifest mount and the node selectors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from cna_dist import manifest as manifestmod
from tests.test_infra import errors_of  # skips this module too where the CRDs are missing

INFRA = Path(__file__).resolve().parents[1] / "infra"
CLOUDS = {
    "gke": {"scheme": "gs://", "annotation": "iam.gke.io/gcp-service-account", "label": None},
    "aks": {
        "scheme": "az://",
        "annotation": "azure.workload.identity/client-id",
        "label": "azure.workload.identity/use",
    },
}
FORBIDDEN = ("AccountKey=", "SharedAccessSignature", "sig=", "private_key", "BEGIN PRIVATE KEY", "AKIA")
SECRET_NAMES = ("GOOGLE_APPLICATION_CREDENTIALS", "AZURE_CLIENT_SECRET", "AZURE_STORAGE_KEY", "AWS_SECRET_ACCESS_KEY")


def documents(cloud: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((INFRA / cloud / "rayjob-mine.yaml").read_text())}


def groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (str(k), *strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [str(node)]


@pytest.mark.slow  # a RayJob against the 3 MB of CRDs: ~2-3 s each
@pytest.mark.parametrize("cloud", list(CLOUDS))
def test_rayjob_validates_against_the_crd(cloud: str) -> None:
    job = documents(cloud)["RayJob"]
    assert not errors_of(job), errors_of(job)


@pytest.mark.parametrize("cloud", list(CLOUDS))
def test_no_key_in_any_manifest(cloud: str) -> None:
    text = (INFRA / cloud / "rayjob-mine.yaml").read_text()
    assert not [f for f in FORBIDDEN if f in text]
    for group in groups(documents(cloud)["RayJob"]["spec"]["rayClusterSpec"]):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert "envFrom" not in container  # no credentials Secret at all
        assert not [v for v in pod["volumes"] if "secret" in v]  # no key file mounted
        for env in container["env"]:
            assert env["name"] not in SECRET_NAMES
            if "TOKEN" in env["name"] or "SECRET" in env["name"]:
                assert "value" not in env and "secretKeyRef" in env["valueFrom"]  # HF_TOKEN: from a Secret


@pytest.mark.parametrize("cloud", list(CLOUDS))
def test_every_pod_runs_as_the_federated_service_account(cloud: str) -> None:
    docs = documents(cloud)
    account = docs["ServiceAccount"]
    assert CLOUDS[cloud]["annotation"] in account["metadata"]["annotations"]
    for group in groups(docs["RayJob"]["spec"]["rayClusterSpec"]):
        assert group["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
        label = CLOUDS[cloud]["label"]
        if label:
            assert group["template"]["metadata"]["labels"][label] == "true"
        else:
            selector = group["template"]["spec"]["nodeSelector"]
            assert selector["iam.gke.io/gke-metadata-server-enabled"] == "true"


@pytest.mark.parametrize("cloud", list(CLOUDS))
def test_the_mounted_manifest_is_valid_and_keeps_its_data_in_the_cloud(cloud: str) -> None:
    docs = documents(cloud)
    job = docs["RayJob"]
    path = job["spec"]["entrypoint"].split()[-1]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    text = docs["ConfigMap"]["data"][Path(path).name]
    m = manifestmod.parse(yaml.safe_load(text), path)
    scheme = CLOUDS[cloud]["scheme"]
    assert m.output.store.startswith(scheme) and m.output.registry.startswith(scheme)
    assert all(p.uri.startswith(scheme) for p in m.prompt_sets().values())
    assert m.model.uri.startswith("hf://") and not m.output.storage_options  # identity, not options, reaches it
    assert m.prompts.positive.category_field == "Category"


def without_cloud_parts(spec: dict, cloud: str) -> dict:
    """The cluster spec less what the cloud variant adds: identity, node selectors, its env, the manifest mount."""
    spec = copy.deepcopy(spec)
    base_env = {"CNA_DIST_CACHE", "HF_HOME", "PYTHONUNBUFFERED"}
    for group in groups(spec):
        pod = group["template"]["spec"]
        pod.pop("serviceAccountName")
        pod.pop("nodeSelector", None)
        label = CLOUDS[cloud]["label"]
        if label:
            group["template"]["metadata"]["labels"].pop(label)
        container = pod["containers"][0]
        container["env"] = [e for e in container["env"] if e["name"] in base_env]
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "cna-manifest"]
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "cna-manifest"]
    return spec


@pytest.mark.parametrize("cloud", list(CLOUDS))
def test_no_drift_from_the_base_rayjob(cloud: str) -> None:
    base = yaml.safe_load((INFRA / "rayjob-mine.yaml").read_text())
    job = documents(cloud)["RayJob"]
    reference = copy.deepcopy(base["spec"]["rayClusterSpec"])
    for group in groups(reference):
        group["template"]["spec"]["containers"][0].pop("envFrom")
        group["template"]["spec"].pop("nodeSelector", None)
    assert without_cloud_parts(job["spec"]["rayClusterSpec"], cloud) == reference
    others = {k: v for k, v in job["spec"].items() if k not in ("rayClusterSpec", "entrypoint")}
    assert others == {k: v for k, v in base["spec"].items() if k not in ("rayClusterSpec", "entrypoint")}
