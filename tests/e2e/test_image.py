"""`make image` builds the ambit image here, with no registry, and it runs under podman.

scripts/image.sh: the Debian base from daemonset/image-packages.txt with
mmdebstrap (cached under /var/cache/ambit/rootfs), wheels built on this host,
daemonset/Dockerfile built with podman. Then the image runs the commands the
manifests run, with the ztunnel's posture (read-only root, no capabilities).
Podman runs here only with runc, cgroupfs and explicit rlimits (Debian 12's
podman 4.3 on a hybrid cgroup host without CAP_SYS_RESOURCE).
"""

from __future__ import annotations

import subprocess
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
RUN = [*PODMAN, "run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL",
       "--security-opt", "no-new-privileges", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]


@pytest.fixture(scope="module")
def image() -> str:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    start = time.monotonic()
    r = subprocess.run(["bash", "scripts/image.sh"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = r.stdout.strip().splitlines()[-1]
    assert ref == f"ghcr.io/ambit-mesh/ambit:{version}"  # what daemonset/ deploys
    print(f"image built in {time.monotonic() - start:.0f}s: {r.stderr.strip()}")
    return ref


def run(image: str, *args: str, user: str = "0") -> str:
    r = subprocess.run([*RUN, "--user", user, image, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


@pytest.mark.timeout(900)
def test_the_image_runs_every_component(image: str) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert run(image, "version").startswith(f"ambit {version} (python 3.11")
    assert "--bpf-dir" in run(image, "agent", "run", "--help")
    assert "--ca-token-file" in run(image, "ztunnel", "run", "--help")
    # the CA and the waypoint run as non-root users in the manifests
    assert "--node-auth" in run(image, "ca", "run", "--help", user="65532")
    assert "--gateway" in run(image, "waypoint", "run", "--help", user="1337")
    # what the agent loads at run time is in the image: BCC and the eBPF C sources
    r = subprocess.run([*RUN, "--entrypoint", "python3", image, "-c",
                        "import bcc, agent.bpf; print((agent.bpf.bpf_sources() / 'cgroup.c').is_file())"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "True", r.stderr
    labels = subprocess.run([*PODMAN, "image", "inspect", "--format",
                             "{{index .Labels \"org.opencontainers.image.version\"}}", image],
                            capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert labels == version
