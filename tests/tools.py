"""Outside tools some tests drive (kubectl, promtool, shellcheck, podman), found or provided.

A tool that is missing is installed from Debian when the tests run as root
(promtool is only extracted from Debian's `prometheus` package, so no
Prometheus server is ever installed or started); otherwise the test skips, and
under `CI=true` it fails, as privileged tests do.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import _in_ci

TOOLS_CACHE = Path("/var/cache/ambit/tools")


def _missing(what: str) -> None:
    if _in_ci():
        pytest.fail(f"{what}, and CI is set")
    pytest.skip(what)


def _apt(*args: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and args[0] != "update":
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
        r = subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"apt-get {' '.join(args)} failed: {r.stderr.strip()[-500:]}")


def run_group(argv: list[str], *, timeout: float, grace: float = 60.0, cwd: Path | None = None,
              merge_stderr: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `argv` in a process group of its own, capturing its output. On timeout the whole
    group gets SIGTERM first, so the scripts' own cleanup traps run (VMs, namespaces,
    cgroups), SIGKILL only after `grace`, then the test fails. (subprocess.run's timeout
    would SIGKILL the leader alone: no trap runs and its children go on.)"""
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            out, err = p.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        pytest.fail(f"{' '.join(argv)} did not end within {timeout:g}s (stopped):\n{(out or '')[-3000:]}"
                    f"\n{(err or '')[-3000:]}")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def tool(name: str, package: str | None = None) -> str:
    """The path of command `name`, installing Debian's `package` (as root) when it is missing."""
    found = shutil.which(name)
    if found:
        return found
    if package is None or os.geteuid() != 0:
        _missing(f"{name} is not installed" + (f" (Debian package {package}; run as root)" if package else ""))
    _apt("install", "-y", "-qq", package)  # type: ignore[arg-type]
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{package} installed no {name}")
    return found


def promtool() -> str:
    """promtool from Debian's prometheus package, extracted (not installed: no server starts)."""
    found = shutil.which("promtool")
    if found:
        return found
    extracted = TOOLS_CACHE / "prometheus" / "usr" / "bin" / "promtool"
    if extracted.is_file():
        return str(extracted)
    if os.geteuid() != 0:
        _missing("promtool is not installed (Debian package prometheus)")
    work = TOOLS_CACHE / "download"
    work.mkdir(parents=True, exist_ok=True)
    for f in work.glob("prometheus_*.deb"):
        f.unlink()
    r = subprocess.run(["apt-get", "download", "prometheus"], cwd=work, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        subprocess.run(["apt-get", "download", "prometheus"], cwd=work, check=True, capture_output=True, timeout=600)
    deb = next(work.glob("prometheus_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(TOOLS_CACHE / "prometheus")], check=True, timeout=120)
    deb.unlink()
    return str(extracted)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, as objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # Debian's kubernetes-client (1.20) embeds a kustomize too old for components.
        _missing("kubectl is not installed (it ships kustomize; Debian's kubernetes-client is too old)")
    r = subprocess.run([str(kubectl), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kubectl kustomize {directory}: {r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d]
