"""The eBPF loader: compiles bpf/*.c with BCC, owns the pinned maps, attaches
programs to cgroups and interfaces, and reads drop counters and flow events.

The only importer of bcc. Maps are pinned under one directory per node so a
restarted agent reuses them; programs attached to cgroups and TC stay attached
when the agent exits, and a restarted agent adopts them (same program tag: keep;
different: attach the new one, then detach the old, so redirection never lapses).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
import socket
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import AgentError, cgroups
from agent import netns as nsops
from agent.enroll import KernelMode

log = logging.getLogger("ambit.bpf")


def bpf_sources() -> Path:
    """The eBPF C sources: agent/bpfsrc, the checkout's bpf/ through a link, or the copy
    installed with the package (see pyproject's package-data)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "bpfsrc", here.parent / "bpf"):
        if (cand / "ambit.h").is_file():
            return cand
    raise BpfError(f"the eBPF sources are missing: neither {here / 'bpfsrc'} nor {here.parent / 'bpf'} "
                   "holds ambit.h (a broken install? reinstall the ambit package)")


DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/ambit")
MAX_PORTS = 8
MODES: dict[KernelMode, int] = {"PERMISSIVE": 0, "STRICT": 1}  # AMBIT_MODE_* of bpf/ambit.h


def mode_name(value: int) -> KernelMode:
    """A mode as the kernel holds it, read as the programs read it (only STRICT drops)."""
    return "STRICT" if value == MODES["STRICT"] else "PERMISSIVE"


# uapi constants (linux/bpf.h); named here so this module needs no bcc to import
BPF_F_ALLOW_MULTI = 1 << 1
PROG_CGROUP_SKB, PROG_SOCK_OPS, PROG_CGROUP_SOCK_ADDR, PROG_CGROUP_SOCKOPT, PROG_SCHED_CLS = 8, 13, 18, 25, 3
ATTACH_INGRESS, ATTACH_EGRESS, ATTACH_SOCK_OPS = 0, 1, 3
ATTACH_CONNECT4, ATTACH_CONNECT6, ATTACH_GETSOCKOPT = 10, 11, 21

# (function, program type, attach type) for every program on an enrolled pod's cgroup
POD_PROGRAMS: tuple[tuple[str, int, int], ...] = (
    ("ambit_connect4", PROG_CGROUP_SOCK_ADDR, ATTACH_CONNECT4),
    ("ambit_connect6", PROG_CGROUP_SOCK_ADDR, ATTACH_CONNECT6),
    ("ambit_sockops", PROG_SOCK_OPS, ATTACH_SOCK_OPS),
    ("ambit_egress", PROG_CGROUP_SKB, ATTACH_EGRESS),
    ("ambit_ingress", PROG_CGROUP_SKB, ATTACH_INGRESS),
)
ZTUNNEL_PROGRAMS: tuple[tuple[str, int, int], ...] = (("ambit_getsockopt", PROG_CGROUP_SOCKOPT, ATTACH_GETSOCKOPT),)
TC_PROGRAMS = ("ambit_tc_ingress", "ambit_tc_egress")
TC_PARENTS = {"ambit_tc_ingress": "ffff:fff2", "ambit_tc_egress": "ffff:fff3"}
TC_PRIO = 0xA4B  # a fixed priority of ours, so `replace` swaps our filter atomically
MAP_NAMES = ("config", "pods", "pod_ips", "port_modes", "ztunnel_addrs", "ifaces", "cookie_dst", "out_orig_dst",
             "in_orig_dst", "drops", "drop_rl", "events")
# pinned by earlier versions; removed with the rest when a node is torn down
OLD_MAP_NAMES = ("orig_dst",)
BPF_F_QUERY_EFFECTIVE = 1 << 0

EVENT_KINDS = {
    1: "open_active",
    2: "open_passive",
    3: "close",
    4: "drop_egress",
    5: "drop_ingress",
    6: "drop_strict",
    7: "inbound_redirect",
}


class BpfError(AgentError):
    """Loading, attaching or reading the eBPF datapath failed; the message says why and what to do."""


class _Event(ctypes.Structure):
    # mirrors struct ambit_event in bpf/ambit.h
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("cookie", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("bytes_acked", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("srtt_us", ctypes.c_uint32),
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("orig_daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("orig_dport", ctypes.c_uint16),
        ("kind", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
    ]


@dataclass(frozen=True)
class FlowEvent:
    """One event from the datapath: a flow opened or closed, or a dropped bypass attempt."""

    kind: str
    ts_ns: int
    cookie: int
    cgroup_id: int
    src: str
    sport: int
    dst: str
    dport: int
    orig_dst: str | None
    orig_dport: int | None
    bytes_acked: int
    bytes_received: int
    srtt_us: int


@dataclass(frozen=True)
class DropCounts:
    egress: int
    ingress: int
    inbound_strict: int


@dataclass(frozen=True)
class Attachment:
    attach_type: int
    prog_id: int
    name: str
    tag: str


def ip_to_be32(ip: str) -> int:
    """An IPv4 address as the u32 whose memory holds it in network order (how the maps store it)."""
    try:
        return int(struct.unpack("=I", socket.inet_aton(ip))[0])
    except OSError as e:
        raise BpfError(f"{ip!r} is not an IPv4 address") from e


def be32_to_ip(v: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", v))


def port_to_be16(port: int) -> int:
    if not 0 < port < 65536:
        raise BpfError(f"port {port} is out of range 1..65535")
    return socket.htons(port)


# ---------------------------------------------------------------------------
# environment checks


def _mounts() -> list[tuple[str, str]]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append((parts[1], parts[2]))
    return out


def cgroup2_root() -> Path:
    """The cgroup v2 mount (pure v2 at /sys/fs/cgroup, or the hybrid /sys/fs/cgroup/unified)."""
    try:
        return cgroups.find_root()
    except cgroups.CgroupError as e:
        raise BpfError(
            "no cgroup v2 filesystem is mounted: ambit attaches its programs to cgroup v2 directories. "
            "Boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1) or mount one: mount -t cgroup2 none /sys/fs/cgroup/unified"
        ) from e


def check_bpffs(path: Path) -> None:
    """Raise unless `path` lies on a bpf filesystem."""
    p = str(path.resolve())
    for mnt, fstype in _mounts():
        if fstype == "bpf" and (p == mnt or p.startswith(mnt.rstrip("/") + "/")):
            return
    raise BpfError(
        f"{path} is not on a bpf filesystem, so maps cannot be pinned there: "
        "mount it (mount -t bpf bpf /sys/fs/bpf, or run `make setup`) or choose --bpf-dir under /sys/fs/bpf"
    )


def check_kernel_headers() -> None:
    build = Path("/lib/modules") / platform.release() / "build" / "include"
    if not build.exists():
        raise BpfError(
            f"no kernel headers for the running kernel {platform.release()} ({build} is missing): "
            "BCC compiles against them. Run `make setup` (it installs linux-headers-amd64 and links them)."
        )


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], str]]:
    """Capture fd 2: libbcc prints compiler errors and the verifier log there, not into its exception."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)

            def read() -> str:
                tmp.seek(0)
                return tmp.read().decode(errors="replace")

            yield read
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# ---------------------------------------------------------------------------
# libbpf (attachment queries; bcc wraps attach/detach but not query)


class _ProgInfo(ctypes.Structure):
    # the leading fields of struct bpf_prog_info; the kernel fills what fits
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


def _libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise BpfError(f"cannot load libbpf ({name}): install libbpf1 (run `make setup`)") from e
    lib.bpf_prog_query.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
    ]
    lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_prog_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
    lib.bpf_prog_detach2.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


_LIB: ctypes.CDLL | None = None


def libbpf() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _libbpf()
    return _LIB


def prog_info(fd: int) -> tuple[int, str, str]:
    """(id, name, tag hex) of a loaded program."""
    info = _ProgInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    if libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)) != 0:
        raise BpfError(f"bpf_obj_get_info_by_fd: {os.strerror(ctypes.get_errno())}")
    return info.id, info.name.decode(errors="replace"), bytes(info.tag).hex()


def query_cgroup(cgroup_fd: int, attach_type: int, *, effective: bool = False) -> list[int]:
    """Ids of programs attached directly to a cgroup for one attach type (`effective`: also
    those inherited from its ancestors, i.e. every program that runs for its processes)."""
    ids = (ctypes.c_uint32 * 64)()
    cnt = ctypes.c_uint32(64)
    flags = ctypes.c_uint32(0)
    qflags = BPF_F_QUERY_EFFECTIVE if effective else 0
    rc = libbpf().bpf_prog_query(cgroup_fd, attach_type, qflags, ctypes.byref(flags), ids, ctypes.byref(cnt))
    if rc != 0:
        raise BpfError(f"BPF_PROG_QUERY on cgroup: {os.strerror(ctypes.get_errno() or -rc)}")
    return list(ids[: cnt.value])


@contextlib.contextmanager
def _prog_fd_by_id(prog_id: int) -> Iterator[int | None]:
    fd = libbpf().bpf_prog_get_fd_by_id(prog_id)
    try:
        yield fd if fd >= 0 else None
    finally:
        if fd >= 0:
            os.close(fd)


def cgroup_attachments(cgroup: Path, types: Iterable[int] | None = None, *,
                       effective: bool = False) -> list[Attachment]:
    """Every program attached directly to `cgroup` (all attach types ambit uses unless `types`);
    with `effective`, every program that runs for its processes, inherited ones included."""
    if types is None:
        types = [t for _, _, t in POD_PROGRAMS + ZTUNNEL_PROGRAMS]
    out: list[Attachment] = []
    fd = _open_cgroup(cgroup)
    try:
        for t in types:
            for pid in query_cgroup(fd, t, effective=effective):
                with _prog_fd_by_id(pid) as pfd:
                    if pfd is None:
                        continue
                    _, name, tag = prog_info(pfd)
                out.append(Attachment(t, pid, name, tag))
    finally:
        os.close(fd)
    return out


def _open_cgroup(cgroup: Path) -> int:
    try:
        return os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise BpfError(f"cannot open cgroup {cgroup}: {e.strerror} (is it a cgroup v2 directory?)") from e


def detach_ours(cgroup: Path, names: Iterable[str] | None = None) -> int:
    """Detach every ambit program (by name) from `cgroup`; returns how many were detached."""
    wanted = {n[:15] for n in (names or [f for f, _, _ in POD_PROGRAMS + ZTUNNEL_PROGRAMS])}
    n = 0
    fd = _open_cgroup(cgroup)
    try:
        for a in cgroup_attachments(cgroup):
            if a.name in wanted:
                with _prog_fd_by_id(a.prog_id) as pfd:
                    if pfd is not None and libbpf().bpf_prog_detach2(pfd, fd, a.attach_type) == 0:
                        n += 1
    finally:
        os.close(fd)
    return n


def cgroup_id(path: Path) -> int:
    """The kernel's id of a cgroup v2 directory (its inode number, as bpf_get_current_cgroup_id returns)."""
    return os.stat(path).st_ino


# ---------------------------------------------------------------------------
# the datapath


class Datapath:
    """Compiled programs and the pinned maps of one node.

    Construct with the pin directory (created if missing). `close()` releases
    the agent's handles but leaves programs attached and maps pinned, so the
    datapath keeps working across an agent restart; `remove_pins()` is for
    tearing the node down.
    """

    def __init__(self, pin_dir: Path, *, src_dir: Path | None = None) -> None:
        self.pin_dir = Path(pin_dir)
        check_bpffs(self.pin_dir.parent if not self.pin_dir.exists() else self.pin_dir)
        cgroup2_root()
        check_kernel_headers()
        try:
            import bcc  # noqa: F401  (imported here so the rest of the agent loads without it)
        except ImportError as e:
            raise BpfError("the bcc Python module is not importable: run `make setup` (python3-bpfcc)") from e
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        src_dir = src_dir or bpf_sources()
        header = (src_dir / "ambit.h").read_text()
        self._cg = self._compile(src_dir / "cgroup.c", header)
        self._tc = self._compile(src_dir / "tc.c", header)
        self.funcs: dict[str, Any] = {}
        for name, ptype, atype in POD_PROGRAMS + ZTUNNEL_PROGRAMS:
            self.funcs[name] = self._load(self._cg, name, ptype, atype)
        for name in TC_PROGRAMS:
            self.funcs[name] = self._load(self._tc, name, PROG_SCHED_CLS, -1)
        self.tags = {name: prog_info(f.fd)[2] for name, f in self.funcs.items()}
        self._ringbuf_open = False
        self._pending: list[FlowEvent] = []

    def _compile(self, path: Path, header: str) -> Any:
        from bcc import BPF

        # BCC rewrites map calls only in the main source, not in #included files,
        # so the shared header is pasted in instead of included.
        text = path.read_text().replace('#include "ambit.h"', header)
        with _captured_stderr() as err:
            try:
                return BPF(text=text.encode(), cflags=[f'-DAMBIT_PIN="{self.pin_dir}"', "-Wno-unused-function"])
            except Exception as e:
                msg = err().strip()
                if "pinned" in msg or "pin" in str(e).lower():
                    hint = f" (a map pinned under {self.pin_dir} has another layout: remove the directory)"
                else:
                    hint = ""
                raise BpfError(f"compiling {path.name} failed{hint}: {e}\n{msg[-4000:]}") from e

    def _load(self, b: Any, name: str, ptype: int, atype: int) -> Any:
        with _captured_stderr() as err:
            try:
                return b.load_func(name.encode(), ptype, attach_type=atype)
            except Exception as e:
                raise BpfError(f"the kernel verifier rejected {name}: {e}\nverifier log:\n{err()[-8000:]}") from e

    # -- maps ----------------------------------------------------------------

    def _table(self, name: str) -> Any:
        return self._cg[name.encode()]

    def set_config(self, outbound: tuple[str, int], inbound: tuple[str, int] | None = None) -> None:
        """Point redirection at the ztunnel's outbound (15001) and inbound plaintext (15006) listeners."""
        t = self._table("ambit_config")
        leaf = t.Leaf()
        leaf.outbound_ip = ip_to_be32(outbound[0])
        leaf.outbound_port = port_to_be16(outbound[1])
        if inbound is not None:
            leaf.inbound_ip = ip_to_be32(inbound[0])
            leaf.inbound_port = port_to_be16(inbound[1])
        t[t.Key(0)] = leaf

    def set_ztunnel_addresses(self, ips: Iterable[str]) -> None:
        """The addresses the ztunnel talks to pods from/at; exactly this set after the call."""
        t = self._table("ambit_ztunnel")
        want = {ip_to_be32(ip) for ip in ips}
        for k in list(t.keys()):
            if k.value not in want:
                del t[k]
        for v in want:
            t[t.Key(v)] = t.Leaf(1)

    def set_pod(
        self,
        cgroup: Path,
        ip: str | None,
        *,
        enrolled: bool,
        mode: KernelMode = "PERMISSIVE",
        port_modes: Mapping[int, KernelMode] | None = None,
        port_exceptions: Sequence[int] = (),
    ) -> int:
        """Write a pod's settings (for its cgroup, which covers every cgroup below it, and its IP).

        `mode` is the pod's inbound plaintext mode; `port_modes` the ports whose mode differs
        (PeerAuthentication portLevelMtls), exactly these after the call. Returns its cgroup id.
        """
        port_modes = dict(port_modes or {})
        for m in (mode, *port_modes.values()):
            if m not in MODES:
                raise BpfError(f"mode {m!r}: expected one of {', '.join(MODES)}")
        for p in port_modes:
            if not 0 < p < 65536:
                raise BpfError(f"port {p} in the pod's port modes is out of range 1..65535")
        if len(port_exceptions) > MAX_PORTS:
            raise BpfError(f"{len(port_exceptions)} port exceptions: at most {MAX_PORTS} per pod")
        root_id = cgroup_id(cgroup)
        t = self._table("ambit_pods")
        leaf = t.Leaf()
        leaf.enrolled = int(enrolled)
        leaf.mode = MODES[mode]
        leaf.nports = len(port_exceptions)
        for i, p in enumerate(port_exceptions):
            if not 0 < p < 65536:
                raise BpfError(f"port exception {p} is out of range 1..65535")
            leaf.ports[i] = p
        leaf.cgroup_id = root_id
        t[t.Key(root_id)] = leaf
        if ip:
            # port exceptions first: a pod's IP entry never takes effect with stale ones
            self._set_port_modes(ip, port_modes)
            ti = self._table("ambit_pod_ips")
            li = ti.Leaf()
            li.cgroup_id = root_id
            li.enrolled = int(enrolled)
            li.mode = MODES[mode]
            ti[ti.Key(ip_to_be32(ip))] = li
        return root_id

    def _set_port_modes(self, ip: str, port_modes: Mapping[int, KernelMode]) -> None:
        t = self._table("ambit_port_modes")
        want = {port_to_be16(p): MODES[m] for p, m in port_modes.items()}
        ip_be = ip_to_be32(ip)
        for k in list(t.keys()):
            if k.ip == ip_be and k.port not in want:
                with contextlib.suppress(KeyError):
                    del t[k]
        for port_be, m in want.items():
            k = t.Key()
            k.ip = ip_be
            k.port = port_be
            t[k] = ctypes.c_uint8(m)

    def port_modes(self, ip: str) -> dict[int, KernelMode]:
        """The per-port plaintext modes the kernel holds for a pod IP."""
        ip_be = ip_to_be32(ip)
        return {socket.ntohs(k.port): mode_name(int(v.value)) for k, v in self._table("ambit_port_modes").items()
                if k.ip == ip_be}

    def remove_pod(self, cgroup_ids: Iterable[int], ip: str | None) -> None:
        t = self._table("ambit_pods")
        ids = set(cgroup_ids)
        for k, v in list(t.items()):
            if k.value in ids or v.cgroup_id in ids:
                with contextlib.suppress(KeyError):
                    del t[k]
        d = self._table("ambit_drops")
        for cid in ids:
            with contextlib.suppress(KeyError):
                del d[d.Key(cid)]
        if ip:
            ti = self._table("ambit_pod_ips")
            with contextlib.suppress(KeyError):
                del ti[ti.Key(ip_to_be32(ip))]
            self._set_port_modes(ip, {})

    def pods(self) -> dict[int, dict[str, Any]]:
        """cgroup id -> settings, as the kernel sees them."""
        out = {}
        for k, v in self._table("ambit_pods").items():
            out[int(k.value)] = {
                "enrolled": bool(v.enrolled),
                "mode": mode_name(int(v.mode)),
                "port_exceptions": [int(v.ports[i]) for i in range(v.nports)],
                "pod_cgroup_id": int(v.cgroup_id),
            }
        return out

    def pod_ips(self) -> dict[str, int]:
        """Pod IP -> the pod's cgroup id, as TC sees them."""
        return {be32_to_ip(int(k.value)): int(v.cgroup_id) for k, v in self._table("ambit_pod_ips").items()}

    def drop_counts(self) -> dict[int, DropCounts]:
        """Per pod cgroup id: TCP packets dropped because they bypassed the ztunnel."""
        return {
            int(k.value): DropCounts(int(v.egress), int(v.ingress), int(v.inbound_strict))
            for k, v in self._table("ambit_drops").items()
        }

    def original_destination(self, client_ip: str, client_port: int,
                             direction: str = "outbound") -> tuple[str, int] | None:
        """What SO_ORIGINAL_DST answers on 15001 (`outbound`) or 15006 (`inbound`) for a
        client (ip, port), for inspection and tests."""
        t = self._table({"outbound": "ambit_out_dst", "inbound": "ambit_in_dst"}[direction])
        k = t.Key()
        k.ip = ip_to_be32(client_ip)
        k.port = port_to_be16(client_port)
        try:
            v = t[k]
        except KeyError:
            return None
        return be32_to_ip(v.ip), socket.ntohs(v.port)

    # -- attachment ----------------------------------------------------------

    def _attach_cgroup(self, cgroup: Path, programs: Sequence[tuple[str, int, int]]) -> list[str]:
        """Attach `programs` to `cgroup`, adopting what an earlier agent attached. Returns actions taken."""
        actions: list[str] = []
        fd = _open_cgroup(cgroup)
        try:
            for name, _, atype in programs:
                fn = self.funcs[name]
                ours = [a for a in cgroup_attachments(cgroup, [atype]) if a.name == name[:15]]
                same = [a for a in ours if a.tag == self.tags[name]]
                if same:
                    keep = same[0]
                    stale = [a for a in ours if a.prog_id != keep.prog_id]
                    actions.append(f"adopted {name}")
                else:
                    rc = libbpf().bpf_prog_attach(fn.fd, fd, atype, BPF_F_ALLOW_MULTI)
                    if rc != 0:
                        err = ctypes.get_errno() or -rc
                        raise BpfError(f"attaching {name} to {cgroup}: {os.strerror(err)}")
                    stale = ours
                    actions.append(f"attached {name}")
                # Detach older versions only after the current one is in place: no window.
                for a in stale:
                    with _prog_fd_by_id(a.prog_id) as pfd:
                        if pfd is not None:
                            libbpf().bpf_prog_detach2(pfd, fd, atype)
                            actions.append(f"replaced {name} id {a.prog_id}")
        finally:
            os.close(fd)
        return actions

    def attach_pod(self, cgroup: Path) -> list[str]:
        return self._attach_cgroup(cgroup, POD_PROGRAMS)

    def detach_pod(self, cgroup: Path) -> int:
        return detach_ours(cgroup, [n for n, _, _ in POD_PROGRAMS])

    def attach_ztunnel(self, cgroup: Path) -> list[str]:
        """The SO_ORIGINAL_DST answer, on the ztunnel's cgroup (or an ancestor of it)."""
        return self._attach_cgroup(cgroup, ZTUNNEL_PROGRAMS)

    def pod_attached(self, cgroup: Path) -> dict[str, bool]:
        names = {a.name for a in cgroup_attachments(cgroup, [t for _, _, t in POD_PROGRAMS])}
        return {n: n[:15] in names for n, _, _ in POD_PROGRAMS}

    def uncovered_subcgroups(self, cgroup: Path) -> list[Path]:
        """Cgroups below a pod's whose processes do not run every pod program (inherited
        from the pod's cgroup). The programs find the pod of such a cgroup by its ancestors,
        so an empty list means the whole subtree, containers included, is redirected."""
        want = {n[:15] for n, _, _ in POD_PROGRAMS}
        types = [t for _, _, t in POD_PROGRAMS]
        out = []
        for sub in _subcgroups(cgroup):
            try:
                names = {a.name for a in cgroup_attachments(sub, types, effective=True)}
            except BpfError:
                continue  # removed while we looked
            if not want <= names:
                out.append(sub)
        return out

    def attach_interface(self, ifname: str, netns: Path | None = None) -> None:
        """Inbound capture on one node interface (clsact + direct-action bpf filters, replaced atomically)."""
        with _iproute(netns) as ipr:
            idx = _ifindex(ipr, ifname)
            self._set_iface_mac(idx, _bridge_mac(ipr, idx))
            with contextlib.suppress(Exception):  # already there: clsact is shared with other users
                ipr.tc("add", "clsact", index=idx)
            for name in TC_PROGRAMS:
                fn = self.funcs[name]
                try:
                    ipr.tc(
                        "replace-filter",
                        "bpf",
                        index=idx,
                        handle=1,
                        prio=TC_PRIO,
                        fd=fn.fd,
                        name=name,
                        parent=TC_PARENTS[name],
                        classid=1,
                        direct_action=True,
                    )
                except Exception as e:
                    raise BpfError(f"attaching {name} to {ifname}: {e}") from e

    def _set_iface_mac(self, ifindex: int, mac: bytes | None) -> None:
        """Where TC readdresses frames it DNATs on this interface (None: it leaves the MAC)."""
        t = self._table("ambit_ifaces")
        if mac is None:
            with contextlib.suppress(KeyError):
                del t[t.Key(ifindex)]
            return
        leaf = t.Leaf()
        for i, b in enumerate(mac):
            leaf.mac[i] = b
        t[t.Key(ifindex)] = leaf

    def detach_interface(self, ifname: str, netns: Path | None = None) -> None:
        with _iproute(netns) as ipr:
            try:
                idx = _ifindex(ipr, ifname)
            except BpfError:
                return  # the interface is gone, and our filters with it
            for name in TC_PROGRAMS:
                with contextlib.suppress(Exception):
                    ipr.tc("del-filter", "bpf", index=idx, handle=1, prio=TC_PRIO, parent=TC_PARENTS[name])

    def interface_programs(self, ifname: str, netns: Path | None = None) -> list[str]:
        """Names of ambit programs on an interface's clsact hooks."""
        out = []
        with _iproute(netns) as ipr:
            idx = _ifindex(ipr, ifname)
            for name in TC_PROGRAMS:
                with contextlib.suppress(Exception):
                    for f in ipr.get_filters(index=idx, parent=TC_PARENTS[name]):
                        opts = f.get_attr("TCA_OPTIONS")
                        if opts is not None and str(opts.get_attr("TCA_BPF_NAME") or "").startswith(name):
                            out.append(name)
        return out

    # -- events --------------------------------------------------------------

    def poll_events(self, timeout_ms: int = 0) -> list[FlowEvent]:
        """Events from the ring buffer (waits up to `timeout_ms` for the first)."""
        if not self._ringbuf_open:
            self._cg[b"ambit_events"].open_ring_buffer(self._on_event)
            self._ringbuf_open = True
        self._cg.ring_buffer_poll(timeout_ms)
        out, self._pending = self._pending, []
        return out

    def _on_event(self, _ctx: Any, data: Any, size: int) -> None:
        ev = ctypes.cast(data, ctypes.POINTER(_Event)).contents
        self._pending.append(
            FlowEvent(
                kind=EVENT_KINDS.get(ev.kind, f"unknown-{ev.kind}"),
                ts_ns=ev.ts_ns,
                cookie=ev.cookie,
                cgroup_id=ev.cgroup_id,
                src=be32_to_ip(ev.saddr),
                sport=ev.sport,
                dst=be32_to_ip(ev.daddr),
                dport=ev.dport,
                orig_dst=be32_to_ip(ev.orig_daddr) if ev.orig_daddr else None,
                orig_dport=ev.orig_dport or None,
                bytes_acked=ev.bytes_acked,
                bytes_received=ev.bytes_received,
                srtt_us=ev.srtt_us,
            )
        )

    def close(self) -> None:
        """Release handles; attachments and pins stay (see the class docstring)."""
        for b in (self._cg, self._tc):
            with contextlib.suppress(Exception):
                b.cleanup()

    def remove_pins(self) -> None:
        remove_pins(self.pin_dir)


def remove_pins(pin_dir: Path) -> None:
    """Unpin every ambit map under `pin_dir` and remove the directory."""
    for name in MAP_NAMES + OLD_MAP_NAMES:
        with contextlib.suppress(FileNotFoundError):
            (pin_dir / name).unlink()
    with contextlib.suppress(FileNotFoundError, OSError):
        pin_dir.rmdir()


def _subcgroups(cgroup: Path) -> list[Path]:
    """Every cgroup below `cgroup` (not itself)."""
    out: list[Path] = []
    for root, dirs, _ in os.walk(cgroup):
        out.extend(Path(root) / d for d in dirs)
    return out


def _bridge_mac(ipr: Any, ifindex: int) -> bytes | None:
    """The MAC of the bridge `ifindex` is a port of (None: not a bridge port)."""
    links = ipr.get_links(ifindex)
    master = links[0].get_attr("IFLA_MASTER") if links else None
    if not master:
        return None
    mlinks = ipr.get_links(master)
    addr = mlinks[0].get_attr("IFLA_ADDRESS") if mlinks else None
    return bytes.fromhex(addr.replace(":", "")) if addr else None


@contextlib.contextmanager
def _iproute(netns: Path | None) -> Iterator[Any]:
    """An IPRoute whose netlink socket lives in `netns`.

    pyroute2's NetNS runs a helper process, which could not use our program
    fds; so this thread enters the netns just long enough to open the socket.
    """
    from pyroute2 import IPRoute

    if netns is None:
        ipr = IPRoute()
    else:
        opened: list[Any] = []
        try:
            with nsops.entered(netns):
                opened.append(IPRoute())
        except nsops.NetnsError as e:
            for o in opened:  # made, but the thread could not return: do not leak the socket
                o.close()
            raise BpfError(f"cannot open a netlink socket in netns {netns}: {e}") from e
        ipr = opened[0]
    try:
        yield ipr
    finally:
        ipr.close()


def _ifindex(ipr: Any, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise BpfError(f"interface {ifname} does not exist in the node's network namespace")
    return int(idx[0])
