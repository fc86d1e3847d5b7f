"""The per-cluster supervisor daemon: runs node processes and pod commands, restarts, answers commands.

One process per cluster, started by `ambit local up` (pid in <state>/pids/,
log in <state>/logs/supervisor.log). It runs the CA in the control netns, each
node's agent and ztunnel inside that node's netns (entered with setns before
exec, so they keep /sys/fs/cgroup and /sys/fs/bpf), and each pod's command
through `ip netns exec` (which bind-mounts the pod's /etc/hosts). Every process
goes into its own cgroup below <cgroup2>/ambit-<cid>/, so `down` can kill all
of them even after the supervisor crashed. Crashed node processes restart with
exponential backoff (0.5 s doubling to 30 s, reset after 10 s of uptime);
pod commands run once, and their exit sets the pod's phase.

Commands arrive as one JSON object per connection on <state>/supervisor.sock:
{"op": "status"|"start"|"stop"|"restart"|"pod_start"|"pod_stop"|"shutdown", ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import cgroups
from agent import netns as nsops
from agent.local import LocalError
from agent.local.layout import Layout
from agent.local.store import Store
from ambit.tasks import TaskSet

log = logging.getLogger("ambit.local.supervisor")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
BACKOFF_RESET_AFTER = 10.0
STOP_GRACE = 5.0
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------
# pid files (shared with `down`)


def proc_starttime(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: tells a pid apart from a later process reusing it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def write_pidfile(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid} {proc_starttime(pid) or '?'}\n")


def pidfile_alive(path: Path) -> int | None:
    """The pid recorded in `path` if that very process still runs (a zombie does not), else None."""
    try:
        pid_s, start = path.read_text().split()
        pid = int(pid_s)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    return pid if fields[19] == start and fields[0] != "Z" else None


# ---------------------------------------------------------------------------
# units


@dataclass
class UnitSpec:
    name: str  # "ca", "node-a/agent", "node-a/ztunnel", "pod/<ns>/<name>"
    argv: list[str]
    cgroup: Path
    log: Path
    pidfile: Path
    netns: str | None = None  # entered with setns before exec
    restart: bool = True
    unavailable: str | None = None  # why it cannot start in this build
    stop_grace: float = STOP_GRACE  # seconds between SIGTERM and killing the unit's cgroup
    on_start: Callable[[], None] | None = None
    on_exit: Callable[[int], None] | None = None


@dataclass
class Unit:
    spec: UnitSpec
    desired: bool = True
    state: str = "pending"
    reason: str = ""
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def info(self) -> dict[str, Any]:
        return {
            "unit": self.spec.name,
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "reason": self.reason,
            "log": str(self.spec.log),
        }

    async def run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            if not self.desired:
                self.wake.clear()
                await self.wake.wait()
                backoff = BACKOFF_MIN
                continue
            if self.spec.unavailable:
                self.state, self.reason = "unavailable", self.spec.unavailable
                self.desired = False
                self.started.set()
                continue
            t0 = time.monotonic()
            try:
                proc = await self._spawn()
            except (OSError, cgroups.CgroupError) as e:
                self.state, self.reason = "failed", f"cannot start: {e}"
                self.started.set()
                if not self.spec.restart:
                    return
                await self._sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self.proc, self.pid = proc, proc.pid
            write_pidfile(self.spec.pidfile, proc.pid)
            self.state, self.reason = "running", ""
            log.info("%s: started pid %d", self.spec.name, proc.pid)
            if self.spec.on_start:
                await asyncio.to_thread(self.spec.on_start)
            self.started.set()
            rc = await proc.wait()
            self.proc, self.pid, self.last_exit = None, None, rc
            self.spec.pidfile.unlink(missing_ok=True)
            log.info("%s: exited with status %d", self.spec.name, rc)
            if self.spec.on_exit:
                await asyncio.to_thread(self.spec.on_exit, rc)
            if not self.spec.restart:
                self.state = "exited"
                self.reason = f"exit status {rc}"
                return
            if not self.desired:
                self.state, self.reason = "stopped", ""
                continue
            if time.monotonic() - t0 > BACKOFF_RESET_AFTER:
                backoff = BACKOFF_MIN
            self.restarts += 1
            self.state = "backoff"
            self.reason = f"exited with status {rc}; restarting in {backoff:g}s (see {self.spec.log})"
            await self._sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _sleep(self, seconds: float) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)

    async def _spawn(self) -> asyncio.subprocess.Process:
        cgroups.create(self.spec.cgroup)
        self.spec.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.spec.log, "ab") as logf:
            logf.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(self.spec.argv)}\n".encode())
            logf.flush()
            return await asyncio.create_subprocess_exec(
                *self.spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=nsops.preexec(self.spec.netns, self.spec.cgroup / "cgroup.procs"),
            )

    async def stop(self) -> None:
        self.desired = False
        self.wake.set()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.spec.stop_grace)
            except TimeoutError:
                log.warning("%s: did not stop within %gs; killing", self.spec.name, self.spec.stop_grace)
        # Whatever it left behind (its children) goes too.
        await asyncio.to_thread(cgroups.kill, self.spec.cgroup)
        if proc is not None:
            await proc.wait()
        if self.spec.restart:
            self.state, self.reason = "stopped", ""

    def start(self) -> None:
        self.desired = True
        self.wake.set()


# ---------------------------------------------------------------------------
# what each node runs


# Not `python -m agent.cli`: run as __main__, that module's CliError would be a
# second class, and the user errors of the groups would surface as tracebacks.
AMBIT = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))"]


def _ambit(*args: str) -> list[str]:
    return [*AMBIT, *args]


def _disabled(layout: Layout, component: str) -> str | None:
    if component in layout.components:
        return None
    return f"left out by `ambit local up --without {component}`"


def system_units(layout: Layout) -> list[UnitSpec]:
    """The CA and, per node, the agent and the ztunnel."""
    base = layout.cgroup_base
    cluster = f"local:{layout.cluster_dir}"
    units = []
    ca_missing = _disabled(layout, "ca")
    if ca_missing is None and not (layout.ca_dir / "root-cert.pem").exists():
        ca_missing = f"the CA was not initialised in {layout.ca_dir}"
    units.append(
        UnitSpec(
            name="ca",
            argv=_ambit("ca", "run", "--dir", str(layout.ca_dir), "--cluster", cluster, "--listen", layout.ca_address),
            cgroup=base / "_control" / "ca",
            log=layout.logs_dir / "ca.log",
            pidfile=layout.pids_dir / "ca.pid",
            netns=layout.control_netns,
            unavailable=ca_missing,
        )
    )
    for n in layout.nodes:
        node_dir = layout.state / "nodes" / n.name
        cred = layout.node_credential_dir(n.name)
        units.append(
            UnitSpec(
                name=f"{n.name}/agent",
                argv=_ambit(
                    "agent", "run", "--node", n.name, "--cluster", cluster,
                    "--runtime", f"local:{layout.state}", "--bpf-dir", n.bpf_dir,
                    "--state-feed", str(node_dir / "feed.sock"), "--state-dir", str(node_dir),
                    # in the node's state dir: it outlives an agent restart (and, like the logs, `down`)
                    "--flow-history", str(node_dir / "flows.db"),
                ),
                cgroup=base / n.name / "_agent",
                log=node_dir / "agent.log",
                pidfile=layout.pids_dir / f"{n.name}.agent.pid",
                netns=n.netns,
                unavailable=_disabled(layout, "agent"),
            )
        )
        zt_missing = _disabled(layout, "ztunnel")
        if zt_missing is None and not (cred / "tls.crt").exists():
            zt_missing = f"no node credential in {cred} (the CA could not issue one)"
        units.append(
            UnitSpec(
                name=f"{n.name}/ztunnel",
                argv=_ambit(
                    # the ztunnel follows its node agent's live feed, as on Kubernetes
                    "ztunnel", "run", "--node", n.name, "--state-feed", str(node_dir / "feed.sock"),
                    "--ca", layout.ca_address, "--credential-dir", str(cred),
                    # 15001/15006 on the pods' gateway: node-local, reachable from its pods;
                    # 15008/15020/15021 default to the node's fabric address.
                    "--outbound", f"{n.gateway}:15001", "--inbound-plaintext", f"{n.gateway}:15006",
                    "--cert-ttl", str(layout.cert_ttl),
                ),
                cgroup=base / n.name / "_ztunnel",
                log=node_dir / "ztunnel.log",
                pidfile=layout.pids_dir / f"{n.name}.ztunnel.pid",
                netns=n.netns,
                unavailable=zt_missing,
            )
        )
    return units


# ---------------------------------------------------------------------------
# the daemon


class Supervisor:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.store = Store(layout.cluster_dir, layout.state / "store.lock")
        self.units: dict[str, Unit] = {}
        self._stopping = asyncio.Event()
        self._tasks = TaskSet("supervisor")

    def add(self, spec: UnitSpec) -> Unit:
        unit = Unit(spec)
        self.units[spec.name] = unit
        unit.task = self._tasks.spawn(f"unit:{spec.name}", unit.run())
        return unit

    def _refresh_spec(self, name: str) -> None:
        """Re-check availability (the module may have landed, the credential been issued)."""
        for spec in system_units(self.layout):
            if spec.name == name and name in self.units:
                self.units[name].spec = spec

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, "units": [u.info() for u in self.units.values()]}
        if op in ("start", "stop", "restart"):
            name = str(req.get("unit"))
            unit = self.units.get(name)
            if unit is None or name.startswith("pod/"):
                names = ", ".join(n for n in self.units if not n.startswith("pod/"))
                return {"ok": False, "error": f"no unit {name!r}; units: {names}"}
            if op in ("stop", "restart"):
                await unit.stop()
            if op in ("start", "restart"):
                self._refresh_spec(name)
                unit.started.clear()
                unit.start()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(unit.started.wait(), 5.0)
            return {"ok": True, "unit": unit.info()}
        if op == "pod_start":
            return await self._pod_start(req)
        if op == "pod_stop":
            name = f"pod/{req.get('namespace')}/{req.get('name')}"
            unit = self.units.pop(name, None)
            if unit is not None:
                await unit.stop()
                if unit.task:
                    unit.task.cancel()
            return {"ok": True}
        if op == "shutdown":
            self._stopping.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def _pod_start(self, req: dict[str, Any]) -> dict[str, Any]:
        ns, name, node = str(req["namespace"]), str(req["name"]), str(req["node"])
        argv = [str(a) for a in req["argv"]]
        uname = f"pod/{ns}/{name}"
        if uname in self.units and self.units[uname].state in ("running", "pending"):
            return {"ok": True, "unit": self.units[uname].info()}
        key = ("Pod", ns, name)
        store = self.store

        def set_phase(phase: str) -> None:
            def fn(obj: dict[str, Any]) -> None:
                obj.setdefault("status", {})["phase"] = phase

            store.update(key, fn)

        spec = UnitSpec(
            name=uname,
            argv=nsops.exec_argv(self.layout.pod_netns(ns, name), argv),
            cgroup=self.layout.pod_cgroup(node, ns, name),
            log=self.layout.logs_dir / "pods" / f"{ns}.{name}.log",
            pidfile=self.layout.pids_dir / f"pod.{ns}.{name}.pid",
            restart=False,
            on_start=lambda: set_phase("Running"),
            on_exit=lambda rc: set_phase("Succeeded" if rc == 0 else "Failed"),
        )
        unit = self.add(spec)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(unit.started.wait(), 5.0)
        if unit.state == "failed":
            return {"ok": False, "error": f"pod {ns}/{name}: {unit.reason}", "unit": unit.info()}
        return {"ok": True, "unit": unit.info()}

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
                resp = await self.handle(req)
            except (ValueError, KeyError) as e:
                resp = {"ok": False, "error": f"bad request: {e}"}
            writer.write(json.dumps(resp).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        sock_path = self.layout.socket_path
        sock_path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._serve_conn, path=str(sock_path))
        for spec in system_units(self.layout):
            self.add(spec)
        log.info("supervisor of cluster %s ready on %s", self.layout.cid, sock_path)
        try:
            await self._stopping.wait()
        finally:
            log.info("shutting down")
            server.close()
            await asyncio.gather(*(u.stop() for u in self.units.values()), return_exceptions=True)
            await self._tasks.close()
            sock_path.unlink(missing_ok=True)
            (self.layout.pids_dir / "supervisor.pid").unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# the client side (used by the CLI)


def request(layout: Layout, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one command to the cluster's supervisor; raises LocalError when it does not answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(layout.socket_path))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        raise LocalError(
            f"the supervisor of {layout.state_dir} does not answer on {layout.socket_path} ({e}); "
            f"see {layout.logs_dir / 'supervisor.log'}; `ambit local down` then `up` recovers"
        ) from e
    finally:
        s.close()
    try:
        resp: dict[str, Any] = json.loads(buf)
    except ValueError as e:
        raise LocalError(f"the supervisor sent a bad answer: {buf[:200]!r}") from e
    return resp


def spawn(layout: Layout) -> int:
    """Start the supervisor daemon detached (own session, own cgroup); returns its pid once it answers."""
    layout.logs_dir.mkdir(parents=True, exist_ok=True)
    cg = layout.cgroup_base / "_supervisor"
    cgroups.create(cg)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(layout.logs_dir / "supervisor.log", "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from agent.local.supervisor import main; sys.exit(main(sys.argv[1:]))",
             "--state-dir", layout.state_dir],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=nsops.preexec(None, cg / "cgroup.procs"),
        )
    write_pidfile(layout.pids_dir / "supervisor.pid", proc.pid)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalError(
                f"the supervisor exited at start with status {proc.returncode}; see {layout.logs_dir / 'supervisor.log'}"
            )
        try:
            if request(layout, {"op": "status"}, timeout=2).get("ok"):
                return proc.pid
        except LocalError:
            time.sleep(0.05)
    raise LocalError(f"the supervisor did not answer within 15s; see {layout.logs_dir / 'supervisor.log'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.local.supervisor")
    parser.add_argument("--state-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    layout = Layout.load(args.state_dir)
    asyncio.run(Supervisor(layout).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
