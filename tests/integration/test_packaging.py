"""The installed package carries what the processes load at run time: the eBPF C sources,
the feed's proto and the type markers; the agent finds its sources installed as in a checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_bpf_sources_and_the_agent_finds_them(tmp_path: Path) -> None:
    # a copy of the checkout (symlinks kept): setuptools builds in the source tree's build/
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("ambit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("agent/bpfsrc/ambit.h", "agent/bpfsrc/cgroup.c", "agent/bpfsrc/tc.c", "ambit/wire/feed.proto",
              "ambit/py.typed", "agent/py.typed"):
        assert f in names, f"{f} is not in {wheel.name}"
    # installed elsewhere, away from the checkout: the agent finds the copy inside the package
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-I", "-c",
                        f"import sys; sys.path.insert(0, {str(target)!r}); import agent.bpf as b; "
                        "print(b.__file__); print(b.bpf_sources())"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60, check=True)
    module, sources = r.stdout.split()
    assert module.startswith(str(target)), module
    assert Path(sources) == target / "agent" / "bpfsrc" and (Path(sources) / "cgroup.c").is_file()
