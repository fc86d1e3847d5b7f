"""`ambit ca run` as a real process for tests: started on an ephemeral port, always stopped."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def ca_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run `ambit ca run ARGS --listen 127.0.0.1:0`; yields the process and the port it bound."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "ca", "run", *args, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, (line, proc.stderr.read() if proc.stderr else "")
        yield proc, int(line.rsplit(":", 1)[1])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
