"""WHIP end to end with an independent WebRTC stack: aiortc against `cochlea serve`.

    python=$(scripts/aiortc-venv.sh) && "$python" tests/e2e/whip_aiortc.py

(scripts/test.sh runs it so; it needs the venv of scripts/aiortc-venv.sh:
aiortc, PyAV and numpy.) It starts the server itself (env COCHLEA_BIN, else
target/debug/cochlea) on 127.0.0.1 with port 0, in a temporary recordings
directory, and plays samples/audio/speaker-16k.wav as the microphone of an
aiortc peer connection (MediaPlayer: PyAV decodes the WAV, resamples it to
48 kHz, and aiortc sends it as Opus in real time; a sendonly transceiver, as
WHIP clients offer), with a data channel named `cochlea-events`. The offer
(all candidates gathered, no trickle) goes to
`POST /v1/whip?sinks=record`; once the file has been played, `DELETE` on the
answer's Location ends the session. Checks:

  * 201 with a Location under /v1/whip/;
  * the events on the data channel: `started` (opus, 48000 Hz), no `ack`,
    no `error`, a `stats` whose webrtc.packets_received > 0, a `recording`,
    and `closed` with reason "stop" after the DELETE;
  * the recording (`recording.path`, on this machine's disk): 16 kHz, within
    0.5 s of the source's duration, and its normalized cross-correlation at
    the best lag (within +-0.5 s) >= 0.95 with the source as the encoder saw
    it: aiortc encodes in libopus' VoIP mode, whose 60 Hz high-pass shifts
    the phase of a voice's fundamental (0.93 against the raw source, 0.999
    against the filtered one, for libopus alone); and >= 0.99 with the
    source through aiortc's Opus encoder and libopus' decoder locally (1.0
    when the server decoded every packet in place).

Loopback only: the ICE agent gathers 127.0.0.1 alone (aioice leaves loopback
out by itself) and no STUN server is used (aiortc's default is a public one).
Every wait is bounded, and the server is killed at the end. The figures are
printed on stdout; the exit status is non-zero on failure.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
from typing import List, Optional, Tuple

import av
import numpy as np

import aioice.ice
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs.opus import OpusEncoder
from aiortc.contrib.media import MediaPlayer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCE = os.path.join(ROOT, "samples", "audio", "speaker-16k.wav")
COCHLEA = os.environ.get("COCHLEA_BIN") or os.path.join(ROOT, "target", "debug", "cochlea")

RECORD_RATE = 16000
MIN_CORRELATION = 0.95
MIN_ROUND_TRIP_CORRELATION = 0.99
MAX_DURATION_ERROR_S = 0.5
MAX_LAG_S = 0.5
START_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
CLOSED_TIMEOUT_S = 10.0
TEST_TIMEOUT_S = 90.0

# Loopback only: host candidates on 127.0.0.1 alone. aioice gathers every
# interface's address but 127.0.0.1; the server offers 127.0.0.1.
aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []


def read_wav(path: str) -> Tuple[np.ndarray, int, int]:
    """(samples as float64 in [-1, 1], mono mix; rate; channels) of a PCM16
    or float32 WAV (plain or WAVE_FORMAT_EXTENSIBLE)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a WAV file")
    pos, fmt, pcm = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            tag, channels, rate = struct.unpack("<HHI", body[:8])
            bits = struct.unpack("<H", body[14:16])[0]
            if tag == 0xFFFE and len(body) >= 26:
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            pcm = body
            break
        pos += 8 + size + (size & 1)
    if fmt is None or pcm is None:
        raise ValueError(f"{path}: no fmt or data chunk")
    tag, channels, rate, bits = fmt
    if tag == 1 and bits == 16:
        samples = np.frombuffer(pcm[:len(pcm) // 2 * 2], dtype="<i2").astype(np.float64) / 32768.0
    elif tag == 3 and bits == 32:
        samples = np.frombuffer(pcm[:len(pcm) // 4 * 4], dtype="<f4").astype(np.float64)
    else:
        raise ValueError(f"{path}: format tag {tag} with {bits} bits is not handled here")
    frames = len(samples) // channels
    samples = samples[:frames * channels].reshape(frames, channels).mean(axis=1)
    return samples, rate, channels


def voip_high_pass(samples: np.ndarray, rate: int) -> np.ndarray:
    """The high-pass libopus applies in its VoIP application: a second-order
    Butterworth biquad at 60 Hz (as tests/integration/signal.rs)."""
    w0 = 2 * math.pi * 60.0 / rate
    alpha = math.sin(w0) / (2 * math.sqrt(0.5))
    cos = math.cos(w0)
    a0 = 1 + alpha
    b0, b1, b2 = (1 + cos) / 2 / a0, -(1 + cos) / a0, (1 + cos) / 2 / a0
    a1, a2 = -2 * cos / a0, (1 - alpha) / a0
    out = np.empty(len(samples))
    x1 = x2 = y1 = y2 = 0.0
    for i, x in enumerate(samples.astype(np.float64)):
        y = b0 * x + b1 * x1 + b2 * x2 - a1 * y1 - a2 * y2
        x2, x1, y2, y1 = x1, x, y1, y
        out[i] = y
    return out


def best_lag_correlation(source: np.ndarray, recording: np.ndarray, max_lag: int) -> Tuple[float, int]:
    """(normalized cross-correlation, lag in samples) at the lag in
    [-max_lag, max_lag] where it is highest; lag > 0: the recording is late.

    ncc(L) = sum x[i] y[i+L] / sqrt(sum x[i]^2 * sum y[i+L]^2), the sums over
    the samples where both exist."""
    x, y = source, recording
    nx, ny = len(x), len(y)
    n = 1 << (nx + ny).bit_length()
    raw = np.fft.irfft(np.fft.rfft(y, n) * np.conj(np.fft.rfft(x, n)), n)  # raw[L] = sum x[i] y[i+L]
    cx = np.concatenate(([0.0], np.cumsum(x * x)))
    cy = np.concatenate(([0.0], np.cumsum(y * y)))
    best, best_lag = -2.0, 0
    for lag in range(-max_lag, max_lag + 1):
        lo = max(0, -lag)            # first i with both x[i] and y[i+lag]
        hi = min(nx, ny - lag)       # one past the last
        if hi - lo < RECORD_RATE // 10:
            continue
        ex = cx[hi] - cx[lo]
        ey = cy[hi + lag] - cy[lo + lag]
        if ex <= 0 or ey <= 0:
            continue
        ncc = raw[lag % n] / np.sqrt(ex * ey)
        if ncc > best:
            best, best_lag = float(ncc), lag
    return best, best_lag


def local_opus_round_trip(source: np.ndarray, rate: int) -> np.ndarray:
    """SOURCE through aiortc's own Opus encoder (the sender's settings: 48 kHz
    stereo, 96 kb/s, application voip) and libopus' decoder (mono), back at
    RATE, here without any network or server: the best a recording can match
    the source, since Opus in voip mode does not keep the waveform exactly."""
    encoder = OpusEncoder()
    decoder = av.CodecContext.create("libopus", "r")
    decoder.format = "s16"
    decoder.layout = "mono"
    decoder.sample_rate = 48000
    down = av.AudioResampler(format="s16", layout="mono", rate=rate)
    pcm = np.clip(np.round(source * 32768.0), -32768, 32767).astype(np.int16)
    out: List[np.ndarray] = []
    step = rate // 50  # 20 ms, as MediaPlayer hands them on
    for i in range(0, len(pcm), step):
        frame = av.AudioFrame.from_ndarray(pcm[i:i + step].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = i
        payloads, _ = encoder.encode(frame)
        for payload in payloads:
            for decoded in decoder.decode(av.Packet(payload)):
                out += [f.to_ndarray().reshape(-1) for f in down.resample(decoded)]
    out += [f.to_ndarray().reshape(-1) for f in down.resample(None)]
    return np.concatenate(out).astype(np.float64) / 32768.0


class Server:
    """`cochlea serve` on 127.0.0.1, port 0; killed by stop()."""

    def __init__(self, recordings: str, log_path: str) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [COCHLEA, "serve", "--listen", "127.0.0.1:0", "--recordings-dir", recordings,
             "--recorder-sample-rate", str(RECORD_RATE), "--stats-interval-ms", "1000"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log)
        try:
            self.base = self._wait_for_address()
        except BaseException:
            self.stop()
            raise

    def _wait_for_address(self) -> str:
        prefix = "cochlea listening on "
        found: List[str] = []

        def read() -> None:  # drains stdout until the process exits
            assert self.proc.stdout is not None
            try:
                for raw in self.proc.stdout:
                    line = raw.decode(errors="replace").strip()
                    if line.startswith(prefix) and not found:
                        found.append(line[len(prefix):])
            except (OSError, ValueError):  # closed by stop()
                pass

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not found:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cochlea exited with {self.proc.returncode} before listening:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"cochlea did not print '{prefix}...' in {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)
        return found[0].rstrip("/")

    def log_tail(self, lines: int = 40) -> str:
        self.log.flush()
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def http_request(method: str, url: str, body: Optional[bytes] = None,
                 content_type: Optional[str] = None) -> Tuple[int, "http.client.HTTPMessage", bytes]:
    """(status, headers (case-insensitive get), body) of one request."""
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def whip_session(base: str, source_duration: float) -> dict:
    """One WHIP session playing SOURCE; returns what the checks need."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    player = MediaPlayer(SOURCE)
    events: List[dict] = []
    bad_messages: List[str] = []
    states: List[str] = []
    result: dict = {"events": events, "bad_messages": bad_messages, "states": states}
    try:
        assert player.audio is not None, f"MediaPlayer found no audio in {SOURCE}"
        # sendonly, as WHIP clients offer (RFC 9725); the server answers recvonly.
        pc.addTransceiver(player.audio, direction="sendonly")
        channel = pc.createDataChannel("cochlea-events")

        @channel.on("message")
        def on_message(message) -> None:
            try:
                event = json.loads(message)
            except (TypeError, ValueError):
                bad_messages.append(repr(message)[:200])
                return
            events.append(event)

        @pc.on("connectionstatechange")
        def on_state() -> None:
            states.append(pc.connectionState)

        track_ended = asyncio.Event()
        player.audio.on("ended", track_ended.set)

        # aiortc gathers every candidate before setLocalDescription returns.
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        result["offer"] = offer
        status, headers, body = await asyncio.to_thread(
            http_request, "POST", f"{base}/v1/whip?sinks=record", offer.encode(), "application/sdp")
        result["post_status"] = status
        result["location"] = headers.get("Location")
        if status != 201:
            raise AssertionError(f"POST /v1/whip answered {status}: {body[:500]!r}")
        answer = body.decode()
        result["answer"] = answer
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

        await wait_until(lambda: pc.connectionState in ("connected", "failed", "closed"),
                         CONNECT_TIMEOUT_S, "the peer connection to connect")
        if pc.connectionState != "connected":
            raise AssertionError(f"peer connection {pc.connectionState} (states: {states})")
        connected_at = time.monotonic()

        # The sender pulls frames in real time from here on; the track ends
        # after the file's last frame. Then a second for the last packets.
        try:
            await asyncio.wait_for(track_ended.wait(), source_duration + 5.0)
        except asyncio.TimeoutError:
            raise AssertionError(f"the source did not finish playing in {source_duration + 5.0:.1f} s")
        await asyncio.sleep(1.0)
        result["played_s"] = time.monotonic() - connected_at

        status, _, body = await asyncio.to_thread(http_request, "DELETE", f"{base}{result['location']}")
        result["delete_status"] = status
        if status != 200:
            raise AssertionError(f"DELETE {result['location']} answered {status}: {body[:500]!r}")
        await wait_until(lambda: any(e.get("type") == "closed" for e in events),
                         CLOSED_TIMEOUT_S, "`closed` on the data channel")
        # A moment for anything sent after `closed` (there should be nothing).
        await asyncio.sleep(0.2)
        return result
    finally:
        if player.audio is not None:
            player.audio.stop()
        await asyncio.wait_for(pc.close(), 10.0)


class WhipAiortcTest(unittest.TestCase):
    def setUp(self) -> None:
        if not os.access(COCHLEA, os.X_OK):
            self.fail(f"no server binary at {COCHLEA} (build it, or set COCHLEA_BIN)")
        self.work = tempfile.mkdtemp(prefix="cochlea-whip-aiortc-")
        self.addCleanup(shutil.rmtree, self.work, ignore_errors=True)
        self.server = Server(os.path.join(self.work, "recordings"), os.path.join(self.work, "cochlea.log"))

    def tearDown(self) -> None:
        self.server.stop()

    def test_whip_session_records_what_aiortc_sent(self) -> None:
        try:
            self.check_session()
        except BaseException:
            print(f"cochlea log tail:\n{self.server.log_tail()}", file=sys.stderr)
            raise

    def check_session(self) -> None:
        source, source_rate, _ = read_wav(SOURCE)
        self.assertEqual(source_rate, RECORD_RATE, f"{SOURCE} should be 16 kHz")
        source_duration = len(source) / source_rate
        r = asyncio.run(asyncio.wait_for(whip_session(self.server.base, source_duration), TEST_TIMEOUT_S))
        events = r["events"]
        kinds = [e.get("type") for e in events]
        print(f"whip: Location {r['location']}; events on cochlea-events: {kinds}")

        self.assertEqual(r["post_status"], 201)
        self.assertTrue(r["location"] and r["location"].startswith("/v1/whip/"), f"Location {r['location']!r}")
        self.assertEqual(r["bad_messages"], [], "data channel messages that are not JSON")
        self.assertNotIn("ack", kinds, "no `ack` is sent to a WHIP peer")
        self.assertNotIn("error", kinds, f"error events: {[e for e in events if e.get('type') == 'error']}")

        started = [e for e in events if e.get("type") == "started"]
        self.assertEqual(len(started), 1, f"one `started` expected: {kinds}")
        fmt = started[0].get("format", {})
        self.assertEqual(fmt.get("encoding"), "opus", f"started: {started[0]}")
        self.assertEqual(fmt.get("sample_rate"), 48000, f"started: {started[0]}")
        self.assertIn(fmt.get("channels"), (1, 2), f"started: {started[0]}")
        if "stereo=1" not in r["offer"]:
            self.assertEqual(fmt.get("channels"), 1, "mono unless the offer's Opus fmtp has stereo=1")

        stats = [e for e in events if e.get("type") == "stats"]
        received = [((e.get("webrtc") or {}).get("packets_received") or 0) for e in stats]
        print(f"whip: {len(stats)} stats, webrtc.packets_received {received}; last webrtc {stats[-1].get('webrtc') if stats else None}")
        self.assertTrue(any(n > 0 for n in received), f"no stats with webrtc.packets_received > 0: {stats}")

        closed = [e for e in events if e.get("type") == "closed"]
        self.assertEqual(closed[0].get("reason"), "stop", f"closed: {closed[0]}")
        self.assertEqual(kinds[-1], "closed", "nothing comes after `closed`")

        recordings = [e for e in events if e.get("type") == "recording"]
        self.assertEqual(len(recordings), 1, f"one `recording` expected: {kinds}")
        rec = recordings[0]
        self.assertLess(kinds.index("recording"), kinds.index("closed"), "`recording` comes before `closed`")
        path = rec.get("path")
        self.assertTrue(path and os.path.isfile(path), f"recording.path {path!r} is not a file")
        recorded, rate, channels = read_wav(path)
        duration = len(recorded) / rate
        print(f"whip: source {source_duration:.3f} s; recording {path}: {rate} Hz, {channels} ch, "
              f"{duration:.3f} s (event: duration_seconds {rec.get('duration_seconds')}, "
              f"sample_rate {rec.get('sample_rate')}, channels {rec.get('channels')}); "
              f"played for {r['played_s']:.2f} s")
        self.assertEqual(rate, RECORD_RATE)
        self.assertEqual(rec.get("sample_rate"), RECORD_RATE)
        self.assertEqual(rec.get("channels"), channels)
        self.assertLessEqual(abs(duration - source_duration), MAX_DURATION_ERROR_S,
                             f"recording {duration:.3f} s, source {source_duration:.3f} s")

        correlation, lag = best_lag_correlation(voip_high_pass(source, RECORD_RATE), recorded,
                                                int(MAX_LAG_S * RECORD_RATE))
        print(f"whip: normalized cross-correlation {correlation:.4f} at lag {lag} samples "
              f"({lag / RECORD_RATE * 1000:.1f} ms; >= {MIN_CORRELATION} required)")
        # How far the codec alone gets (no network, no server), and how close
        # the recording is to that.
        reference = local_opus_round_trip(source, RECORD_RATE)
        ceiling, ceiling_lag = best_lag_correlation(source, reference, int(MAX_LAG_S * RECORD_RATE))
        faithful, faithful_lag = best_lag_correlation(reference, recorded, int(MAX_LAG_S * RECORD_RATE))
        print(f"whip: for reference, the source through aiortc's Opus encoder and back locally: "
              f"{ceiling:.4f} at lag {ceiling_lag} (the codec's ceiling); the recording against that "
              f"local round trip: {faithful:.4f} at lag {faithful_lag}")
        self.assertGreaterEqual(correlation, MIN_CORRELATION,
                                f"the recording does not match the source (best lag {lag} samples)")
        self.assertGreaterEqual(faithful, MIN_ROUND_TRIP_CORRELATION,
                                "the recording differs from the same packets decoded locally")


if __name__ == "__main__":
    unittest.main()
