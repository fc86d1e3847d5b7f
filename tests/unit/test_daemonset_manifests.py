"""The Kubernetes manifests in daemonset/ parse and carry what a node needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ambit.sources.kube import ISTIO_SECURITY_GROUP

DIR = Path(__file__).resolve().parents[2] / "daemonset"
ZTUNNEL_PORTS = {15001, 15006, 15008, 15000, 15020, 15021}


def docs() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(DIR.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        out.extend(d for d in yaml.safe_load_all(f.read_text()) if d)
    return out


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    k = yaml.safe_load((DIR / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(f.name for f in DIR.glob("*.yaml") if f.name != "kustomization.yaml")
    assert all(d["metadata"].get("namespace", "ambit-system") == "ambit-system" for d in docs())


def test_daemonset_node_privileges_mounts_and_ports() -> None:
    ds = one("DaemonSet", "ambit-node")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["serviceAccountName"] == "ambit"
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"agent", "ztunnel"}
    for c in containers.values():
        assert c["securityContext"]["privileged"] is True
    agent = containers["agent"]
    assert {"--cluster=kubernetes", "--runtime=kubernetes"} <= set(agent["args"])
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert {"/sys/fs/bpf", "/sys/fs/cgroup", "/run/ambit"} <= set(mounts)
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths[mounts["/sys/fs/bpf"]["name"]] == "/sys/fs/bpf"
    assert host_paths[mounts["/sys/fs/cgroup"]["name"]] == "/sys/fs/cgroup"
    zt = containers["ztunnel"]
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
    for port in ZTUNNEL_PORTS:  # every port is documented for the operator
        assert f"#   {port} " in text


def test_ca_deployment_and_service_on_15012() -> None:
    dep = one("Deployment", "ambit-ca")
    pod_spec = dep["spec"]["template"]["spec"]
    c = pod_spec["containers"][0]
    assert {p["containerPort"] for p in c["ports"]} == {15012}
    # Nodes are authenticated by TokenReview against the same API the CA reads pods from.
    assert c["args"][:2] == ["ca", "run"]
    assert {"--node-auth=tokenreview", "--cluster=kubernetes"} <= set(c["args"])
    assert pod_spec["serviceAccountName"] == "ambit-ca"
    svc = one("Service", "ambit-ca")
    assert svc["spec"]["ports"][0]["port"] == 15012
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def rules(role: str) -> set[tuple[str, str, str]]:
    out = set()
    for r in one("ClusterRole", role)["rules"]:
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    out.add((g, res, v))
    return out


def test_rbac_covers_what_the_source_watches() -> None:
    watched = [("", "namespaces"), ("", "nodes"), ("", "pods"), ("", "services"),
               ("discovery.k8s.io", "endpointslices"),
               (ISTIO_SECURITY_GROUP, "authorizationpolicies"), (ISTIO_SECURITY_GROUP, "peerauthentications")]
    for role in ("ambit-node", "ambit-ca"):
        have = rules(role)
        for g, res in watched:
            assert (g, res, "list") in have and (g, res, "watch") in have, (role, g, res)
    assert ("", "pods", "patch") in rules("ambit-node")
    assert ("authentication.k8s.io", "tokenreviews", "create") in rules("ambit-ca")
    assert ("", "pods", "get") in rules("ambit-ca")  # the node of a token's pod (pre-1.30 tokens)
    assert ("authentication.k8s.io", "tokenreviews", "create") not in rules("ambit-node")


def test_dockerfile_builds_from_debian_12_with_bcc() -> None:
    text = (DIR / "Dockerfile").read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM")]
    assert froms and froms[0].startswith("FROM debian:12")
    assert "python3-bpfcc" in text and "--system-site-packages" in text


def test_container_args_parse_with_the_real_command_line() -> None:
    from agent.cli import build_parser

    zt = next(c for c in one("DaemonSet", "ambit-node")["spec"]["template"]["spec"]["containers"]
              if c["name"] == "ztunnel")
    args = build_parser(zt["args"]).parse_args(zt["args"])
    assert args.ca_token_file == Path("/var/run/secrets/ambit/token")
    ca = one("Deployment", "ambit-ca")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser(ca["args"]).parse_args(ca["args"])
    assert args.node_auth == "tokenreview" and args.cluster == "kubernetes"
