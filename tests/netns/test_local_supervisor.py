"""The supervisor's units (root: cgroups): restart with backoff, stop/start, pod phases; LocalPodRuntime."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cgroups
from agent import netns as nsops
from agent.local import LocalError
from agent.local import cluster as C
from agent.local import layout as L
from agent.local import supervisor as S
from agent.local.runtime import LocalPodRuntime, node_connector
from ambit.cluster import Meta, Pod


@pytest.fixture
def cg_base(tmp_path: Path) -> Iterator[Path]:
    base = cgroups.find_root() / f"ambit-test-{L.cluster_id(tmp_path)}"
    cgroups.create(base)
    try:
        yield base
    finally:
        cgroups.remove(base)


async def _wait(cond: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


async def test_crashing_unit_restarts_with_backoff_and_stops(cg_base: Path, tmp_path: Path) -> None:
    spec = S.UnitSpec(
        name="node-a/crasher",
        argv=[sys.executable, "-c", "import sys, time; time.sleep(0.05); sys.exit(3)"],
        cgroup=cg_base / "crasher",
        log=tmp_path / "crasher.log",
        pidfile=tmp_path / "crasher.pid",
    )
    unit = S.Unit(spec)
    task = asyncio.create_task(unit.run(), name="unit:crasher")
    try:
        await _wait(lambda: unit.restarts >= 2, timeout=5)
        assert unit.last_exit == 3
        assert unit.state in ("backoff", "running")
        assert "exited with status 3" in unit.reason or unit.state == "running"
        await unit.stop()
        assert unit.state == "stopped" and unit.pid is None
        assert not cgroups.procs(spec.cgroup)
        restarts = unit.restarts
        await asyncio.sleep(0.7)
        assert unit.restarts == restarts, "a stopped unit must stay stopped"
        assert "starting:" in spec.log.read_text()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_stop_kills_what_the_unit_left_behind(cg_base: Path, tmp_path: Path) -> None:
    # The process ignores SIGTERM and leaves a child: stop still ends both (via the cgroup).
    code = "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nif os.fork() == 0:\n    time.sleep(60)\ntime.sleep(60)\n"
    spec = S.UnitSpec(
        name="node-a/stubborn", argv=[sys.executable, "-c", code], cgroup=cg_base / "stubborn",
        log=tmp_path / "s.log", pidfile=tmp_path / "s.pid", stop_grace=0.3,
    )
    unit = S.Unit(spec)
    task = asyncio.create_task(unit.run(), name="unit:stubborn")
    try:
        await _wait(lambda: len(cgroups.procs(spec.cgroup)) == 2)
        assert S.pidfile_alive(spec.pidfile) == unit.pid
        await unit.stop()
        assert cgroups.procs(spec.cgroup) == []
        unit.start()
        await _wait(lambda: unit.state == "running" and len(cgroups.procs(spec.cgroup)) == 2)
        await unit.stop()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_unavailable_unit_says_why(cg_base: Path, tmp_path: Path) -> None:
    spec = S.UnitSpec(
        name="node-a/missing", argv=["true"], cgroup=cg_base / "m", log=tmp_path / "m.log",
        pidfile=tmp_path / "m.pid", unavailable="ztunnel.cli is not part of this build yet",
    )
    unit = S.Unit(spec)
    task = asyncio.create_task(unit.run(), name="unit:missing")
    try:
        await asyncio.wait_for(unit.started.wait(), 2)
        assert unit.info()["state"] == "unavailable"
        assert unit.info()["reason"] == "ztunnel.cli is not part of this build yet"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_local_pod_runtime(tmp_path: Path) -> None:
    state = tmp_path / "rt"
    try:
        lay = C.up(state, 2, wait=0.2, components=()).layout
        m = tmp_path / "p.yaml"
        m.write_text(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: default}\n"
            "spec: {nodeName: node-b, containers: [{name: c, command: [sleep, '600']}]}\n"
        )
        C.apply(state, [m])
        pod = Pod(Meta("web", "default"), node_name="node-b")
        rt_b, rt_a = LocalPodRuntime(state, "node-b"), LocalPodRuntime(state, "node-a")
        assert rt_b.cgroup_path(pod) == lay.pod_cgroup("node-b", "default", "web")
        assert rt_b.netns_path(pod) == Path("/run/netns") / lay.pod_netns("default", "web")
        assert rt_b.host_interface(pod) == L.host_veth_name("default", "web")
        assert rt_b.node_interfaces() == ["eth0"]
        assert rt_b.ztunnel_outbound() == (lay.nodes[1].gateway, 15001)
        # another node's runtime does not claim the pod; an unknown pod has nothing yet
        assert rt_a.cgroup_path(pod) is None and rt_a.netns_path(pod) is None
        ghost = Pod(Meta("ghost", "default"), node_name="node-b")
        assert rt_b.cgroup_path(ghost) is None and rt_b.host_interface(ghost) is None
        # annotations land in the pod's YAML and survive a re-apply
        rt_b.set_annotation(pod, "ambit.dev/redirection", "enabled")
        assert C.find_pod(lay, "default/web")["metadata"]["annotations"] == {"ambit.dev/redirection": "enabled"}
        C.apply(state, [m])
        assert C.find_pod(lay, "default/web")["metadata"]["annotations"] == {"ambit.dev/redirection": "enabled"}
        rt_b.set_annotation(pod, "ambit.dev/redirection", None)
        assert "annotations" not in C.find_pod(lay, "default/web")["metadata"]
        with pytest.raises(LocalError, match="gone"):
            rt_b.set_annotation(ghost, "k", "v")
        with pytest.raises(LocalError, match="unknown node"):
            LocalPodRuntime(state, "node-q")
        # node_connector reaches 127.0.0.1 of the node's netns (the admin endpoints), not the machine's
        code = (
            "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); c, _ = s.accept(); c.sendall(b'node-b'); c.close()"
        )
        srv = subprocess.Popen(
            nsops.exec_argv(lay.nodes[1].netns, [sys.executable, "-c", code]), stdout=subprocess.PIPE, text=True
        )
        try:
            assert srv.stdout is not None
            port = int(srv.stdout.readline())
            with node_connector(state, "node-b")("127.0.0.1", port, 3.0) as sock:
                assert sock.recv(10) == b"node-b"
        finally:
            srv.kill()
            srv.wait()
    finally:
        C.down(state)
