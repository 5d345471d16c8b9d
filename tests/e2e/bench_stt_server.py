#!/usr/bin/env python3
"""Benchmark of the reference transcription server (samples/stt-server).

Starts the server on 127.0.0.1 port 0 with the venv's python, then sends
make_speech.sh's sentences (2-4 s each) ROUNDS times over kept-alive
connections from CONCURRENCY client threads, and reports:
  * latency per request (send to full reply), p50 and p95, in ms;
  * the server's own decode time (its openai-processing-ms header) and the
    rest (HTTP, multipart, WAV parsing), p50;
  * the CPU time of the server and its decoder processes (from /proc) per
    second of audio.
A measurement, not a test: it asserts nothing about time.

    python3 tests/e2e/bench_stt_server.py [--rounds 5] [--workers 1] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
import wave
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SPEECH_DIR = os.path.join(ROOT, "target", "e2e-speech")


def cpu_s(root_pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants."""
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        # After the ")": state, ppid, ... utime is stat field 14, stime 15.
        stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree = {root_pid}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(stats[pid][1] for pid in tree if pid in stats) / os.sysconf("SC_CLK_TCK")


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--python", default=os.environ.get("STT_PYTHON")
                        or os.path.join(ROOT, "target", "stt-venv", "bin", "python"))
    args = parser.parse_args()
    if not os.path.exists(os.path.join(SPEECH_DIR, "sentences.tsv")):
        subprocess.run([os.path.join(HERE, "make_speech.sh"), SPEECH_DIR], check=True)
    files: List[Tuple[bytes, float]] = []
    with open(os.path.join(SPEECH_DIR, "sentences.tsv"), encoding="utf-8") as f:
        for line in f:
            name = line.split("\t", 1)[0]
            path = os.path.join(SPEECH_DIR, name)
            with wave.open(path) as w:
                duration_s = w.getnframes() / w.getframerate()
            with open(path, "rb") as wf:
                files.append((wf.read(), duration_s))

    proc = subprocess.Popen([args.python, os.path.join(ROOT, "samples", "stt-server", "stt_server.py"),
                             "--port", "0", "--workers", str(args.workers), "--quiet"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("listening on http://"):
            raise SystemExit(f"server did not start: {line!r}")
        port = int(line.strip().rsplit(":", 1)[1])
        boundary = "bench" + uuid.uuid4().hex

        def body_of(wav: bytes) -> bytes:
            return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nbench\r\n"
                    f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"u.wav\"\r\n"
                    f"Content-Type: audio/wav\r\n\r\n").encode() + wav + f"\r\n--{boundary}--\r\n".encode()

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        bodies = [(body_of(wav), duration_s) for wav, duration_s in files]
        samples: List[Tuple[float, float]] = []  # (latency_s, processing_s)
        lock = threading.Lock()

        def client(jobs: List[bytes]) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            for body in jobs:
                started = time.perf_counter()
                conn.request("POST", "/v1/audio/transcriptions", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                latency_s = time.perf_counter() - started
                if response.status != 200:
                    raise SystemExit(f"HTTP {response.status}")
                with lock:
                    samples.append((latency_s, int(response.getheader("openai-processing-ms", "0")) / 1000))
            conn.close()

        client([bodies[0][0]])  # warm-up: first-use costs are not the steady state
        samples.clear()
        jobs = [body for _ in range(args.rounds) for body, _ in bodies]
        audio_s = args.rounds * sum(d for _, d in bodies)
        cpu_before = cpu_s(proc.pid)
        wall_started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(jobs[i::args.concurrency],)) for i in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall_s = time.perf_counter() - wall_started
        server_cpu_s = cpu_s(proc.pid) - cpu_before
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    latencies = [s[0] * 1000 for s in samples]
    processing = [s[1] * 1000 for s in samples]
    overhead = [(s[0] - s[1]) * 1000 for s in samples]
    report = {
        "requests": len(samples),
        "workers": args.workers,
        "concurrency": args.concurrency,
        "utterance_s": {"min": round(min(d for _, d in bodies), 2), "max": round(max(d for _, d in bodies), 2),
                        "mean": round(statistics.mean(d for _, d in bodies), 2)},
        "latency_ms": {"p50": round(percentile(latencies, 0.5)), "p95": round(percentile(latencies, 0.95))},
        "processing_ms_p50": round(percentile(processing, 0.5)),
        "overhead_ms_p50": round(percentile(overhead, 0.5), 1),
        "server_cpu_s_per_audio_s": round(server_cpu_s / audio_s, 3),
        "audio_s_per_wall_s": round(audio_s / wall_s, 2),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
