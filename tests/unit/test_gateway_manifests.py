"""The ingress gateway's Kubernetes example (daemonset/gateway/): it renders, validates strictly, runs
what the gateway needs (its Gateway's name everywhere, the CA by its own token, no privileges), and
its Gateway, RBAC and CRD match what the gateway reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ambit.cluster import build_state
from gateway.listeners import compile_gateway
from tests.tools import kustomize

DIR = Path(__file__).resolve().parents[2] / "daemonset" / "gateway"
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    return kustomize(DIR)


def one(objs: list[Obj], kind: str) -> Obj:
    (found,) = [d for d in objs if d["kind"] == kind]
    return found


def test_the_kustomization_lists_every_file() -> None:
    k = yaml.safe_load((DIR / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(f.name for f in DIR.glob("*.yaml") if f.name != "kustomization.yaml")


def test_every_name_follows_the_gateway(rendered: list[Obj]) -> None:
    gw = one(rendered, "Gateway")
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    left = [d for d in rendered if "GATEWAY_" in yaml.safe_dump({k: v for k, v in d.items() if k != "spec"})
            or "GATEWAY_NAMESPACE" in yaml.safe_dump(d)]
    assert not left, f"a placeholder was left in {[(d['kind'], d['metadata']['name']) for d in left]}"
    dep = one(rendered, "Deployment")
    pod = dep["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == name == one(rendered, "ServiceAccount")["metadata"]["name"]
    assert pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == name
    assert pod["metadata"]["labels"]["ambit.dev/dataplane-mode"] == "none"
    svc = one(rendered, "Service")
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["spec"]["selector"]["gateway.networking.k8s.io/gateway-name"] == name
    crb = one(rendered, "ClusterRoleBinding")
    assert crb["metadata"]["name"] == f"ambit-ingress.{ns}.{name}"
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
    args = pod["spec"]["containers"][0]["args"]
    assert args[:2] == ["gateway", "run"] and "--cluster=kubernetes" in args
    assert "--ca-token-file=/var/run/secrets/ambit/token" in args


def test_the_pod_is_unprivileged(rendered: list[Obj]) -> None:
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and "hostNetwork" not in spec
    c = spec["containers"][0]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {p["containerPort"] for p in c["ports"]} == {80, 443, 15020, 15021}
    assert c["resources"]["limits"]["memory"]


def test_rbac_reads_what_the_gateway_lists_and_secrets_only_in_its_namespace(rendered: list[Obj]) -> None:
    rules = one(rendered, "ClusterRole")["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("gateway.networking.k8s.io", "httproutes"), ("ambit.dev", "ratelimitpolicies"),
            ("security.istio.io", "authorizationpolicies"), ("", "pods")} <= granted
    assert ("", "secrets") not in granted
    role = one(rendered, "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]}]
    assert one(rendered, "RoleBinding")["roleRef"]["name"] == role["metadata"]["name"]


def test_the_crd_and_the_gateway_are_what_the_gateway_reads(rendered: list[Obj]) -> None:
    crd = one(rendered, "CustomResourceDefinition")
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"], crd["spec"]["versions"][0]["name"]) == (
        "ambit.dev", "RateLimitPolicy", "v1alpha1")
    gw = one(rendered, "Gateway")
    state = build_state([gw])
    (model,) = state.gateways.values()
    assert model.is_ingress
    compiled = compile_gateway(model, {})
    assert list(compiled.ports) == [80]  # the HTTPS listener waits for its Secret, and says so
    assert "no kubernetes.io/tls Secret" in compiled.errors[0]


def test_every_object_validates_strictly(rendered: list[Obj]) -> None:
    import kubernetes_validate  # type: ignore[import-untyped]  # a dev dependency: never skipped
    from kubernetes_validate import utils  # type: ignore[import-untyped]

    version = sorted(set(utils.all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))[-1]
    for d in rendered:
        if d["kind"] == "Gateway":
            continue  # a custom resource
        kubernetes_validate.validate(d, version, strict=True)
