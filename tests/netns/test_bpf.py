"""The eBPF datapath on real namespaces: redirect, SO_ORIGINAL_DST, no-bypass,
inbound STRICT/PERMISSIVE, flow events, fail-closed, restart adoption, cleanup.

Topology made by the fixture (names unique per run, all removed afterwards):
  pod netns (10.77.1.2, in cgroup .../pod) --veth-- node netns (10.77.1.1; 10.77.2.1) --veth-- peer netns (10.77.2.2)
The stand-in ztunnel is a plain Python listener in the node netns and in the
cgroup .../ztunnel, serving 15001 and 15006: it answers each connection with
the original destination its getsockopt(SO_ORIGINAL_DST) returned.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.bpf import (
    BpfError,
    Datapath,
    FlowEvent,
    cgroup2_root,
    cgroup_attachments,
    check_bpffs,
    check_kernel_headers,
)
from agent.enroll import KernelMode

NODE_IP, POD_IP, GW2, PEER_IP = "10.77.1.1", "10.77.1.2", "10.77.2.1", "10.77.2.2"

ZTUNNEL = r"""
import socket, struct, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], port)); s.listen(64)
    while True:
        c, peer = s.accept()
        try:
            raw = c.getsockopt(socket.SOL_IP, 80, 16)
            port_, ip = struct.unpack("!2xH4s8x", raw)
            msg = f"ORIG {socket.inet_ntoa(ip)}:{port_} FROM {peer[0]}:{peer[1]} ON {port}\n"
        except OSError as e:
            msg = f"NOORIG {e.errno}\n"
        c.sendall(msg.encode() + b"x" * 5000); c.close()
for p in (15001, 15006):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

APP = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"APP\n"); c.close()
"""

# A long-running client: one command per stdin line, one answer line each.
CLIENT = r"""
import errno, socket, struct, sys, time
for line in sys.stdin:
    cmd, host, port = line.split()
    t0 = time.monotonic()
    try:
        if cmd == "raw":
            r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
            syn = struct.pack("!HHIIBBHHH", 40000, int(port), 1, 0, 5 << 4, 0x02, 65535, 0, 0)
            try:
                r.sendto(syn, (host, 0)); print("sent", flush=True)
            except OSError as e:
                print("senderr", errno.errorcode.get(e.errno), flush=True)
            continue
        c = socket.create_connection((host, int(port)), timeout=1.5)
        data = b""
        while True:
            b = c.recv(65536)
            if not b: break
            data += b
        c.close()
        print(data.split(b"\n")[0].decode(), len(data), flush=True)
    except OSError as e:
        name = "timeout" if isinstance(e, TimeoutError) else errno.errorcode.get(e.errno, str(e.errno))
        print("ERR", name, round(time.monotonic() - t0, 3), flush=True)
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@dataclass
class Proc:
    p: subprocess.Popen[str]

    def ask(self, line: str) -> str:
        assert self.p.stdin and self.p.stdout
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(5)


@dataclass
class Env:
    tag: str
    ns: dict[str, str]
    cg: dict[str, Path]
    cg_base: Path
    pin: Path
    dp: Datapath
    node_ifs: list[str]
    procs: list[Proc]

    def spawn(self, where: str, code: str, *args: str, cgroup: str | None = None) -> Proc:
        cg = self.cg[cgroup] if cgroup else None

        def enter() -> None:
            if cg is not None:
                (cg / "cgroup.procs").write_text(str(os.getpid()))

        p = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[where], sys.executable, "-u", "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=enter,
        )
        proc = Proc(p)
        self.procs.append(proc)
        return proc

    def enroll(self, enrolled: bool = True, mode: KernelMode = "PERMISSIVE", exceptions: tuple[int, ...] = ()) -> int:
        return self.dp.set_pod(self.cg["pod"], POD_IP, enrolled=enrolled, mode=mode, port_exceptions=exceptions)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    tag = secrets.token_hex(3)
    ns = {k: f"ambit-t{tag}-{k}" for k in ("node", "pod", "peer")}
    cg_base = cgroup2_root() / f"ambit-test-{tag}"
    cg = {k: cg_base / k for k in ("pod", "ztunnel")}
    pin = Path("/sys/fs/bpf") / f"ambit-test-{tag}"
    procs: list[Proc] = []
    dp: Datapath | None = None
    try:
        for n in ns.values():
            sh("ip", "netns", "add", n)
            sh("ip", "-n", n, "link", "set", "lo", "up")
        for side, addr, gw, local in (("pod", POD_IP, NODE_IP, "a"), ("peer", PEER_IP, GW2, "b")):
            host_if = f"v{tag}{local}"
            sh("ip", "link", "add", host_if, "netns", ns["node"], "type", "veth", "peer", "eth0", "netns", ns[side])
            sh("ip", "-n", ns["node"], "addr", "add", f"{gw}/24", "dev", host_if)
            sh("ip", "-n", ns["node"], "link", "set", host_if, "up")
            sh("ip", "-n", ns[side], "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns[side], "link", "set", "eth0", "up")
            sh("ip", "-n", ns[side], "route", "add", "default", "via", gw)
        sh("ip", "netns", "exec", ns["node"], "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for c in cg.values():
            c.mkdir(parents=True)
        dp = Datapath(pin)
        dp.set_config((NODE_IP, 15001), (NODE_IP, 15006))
        dp.set_ztunnel_addresses([NODE_IP, GW2])
        dp.attach_ztunnel(cg["ztunnel"])
        node_ifs = [f"v{tag}a", f"v{tag}b"]
        for i in node_ifs:
            dp.attach_interface(i, Path("/run/netns") / ns["node"])
        e = Env(tag, ns, cg, cg_base, pin, dp, node_ifs, procs)
        zt = e.spawn("node", ZTUNNEL, NODE_IP, cgroup="ztunnel")
        assert zt.p.stdout and zt.p.stdout.readline().strip() == "ready"
        app = e.spawn("node", APP, NODE_IP, "8080")
        assert app.p.stdout and app.p.stdout.readline().strip() == "ready"
        yield e
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.stop()
        if dp is not None:
            dp.close()
        for n in ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        for c in cg.values():
            with contextlib.suppress(OSError):
                c.rmdir()
        with contextlib.suppress(OSError):
            cg_base.rmdir()
        from agent.bpf import remove_pins

        remove_pins(pin)
        # cleanup leaves nothing behind
        assert not pin.exists(), f"pinned maps left in {pin}"
        assert not cg_base.exists(), f"cgroup {cg_base} left behind"
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"ambit-t{tag}" not in left, "network namespaces left behind"


@pytest.fixture
def client(env: Env) -> Iterator[Proc]:
    c = env.spawn("pod", CLIENT, cgroup="pod")
    try:
        yield c
    finally:
        c.stop()
        env.procs.remove(c)


def test_programs_attached_and_maps_pinned(env: Env) -> None:
    env.dp.attach_pod(env.cg["pod"])
    assert all(env.dp.pod_attached(env.cg["pod"]).values())
    assert {"config", "pods", "out_orig_dst", "in_orig_dst", "port_modes", "events"} <= set(os.listdir(env.pin))
    assert sorted(env.dp.interface_programs(env.node_ifs[0], Path("/run/netns") / env.ns["node"])) == [
        "ambit_tc_egress",
        "ambit_tc_ingress",
    ]


def test_outbound_redirect_and_original_dst(env: Env, client: Proc) -> None:
    env.dp.attach_pod(env.cg["pod"])
    env.enroll(True)
    ans = client.ask("tcp 10.77.9.9 8080")
    assert ans.startswith(f"ORIG 10.77.9.9:8080 FROM {POD_IP}:") and " ON 15001" in ans, ans
    # loopback is never redirected
    assert client.ask("tcp 127.0.0.1 9").startswith("ERR ECONNREFUSED")


def test_unspecified_address_stays_in_the_pod(env: Env, client: Proc) -> None:
    """0.0.0.0 means "this host": redirected, the ztunnel would dial it in the node's netns
    and reach the node's 127.0.0.1 admin ports. It stays in the pod (nothing listens there)."""
    env.dp.attach_pod(env.cg["pod"])
    env.enroll(True)
    for addr in ("0.0.0.0", "0.1.2.3"):
        ans = client.ask(f"tcp {addr} 15000")
        assert not ans.startswith("ORIG"), f"{addr} was redirected to the ztunnel: {ans}"


def test_subcgroup_made_after_enrollment_is_enrolled(env: Env) -> None:
    """A process moved into a cgroup created under the pod's after enrollment (a container
    started later, or one the process made itself) is redirected and cannot bypass."""
    env.dp.attach_pod(env.cg["pod"])
    cid = env.enroll(True)
    late = env.cg["pod"] / "late" / "deeper"
    late.mkdir(parents=True)
    env.cg["late"] = late
    proc = env.spawn("pod", CLIENT, cgroup="late")
    try:
        assert env.dp.uncovered_subcgroups(env.cg["pod"]) == []
        ans = proc.ask("tcp 10.77.9.9 8080")
        assert ans.startswith("ORIG 10.77.9.9:8080") and " ON 15001" in ans, ans
        before = env.dp.drop_counts()[cid].egress if cid in env.dp.drop_counts() else 0
        proc.ask(f"raw {PEER_IP} 80")
        assert env.dp.drop_counts()[cid].egress >= before + 1, "raw SYN from a sub-cgroup is counted against the pod"
    finally:
        proc.stop()
        env.procs.remove(proc)
        del env.cg["late"]
        late.rmdir()
        late.parent.rmdir()


def test_process_outside_the_pod_cgroup_still_cannot_bypass(env: Env) -> None:
    """A process in the pod's netns but not its cgroup: TC on the node side drops its TCP."""
    env.dp.attach_pod(env.cg["pod"])
    cid = env.enroll(True)
    outside = env.spawn("pod", CLIENT)
    try:
        before = env.dp.drop_counts()[cid].egress if cid in env.dp.drop_counts() else 0
        ans = outside.ask(f"tcp {PEER_IP} 80")
        assert ans.startswith("ERR timeout"), f"plaintext left an enrolled pod's address: {ans}"
        assert env.dp.drop_counts()[cid].egress >= before + 1
        # the ztunnel's addresses stay reachable (replies to the ztunnel take this path too)
        assert outside.ask(f"tcp {NODE_IP} 8080").startswith("APP")
    finally:
        outside.stop()
        env.procs.remove(outside)


# From the peer (not enrolled): a plaintext connection to the PERMISSIVE pod (TC records
# an inbound original destination for this client address), then a connection from the
# same address straight to 15001, hoping the ztunnel answers SO_ORIGINAL_DST from it.
LAUNDER = r"""
import socket, sys
pod, node, port = sys.argv[1], sys.argv[2], 41234
def dial(host, p):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.settimeout(2); s.connect((host, p))
    data = b""
    while True:
        b = s.recv(65536)
        if not b: break
        data += b
    s.close()
    return data.split(b"\n")[0].decode()
print(dial(pod, 9000), flush=True)
print(dial(node, 15001), flush=True)
"""


def test_inbound_original_dst_never_answers_on_15001(env: Env) -> None:
    env.dp.attach_pod(env.cg["pod"])
    env.enroll(True, mode="PERMISSIVE")
    p = env.spawn("peer", LAUNDER, POD_IP, NODE_IP)
    try:
        assert p.p.stdout is not None
        first, second = p.p.stdout.readline().strip(), p.p.stdout.readline().strip()
        assert first.startswith(f"ORIG {POD_IP}:9000") and " ON 15006" in first, first
        assert env.dp.original_destination(PEER_IP, 41234, "inbound") == (POD_IP, 9000)
        assert second.startswith("NOORIG"), f"15001 answered an unenrolled client: {second}"
        assert env.dp.original_destination(PEER_IP, 41234, "outbound") is None
    finally:
        p.stop()
        env.procs.remove(p)


def test_port_level_modes(env: Env) -> None:
    """portLevelMtls: a port may be more or less strict than its pod."""
    env.dp.attach_pod(env.cg["pod"])
    peer = env.spawn("peer", CLIENT)
    try:
        env.dp.set_pod(env.cg["pod"], POD_IP, enrolled=True, mode="STRICT", port_modes={9000: "PERMISSIVE"})
        assert env.dp.port_modes(POD_IP) == {9000: "PERMISSIVE"}
        assert " ON 15006" in peer.ask(f"tcp {POD_IP} 9000")
        assert peer.ask(f"tcp {POD_IP} 9001").startswith("ERR timeout")
        env.dp.set_pod(env.cg["pod"], POD_IP, enrolled=True, mode="PERMISSIVE", port_modes={9001: "STRICT"})
        assert env.dp.port_modes(POD_IP) == {9001: "STRICT"}, "the old exception is gone"
        assert " ON 15006" in peer.ask(f"tcp {POD_IP} 9000")
        assert peer.ask(f"tcp {POD_IP} 9001").startswith("ERR timeout")
    finally:
        peer.stop()
        env.procs.remove(peer)
        env.enroll(True)
    assert env.dp.port_modes(POD_IP) == {}


def test_enroll_unenroll_running_pod_by_map_update(env: Env, client: Proc) -> None:
    env.dp.attach_pod(env.cg["pod"])
    env.enroll(False)
    assert client.ask(f"tcp {NODE_IP} 8080").startswith("APP"), "unenrolled pod must reach the app directly"
    env.enroll(True)
    assert client.ask(f"tcp {NODE_IP} 8080").startswith(f"ORIG {NODE_IP}:8080")
    env.enroll(True, exceptions=(8080,))
    assert client.ask(f"tcp {NODE_IP} 8080").startswith("APP"), "port exception is not redirected"
    env.enroll(False)
    assert client.ask(f"tcp {NODE_IP} 8080").startswith("APP")


def test_raw_syn_dropped_and_counted(env: Env, client: Proc) -> None:
    env.dp.attach_pod(env.cg["pod"])
    cid = env.enroll(True)
    before = env.dp.drop_counts().get(cid)
    client.ask(f"raw {PEER_IP} 80")
    after = env.dp.drop_counts()[cid]
    assert after.egress >= (before.egress if before else 0) + 1
    events = env.dp.poll_events(200)
    assert any(e.kind == "drop_egress" and e.dst == PEER_IP and e.dport == 80 for e in events), events


def test_inbound_strict_dropped(env: Env) -> None:
    env.dp.attach_pod(env.cg["pod"])
    cid = env.enroll(True, mode="STRICT")
    peer = env.spawn("peer", CLIENT)
    try:
        ans = peer.ask(f"tcp {POD_IP} 9000")
        assert ans.startswith("ERR timeout"), ans
        assert env.dp.drop_counts()[cid].inbound_strict >= 1
    finally:
        peer.stop()


def test_inbound_permissive_lands_on_15006(env: Env) -> None:
    env.dp.attach_pod(env.cg["pod"])
    env.enroll(True, mode="PERMISSIVE")
    peer = env.spawn("peer", CLIENT)
    try:
        ans = peer.ask(f"tcp {POD_IP} 9000")
        # the handshake only completes if the reverse NAT made replies come from POD_IP:9000
        assert ans.startswith(f"ORIG {POD_IP}:9000 FROM {PEER_IP}:") and " ON 15006" in ans, ans
        assert int(ans.split()[-1]) > 5000, "the whole reply came back through the reverse NAT"
    finally:
        peer.stop()


def test_flow_events_with_bytes(env: Env, client: Proc) -> None:
    env.dp.attach_pod(env.cg["pod"])
    env.enroll(True)
    env.dp.poll_events(0)
    assert client.ask("tcp 10.77.9.10 443").startswith("ORIG 10.77.9.10:443")
    events: list[FlowEvent] = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not any(e.kind == "close" for e in events):
        events += env.dp.poll_events(100)
    opens = [e for e in events if e.kind == "open_active" and e.orig_dst == "10.77.9.10"]
    assert opens and opens[0].src == POD_IP and opens[0].dport == 15001 and opens[0].orig_dport == 443
    closes = [e for e in events if e.kind == "close" and e.cookie == opens[0].cookie]
    assert closes and closes[0].bytes_received > 5000, events


def test_fail_closed_without_listener(env: Env, client: Proc) -> None:
    env.dp.attach_pod(env.cg["pod"])
    env.enroll(True)
    env.dp.set_config((NODE_IP, 15011), (NODE_IP, 15006))  # nothing listens there
    try:
        ans = client.ask("tcp 10.77.9.9 8080")
        _, name, secs = ans.split()
        assert name == "ECONNREFUSED" and float(secs) < 1.0, ans
    finally:
        env.dp.set_config((NODE_IP, 15001), (NODE_IP, 15006))


def test_restart_adopts_pins_and_attachments(env: Env, client: Proc) -> None:
    env.dp.attach_pod(env.cg["pod"])
    cid = env.enroll(True, mode="STRICT")
    before = {(a.attach_type, a.prog_id) for a in cgroup_attachments(env.cg["pod"])}
    second = Datapath(env.pin)  # a restarted agent: same pins
    try:
        assert second.pods()[cid]["mode"] == "STRICT", "pinned pod settings survive the restart"
        actions = second.attach_pod(env.cg["pod"])
        assert all(a.startswith("adopted") for a in actions), actions
        after = {(a.attach_type, a.prog_id) for a in cgroup_attachments(env.cg["pod"])}
        assert after == before, "no double attach, no detach"
        assert client.ask("tcp 10.77.9.9 8080").startswith("ORIG 10.77.9.9:8080")
    finally:
        second.close()
    env.enroll(True, mode="PERMISSIVE")


def test_unenrolled_detached_pod_has_no_effect(env: Env, client: Proc) -> None:
    env.dp.attach_pod(env.cg["pod"])
    env.enroll(True)
    assert env.dp.detach_pod(env.cg["pod"]) == 5
    assert not any(env.dp.pod_attached(env.cg["pod"]).values())
    assert client.ask(f"tcp {NODE_IP} 8080").startswith("APP")
    env.dp.attach_pod(env.cg["pod"])


def test_loader_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BpfError, match="not on a bpf filesystem"):
        check_bpffs(tmp_path)
    monkeypatch.setattr("platform.release", lambda: "0.0-nonexistent")
    with pytest.raises(BpfError, match="make setup"):
        check_kernel_headers()
    monkeypatch.undo()
    monkeypatch.setattr("agent.cgroups._mountinfo", lambda: "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    with pytest.raises(BpfError, match="no cgroup v2"):
        cgroup2_root()
    monkeypatch.undo()
    # a program the verifier rejects: the message carries the verifier log
    src = Path(__file__).resolve().parents[2] / "bpf"
    bad = tmp_path / "bpf"
    bad.mkdir()
    (bad / "ambit.h").write_text((src / "ambit.h").read_text())
    (bad / "tc.c").write_text((src / "tc.c").read_text())
    (bad / "cgroup.c").write_text(
        (src / "cgroup.c").read_text().replace(
            "int ambit_connect4(struct bpf_sock_addr *ctx)\n{",
            "int ambit_connect4(struct bpf_sock_addr *ctx)\n{\n    u64 k = 1; u32 *p = (u32 *)ambit_pods.lookup(&k); if (p[0]) return 0;",
        )
    )
    pin = Path("/sys/fs/bpf") / f"ambit-test-bad-{secrets.token_hex(3)}"
    try:
        with pytest.raises(BpfError, match="verifier rejected ambit_connect4") as ei:
            Datapath(pin, src_dir=bad)
        assert "verifier log" in str(ei.value) and "map_value_or_null" in str(ei.value)
    finally:
        from agent.bpf import remove_pins

        remove_pins(pin)
    assert not pin.exists()
