"""Network namespaces, veths, bridges, addresses and routes (pyroute2), and entering a netns.

The only module of the agent that calls setns or pyroute2 (besides the BCC
loader's TC attach). Every link is created directly inside the namespace it
belongs to (a veth's peer is created straight into its target namespace), so
nothing ever appears, even briefly, in the machine's own network namespace.

Synchronous: from asyncio code call these through `asyncio.to_thread`
(pyroute2 0.9's IPRoute refuses to start on a thread whose event loop runs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as _pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from agent import AgentError

NETNS_RUN_DIR = Path("/run/netns")
# `ip netns exec NAME` bind-mounts every file of /etc/netns/NAME/ over /etc/.
NETNS_ETC_DIR = Path("/etc/netns")
CLONE_NEWNET = 0x40000000


class NetnsError(AgentError):
    """A namespace, link, address or route operation failed; names the namespace and object."""


def netns_path(name: str) -> Path:
    return NETNS_RUN_DIR / name


def exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns(prefix: str = "") -> list[str]:
    """Names of the named network namespaces (those under /run/netns) starting with `prefix`."""
    if not NETNS_RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir() if p.name.startswith(prefix))


def create(name: str) -> None:
    """Create a named network namespace with its loopback up; fails if it exists."""
    if exists(name):
        raise NetnsError(f"network namespace {name} already exists (left over from another run? try `ambit local down`)")
    try:
        _pr_netns.create(name)
    except OSError as e:
        raise NetnsError(f"cannot create network namespace {name}: {e}") from e
    with _ipr(name) as ip:
        lo = ip.link_lookup(ifname="lo")
        if lo:
            ip.link("set", index=lo[0], state="up")


def remove(name: str) -> None:
    """Remove a named namespace and its /etc/netns/<name> directory; a missing one is fine."""
    if exists(name):
        try:
            _pr_netns.remove(name)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise NetnsError(f"cannot remove network namespace {name}: {e}") from e
    shutil.rmtree(NETNS_ETC_DIR / name, ignore_errors=True)


def _ipr(name: str) -> IPRoute:
    try:
        return IPRoute(netns=name)
    except Exception as e:  # pyroute2 raises assorted types when the netns is unusable
        raise NetnsError(f"cannot open network namespace {name}: {e}") from e


def _index(ip: IPRoute, ns: str, ifname: str) -> int:
    found = ip.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(f"interface {ifname} not found in network namespace {ns}")
    return int(found[0])


def add_bridge(ns: str, ifname: str) -> None:
    with _ipr(ns) as ip:
        try:
            ip.link("add", ifname=ifname, kind="bridge")
            ip.link("set", index=_index(ip, ns, ifname), state="up")
        except NetlinkError as e:
            raise NetnsError(f"cannot create bridge {ifname} in {ns}: {e}") from e


def add_veth(ns: str, ifname: str, peer_ns: str, peer_ifname: str, *, master: str | None = None) -> None:
    """A veth pair: `ifname` in `ns` (optionally enslaved to bridge `master`), `peer_ifname` in `peer_ns`; both up."""
    with _ipr(ns) as ip:
        try:
            ip.link(
                "add",
                ifname=ifname,
                kind="veth",
                peer={"ifname": peer_ifname, "net_ns_fd": str(netns_path(peer_ns))},
            )
            idx = _index(ip, ns, ifname)
            if master is not None:
                ip.link("set", index=idx, master=_index(ip, ns, master))
            ip.link("set", index=idx, state="up")
        except NetlinkError as e:
            raise NetnsError(f"cannot create veth {ifname} in {ns} (peer {peer_ifname} in {peer_ns}): {e}") from e
    with _ipr(peer_ns) as ip:
        ip.link("set", index=_index(ip, peer_ns, peer_ifname), state="up")


def delete_link(ns: str, ifname: str) -> None:
    """Delete a link if it exists (deleting one end of a veth deletes both)."""
    if not exists(ns):
        return
    with _ipr(ns) as ip:
        found = ip.link_lookup(ifname=ifname)
        if found:
            ip.link("del", index=found[0])


def add_address(ns: str, ifname: str, address: str, prefixlen: int) -> None:
    with _ipr(ns) as ip:
        try:
            ip.addr("add", index=_index(ip, ns, ifname), address=address, prefixlen=prefixlen)
        except NetlinkError as e:
            raise NetnsError(f"cannot add {address}/{prefixlen} to {ifname} in {ns}: {e}") from e


def add_route(ns: str, dst: str, gateway: str) -> None:
    """Add a route to `dst` (CIDR or "default") via `gateway` inside `ns`."""
    with _ipr(ns) as ip:
        try:
            if dst == "default":
                ip.route("add", dst="0.0.0.0/0", gateway=gateway)
            else:
                ip.route("add", dst=dst, gateway=gateway)
        except NetlinkError as e:
            raise NetnsError(f"cannot add route {dst} via {gateway} in {ns}: {e}") from e


def addresses(ns: str) -> list[tuple[str, str, int]]:
    """(interface, address, prefixlen) of every IPv4 address in `ns`."""
    out = []
    with _ipr(ns) as ip:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ip.get_links()}
        for a in ip.get_addr(family=2):
            out.append((str(names.get(a["index"], "?")), str(a.get_attr("IFA_ADDRESS")), int(a["prefixlen"])))
    return out


def route_interface(dst: str) -> str | None:
    """The interface through which this thread's netns routes to `dst`, or None (no route)."""
    with IPRoute() as ip:
        try:
            routes = ip.route("get", dst=dst)
        except Exception:  # unreachable, bad address: pyroute2 raises assorted types
            return None
        for r in routes:
            oif = r.get_attr("RTA_OIF")
            if oif:
                links = ip.get_links(oif)
                if links:
                    return str(links[0].get_attr("IFLA_IFNAME"))
    return None


def interfaces_facing(addresses: Sequence[str]) -> list[str]:
    """Names of the interfaces holding one of `addresses` in this thread's netns;
    with no addresses, those of the default routes."""
    index: set[int] = set()
    names: list[str] = []
    with IPRoute() as ip:
        if addresses:
            for a in ip.get_addr():
                if a.get_attr("IFA_ADDRESS") in addresses:
                    index.add(int(a["index"]))
        else:
            for r in ip.get_default_routes():
                oif = r.get_attr("RTA_OIF")
                if oif:
                    index.add(int(oif))
        for i in sorted(index):
            for link in ip.get_links(i):
                names.append(str(link.get_attr("IFLA_IFNAME")))
    return names


def set_sysctl(ns: str, key: str, value: str) -> None:
    """Write a per-namespace sysctl (e.g. net.ipv4.ip_forward) inside `ns`."""
    path = "/proc/sys/" + key.replace(".", "/")
    # /proc/sys/net follows the netns of the writing task, so a short child that
    # entered the namespace does it; no mount tricks needed.
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 0
        try:
            enter(ns)
            with open(path, "w") as f:
                f.write(value)
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise NetnsError(f"cannot set {key}={value} in network namespace {ns}")


_libc: ctypes.CDLL | None = None


def _setns(fd: int, what: str) -> None:
    # Python 3.11 has no os.setns, hence ctypes.
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise NetnsError(f"setns into {what} failed: {os.strerror(ctypes.get_errno())}")


def enter(ns: str) -> None:
    """Move the calling thread into network namespace `ns` (setns(2)).

    Meant for a freshly forked child (preexec) or a short-lived helper
    process: the thread stays in `ns`.
    """
    fd = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd, ns)
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(path: Path) -> Iterator[None]:
    """Run the body with the calling thread in the network namespace at `path`, then move it back.

    For objects that must be made on the caller's own thread inside another
    netns, such as a pyroute2 IPRoute (it belongs to the thread that opened
    it; its NetNS helper process could not use the caller's BPF program fds).
    Keep the body short: everything the thread does meanwhile happens in `path`.
    """
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise NetnsError(f"cannot open network namespace {path}: {e.strerror}") from e
        try:
            _setns(target, str(path))
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own, "the thread's own network namespace")
    finally:
        os.close(own)


def connect_in(ns: str, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to host:port made from inside network namespace `ns` (by name)."""
    return connect_at(netns_path(ns), host, port, timeout)


def connect_at(path: Path, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to host:port made from inside the network namespace at `path` (a
    pod's `/proc/PID/ns/net` or `/run/netns/NAME`): how the agent reaches a pod's loopback.
    A short helper thread makes the socket there; the caller's thread never changes
    namespace. Blocking (run it in a worker thread from async code)."""
    result: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            with entered(path):
                result.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=make, name=f"netns-socket:{path}", daemon=True)
    t.start()
    t.join()
    sock = result[0]
    if isinstance(sock, BaseException):
        raise NetnsError(f"cannot open a socket in network namespace {path}: {sock}") from sock
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """argv that runs `argv` inside `ns` through `ip netns exec` (which also bind-mounts /etc/netns/<ns>/*).

    `ip netns exec` remounts /sys for the namespace, so /sys/fs/cgroup and
    /sys/fs/bpf are not visible to the command: fine for pods, not for node
    processes (use `enter` in a preexec hook for those).
    """
    return ["ip", "netns", "exec", ns, *argv]


def write_etc_file(ns: str, filename: str, content: str) -> Path:
    """Write /etc/netns/<ns>/<filename>, in place so already-running commands see the new content.

    A bind mount pins the inode, so replacing the file by rename would hide the
    update from processes started earlier; truncate-and-write keeps the inode.
    """
    d = NETNS_ETC_DIR / ns
    d.mkdir(parents=True, exist_ok=True)
    p = d / filename
    with open(p, "a+") as f:
        f.seek(0)
        f.truncate()
        f.write(content)
    return p


def preexec(ns: str | None, cgroup_procs: Path | None) -> Callable[[], None]:
    """A preexec_fn for subprocess: join a cgroup (by its cgroup.procs file) and then a netns."""

    def hook() -> None:
        if cgroup_procs is not None:
            with open(cgroup_procs, "w") as f:
                f.write("0")
        if ns is not None:
            enter(ns)

    return hook


def run_in(ns: str, argv: Sequence[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run a short command in `ns` and capture its output (diagnostics and tests)."""
    return subprocess.run(exec_argv(ns, argv), capture_output=True, text=True, timeout=timeout, check=False)
