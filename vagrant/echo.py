"""The end-to-end's application, plain TCP on both ends (the mesh adds mTLS and policy).

    python3 echo.py serve PORT              answer each connection's first line with "echo: <line>"
    python3 echo.py call HOST PORT MESSAGE  send MESSAGE, print the answer; exit 0 answered,
                                            3 closed without an answer, 4 refused or timed out

Runs on the VMs' Debian python3 (standard library only).
"""

from __future__ import annotations

import socket
import sys
import threading


def serve(port: int) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)

    def answer(c: socket.socket) -> None:
        with c:
            c.settimeout(10)
            data = b""
            while not data.endswith(b"\n") and len(data) < 4096:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            c.sendall(b"echo: " + data.strip() + b"\n")

    while True:
        c, _ = s.accept()
        threading.Thread(target=answer, args=(c,), daemon=True).start()


def call(host: str, port: int, message: str, timeout: float) -> int:
    try:
        with socket.create_connection((host, port), timeout=timeout) as c:
            c.sendall(message.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = c.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError as e:
        print(f"failed: {e}")
        return 4
    if not reply:
        print("closed without an answer")
        return 3
    print(reply.decode().strip())
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        serve(int(argv[1]))
        return 0
    if len(argv) in (4, 5) and argv[0] == "call":
        return call(argv[1], int(argv[2]), argv[3], float(argv[4]) if len(argv) == 5 else 10.0)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
