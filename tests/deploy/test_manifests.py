"""deploy/: the kustomization rendered (resources, namespace, images: the parts of kustomize it uses), each
object checked for what the DaemonSet must have, and the ClusterRole against the API calls in the code."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from aproxy.config_file import parse_documents

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE_SOURCE = ROOT / "aproxy" / "sources" / "kube"
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "Namespace"}

# kubernetes_asyncio's methods -> (API group, resource, the verbs a call needs). A list method also serves the
# watch (watch=True) in aproxy's list-then-watch; reading one object is get.
CLIENT_METHODS = {
    "list_service_for_all_namespaces": ("", "services", {"list", "watch"}),
    "list_endpoint_slice_for_all_namespaces": ("discovery.k8s.io", "endpointslices", {"list", "watch"}),
    "list_node": ("", "nodes", {"list", "watch"}),
    "read_node": ("", "nodes", {"get"}),
}


def render() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    images = {image["name"]: image for image in kustomization.get("images", [])}
    objects = []
    for resource in kustomization["resources"]:
        for obj in yaml.safe_load_all((DEPLOY / resource).read_text()):
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
            pod = obj.get("spec", {}).get("template", {}).get("spec", {})
            for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
                image = images.get(container["image"])
                if image is not None:
                    container["image"] = f"{image['newName']}:{image['newTag']}"
            objects.append(obj)
    return objects


def one(kind: str) -> dict[str, Any]:
    (found,) = [obj for obj in render() if obj["kind"] == kind]
    return found


def api_calls() -> dict[tuple[str, str], set[str]]:
    """(group, resource) -> verbs, from every kubernetes_asyncio API method the Kubernetes source calls."""
    needed: dict[tuple[str, str], set[str]] = {}
    for path in KUBE_SOURCE.glob("*.py"):
        for method in re.findall(r"V1Api\([^)]*\)\.(\w+)|\bapi\.(\w+)\(", path.read_text()):
            name = method[0] or method[1]
            assert name in CLIENT_METHODS, (
                f"{path.name} calls {name}: add it to CLIENT_METHODS and the ClusterRole"
            )
            group, resource, verbs = CLIENT_METHODS[name]
            needed.setdefault((group, resource), set()).update(verbs)
    return needed


def test_the_cluster_role_grants_exactly_what_the_code_calls() -> None:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in one("ClusterRole")["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == api_calls()


def test_the_binding_names_the_role_and_the_service_account() -> None:
    binding, account = one("ClusterRoleBinding"), one("ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "aproxy",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "kube-system"}
    ]
    assert one("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_the_daemonset() -> None:
    daemonset = one("DaemonSet")
    pod = daemonset["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    security = container["securityContext"]
    assert security["capabilities"] == {"add": ["NET_ADMIN"]} and not security.get("privileged")
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 10256}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 10256}
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "10249"
    assert "--metrics-bind-address=$(HOST_IP):10249" in container["args"]
    env = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"] for item in container["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "HOST_IP": "status.hostIP"}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts["/lib/modules"]["readOnly"] is True
    assert "/run/xtables.lock" in mounts
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes[mounts["/run/xtables.lock"]["name"]]["hostPath"] == {
        "path": "/run/xtables.lock",
        "type": "FileOrCreate",
    }
    assert container["image"] == "aproxy:latest"
    # The one privileged step: the sysctls, set by an init container (tests/kernel/test_prepare_node.py shows
    # the daemon working with /proc/sys read-only once they are set).
    (init,) = spec["initContainers"]
    assert init["args"] == ["prepare-node"] and init["image"] == container["image"]
    assert init["securityContext"] == {"privileged": True}


def test_the_configmap_is_a_configuration_aproxy_accepts_without_warnings() -> None:
    configmap = one("ConfigMap")
    assert (
        one("DaemonSet")["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
        == (configmap["metadata"]["name"])
    )
    config = parse_documents(list(yaml.safe_load_all(configmap["data"]["config.conf"])), "config.conf")
    assert config.warnings == ()
    assert config.values["ipvs_scheduler"] == "rr"


def test_every_object_is_namespaced_where_it_must_be() -> None:
    for obj in render():
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"]
        assert ("namespace" in obj["metadata"]) == (obj["kind"] not in CLUSTER_SCOPED), obj["kind"]


# The newest Kubernetes whose schemas kubernetes-validate ships, and the oldest still supported upstream.
SCHEMA_VERSIONS = (kubernetes_validate.latest_version(), "1.32")


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_object_validates_against_the_kubernetes_api_schemas(version: str) -> None:
    objects = render()
    assert {obj["kind"] for obj in objects} == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    }
    for obj in objects:
        # strict: a field the API does not know (a typo the API server would drop silently) fails too.
        kubernetes_validate.validate(obj, version, strict=True)


def test_a_misspelt_field_is_caught_by_the_schema_check() -> None:
    daemonset = one("DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, SCHEMA_VERSIONS[0], strict=True)


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed: no reference rendering"
)
def test_the_rendering_here_is_kubectl_kustomize_s() -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60, check=True
    )
    reference = list(yaml.safe_load_all(done.stdout))
    key = lambda obj: (obj["kind"], obj["metadata"]["name"])  # noqa: E731
    assert sorted(render(), key=key) == sorted(reference, key=key)
