#!/usr/bin/env python3
"""A small OpenAI-compatible speech-to-text server over pocketsphinx.

For trying cochlea's transcription without a cloud account, and for its
end-to-end tests. Python standard library plus the `pocketsphinx` package,
whose wheel ships the en-us model (nothing is downloaded at run time).

Endpoints
  POST /v1/audio/transcriptions   multipart/form-data, as OpenAI's API:
        file             a WAV file (required): PCM 8/16/24/32-bit, float32,
                         G.711 mu-law or A-law; any rate from 4 to 192 kHz and
                         any channel count. Channels are averaged to mono and
                         the rate is converted to 16 kHz (a windowed-sinc
                         resampler; 16 kHz mono 16-bit needs no conversion).
        model            accepted and echoed in verbose_json, otherwise ignored
        language         optional; only English ("en", "en-US", "english")
        prompt, temperature, timestamp_granularities[]: accepted, ignored
        response_format  json (default) -> {"text": ...}; text -> plain text;
                         verbose_json -> adds task, language, duration, model,
                         segments and words (word times in seconds)
  POST /webhook   the same engine for cochlea's `webhook` backend: a JSON body
        {"audio_base64": "<base64 WAV>", ...any metadata...} (or "audio"), or
        a raw WAV body (Content-Type audio/wav, audio/x-wav, audio/wave or
        application/octet-stream). Replies {"text": ..., "duration": ...}.
  GET /health     {"status": "ok", "workers": n, "busy": k}

Errors are OpenAI-style JSON, {"error": {"message", "type", "param", "code"}},
with 400 (bad input), 401 (wrong API key), 404, 405, 411, 413 (body larger
than --max-bytes), 415 (not a WAV), or 503 (no decoder free within
--queue-timeout-s). Every transcription reply carries the header
`openai-processing-ms` (the time spent decoding, as hosted providers report
it), so a client can subtract the engine's own time from its latency.

pocketsphinx decoders are not thread-safe, and its binding holds the GIL
while decoding: the server runs --workers processes with one decoder each
(a request waits for a free one), and HTTP in threads of the main process.

Run: python stt_server.py --host 127.0.0.1 --port 0 --workers 2
It prints `listening on http://HOST:PORT` on stdout once the decoders are
loaded and the socket is bound.
"""

from __future__ import annotations

import argparse
import array
import base64
import binascii
import email.message
import email.parser
import email.policy
import email.utils
import hmac
import http.server
import json
import math
import multiprocessing
import operator
import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

TARGET_RATE_HZ = 16000
DEFAULT_MAX_BYTES = 25 * 1024 * 1024  # OpenAI's own upload limit
# A body over the limit but at most this many times it is read and dropped
# before the 413; a larger one gets the 413 and the connection is closed.
DRAIN_FACTOR = 4
RESPONSE_FORMATS = ("json", "text", "verbose_json")
ENGLISH = {"en", "en-us", "en_us", "english", "eng"}
WEBHOOK_WAV_TYPES = {"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "application/octet-stream"}


class RequestError(Exception):
    """A client error, answered as OpenAI-style JSON with this status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type


# --------------------------------------------------------------------------
# WAV reading

class Audio(NamedTuple):
    pcm16k: bytes        # 16 kHz mono signed 16-bit little-endian
    duration_s: float    # of the input, before any conversion
    rate_hz: int         # of the input
    channels: int        # of the input


FORMAT_PCM = 0x0001
FORMAT_FLOAT = 0x0003
FORMAT_ALAW = 0x0006
FORMAT_MULAW = 0x0007
FORMAT_EXTENSIBLE = 0xFFFE


def _mulaw_table() -> List[int]:
    table = []
    for byte in range(256):
        u = ~byte & 0xFF
        magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
        table.append(0x84 - magnitude if u & 0x80 else magnitude - 0x84)
    return table


def _alaw_table() -> List[int]:
    table = []
    for byte in range(256):
        a = byte ^ 0x55
        exponent = (a & 0x70) >> 4
        mantissa = a & 0x0F
        if exponent == 0:
            magnitude = (mantissa << 4) + 8
        else:
            magnitude = ((mantissa << 4) + 0x108) << (exponent - 1)
        table.append(magnitude if a & 0x80 else -magnitude)
    return table


MULAW = _mulaw_table()
ALAW = _alaw_table()


def read_wav(data: bytes) -> Audio:
    """Parses a RIFF/WAVE file and returns 16 kHz mono 16-bit PCM.

    Lenient where streaming writers are: a RIFF or data size of 0 or
    0xFFFFFFFF, or one larger than the file, means "up to the end of the
    file" (whole frames only).
    """
    if len(data) < 12 or data[0:4] != b"RIFF" or data[8:12] != b"WAVE":
        if data[0:4] == b"RIFX":
            raise RequestError(400, "big-endian WAV (RIFX) is not supported", "file")
        raise RequestError(415, "file is not a WAV (RIFF/WAVE) file; only WAV is supported", "file",
                           code="unsupported_format")
    pos = 12
    fmt: Optional[Tuple[int, int, int, int, int]] = None
    samples: Optional[bytes] = None
    while pos + 8 <= len(data):
        chunk_id = data[pos:pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body_start = pos + 8
        if chunk_id == b"data":
            end = len(data) if size in (0, 0xFFFFFFFF) or body_start + size > len(data) else body_start + size
            samples = data[body_start:end]
            break
        if body_start + size > len(data):
            raise RequestError(400, f"WAV chunk {chunk_id!r} is truncated", "file")
        if chunk_id == b"fmt ":
            if size < 16:
                raise RequestError(400, "WAV fmt chunk is shorter than 16 bytes", "file")
            tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", data, body_start)
            if tag == FORMAT_EXTENSIBLE:
                if size < 40:
                    raise RequestError(400, "WAV extensible fmt chunk is shorter than 40 bytes", "file")
                # The sub-format GUID starts with the plain format tag.
                (tag,) = struct.unpack_from("<H", data, body_start + 24)
            fmt = (tag, channels, rate, block_align, bits)
        pos = body_start + size + (size & 1)  # chunks are padded to even sizes
    if fmt is None:
        raise RequestError(400, "WAV file has no fmt chunk (or it comes after the data chunk)", "file")
    if samples is None:
        raise RequestError(400, "WAV file has no data chunk", "file")
    tag, channels, rate, block_align, bits = fmt
    if channels < 1 or channels > 32:
        raise RequestError(400, f"WAV channel count {channels} is not supported (1 to 32)", "file")
    if rate < 4000 or rate > 192000:
        raise RequestError(400, f"WAV sample rate {rate} Hz is not supported (4000 to 192000 Hz)", "file")
    supported = {
        (FORMAT_PCM, 8), (FORMAT_PCM, 16), (FORMAT_PCM, 24), (FORMAT_PCM, 32),
        (FORMAT_FLOAT, 32), (FORMAT_ALAW, 8), (FORMAT_MULAW, 8),
    }
    if (tag, bits) not in supported:
        raise RequestError(400, f"WAV format tag {tag:#06x} with {bits} bits per sample is not supported "
                                "(PCM 8/16/24/32-bit, float 32-bit, mu-law, A-law)", "file")
    bytes_per_sample = bits // 8
    if block_align != bytes_per_sample * channels:
        raise RequestError(400, f"WAV block align {block_align} does not match {channels} channel(s) "
                                f"of {bits} bits", "file")
    frames = len(samples) // block_align
    if frames == 0:
        raise RequestError(400, "WAV file has no audio samples", "file")
    samples = samples[:frames * block_align]
    duration_s = frames / rate

    if tag == FORMAT_PCM and bits == 16 and channels == 1 and rate == TARGET_RATE_HZ:
        # Already what the decoder takes: no copy through Python numbers.
        pcm = array.array("h")
        pcm.frombytes(samples)
        if sys.byteorder == "big":
            pcm.byteswap()
            return Audio(pcm.tobytes(), duration_s, rate, channels)
        return Audio(samples, duration_s, rate, channels)

    values = _decode_samples(samples, tag, bits)
    mono = _downmix(values, channels)
    if rate != TARGET_RATE_HZ:
        mono = resample(mono, rate, TARGET_RATE_HZ)
    return Audio(_to_s16le(mono), duration_s, rate, channels)


def _decode_samples(samples: bytes, tag: int, bits: int) -> Sequence[float]:
    """Interleaved samples as numbers on the 16-bit scale (-32768..32767)."""
    if tag == FORMAT_MULAW:
        return [MULAW[b] for b in samples]
    if tag == FORMAT_ALAW:
        return [ALAW[b] for b in samples]
    if tag == FORMAT_FLOAT:
        values = array.array("f")
        values.frombytes(samples)
        if sys.byteorder == "big":
            values.byteswap()
        # NaN or infinity would poison the resampler: treat them as silence.
        return [v * 32768.0 if math.isfinite(v) else 0.0 for v in values]
    if bits == 8:  # unsigned, centred on 128
        return [(b - 128) * 256 for b in samples]
    if bits == 16:
        values16 = array.array("h")
        values16.frombytes(samples)
        if sys.byteorder == "big":
            values16.byteswap()
        return values16
    if bits == 24:
        return [int.from_bytes(samples[i:i + 3], "little", signed=True) / 256.0
                for i in range(0, len(samples), 3)]
    values32 = array.array("i" if array.array("i").itemsize == 4 else "l")
    values32.frombytes(samples)
    if sys.byteorder == "big":
        values32.byteswap()
    return [v / 65536.0 for v in values32]


def _downmix(values: Sequence[float], channels: int) -> Sequence[float]:
    if channels == 1:
        return values
    if channels == 2:
        return [(a + b) * 0.5 for a, b in zip(values[0::2], values[1::2])]
    scale = 1.0 / channels
    return [sum(frame) * scale for frame in zip(*(values[c::channels] for c in range(channels)))]


def _to_s16le(values: Sequence[float]) -> bytes:
    pcm = array.array("h", (
        32767 if v >= 32767 else -32768 if v <= -32768 else int(round(v)) for v in values
    ))
    if sys.byteorder == "big":
        pcm.byteswap()
    return pcm.tobytes()


_RESAMPLE_TABLES: Dict[Tuple[int, int], Tuple[int, List[List[float]]]] = {}
_RESAMPLE_LOCK = threading.Lock()
RESAMPLE_PHASES = 256
RESAMPLE_ZERO_CROSSINGS = 8
RESAMPLE_ROLLOFF = 0.92


def _resample_tables(rate_in: int, rate_out: int) -> Tuple[int, List[List[float]]]:
    """Hann-windowed sinc low-pass, tabulated at RESAMPLE_PHASES+1 offsets."""
    key = (rate_in, rate_out)
    with _RESAMPLE_LOCK:
        cached = _RESAMPLE_TABLES.get(key)
        if cached is not None:
            return cached
    # Cut-off below the lower Nyquist frequency, in cycles per input sample.
    cutoff = 0.5 * min(rate_in, rate_out) * RESAMPLE_ROLLOFF / rate_in
    half = int(math.ceil(RESAMPLE_ZERO_CROSSINGS / (2.0 * cutoff)))
    tables = []
    for phase in range(RESAMPLE_PHASES + 1):
        frac = phase / RESAMPLE_PHASES
        taps = []
        for k in range(-half + 1, half + 1):
            x = k - frac
            u = 2.0 * cutoff * x
            sinc = 1.0 if u == 0.0 else math.sin(math.pi * u) / (math.pi * u)
            w = x / half
            window = 0.5 + 0.5 * math.cos(math.pi * w) if abs(w) < 1.0 else 0.0
            taps.append(2.0 * cutoff * sinc * window)
        tables.append(taps)
    with _RESAMPLE_LOCK:
        _RESAMPLE_TABLES[key] = (half, tables)
    return half, tables


def resample(values: Sequence[float], rate_in: int, rate_out: int) -> List[float]:
    """Band-limited sample-rate conversion (windowed sinc, 8 zero crossings).

    Pure Python: about 0.4 s for 15 s of 8 kHz audio to 16 kHz on one core.
    Good enough for a reference server whose usual input needs none.
    """
    if rate_in == rate_out:
        return list(values)
    half, tables = _resample_tables(rate_in, rate_out)
    padded = [0.0] * half + list(values) + [0.0] * (half + 1)
    n_out = len(values) * rate_out // rate_in
    step = rate_in / rate_out
    mul = operator.mul
    out = [0.0] * n_out
    width = 2 * half
    for k in range(n_out):
        t = k * step
        i = int(t)
        taps = tables[int(round((t - i) * RESAMPLE_PHASES))]
        # Input sample i+j (j = -half+1..half) sits at padded[i+j+half].
        out[k] = sum(map(mul, taps, padded[i + 1:i + 1 + width]))
    return out


# --------------------------------------------------------------------------
# multipart/form-data

class Part(NamedTuple):
    name: str
    filename: Optional[str]
    content_type: Optional[str]
    data: bytes


def parse_multipart(body: bytes, content_type: str) -> Dict[str, Part]:
    """Fields of a multipart/form-data body by name (the first of each name).

    RFC 7578 / RFC 2046: the boundary comes from the Content-Type; each
    delimiter is CRLF "--" boundary (the first may open the body); part
    headers end at the first empty line; the close delimiter has "--" after
    the boundary. Binary content is returned byte for byte.
    """
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_boundary()
    if not boundary:
        raise RequestError(400, "multipart/form-data Content-Type has no boundary parameter")
    if len(boundary) > 200:
        raise RequestError(400, "multipart boundary is longer than 200 characters")
    delimiter = b"--" + boundary.encode("latin-1")
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        found = body.find(b"\r\n" + delimiter)
        if found < 0:
            raise RequestError(400, "malformed multipart body: the boundary never occurs")
        pos = found + 2 + len(delimiter)
    parts: Dict[str, Part] = {}
    header_parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    while True:
        if body[pos:pos + 2] == b"--":
            return parts  # close delimiter; anything after it is epilogue
        # Transport padding (RFC 2046) may follow a delimiter before its CRLF.
        while body[pos:pos + 1] in (b" ", b"\t"):
            pos += 1
        if body[pos:pos + 2] != b"\r\n":
            raise RequestError(400, "malformed multipart body: a boundary is not followed by CRLF")
        start = pos + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise RequestError(400, "malformed multipart body: no closing boundary")
        part = body[start:end]
        if part.startswith(b"\r\n"):
            head, content = b"", part[2:]
        else:
            split = part.find(b"\r\n\r\n")
            if split < 0:
                raise RequestError(400, "malformed multipart body: a part's headers do not end")
            head, content = part[:split], part[split + 4:]
        headers = header_parser.parsebytes(head + b"\r\n\r\n")
        disposition = headers.get("content-disposition")
        if disposition is None or headers.get_content_disposition() != "form-data":
            raise RequestError(400, "malformed multipart body: a part has no Content-Disposition: form-data")
        name = headers.get_param("name", header="content-disposition")
        if isinstance(name, tuple):  # RFC 2231 encoded
            name = email.utils.collapse_rfc2231_value(name)
        if not name:
            raise RequestError(400, "malformed multipart body: a part has no name")
        if name not in parts:
            parts[name] = Part(name, headers.get_filename(), headers.get("content-type"), content)
        pos = end + 2 + len(delimiter)


# --------------------------------------------------------------------------
# The engine

def make_decoder():
    """One pocketsphinx decoder with the settings the tests also use.

    The en-us model that ships with the package, at 16 kHz; the defaults
    otherwise (no dither, so results are repeatable).
    """
    from pocketsphinx import Decoder  # imported here so --help works without it

    return Decoder(samprate=TARGET_RATE_HZ, loglevel="ERROR")


class Transcript(NamedTuple):
    text: str
    words: List[Dict[str, object]]
    decode_s: float
    cpu_s: float


def transcribe(decoder, pcm16k: bytes) -> Transcript:
    """Decodes one utterance of 16 kHz mono s16le PCM as a whole."""
    started = time.perf_counter()
    cpu_started = time.thread_time()
    # Feature state (the cepstral mean, among others) carries over from one
    # utterance to the next in a decoder, so the same audio could decode
    # differently depending on what the thread decoded before. Resetting it
    # (microseconds) makes each request depend on its own audio alone.
    decoder.reinit_feat()
    decoder.start_utt()
    try:
        decoder.process_raw(pcm16k, no_search=False, full_utt=True)
    finally:
        decoder.end_utt()
    hyp = decoder.hyp()
    text = hyp.hypstr if hyp is not None else ""
    frame_rate = float(decoder.config["frate"])
    words = []
    # seg() is None, not empty, when nothing was recognized (e.g. silence).
    for seg in (decoder.seg() or []) if hyp is not None else []:
        word = seg.word
        # Fillers and sentence markers are not words: <s>, </s>, <sil>, [NOISE].
        if word.startswith(("<", "[", "+")):
            continue
        if word.endswith(")") and "(" in word:  # alternate pronunciation: the(2)
            word = word[:word.rindex("(")]
        words.append({
            "word": word,
            "start": round(seg.start_frame / frame_rate, 2),
            "end": round((seg.end_frame + 1) / frame_rate, 2),
        })
    return Transcript(text, words, time.perf_counter() - started, time.thread_time() - cpu_started)


# One decoder per worker process, made by _worker_init.
_WORKER_DECODER = None


def _worker_init() -> None:
    global _WORKER_DECODER
    _WORKER_DECODER = make_decoder()


def _worker_transcribe(pcm16k: bytes) -> Tuple[str, List[Dict[str, object]], float, float]:
    # A plain tuple crosses the process boundary without naming this module.
    return tuple(transcribe(_WORKER_DECODER, pcm16k))  # type: ignore[return-value]


class DecoderPool:
    """--workers processes, each with its own decoder.

    Processes rather than threads: pocketsphinx's Python binding holds the
    GIL for the whole of process_raw (measured: a Python thread barely runs
    during a decode), so decoders in threads of one process decode one at a
    time and also stall the HTTP threads. A semaphore admits at most
    --workers decodes at once, so a request that cannot start within
    --queue-timeout-s gets a 503 instead of waiting in an unbounded queue.
    """

    def __init__(self, workers: int, decode_timeout_s: float):
        self.size = workers
        self.decode_timeout_s = decode_timeout_s
        self._slots = threading.BoundedSemaphore(workers)
        self._busy = 0
        self._lock = threading.Lock()
        # spawn: the children start clean rather than as forks of a process
        # that may already run threads. Pool starts every worker now, so the
        # model is loaded before the server says it is listening.
        self._pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)
        # Wait until each worker has its decoder (0.1 s of silence each).
        for pending in [self._pool.apply_async(_worker_transcribe, (b"\0\0" * 1600,)) for _ in range(workers)]:
            pending.get(timeout=120)

    def busy(self) -> int:
        with self._lock:
            return self._busy

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def run(self, pcm16k: bytes, timeout_s: float) -> Transcript:
        if not self._slots.acquire(timeout=timeout_s):
            raise RequestError(503, f"all {self.size} decoders stayed busy for {timeout_s} s; retry later",
                               code="server_busy", error_type="server_error")
        with self._lock:
            self._busy += 1
        try:
            # Generous: a decode takes about a quarter of the audio's length.
            limit_s = self.decode_timeout_s + len(pcm16k) / (2 * TARGET_RATE_HZ)
            try:
                text, words, decode_s, cpu_s = self._pool.apply_async(_worker_transcribe, (pcm16k,)).get(limit_s)
            except multiprocessing.TimeoutError:
                raise RequestError(500, f"decoding took longer than {limit_s:.0f} s",
                                   error_type="server_error") from None
            return Transcript(text, words, decode_s, cpu_s)
        finally:
            with self._lock:
                self._busy -= 1
            self._slots.release()


# --------------------------------------------------------------------------
# HTTP

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as HTTP client pools expect
    # Headers and body go out in separate writes; with Nagle's algorithm the
    # body would wait for the client's delayed ACK (measured: +40 ms a reply).
    disable_nagle_algorithm = True
    server_version = "cochlea-stt-sample/1"
    server: "SttServer"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:
            sys.stderr.write("stt-server: %s %s\n" % (self.address_string(), format % args))

    # -- replies

    def _send(self, status: int, body: bytes, content_type: str, extra: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: object, extra: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json", extra)

    def _send_error(self, err: RequestError) -> None:
        self._send_json(err.status, {"error": {
            "message": err.message, "type": err.error_type, "param": err.param, "code": err.code,
        }})

    # -- request body

    def _read_body(self) -> bytes:
        limit = self.server.max_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "a request body needs Content-Length (or chunked Transfer-Encoding)")
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"Content-Length {length!r} is not a byte count") from None
        if size > limit:
            message = f"request body of {size} bytes is larger than the limit of {limit} bytes"
            if size <= DRAIN_FACTOR * limit:
                # Read and drop it, so that a client still sending gets the 413
                # rather than a reset connection, and may reuse the connection.
                self._discard(size)
            else:
                self.close_connection = True
            raise RequestError(413, message, code="payload_too_large")
        body = self.rfile.read(size)
        if len(body) != size:
            self.close_connection = True
            raise RequestError(400, f"request body ended after {len(body)} of {size} bytes")
        return body

    def _discard(self, size: int) -> None:
        while size > 0:
            got = self.rfile.read(min(size, 1 << 16))
            if not got:
                self.close_connection = True
                return
            size -= len(got)

    def _read_chunked(self, limit: int) -> bytes:
        chunks = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise RequestError(400, "malformed chunked request body") from None
            if size == 0:
                break
            total += size
            if total > limit:
                self.close_connection = True
                raise RequestError(413, f"request body is larger than the limit of {limit} bytes",
                                   code="payload_too_large")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.read(2) != b"\r\n":
                self.close_connection = True
                raise RequestError(400, "chunked request body ended early")
            chunks.append(chunk)
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)

    def _check_auth(self) -> None:
        key = self.server.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RequestError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                               code="invalid_api_key")

    # -- routes

    def do_GET(self) -> None:  # noqa: N802 - the base class's naming
        path = self.path.split("?", 1)[0]
        if path == "/health":
            pool = self.server.pool
            self._send_json(200, {"status": "ok", "workers": pool.size, "busy": pool.busy()})
        elif path in ("/v1/audio/transcriptions", "/webhook"):
            self._send_error(RequestError(405, f"{path} takes POST"))
        else:
            self._send_error(RequestError(404, f"no such path: {path}"))

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            if path not in ("/v1/audio/transcriptions", "/webhook"):
                self.close_connection = True  # the body is not read
                raise RequestError(404, f"no such path: {path}")
            self._check_auth()
            body = self._read_body()
            if path == "/webhook":
                self._webhook(body)
            else:
                self._transcriptions(body)
        except RequestError as err:
            self._send_error(err)
        except Exception as err:  # noqa: BLE001 - a bug must still get an answer
            sys.stderr.write(f"stt-server: internal error: {err!r}\n")
            self._send_error(RequestError(500, f"internal error: {err}", error_type="server_error"))

    def _transcriptions(self, body: bytes) -> None:
        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
            raise RequestError(415, "send multipart/form-data with a 'file' field")
        fields = parse_multipart(body, content_type)
        if "file" not in fields:
            raise RequestError(400, "the 'file' field is missing", "file")

        def text_field(name: str) -> Optional[str]:
            part = fields.get(name)
            if part is None:
                return None
            try:
                return part.data.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise RequestError(400, f"the '{name}' field is not UTF-8 text", name) from None

        model = text_field("model")
        response_format = (text_field("response_format") or "json").lower()
        if response_format not in RESPONSE_FORMATS:
            raise RequestError(400, f"response_format {response_format!r} is not supported: "
                                    f"use one of {', '.join(RESPONSE_FORMATS)}", "response_format")
        language = text_field("language")
        if language and language.lower() not in ENGLISH:
            raise RequestError(400, f"language {language!r} is not supported: this engine knows only English (en)",
                               "language", code="unsupported_language")
        text_field("prompt")  # accepted (must be text), not used by this engine
        audio = read_wav(fields["file"].data)
        result = self.server.pool.run(audio.pcm16k, self.server.queue_timeout_s)
        self._log_decode(audio, result)
        headers = {"openai-processing-ms": str(int(round(result.decode_s * 1000)))}
        if response_format == "text":
            self._send(200, (result.text + "\n").encode("utf-8"), "text/plain; charset=utf-8", headers)
            return
        reply: Dict[str, object] = {"text": result.text}
        if response_format == "verbose_json":
            reply = {
                "task": "transcribe",
                "language": "english",
                "duration": round(audio.duration_s, 3),
                "model": model,
                "text": result.text,
                "segments": [{
                    "id": 0,
                    "start": 0.0,
                    "end": round(audio.duration_s, 3),
                    "text": result.text,
                }],
                "words": result.words,
            }
        self._send_json(200, reply, headers)

    def _webhook(self, body: bytes) -> None:
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type == "application/json":
            try:
                request = json.loads(body)
            except (ValueError, UnicodeDecodeError) as err:
                raise RequestError(400, f"body is not valid JSON: {err}") from None
            if not isinstance(request, dict):
                raise RequestError(400, "JSON body must be an object")
            field = "audio_base64" if "audio_base64" in request else "audio"
            encoded = request.get(field)
            if not isinstance(encoded, str):
                raise RequestError(400, "JSON body needs 'audio_base64': a base64 WAV file", "audio_base64")
            try:
                wav = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(400, f"'{field}' is not valid base64", field) from None
        elif content_type in WEBHOOK_WAV_TYPES:
            wav = body
        else:
            raise RequestError(415, "send JSON {\"audio_base64\": ...} or a WAV body (Content-Type audio/wav)")
        audio = read_wav(wav)
        result = self.server.pool.run(audio.pcm16k, self.server.queue_timeout_s)
        self._log_decode(audio, result)
        self._send_json(200, {"text": result.text, "duration": round(audio.duration_s, 3)},
                        {"openai-processing-ms": str(int(round(result.decode_s * 1000)))})

    def _log_decode(self, audio: Audio, result: Transcript) -> None:
        if not self.server.quiet:
            sys.stderr.write(
                f"stt-server: {audio.duration_s:.2f} s of audio ({audio.rate_hz} Hz x{audio.channels}) "
                f"decoded in {result.decode_s * 1000:.0f} ms ({result.cpu_s * 1000:.0f} ms CPU): "
                f"{result.text!r}\n")


class SttServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, pool: DecoderPool, *, max_bytes: int, queue_timeout_s: float,
                 api_key: Optional[str], quiet: bool):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.pool = pool
        self.max_bytes = max_bytes
        self.queue_timeout_s = queue_timeout_s
        self.api_key = api_key
        self.quiet = quiet


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="OpenAI-compatible transcription server over pocketsphinx.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default 8000)")
    parser.add_argument("--workers", type=int, default=2,
                        help="decoder processes, so concurrent decodes (default 2; each holds ~120 MB)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help=f"largest request body (default {DEFAULT_MAX_BYTES})")
    parser.add_argument("--queue-timeout-s", type=float, default=30.0,
                        help="how long a request waits for a free decoder before 503 (default 30)")
    parser.add_argument("--decode-timeout-s", type=float, default=60.0,
                        help="a decode taking longer than this plus the audio's length fails with 500 (default 60)")
    parser.add_argument("--api-key", default=os.environ.get("STT_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' (default: env STT_API_KEY; none: open)")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines on stderr")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.max_bytes < 1024:
        parser.error("--max-bytes must be at least 1024")

    pool = DecoderPool(args.workers, args.decode_timeout_s)
    server = SttServer((args.host, args.port), pool, max_bytes=args.max_bytes,
                       queue_timeout_s=args.queue_timeout_s, api_key=args.api_key, quiet=args.quiet)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    # SIGTERM ends the server like Ctrl-C does, so the decoder processes are
    # stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"listening on http://{shown}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
