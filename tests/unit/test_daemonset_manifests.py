"""The Kubernetes manifests in daemonset/: they render, validate strictly, and hold their posture.

Rendered with `kubectl kustomize` (the base, the base with every optional
component, the waypoint example), validated with kubernetes-validate against
the two newest Kubernetes versions it knows, then read for what a reviewer
checks: who is privileged, which capabilities, read-only root filesystems,
RBAC verbs no wider than each component needs and no wildcards.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from kubernetes_validate import utils as kv_utils  # type: ignore[import-untyped]

from ambit.cluster import GATEWAY_NAME_LABEL
from ambit.sources.kube import (
    GATEWAY_GROUP,
    GATEWAY_VERSIONS,
    ISTIO_SECURITY_GROUP,
    ISTIO_SECURITY_VERSIONS,
)
from tests.tools import kustomize

DIR = Path(__file__).resolve().parents[2] / "daemonset"
COMPONENTS = ("istio-crds", "gateway-api-crds", "observability")
ZTUNNEL_PORTS = {15001, 15006, 15008, 15000, 15020, 15021}
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return kustomize(DIR)


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    """The base with every optional component, as a user's overlay would have it."""
    overlay = tmp_path_factory.mktemp("overlay")
    rel = os.path.relpath(DIR, overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel], "components": [f"{rel}/components/{c}" for c in COMPONENTS]}))
    return kustomize(overlay)


@pytest.fixture(scope="module")
def waypoint() -> list[Obj]:
    return kustomize(DIR / "waypoint")


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [d for d in objs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def containers(objs: list[Obj]) -> Iterator[tuple[Obj, Obj, Obj]]:
    """(workload, pod spec, container) of every container of every workload."""
    for d in objs:
        if d["kind"] in ("DaemonSet", "Deployment"):
            spec = d["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield d, spec, c


def node_pod(objs: list[Obj]) -> tuple[Obj, dict[str, Obj]]:
    spec = one(objs, "DaemonSet", "ambit-node")["spec"]["template"]["spec"]
    return spec, {c["name"]: c for c in spec["containers"]}


# -- rendering and validation


def newest_versions() -> list[str]:
    versions = sorted(set(kv_utils.all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))
    return versions[-2:]


def test_kustomization_lists_every_manifest() -> None:
    k = yaml.safe_load((DIR / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(f.name for f in DIR.glob("*.yaml") if f.name != "kustomization.yaml")
    for c in COMPONENTS:
        comp = yaml.safe_load((DIR / "components" / c / "kustomization.yaml").read_text())
        assert comp["kind"] == "Component"


def test_everything_renders_into_ambit_system(base: list[Obj], everything: list[Obj]) -> None:
    assert {(d["kind"], d["metadata"]["name"]) for d in base} <= {(d["kind"], d["metadata"]["name"])
                                                                  for d in everything}
    for d in everything:
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert d["metadata"]["namespace"] == "ambit-system", (d["kind"], d["metadata"]["name"])
    kinds = {d["kind"] for d in everything}
    assert {"PodMonitor", "PrometheusRule", "ConfigMap", "CustomResourceDefinition"} <= kinds


@pytest.mark.parametrize("version", newest_versions())
def test_every_object_validates_strictly(everything: list[Obj], waypoint: list[Obj], version: str) -> None:
    checked = 0
    for d in everything + waypoint:
        try:
            kubernetes_validate.validate(d, version, strict=True)
            checked += 1
        except kubernetes_validate.SchemaNotFoundError:
            # custom resources: the Prometheus Operator's (checked by promtool and below), Gateway (below)
            assert d["kind"] in ("PodMonitor", "PrometheusRule", "Gateway"), d["kind"]
    assert checked >= 15
    # strict means strict: an unknown field is an error
    ds = copy.deepcopy(one(everything, "DaemonSet", "ambit-node"))
    ds["spec"]["template"]["spec"]["containers"][1]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, version, strict=True)


def test_the_crds_serve_what_the_source_reads(everything: list[Obj], waypoint: list[Obj]) -> None:
    crds = {d["spec"]["names"]["kind"]: d for d in everything if d["kind"] == "CustomResourceDefinition"}
    assert set(crds) == {"AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication", "Gateway"}
    for kind in ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"):
        spec = crds[kind]["spec"]
        assert spec["group"] == ISTIO_SECURITY_GROUP and spec["scope"] == "Namespaced"
        assert {v["name"] for v in spec["versions"] if v["served"]} >= set(ISTIO_SECURITY_VERSIONS)
        assert [v["name"] for v in spec["versions"] if v["storage"]] == ["v1"]
    gw = crds["Gateway"]["spec"]
    assert gw["group"] == GATEWAY_GROUP and {v["name"] for v in gw["versions"]} & set(GATEWAY_VERSIONS)
    # the waypoint example's Gateway is valid against the shipped schema, a broken one is not
    schema = gw["versions"][0]["schema"]["openAPIV3Schema"]
    gateway = one(waypoint, "Gateway", "waypoint")
    jsonschema.validate(gateway, schema)
    broken = copy.deepcopy(gateway)
    broken["spec"]["listeners"][0]["port"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# -- the posture


def test_only_the_agent_is_privileged(everything: list[Obj], waypoint: list[Obj]) -> None:
    privileged = []
    for wl, spec, c in containers(everything + waypoint):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            privileged.append(f"{wl['metadata']['name']}/{c['name']}")
            continue
        where = f"{wl['metadata']['name']}/{c['name']}"
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("capabilities") == {"drop": ["ALL"]}, where  # and nothing added back
        pod_sc = spec.get("securityContext") or {}
        assert (sc.get("seccompProfile") or pod_sc.get("seccompProfile")) == {"type": "RuntimeDefault"}, where
        if wl["metadata"]["name"] != "ambit-node":  # the ztunnel is root without capabilities: see below
            assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) > 0, where
    assert privileged == ["ambit-node/agent"]


def test_the_ztunnel_runs_without_capabilities_or_api_access(everything: list[Obj]) -> None:
    spec, cs = node_pod(everything)
    zt = cs["ztunnel"]
    sc = zt["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    # UID 0 only to open the agent's 0600 feed socket; the reason is written next to it
    assert sc["runAsUser"] == 0
    text = (DIR / "daemonset.yaml").read_text()
    for why in ("NET_BIND_SERVICE", "SO_ORIGINAL_DST", "NET_ADMIN", "0600"):
        assert why in text
    # no Kubernetes API token in the ztunnel: the API credentials are mounted into the agent alone
    assert spec["automountServiceAccountToken"] is False
    api = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert api in {m["mountPath"] for m in cs["agent"]["volumeMounts"]}
    assert api not in {m["mountPath"] for m in zt["volumeMounts"]}
    assert {m["mountPath"] for m in zt["volumeMounts"]} == {"/run/ambit", "/var/run/secrets/ambit"}


def test_daemonset_node_privileges_mounts_and_ports(everything: list[Obj]) -> None:
    ds = one(everything, "DaemonSet", "ambit-node")
    spec, cs = node_pod(everything)
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["serviceAccountName"] == "ambit"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]  # every taint
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    assert set(cs) == {"agent", "ztunnel"}
    agent = cs["agent"]
    assert {"--cluster=kubernetes", "--runtime=kubernetes", "--state-dir=/var/lib/ambit"} <= set(agent["args"])
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    for path in ("/sys/fs/bpf", "/sys/fs/cgroup", "/run/ambit", "/var/lib/ambit", "/lib/modules", "/usr/src"):
        assert host_paths[mounts[path]["name"]] == path, path
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    assert any(a == "--bpf-dir=/sys/fs/bpf/ambit" for a in agent["args"])  # pinned in the host's bpffs
    zt = cs["ztunnel"]
    assert {p["containerPort"] for p in zt["ports"]} == ZTUNNEL_PORTS
    assert zt["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert any(a.startswith("--ca=ambit-ca.ambit-system.svc:15012") for a in zt["args"])
    # The ztunnel authenticates to the CA with its pod's projected token (audience
    # ambit-ca, as the CA reviews it) and trusts the CA root next to it.
    zt_args = dict(a.split("=", 1) for a in zt["args"] if a.startswith("--") and "=" in a)
    token_file = Path(zt_args["--ca-token-file"])
    cred_dir = zt_args["--credential-dir"]
    assert str(token_file.parent) == cred_dir
    mount = next(m for m in zt["volumeMounts"] if m["mountPath"] == cred_dir)
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    sources = vol["projected"]["sources"]
    sa_token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    assert sa_token["path"] == token_file.name and sa_token["audience"] == "ambit-ca"
    assert any(i["path"] == "ca.crt" for s in sources if "configMap" in s for i in s["configMap"]["items"])
    text = (DIR / "daemonset.yaml").read_text()
    for port in [*ZTUNNEL_PORTS, 15010, 15014]:  # every port is documented for the operator
        assert f"#   {port} " in text


def test_every_container_has_requests_and_a_memory_limit(everything: list[Obj], waypoint: list[Obj]) -> None:
    for wl, _, c in containers(everything + waypoint):
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]), (wl["metadata"]["name"], c["name"])
        assert "memory" in res["limits"], (wl["metadata"]["name"], c["name"])


def test_ca_deployment_service_and_istio_cacerts_layout(everything: list[Obj], tmp_path: Path) -> None:
    from controlplane.pki import CaMaterial

    dep = one(everything, "Deployment", "ambit-ca")
    pod_spec = dep["spec"]["template"]["spec"]
    c = pod_spec["containers"][0]
    assert {p["containerPort"] for p in c["ports"]} == {15012}
    assert c["args"][:2] == ["ca", "run"]
    assert {"--node-auth=tokenreview", "--cluster=kubernetes"} <= set(c["args"])
    assert pod_spec["serviceAccountName"] == "ambit-ca"
    svc = one(everything, "Service", "ambit-ca")
    assert svc["spec"]["ports"][0]["port"] == 15012
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # its keys: the Secret `cacerts` in Istio's plug-in layout, which `ambit ca init` writes
    ca_dir = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--dir="))
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == ca_dir)
    vol = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    assert vol["secret"]["secretName"] == "cacerts"
    CaMaterial.generate().write(tmp_path / "ca")
    assert {f.name for f in (tmp_path / "ca").iterdir()} == {
        "ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"}


def rules(objs: list[Obj], role: str) -> set[tuple[str, str, str]]:
    out = set()
    for r in one(objs, "ClusterRole", role)["rules"]:
        assert "resourceNames" not in r and "nonResourceURLs" not in r
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    out.add((g, res, v))
    return out


READS = {("", "namespaces"), ("", "nodes"), ("", "pods"), ("", "services"), ("discovery.k8s.io", "endpointslices"),
         (ISTIO_SECURITY_GROUP, "authorizationpolicies"), (ISTIO_SECURITY_GROUP, "peerauthentications"),
         (ISTIO_SECURITY_GROUP, "requestauthentications"), (GATEWAY_GROUP, "gateways")}


def test_rbac_is_no_wider_than_each_component_needs(everything: list[Obj], waypoint: list[Obj]) -> None:
    objs = everything + waypoint
    for d in objs:
        if d["kind"] in ("ClusterRole", "Role"):
            for r in d["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in r.get(field, []), (d["metadata"]["name"], field)
    assert {d["metadata"]["name"] for d in objs if d["kind"] == "ClusterRole"} == {
        "ambit-node", "ambit-ca", "ambit-waypoint"}
    read_verbs = {"get", "list", "watch"}
    for role in ("ambit-node", "ambit-waypoint"):
        have = rules(objs, role)
        for g, res in READS:  # what the Kubernetes source lists and watches
            assert (g, res, "list") in have and (g, res, "watch") in have, (role, g, res)
        extra = {(g, res, v) for g, res, v in have if (g, res) not in READS or v not in read_verbs}
        # the agent writes one annotation on pods; the waypoint writes nothing
        assert extra == ({("", "pods", "patch")} if role == "ambit-node" else set()), (role, extra)
    # the CA: pods (which node hosts which identity; a token's pod) and TokenReviews, nothing else
    assert rules(objs, "ambit-ca") == {("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"),
                                       ("authentication.k8s.io", "tokenreviews", "create")}
    from controlplane.cli import CA_KUBE_RESOURCES

    assert CA_KUBE_RESOURCES == ("pods",)
    bindings = {(d["roleRef"]["name"], s["namespace"], s["name"])
                for d in objs if d["kind"] == "ClusterRoleBinding" for s in d["subjects"]}
    assert bindings == {("ambit-node", "ambit-system", "ambit"), ("ambit-ca", "ambit-system", "ambit-ca"),
                        ("ambit-waypoint", "shop", "waypoint")}
    assert not any(d["kind"] in ("Role", "RoleBinding") for d in objs)


def test_waypoint_runs_as_its_gateway(waypoint: list[Obj]) -> None:
    from agent.cli import build_parser

    gw = one(waypoint, "Gateway", "waypoint")
    assert gw["spec"]["gatewayClassName"] == "ambit-waypoint"
    assert gw["spec"]["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
    dep = one(waypoint, "Deployment", "waypoint")
    assert dep["metadata"]["namespace"] == gw["metadata"]["namespace"] == "shop"
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["labels"][GATEWAY_NAME_LABEL] == "waypoint"
    assert dep["spec"]["selector"]["matchLabels"][GATEWAY_NAME_LABEL] == "waypoint"
    assert tmpl["metadata"]["labels"]["ambit.dev/dataplane-mode"] == "none"
    assert tmpl["spec"]["serviceAccountName"] == "waypoint"
    one(waypoint, "ServiceAccount", "waypoint")
    c = tmpl["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env["GATEWAY_NAME"] == f"metadata.labels['{GATEWAY_NAME_LABEL}']"
    args = build_parser(c["args"]).parse_args(c["args"])
    assert args.gateway == "$(POD_NAMESPACE)/$(GATEWAY_NAME)" and args.cluster == "kubernetes"
    assert args.ca == "ambit-ca.ambit-system.svc:15012"
    vol = next(v for v in tmpl["spec"]["volumes"] if v["name"] == "ca-credential")
    token = next(s["serviceAccountToken"] for s in vol["projected"]["sources"] if "serviceAccountToken" in s)
    assert token["audience"] == "ambit-ca" and args.ca_token_file == args.credential_dir / token["path"]


def test_podmonitors_scrape_ports_the_pods_have(everything: list[Obj]) -> None:
    _, cs = node_pod(everything)
    node_ports = {p["name"]: p["containerPort"] for c in cs.values() for p in c.get("ports", [])}
    monitors = {d["metadata"]["name"]: d for d in everything if d["kind"] == "PodMonitor"}
    assert set(monitors) == {"ambit-ztunnel", "ambit-agent", "ambit-waypoint"}
    assert node_ports[monitors["ambit-ztunnel"]["spec"]["podMetricsEndpoints"][0]["port"]] == 15020
    assert node_ports[monitors["ambit-agent"]["spec"]["podMetricsEndpoints"][0]["port"]] == 15014
    assert "--metrics=$(HOST_IP):15014" in cs["agent"]["args"]
    labels = one(everything, "DaemonSet", "ambit-node")["spec"]["template"]["metadata"]["labels"]
    for name in ("ambit-ztunnel", "ambit-agent"):
        assert monitors[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_dockerfile_is_multi_stage_on_debian_12_with_bcc() -> None:
    text = (DIR / "Dockerfile").read_text()
    assert "ARG BASE=docker.io/library/debian:12-slim" in text
    froms = [line for line in text.splitlines() if line.startswith("FROM")]
    assert froms == ["FROM ${BASE} AS base", "FROM base AS build", "FROM base"]
    packages = (DIR / "image-packages.txt").read_text()
    assert "python3-bpfcc" in packages and "--system-site-packages" in text
    assert "--no-index" in text  # wheels built beforehand: nothing downloaded or compiled in the build


def test_container_args_parse_with_the_real_command_line(everything: list[Obj]) -> None:
    from agent.cli import build_parser

    _, cs = node_pod(everything)
    args = build_parser(cs["ztunnel"]["args"]).parse_args(cs["ztunnel"]["args"])
    assert args.ca_token_file == Path("/var/run/secrets/ambit/token")
    args = build_parser(cs["agent"]["args"]).parse_args(cs["agent"]["args"])
    assert args.metrics == "$(HOST_IP):15014" and args.state_dir == Path("/var/lib/ambit")
    ca = one(everything, "Deployment", "ambit-ca")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser(ca["args"]).parse_args(ca["args"])
    assert args.node_auth == "tokenreview" and args.cluster == "kubernetes"
