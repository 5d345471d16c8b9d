#!/usr/bin/env python3
"""Server memory per idle WebSocket connection (SECURITY.md, "Limits").

    ulimit -n 4096
    python3 scripts/idle-rss.py target/release/cochlea [CONNECTIONS]   (default 1000)

Starts `cochlea serve` on 127.0.0.1 (port 0, a temporary recordings
directory), opens CONNECTIONS WebSockets to /v1/stream and leaves them idle,
and prints the server's resident memory (VmRSS) before and after, per
connection. Two kinds, each on a fresh server: silent connections (no query,
so no stream until a `start` that never comes) and started idle sessions
(`?encoding=mulaw`: a session with its sinks, that never gets audio).
Needs Linux (/proc) and Python 3.8+ only; every wait is bounded, and the
servers are stopped at the end. Run it on an otherwise idle machine.
"""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

DEADLINE_S = 60


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_server(binary, recordings):
    server = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--recordings-dir", recordings,
         "--idle-timeout-ms", "60000", "--max-sessions", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline()
    match = re.search(r"listening on http://([\d.]+):(\d+)", line)
    if not match:
        server.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return server, (match.group(1), int(match.group(2)))


def upgrade(addr, query):
    sock = socket.create_connection(addr, timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    path = "/v1/stream" + (f"?{query}" if query else "")
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed during the upgrade")
        response += chunk
    if not response.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"upgrade refused: {response[:80]!r}")
    return sock


def sessions_active(addr):
    with socket.create_connection(addr, timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := sock.recv(65536):
            body += chunk
    return json.loads(body.split(b"\r\n\r\n", 1)[1])["sessions_active"]


def measure(binary, count, query):
    with tempfile.TemporaryDirectory() as recordings:
        server, addr = start_server(binary, recordings)
        try:
            # One connection first, so one-time allocations (worker buffers,
            # metrics) are in the baseline, not in the per-connection figure.
            upgrade(addr, query).close()
            time.sleep(1.0)
            before = rss_kib(server.pid)
            deadline = time.monotonic() + DEADLINE_S
            sockets = []
            for _ in range(count):
                sockets.append(upgrade(addr, query))
                if time.monotonic() > deadline:
                    raise RuntimeError("connecting took too long")
            while sessions_active(addr) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not take every connection")
                time.sleep(0.1)
            time.sleep(1.0)
            after = rss_kib(server.pid)
            files = len(os.listdir(recordings))
            for sock in sockets:
                sock.close()
            return before, after, files
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    binary = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) == 3 else 1000
    for name, query in (("silent connections", ""), ("started idle sessions", "encoding=mulaw")):
        before, after, files = measure(binary, count, query)
        print(f"{count} {name}: RSS {before} KiB -> {after} KiB, "
              f"{(after - before) / count:.1f} KiB per connection; {files} files in the recordings dir")


if __name__ == "__main__":
    main()
