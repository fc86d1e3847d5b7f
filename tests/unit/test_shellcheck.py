"""Every shell script of the project passes shellcheck (Debian's package)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.tools import tool

REPO = Path(__file__).resolve().parents[2]


def scripts() -> list[Path]:
    """Every tracked (or new, not ignored) *.sh, and .ci/run."""
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.sh", ".ci/run"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:  # not a git checkout (an exported tree): every *.sh outside the venv
        found = [p for p in REPO.rglob("*.sh") if not {".venv", "build"} & set(p.relative_to(REPO).parts)]
        return sorted({*found, REPO / ".ci" / "run"})
    return [REPO / p for p in sorted(set(r.stdout.split())) if (REPO / p).is_file()]


def test_every_script_passes_shellcheck() -> None:
    found = scripts()
    assert REPO / "scripts" / "setup.sh" in found and REPO / ".ci" / "run" in found
    r = subprocess.run([tool("shellcheck", "shellcheck"), "--severity=style", "--external-sources",
                        *map(str, found)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
