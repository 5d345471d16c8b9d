#!/usr/bin/env python3
"""Macro benchmark: cochlea under many concurrent real-time streams, against
a minimal WebSocket sink doing the same work minus everything cochlea adds.

For each scenario it builds release binaries (once), starts `cochlea serve`
on 127.0.0.1 port 0 (recorder into a temporary directory), runs
`cochlea loadgen` against it, and measures during the steady state, once every
stream has started and before the first one ends:

- server CPU seconds per stream-second (utime + stime from /proc/PID/stat);
- peak RSS (VmHWM) and RSS per session (RSS under load minus RSS before, / N);
- ingest latency p50 / p99 (cochlea_ingest_latency_seconds from /metrics,
  the window's bucket deltas, interpolated linearly inside a bucket);
- frames lost (sent by loadgen and never acknowledged by the server).

Then the same load against examples/baseline_sink.rs (tokio-tungstenite,
discards frames), and the ratio of the two CPU figures.

Scenarios:
  pcm   N x 16 kHz mono pcm_s16le, recorded (targets: 0 lost, p99 <= 20 ms,
        CPU <= 1.3x baseline, active session <= 256 KiB)
  opus  N x Opus decoded at 48 kHz, recorded at 16 kHz (recorder.sample_rate)
        (target: <= 1.5 ms CPU per stream-second)
  webrtc N x the same Opus packets pushed over WebRTC (WHIP, str0m as the
        client), recorded at 16 kHz, and in the same run N x WebSocket Opus
        against a second server (cochlea-websocket): the ratio of their CPU
        per stream-second
  idle  N idle sessions (started, recorded, no audio, a keepalive every
        --keepalive-ms, 10 s by default; above 25 s the server's idle timeout
        is raised to 3x that, so a value past the run measures sessions
        that send nothing at all) (targets: < 2 % of a core, <= 64 KiB per
        session)

Everything is bounded in time (each child has a deadline and is killed past
it) and uses loopback only. Python 3.9+ standard library only.

  scripts/loadbench.py                    # all scenarios, quick (30 s runs)
  scripts/loadbench.py --duration-s 60    # the 60 s figures of BENCHMARKS.md
  scripts/loadbench.py --scenario pcm --streams 200 --duration-s 15
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
COCHLEA = RELEASE / "cochlea"
BASELINE = RELEASE / "examples" / "baseline_sink"
FIXTURE = ROOT / "tests" / "fixtures" / "speech-16k.wav"
CLK_TCK = os.sysconf("SC_CLK_TCK")
INGEST = "cochlea_ingest_latency_seconds"
# Time for connections to settle after the last one started, before measuring.
SETTLE_S = 2.0
# loadgen's own per-stream timeouts (connect 10 s, close 30 s) plus margin.
LOADGEN_SLACK_S = 60.0


def log(message):
    print(f"loadbench: {message}", file=sys.stderr, flush=True)


# --- /proc -------------------------------------------------------------------

def cpu_seconds(pid):
    """utime + stime of a process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    # Fields 14 and 15 of proc(5), counted from after the command name.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


# --- metrics -----------------------------------------------------------------

BUCKET = re.compile(r'^' + INGEST + r'_bucket\{le="([^"]+)"\} (\S+)$')


def ingest_buckets(addr):
    """Cumulative bucket counts of the ingest latency histogram: {le: count}."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    buckets = {}
    for line in text.splitlines():
        m = BUCKET.match(line)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            buckets[le] = buckets.get(le, 0.0) + float(m.group(2))
    return buckets


def quantile(before, after, q):
    """Like PromQL histogram_quantile over the window's bucket deltas:
    linear interpolation inside the bucket that holds rank q."""
    les = sorted(after)
    cum = [after[le] - before.get(le, 0.0) for le in les]
    total = cum[-1] if cum else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, c in zip(les, cum):
        if c >= rank:
            if le == float("inf"):
                return lower  # beyond the last finite bound: report that bound
            if c == below:
                return le
            return lower + (le - lower) * (rank - below) / (c - below)
        lower, below = le, c
    return lower


# --- child processes ---------------------------------------------------------

class Child:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, argv, log_path, env=None):
        self.argv = argv
        self.lines = []
        self.out_path = Path(str(log_path) + ".out")
        self.cond = threading.Condition()
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self.log_file, text=True,
            env=env, cwd=ROOT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        with open(self.out_path, "w") as out:
            for line in self.proc.stdout:
                out.write(line)
                with self.cond:
                    self.lines.append(line.rstrip("\n"))
                    self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_line(self, pattern, timeout_s):
        """The first match of `pattern` in the output, or None at the deadline."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self.cond:
            while True:
                for line in self.lines[seen:]:
                    m = regex.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    return None
                self.cond.wait(min(left, 0.5))

    def wait(self, timeout_s):
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log(f"{Path(self.argv[0]).name} overran its {timeout_s:.0f} s deadline: killing it")
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def stop(self, timeout_s=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.wait(timeout_s)
        self.reader.join(timeout=5)
        self.log_file.close()
        return code


# Extra `cochlea serve` arguments (--server-arg), for every cochlea kind.
SERVER_ARGS = []


def start_moto(tmp):
    """moto's S3 server on a free loopback port with a bucket `bench`;
    returns (child, endpoint)."""
    server = subprocess.run([str(ROOT / "scripts" / "moto-venv.sh")], check=True,
                            capture_output=True, text=True).stdout.strip()
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    child = Child([server, "-H", "127.0.0.1", "-p", str(port)], tmp / "moto.log")
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                child.stop()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    urllib.request.urlopen(urllib.request.Request(endpoint + "/bench", method="PUT"), timeout=5).read()
    return child, endpoint


def start_server(kind, tmp, scenario, max_sessions, keepalive_ms, s3_endpoint=None):
    """cochlea (recording into tmp, or into moto's S3 for cochlea-s3) or the
    baseline sink; returns (child, addr)."""
    if kind in ("cochlea", "cochlea-s3"):
        argv = [str(COCHLEA), "serve", "--listen", "127.0.0.1:0",
                "--recordings-dir", str(tmp / "recordings"),
                "--max-sessions", str(max_sessions)] + SERVER_ARGS
        if scenario in ("opus", "webrtc"):
            argv += ["--recorder-sample-rate", "16000"]
        if scenario == "idle" and keepalive_ms > 25_000:
            argv += ["--idle-timeout-ms", str(3 * keepalive_ms)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("COCHLEA_")}
        if kind == "cochlea-s3":
            argv += ["--recordings-url", "s3://bench/recordings"]
            env.update(AWS_ENDPOINT=s3_endpoint, AWS_ALLOW_HTTP="true", AWS_REGION="us-east-1",
                       AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
        pattern = r"cochlea listening on http://(\S+)"
    else:
        argv = [str(BASELINE), "--listen", "127.0.0.1:0"]
        env = None
        pattern = r"baseline_sink listening on http://(\S+)"
    child = Child(argv, tmp / f"{kind}.log", env=env)
    m = child.wait_line(pattern, 30)
    if not m:
        child.stop()
        raise RuntimeError(f"{kind} did not start; see {tmp / (kind + '.log')}")
    return child, m.group(1)


def loadgen_argv(addr, scenario, streams, duration_s, ramp_s, keepalive_ms, sinks):
    argv = [str(COCHLEA), "loadgen", "--url", f"ws://{addr}/v1/stream",
            "--connections", str(streams), "--duration-s", f"{duration_s:g}",
            "--ramp-s", f"{ramp_s:g}", "--sinks", sinks]
    if scenario == "pcm":
        argv += ["--encoding", "pcm_s16le", "--sample-rate", "16000",
                 "--input", str(FIXTURE)]
    elif scenario in ("opus", "webrtc"):
        argv += ["--encoding", "opus", "--sample-rate", "48000",
                 "--input", str(FIXTURE)]
        if scenario == "webrtc":
            # Two generator threads: 300 str0m peers' SRTP and DTLS would
            # otherwise make the generator, not the server, the bottleneck.
            argv += ["--transport", "webrtc", "--threads", "2"]
    else:
        argv += ["--idle", "--keepalive-ms", str(keepalive_ms)]
    return argv


def measure(kind, scenario, streams, duration_s, ramp_s, tmp, keepalive_ms, sinks):
    """One load against one server; returns the figures of the window."""
    moto, endpoint = start_moto(tmp) if kind == "cochlea-s3" else (None, None)
    if kind == "cochlea-websocket":
        # The webrtc scenario's comparison: the same Opus over the WebSocket.
        kind, scenario = "cochlea", "opus"
    server, addr = start_server(kind, tmp, scenario, max(streams, 5000) + 100, keepalive_ms,
                                endpoint)
    pid = server.proc.pid
    try:
        time.sleep(1.0)
        rss_before = status_kib(pid, "VmRSS")
        argv = loadgen_argv(addr, scenario, streams, duration_s, ramp_s, keepalive_ms, sinks)
        log(f"{scenario} against {kind}: {' '.join(Path(a).name if '/' in a else a for a in argv[1:])}")
        t_start = time.monotonic()
        gen = Child(argv, tmp / f"loadgen-{kind}.log")
        # Steady state: every stream started, and the first one (started at
        # t_start) still has until t_start + duration_s.
        started = gen.wait_line(r"^loadgen: all \d+ streams started", ramp_s + 30)
        if not started:
            log("not every stream started: measuring what is open")
        time.sleep(SETTLE_S)
        window_end = t_start + duration_s - 1.0
        if window_end - time.monotonic() < 2.0:
            raise RuntimeError("no steady-state window: raise --duration-s or lower --ramp-s")
        buckets0 = ingest_buckets(addr) if kind != "baseline" else None
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(window_end - t0)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        rss_load = status_kib(pid, "VmRSS")
        buckets1 = ingest_buckets(addr) if kind != "baseline" else None
        opens = [int(m.group(1)) for m in
                 (re.search(r"open\s+(\d+)/", line) for line in list(gen.lines)) if m]
        open_now = opens[-1] if opens else streams
        gen.wait(duration_s + ramp_s + LOADGEN_SLACK_S)
        report = None
        for line in reversed(gen.lines):
            if line.startswith("{"):
                report = json.loads(line)
                break
        if report is None:
            raise RuntimeError(f"loadgen printed no report; see {tmp}")
        window = t1 - t0
        result = {
            "server": kind,
            "scenario": scenario,
            "streams": streams,
            "open_in_window": open_now,
            "window_s": round(window, 2),
            "cpu_s": round(cpu1 - cpu0, 3),
            "core_share": (cpu1 - cpu0) / window,
            "rss_before_kib": rss_before,
            "rss_load_kib": rss_load,
            "peak_rss_kib": status_kib(pid, "VmHWM"),
            "rss_per_session_kib": (rss_load - rss_before) / max(open_now, 1),
            "loadgen": report,
        }
        if scenario != "idle":
            result["cpu_ms_per_stream_s"] = 1000 * (cpu1 - cpu0) / (window * max(open_now, 1))
        if buckets1 is not None:
            for q, name in ((0.5, "ingest_p50_ms"), (0.99, "ingest_p99_ms")):
                v = quantile(buckets0, buckets1, q)
                result[name] = None if v is None else 1000 * v
        return result
    finally:
        server.stop()
        if moto:
            moto.stop()


def scenario_runs(args, scenario, tmp_root):
    streams = {"pcm": args.streams, "opus": args.opus_streams, "webrtc": args.opus_streams,
               "idle": args.idle_sessions}[scenario]
    ramp = {"idle": args.idle_ramp_s}.get(scenario, args.ramp_s)
    duration = args.duration_s if scenario != "idle" else ramp + SETTLE_S + args.idle_window_s + 3
    results = {}
    kinds = {"idle": ["cochlea"], "webrtc": ["cochlea", "cochlea-websocket"]}.get(
        scenario, ["cochlea", "baseline"])
    if args.s3 and scenario != "idle":
        kinds.append("cochlea-s3")
    for kind in kinds:
        tmp = Path(tempfile.mkdtemp(prefix=f"loadbench-{scenario}-{kind}-", dir=tmp_root))
        try:
            results[kind] = measure(kind, scenario, streams, duration, ramp, tmp,
                                    args.keepalive_ms, args.sinks)
        finally:
            if args.keep:
                log(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    if "cochlea-websocket" in results:
        c, w = results["cochlea"], results["cochlea-websocket"]
        results["webrtc_over_websocket"] = c["cpu_ms_per_stream_s"] / w["cpu_ms_per_stream_s"] \
            if w["cpu_ms_per_stream_s"] > 0 else None
    if "baseline" in results:
        c, b = results["cochlea"], results["baseline"]
        results["cpu_ratio"] = c["cpu_ms_per_stream_s"] / b["cpu_ms_per_stream_s"] \
            if b["cpu_ms_per_stream_s"] > 0 else None
    if "cochlea-s3" in results:
        c, s3 = results["cochlea"], results["cochlea-s3"]
        results["s3_extra_cpu_ms_per_stream_s"] = s3["cpu_ms_per_stream_s"] - c["cpu_ms_per_stream_s"]
        results["s3_extra_rss_per_session_kib"] = s3["rss_per_session_kib"] - c["rss_per_session_kib"]
    return results


def fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def table(all_results):
    rows = ["| scenario | server | streams | window s | CPU ms per stream-s | core share | "
            "ingest p50 / p99 ms | RSS per session KiB | peak RSS MiB | frames sent / acked / lost | "
            "send lateness p99 ms | failures |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scenario, results in all_results.items():
        for kind in ("cochlea", "cochlea-websocket", "baseline", "cochlea-s3"):
            r = results.get(kind)
            if not r:
                continue
            lg = r["loadgen"]
            ingest = "—" if "ingest_p50_ms" not in r else \
                f"{fmt(r['ingest_p50_ms'], 3)} / {fmt(r['ingest_p99_ms'], 3)}"
            rows.append(
                f"| {scenario} | {kind} | {r['open_in_window']} | {r['window_s']:.0f} | "
                f"{fmt(r.get('cpu_ms_per_stream_s'), 3)} | {100 * r['core_share']:.1f} % | {ingest} | "
                f"{r['rss_per_session_kib']:.1f} | {r['peak_rss_kib'] / 1024:.0f} | "
                f"{lg['frames_sent']} / {lg['frames_acked']} / {lg['frames_lost']} | "
                f"{fmt(lg['lateness']['p99_ms'])} | {lg['failures']} |")
        if results.get("webrtc_over_websocket") is not None:
            rows.append(f"| {scenario} | **WebRTC ÷ WebSocket** | | | "
                        f"**{results['webrtc_over_websocket']:.2f}×** | | | | | | | |")
        if results.get("cpu_ratio") is not None:
            rows.append(f"| {scenario} | **ratio** | | | **{results['cpu_ratio']:.2f}×** | | | | | | | |")
        if results.get("s3_extra_cpu_ms_per_stream_s") is not None:
            rows.append(f"| {scenario} | **S3 adds** | | | **{results['s3_extra_cpu_ms_per_stream_s']:+.3f}** | | | "
                        f"**{results['s3_extra_rss_per_session_kib']:+.1f}** | | | | |")
    return "\n".join(rows)


def targets(all_results):
    """Each target of issue 9 with its measured value and whether it holds."""
    lines = []

    def check(name, value, ok):
        lines.append(f"- {'PASS' if ok else 'MISS'}: {name}: {value}")

    pcm = all_results.get("pcm")
    if pcm:
        c = pcm["cochlea"]
        lost = c["loadgen"]["frames_lost"] + c["loadgen"]["failures"]
        check("zero frames lost (lost + failed streams)", lost, lost == 0)
        p99 = c.get("ingest_p99_ms")
        check("p99 ingest latency <= 20 ms", f"{fmt(p99, 3)} ms", p99 is not None and p99 <= 20)
        ratio = pcm.get("cpu_ratio")
        check("server CPU per stream <= 1.3x baseline", f"{fmt(ratio)}x", ratio is not None and ratio <= 1.3)
        check("active session RSS <= 256 KiB", f"{c['rss_per_session_kib']:.1f} KiB",
              c["rss_per_session_kib"] <= 256)
    opus = all_results.get("opus")
    if opus:
        v = opus["cochlea"]["cpu_ms_per_stream_s"]
        check("Opus 48k->16k recorded <= 1.5 ms CPU per stream-second", f"{v:.3f} ms", v <= 1.5)
    idle = all_results.get("idle")
    if idle:
        c = idle["cochlea"]
        check(f"{c['open_in_window']} idle sessions < 2 % of a core", f"{100 * c['core_share']:.2f} %",
              c["core_share"] < 0.02)
        check("idle session RSS <= 64 KiB", f"{c['rss_per_session_kib']:.1f} KiB",
              c["rss_per_session_kib"] <= 64)
    return "\n".join(lines)


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return f"{os.cpu_count()} CPUs, {model}; load average before the run {load}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["pcm", "opus", "webrtc", "idle", "all"], default="all",
                   help="all runs pcm, opus and idle; webrtc runs on its own")
    p.add_argument("--streams", type=int, default=1000, help="PCM streams (default 1000)")
    p.add_argument("--opus-streams", type=int, default=300, help="Opus streams (default 300)")
    p.add_argument("--idle-sessions", type=int, default=5000, help="idle sessions (default 5000)")
    p.add_argument("--duration-s", type=float, default=30, help="seconds each stream sends (default 30)")
    p.add_argument("--ramp-s", type=float, default=10, help="stream start spread (default 10)")
    p.add_argument("--idle-ramp-s", type=float, default=10)
    p.add_argument("--idle-window-s", type=float, default=20)
    p.add_argument("--sinks", default="record",
                   help="the streams' sinks query value (default record; none: the "
                        "server's cost without recording, the targets assume record)")
    p.add_argument("--keepalive-ms", type=int, default=10_000,
                   help="idle sessions' keepalive interval (default 10000)")
    p.add_argument("--no-build", action="store_true", help="use the release binaries as they are")
    p.add_argument("--keep", action="store_true", help="keep temporary directories and logs")
    p.add_argument("--json", type=Path, help="also write all figures to this file")
    p.add_argument("--server-arg", action="append", default=[],
                   help="an extra `cochlea serve` argument (repeat it), e.g. "
                        "--server-arg=--recorder-format --server-arg=ogg_opus")
    p.add_argument("--s3", action="store_true",
                   help="also run cochlea recording into moto's S3 server (cochlea-s3), "
                        "and give what S3 adds per stream over local files")
    args = p.parse_args()
    SERVER_ARGS.extend(args.server_arg)

    if not args.no_build:
        log("building release binaries")
        subprocess.run(["cargo", "build", "--release", "--bin", "cochlea", "--example", "baseline_sink"],
                       cwd=ROOT, check=True)
    for binary in (COCHLEA, BASELINE):
        if not binary.exists():
            sys.exit(f"loadbench: {binary} missing (run without --no-build)")
    if not FIXTURE.exists():
        sys.exit(f"loadbench: fixture {FIXTURE} missing")

    print(f"machine: {machine()}")
    scenarios = ["pcm", "opus", "idle"] if args.scenario == "all" else [args.scenario]
    tmp_root = Path(tempfile.mkdtemp(prefix="loadbench-"))
    all_results = {}
    try:
        for scenario in scenarios:
            all_results[scenario] = scenario_runs(args, scenario, tmp_root)
    finally:
        if not args.keep:
            shutil.rmtree(tmp_root, ignore_errors=True)
    print(table(all_results))
    print()
    print(targets(all_results))
    if args.json:
        args.json.write_text(json.dumps(all_results, indent=2))
        log(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
