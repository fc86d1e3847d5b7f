"""Finding a Kubernetes pod's cgroup v2 directory, on fake cgroup trees in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.kubecgroup import (
    KubePodRuntime,
    cgroup2_root,
    container_id,
    find_pod_cgroup,
    first_pid,
    pod_cgroup_candidates,
)
from ambit.cluster import Meta, Pod

UID = "6f4b1c2d-0a1b-4c5d-8e9f-0123456789ab"
UND = UID.replace("-", "_")
CID = "3b1e" + "0" * 60

UNIFIED = """\
24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
29 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
"""
HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_ONLY = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"


@pytest.mark.parametrize(
    ("text", "want"),
    [(UNIFIED, Path("/sys/fs/cgroup")), (HYBRID, Path("/sys/fs/cgroup/unified")), (V1_ONLY, None)],
    ids=["unified", "hybrid", "v1-only"],
)
def test_cgroup2_root(text: str, want: Path | None) -> None:
    assert cgroup2_root(text) == want


def make(root: Path, rel: str, pids: str = "") -> Path:
    d = root / rel
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text(pids)
    return d


@pytest.mark.parametrize(
    ("qos", "rel"),
    [
        ("Burstable", f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UND}.slice"),
        ("BestEffort", f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UND}.slice"),
        ("Guaranteed", f"kubepods.slice/kubepods-pod{UND}.slice"),
        ("Burstable", f"kubepods/burstable/pod{UID}"),
        ("BestEffort", f"kubepods/besteffort/pod{UID}"),
        ("Guaranteed", f"kubepods/pod{UID}"),
    ],
    ids=["systemd-burstable", "systemd-besteffort", "systemd-guaranteed",
         "cgroupfs-burstable", "cgroupfs-besteffort", "cgroupfs-guaranteed"],
)
def test_known_layouts(tmp_path: Path, qos: str, rel: str) -> None:
    want = make(tmp_path, rel)
    # a decoy pod of another uid next to it
    make(tmp_path, "kubepods/burstable/pod00000000-0000-0000-0000-000000000000")
    assert find_pod_cgroup(tmp_path, UID, qos) == want
    assert find_pod_cgroup(tmp_path, UID, "") == want  # unknown QoS: every level is tried
    assert find_pod_cgroup(tmp_path, UID.upper(), qos) == want


def test_candidates_follow_the_qos_class() -> None:
    c = [str(p) for p in pod_cgroup_candidates(UID, "Guaranteed")]
    assert c == [f"kubepods.slice/kubepods-pod{UND}.slice", f"kubepods/pod{UID}"]
    assert len(pod_cgroup_candidates(UID, "")) == 6


def test_nested_root_found_by_search(tmp_path: Path) -> None:
    # kind / --cgroup-root: the kubelet's tree sits below another slice
    rel = f"kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UND}.slice"
    want = make(tmp_path, rel)
    assert find_pod_cgroup(tmp_path, UID, "BestEffort") == want


@pytest.mark.parametrize(
    "scope",
    [f"cri-containerd-{CID}.scope", f"crio-{CID}.scope", f"docker-{CID}.scope", CID],
)
def test_found_from_a_container_id(tmp_path: Path, scope: str) -> None:
    pod_dir = make(tmp_path, "custom/some-pod-dir")
    make(pod_dir, scope)
    assert find_pod_cgroup(tmp_path, "", "", [f"containerd://{CID}"]) == pod_dir
    assert container_id(f"cri-o://{CID}") == CID


def test_absent_pod_is_none(tmp_path: Path) -> None:
    make(tmp_path, "kubepods/burstable/pod11111111-2222-3333-4444-555555555555")
    assert find_pod_cgroup(tmp_path, UID, "Burstable", [f"containerd://{CID}"]) is None
    assert find_pod_cgroup(tmp_path, "", "") is None
    assert find_pod_cgroup(tmp_path / "missing", UID) is None


def test_runtime_netns_from_a_pod_process(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    pod_dir = make(cg, f"kubepods/burstable/pod{UID}")
    make(pod_dir, CID, "4242\n")  # the pod dir itself has no processes, its container has
    assert first_pid(pod_dir) == 4242
    proc = tmp_path / "proc"
    (proc / "4242" / "ns").mkdir(parents=True)
    (proc / "4242" / "ns" / "net").write_text("")
    rt = KubePodRuntime(cgroup_root=cg, proc=proc)
    pod = Pod(Meta(name="web-0", namespace="shop", uid=UID), node_name="n", qos_class="Burstable",
              container_ids=(f"containerd://{CID}",))
    assert rt.cgroup_path(pod) == pod_dir
    assert rt.netns_path(pod) == proc / "4242" / "ns" / "net"
    other = Pod(Meta(name="x", namespace="shop", uid="0" * 8 + "-0000-0000-0000-" + "0" * 12), node_name="n")
    assert rt.cgroup_path(other) is None and rt.netns_path(other) is None


def test_runtime_keeps_a_found_cgroup_until_it_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.kubecgroup as kc

    searches: list[str] = []
    real = kc.find_pod_cgroup

    def counting(root: Path, uid: str, *args: object, **kwargs: object) -> Path | None:
        searches.append(uid)
        return real(root, uid, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kc, "find_pod_cgroup", counting)
    rt = KubePodRuntime(cgroup_root=tmp_path)
    pod = Pod(Meta(name="web-0", namespace="shop", uid=UID), node_name="n", qos_class="Burstable")
    assert rt.cgroup_path(pod) is None and rt.cgroup_path(pod) is None  # a miss is searched again
    assert len(searches) == 2
    pod_dir = make(tmp_path, f"kubepods/burstable/pod{UID}")
    assert rt.cgroup_path(pod) == pod_dir and rt.cgroup_path(pod) == pod_dir and rt.netns_path(pod) is None
    assert len(searches) == 3  # found once, then reused by cgroup_path and netns_path
    (pod_dir / "cgroup.procs").unlink()
    pod_dir.rmdir()
    moved = make(tmp_path, f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UND}.slice")
    assert rt.cgroup_path(pod) == moved and len(searches) == 4
