"""Pure parts of the local cluster: naming, address plan, allocation, hosts files, object store."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from agent.cgroups import CgroupError, find_root
from agent.local import LocalError
from agent.local import layout as L
from agent.local.cluster import _immutable_pod_fields
from agent.local.store import Store, object_key


def test_cluster_id_is_stable_and_differs_per_state_dir(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert L.cluster_id(a) == L.cluster_id(a)
    assert L.cluster_id(a) != L.cluster_id(b)
    assert len(L.cluster_id(a)) == 8


def test_plan_names_and_addresses(tmp_path: Path) -> None:
    lay = L.plan(tmp_path / "s", 3, Path("/sys/fs/cgroup/unified"))
    cid, k = lay.cid, lay.k
    assert [n.name for n in lay.nodes] == ["node-a", "node-b", "node-c"]
    assert 1 <= k <= 95 and k != 96
    assert lay.fabric_netns == f"ambit-{cid}-fabric"
    assert lay.nodes[1].netns == f"ambit-{cid}-node-b"
    assert lay.nodes[1].address == f"10.200.{k}.11"
    assert lay.nodes[2].pod_cidr == f"10.{k}.2.0/24"
    assert lay.nodes[2].gateway == f"10.{k}.2.1"
    assert lay.control_address == f"10.200.{k}.2"
    assert lay.ca_address == f"10.200.{k}.2:15012"
    assert lay.pod_netns("shop", "web") == f"ambit-{cid}-pod-shop.web"
    assert lay.pod_cgroup("node-a", "shop", "web") == Path(f"/sys/fs/cgroup/unified/ambit-{cid}/node-a/shop.web")
    assert lay.bpf_dir == Path(f"/sys/fs/bpf/ambit/{cid}")
    # every address stays in private ranges and out of the service range
    for n in lay.nodes:
        net = ipaddress.ip_network(n.pod_cidr)
        assert net.is_private and not net.overlaps(L.SERVICE_RANGE)


def test_layout_roundtrips_through_json(tmp_path: Path) -> None:
    lay = L.plan(tmp_path, 2, Path("/sys/fs/cgroup"))
    assert L.Layout.from_json(lay.to_json()) == lay


def test_load_without_cluster_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(LocalError, match="ambit local up"):
        L.Layout.load(tmp_path)
    (tmp_path / "cluster.json").write_text("{broken")
    with pytest.raises(LocalError, match="damaged"):
        L.Layout.load(tmp_path)


def test_components(tmp_path: Path) -> None:
    assert L.plan(tmp_path, 1, Path("/x")).components == ("ca", "agent", "ztunnel")
    lay = L.plan(tmp_path, 1, Path("/x"), ["ca"])
    assert L.Layout.from_json(lay.to_json()).components == ("ca",)
    with pytest.raises(LocalError, match="unknown component"):
        L.plan(tmp_path, 1, Path("/x"), ["waypoint"])


def test_node_count_bounds() -> None:
    assert L.node_names(1) == ["node-a"]
    with pytest.raises(LocalError, match="1 to 16"):
        L.node_names(0)
    with pytest.raises(LocalError):
        L.node_names(17)


def test_unknown_node_lists_the_known_ones(tmp_path: Path) -> None:
    lay = L.plan(tmp_path, 2, Path("/sys/fs/cgroup"))
    with pytest.raises(LocalError, match="node-a, node-b"):
        lay.node("node-z")


def test_host_veth_names_fit_ifnamsiz() -> None:
    names = {L.host_veth_name("ns", f"pod-{i}") for i in range(200)}
    assert len(names) == 200
    assert all(len(n) <= 15 for n in names)
    assert L.host_veth_name("a-b", "c") != L.host_veth_name("a", "b-c")


def test_pod_ip_allocation_skips_gateway_and_used() -> None:
    assert L.allocate_pod_ip("10.5.1.0/24", []) == "10.5.1.2"
    assert L.allocate_pod_ip("10.5.1.0/24", ["10.5.1.2", "10.5.1.4"]) == "10.5.1.3"
    full = [f"10.5.1.{i}" for i in range(2, 255)]
    with pytest.raises(LocalError, match="full"):
        L.allocate_pod_ip("10.5.1.0/24", full)


def test_vip_allocation_and_check() -> None:
    assert L.allocate_vip([]) == "10.96.0.10"
    assert L.allocate_vip(["10.96.0.10"]) == "10.96.0.11"
    assert L.check_vip("10.96.3.4", "Service a/b") == "10.96.3.4"
    with pytest.raises(LocalError, match=r"Service a/b: spec.clusterIP 10.97.0.1 is outside"):
        L.check_vip("10.97.0.1", "Service a/b")
    with pytest.raises(LocalError, match="not an IP"):
        L.check_vip("nope", "Service a/b")


def test_render_hosts() -> None:
    text = L.render_hosts("web", "10.1.0.2", {("shop", "backend"): "10.96.0.10", ("a", "z"): "10.96.0.11"})
    lines = text.splitlines()
    assert "127.0.0.1\tlocalhost" in lines
    assert "10.1.0.2\tweb" in lines
    assert "10.96.0.10\tbackend.shop.svc.cluster.local backend.shop" in lines
    # sorted by namespace, then name
    assert lines.index("10.96.0.11\tz.a.svc.cluster.local z.a") < lines.index(
        "10.96.0.10\tbackend.shop.svc.cluster.local backend.shop"
    )


def test_find_root_prefers_unified_v2() -> None:
    hybrid = (
        "30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n"
        "31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    )
    assert find_root(hybrid) == Path("/sys/fs/cgroup/unified")
    pure = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert find_root(pure) == Path("/sys/fs/cgroup")
    with pytest.raises(CgroupError, match="no cgroup2"):
        find_root("30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n")


def test_store_roundtrip_update_and_remove(tmp_path: Path) -> None:
    st = Store(tmp_path / "cluster", tmp_path / "lock")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"}, "spec": {"nodeName": "node-a"}}
    st.put(pod)
    key = object_key(pod)
    assert key == ("Pod", "n", "p")
    assert st.get(key) == pod
    assert st.update(key, lambda o: o.setdefault("status", {}).update(phase="Running"))
    assert (st.get(key) or {})["status"]["phase"] == "Running"
    assert [o["metadata"]["name"] for o in st.list("Pod")] == ["p"]
    # temp files never carry a suffix the cluster source reads
    assert not [p for p in (tmp_path / "cluster").rglob("*") if p.name.startswith(".")]
    assert st.remove(key) and not st.remove(key)
    assert st.update(key, lambda o: None) is None


def test_immutable_pod_fields() -> None:
    a = {"spec": {"nodeName": "node-a", "containers": [{"command": ["sleep"], "args": ["1"]}]}}
    b = {"spec": {"nodeName": "node-b", "containers": [{"command": ["sleep", "1"]}]}}
    fa, fb = _immutable_pod_fields(a), _immutable_pod_fields(b)
    assert fa["spec.containers[0].command"] == fb["spec.containers[0].command"]
    assert fa["spec.nodeName"] != fb["spec.nodeName"]


def test_render_hosts_maps_the_machines_hostname_to_the_pod() -> None:
    # a local pod shares the machine's hostname; looking it up must not fall through to DNS
    assert "10.1.0.2\tweb vm" in L.render_hosts("web", "10.1.0.2", {}, hostname="vm").splitlines()
    assert "10.1.0.2\tweb" in L.render_hosts("web", "10.1.0.2", {}, hostname="web").splitlines()
    assert "nameserver" not in L.RESOLV_CONF
