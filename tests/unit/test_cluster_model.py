"""The cluster model: parsing Kubernetes-shaped YAML, enrollment rules, field errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambit.cluster import ClusterError, build_state, load_documents
from ambit.sources import LocalDirSource

DOCS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: c, command: [python3, -m, http.server]}]
status: {podIP: 10.1.0.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: opt-out, namespace: shop, labels: {ambit.dev/dataplane-mode: none}}
spec: {nodeName: node-b}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {ambit.dev/dataplane-mode: ambient}}
spec: {nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
"""


def test_parse_and_enrollment() -> None:
    st = build_state(load_documents(DOCS))
    web = st.pods[("shop", "web")]
    assert web.service_account == "web" and web.ip == "10.1.0.5" and web.command[0] == "python3"
    assert st.is_enrolled(web)
    assert not st.is_enrolled(st.pods[("shop", "opt-out")])
    assert st.is_enrolled(st.pods[("legacy", "old")])
    assert st.node_hosts_identity("node-a", "shop", "web")
    assert not st.node_hosts_identity("node-b", "shop", "web")
    svc = st.services[("shop", "web")]
    assert svc.ports[0].target_port == 8080
    assert [p.name for p in st.service_endpoints(svc)] == ["web"]
    assert st.pod_by_ip("10.1.0.5") is web


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ("kind: Pod\nmetadata: {}\n", "metadata.name"),
        ("kind: Pod\nmetadata: {name: p}\nstatus: {podIP: 999.1.1.1}\n", "status.podIP"),
        ("kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 70000}]}\n", "spec.ports[0].port"),
        ("kind: Gadget\nmetadata: {name: g}\n", "unsupported kind"),
        ("kind: AuthorizationPolicy\napiVersion: v1\nmetadata: {name: a}\n", "apiVersion"),
    ],
)
def test_errors_name_the_field(doc: str, needle: str) -> None:
    with pytest.raises(ClusterError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        build_state(load_documents(doc))


def test_local_dir_keeps_last_good_state(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(DOCS)
    src = LocalDirSource(tmp_path)
    assert ("shop", "web") in src.current().pods
    (tmp_path / "b.yaml").write_text("kind: Pod\nmetadata: {}\n")
    st = src.current()
    assert ("shop", "web") in st.pods
    assert src.last_error is not None and "metadata.name" in src.last_error
    (tmp_path / "b.yaml").unlink()
    src.current()
    assert src.last_error is None
