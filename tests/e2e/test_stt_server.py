"""Tests of the reference transcription server (samples/stt-server).

    python3 -m unittest discover -s tests/e2e -p 'test_*.py'

Two kinds:
  * units of the server's WAV reader, G.711 tables, resampler and multipart
    parser: standard library only, any python3;
  * the real server, started as a subprocess on 127.0.0.1 port 0 with the
    venv's python (scripts/stt-venv.sh; or env STT_PYTHON) over the speech of
    tests/e2e/make_speech.sh (made here when missing), driven over real
    sockets. Its transcripts must equal the same engine's direct decode of the
    same files. Without the venv these are skipped, except under CI (env CI
    set), where that is a failure.
"""

from __future__ import annotations

import array
import base64
import http.client
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import unittest
import uuid
import wave
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SERVER_DIR = os.path.join(ROOT, "samples", "stt-server")
sys.path.insert(0, HERE)
sys.path.insert(0, SERVER_DIR)

import stt_server  # noqa: E402  (stdlib only at import time)
import wer  # noqa: E402

SPEECH_DIR = os.path.join(ROOT, "target", "e2e-speech")
API_KEY = "test-key-" + uuid.uuid4().hex[:8]
MAX_BYTES = 2_000_000


def wav_bytes(frames: bytes, rate: int, channels: int, bits: int, tag: int = 1, extensible: bool = False,
              data_size: Optional[int] = None, extra_chunk: bool = False) -> bytes:
    block = channels * bits // 8
    if extensible:
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, 0)
        fmt += struct.pack("<H", tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    if extra_chunk:  # an odd-sized chunk before the data, padded to even
        chunks += b"LIST" + struct.pack("<I", 3) + b"abc\x00"
    size = len(frames) if data_size is None else data_size
    chunks += b"data" + struct.pack("<I", size) + frames
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def s16(values: List[int]) -> bytes:
    a = array.array("h", values)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def from_s16(data: bytes) -> List[int]:
    a = array.array("h")
    a.frombytes(data)
    if sys.byteorder == "big":
        a.byteswap()
    return list(a)


def multipart(fields: List[Tuple[str, Optional[str], bytes]], boundary: str) -> bytes:
    out = b""
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: audio/wav\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


class WavReaderTest(unittest.TestCase):
    def test_16k_mono_is_passed_through_exactly(self):
        samples = s16([0, 1, -1, 32767, -32768, 1234])
        audio = stt_server.read_wav(wav_bytes(samples, 16000, 1, 16))
        self.assertEqual(audio.pcm16k, samples)
        self.assertAlmostEqual(audio.duration_s, 6 / 16000)

    def test_odd_chunk_padding_and_streaming_sizes(self):
        samples = s16([5, 6, 7, 8])
        for size in (0, 0xFFFFFFFF, 1000):  # placeholder sizes and one past the end
            audio = stt_server.read_wav(wav_bytes(samples, 16000, 1, 16, data_size=size, extra_chunk=True))
            self.assertEqual(audio.pcm16k, samples)

    def test_stereo_16k_is_averaged(self):
        audio = stt_server.read_wav(wav_bytes(s16([100, 300, -50, -150, 7, 8]), 16000, 2, 16))
        self.assertEqual(from_s16(audio.pcm16k), [200, -100, 8])  # 7.5 rounds to 8

    def test_other_sample_formats(self):
        # 24-bit and 32-bit PCM, float and 8-bit unsigned carry the same 16 kHz signal.
        values = [0, 256, -256, 32000, -32000]
        pcm24 = b"".join((v * 256).to_bytes(3, "little", signed=True) for v in values)
        pcm32 = b"".join((v * 65536).to_bytes(4, "little", signed=True) for v in values)
        flt = struct.pack("<5f", *(v / 32768 for v in values))
        self.assertEqual(from_s16(stt_server.read_wav(wav_bytes(pcm24, 16000, 1, 24)).pcm16k), values)
        self.assertEqual(from_s16(stt_server.read_wav(wav_bytes(pcm32, 16000, 1, 32)).pcm16k), values)
        self.assertEqual(from_s16(stt_server.read_wav(wav_bytes(flt, 16000, 1, 32, tag=3)).pcm16k), values)
        self.assertEqual(from_s16(stt_server.read_wav(wav_bytes(pcm24, 16000, 1, 24, extensible=True)).pcm16k),
                         values)
        u8 = bytes([128, 129, 127, 255, 0])
        self.assertEqual(from_s16(stt_server.read_wav(wav_bytes(u8, 16000, 1, 8)).pcm16k),
                         [0, 256, -256, 32512, -32768])

    def test_g711_tables_match_the_standard(self):
        # ITU-T G.711 reference values (as in every G.711 decoder, e.g. sox's).
        self.assertEqual((stt_server.MULAW[0xFF], stt_server.MULAW[0x7F]), (0, 0))
        self.assertEqual((stt_server.MULAW[0x00], stt_server.MULAW[0x80]), (-32124, 32124))
        self.assertEqual((stt_server.MULAW[0xF0], stt_server.MULAW[0x70]), (120, -120))
        self.assertEqual((stt_server.ALAW[0xD5], stt_server.ALAW[0x55]), (8, -8))
        self.assertEqual((stt_server.ALAW[0xAA], stt_server.ALAW[0x2A]), (32256, -32256))
        self.assertEqual(len(set(stt_server.MULAW)), 255)  # +0 and -0 both decode to 0
        self.assertEqual(len(set(stt_server.ALAW)), 256)

    def test_bad_files_are_rejected_with_reasons(self):
        cases = [
            (b"ID3\x03 not a wav at all", 415, "not a WAV"),
            (b"RIFF\x00\x00\x00\x00WAVE", 400, "no fmt chunk"),
            (wav_bytes(b"", 16000, 1, 16), 400, "no audio samples"),
            (wav_bytes(s16([1]), 16000, 1, 16)[:36], 400, "no data chunk"),
            (wav_bytes(s16([1, 2]), 2000, 1, 16), 400, "sample rate 2000"),
            (wav_bytes(b"\x00" * 8, 16000, 1, 16, tag=0x55), 400, "format tag 0x0055"),
            (wav_bytes(b"\x00" * 6, 16000, 1, 12), 400, "12 bits"),
        ]
        for data, status, words in cases:
            with self.assertRaises(stt_server.RequestError, msg=words) as caught:
                stt_server.read_wav(data)
            self.assertEqual(caught.exception.status, status)
            self.assertIn(words, caught.exception.message)


class ResampleTest(unittest.TestCase):
    def test_8k_to_16k_follows_the_sine(self):
        tone_hz = 1000.0
        x = [10000 * math.sin(2 * math.pi * tone_hz * n / 8000) for n in range(8000)]
        y = stt_server.resample(x, 8000, 16000)
        self.assertEqual(len(y), 16000)
        # Away from the edges (where the filter sees zero padding) it is the
        # same sine at 16 kHz, within 0.5 % of full scale.
        worst = max(abs(y[n] - 10000 * math.sin(2 * math.pi * tone_hz * n / 16000)) for n in range(200, 15800))
        self.assertLess(worst, 50)

    def test_44k1_to_16k_keeps_speech_band_and_removes_aliases(self):
        def rms_after(tone_hz: float) -> float:
            x = [10000 * math.sin(2 * math.pi * tone_hz * n / 44100) for n in range(44100)]
            y = stt_server.resample(x, 44100, 16000)[500:-500]
            return math.sqrt(sum(v * v for v in y) / len(y))

        full = 10000 / math.sqrt(2)
        self.assertAlmostEqual(rms_after(1000) / full, 1.0, delta=0.01)
        # 12 kHz would fold to 4 kHz at 16 kHz without the low-pass.
        self.assertLess(rms_after(12000) / full, 0.01)


class MultipartTest(unittest.TestCase):
    def test_binary_content_comes_back_byte_for_byte(self):
        rng = random.Random(7)
        boundary = "----cochlea" + uuid.uuid4().hex
        for _ in range(50):
            # Line endings and near-boundaries inside the content must not cut it.
            blob = bytes(rng.choice([0, 10, 13, 45, 255, rng.randrange(256)]) for _ in range(rng.randrange(0, 3000)))
            blob += b"\r\n--" + boundary[:-1].encode() + b"\r\n\r\n--"
            body = multipart([("model", None, b"whisper-1"), ("file", "a.wav", blob), ("file", "b.wav", b"second")],
                             boundary)
            parts = stt_server.parse_multipart(body, f'multipart/form-data; boundary="{boundary}"')
            self.assertEqual(parts["file"].data, blob)
            self.assertEqual(parts["file"].filename, "a.wav")
            self.assertEqual(parts["model"].data, b"whisper-1")

    def test_preamble_padding_and_epilogue(self):
        body = (b"preamble\r\n--XyZ  \r\nContent-Disposition: form-data; name=model\r\n\r\nm1\r\n"
                b"--XyZ--\r\nepilogue")
        parts = stt_server.parse_multipart(body, "multipart/form-data; boundary=XyZ")
        self.assertEqual(parts["model"].data, b"m1")

    def test_malformed_bodies(self):
        cases = [
            ("multipart/form-data", b"--a\r\n\r\nx\r\n--a--", "no boundary parameter"),
            ("multipart/form-data; boundary=a", b"nothing here", "never occurs"),
            ("multipart/form-data; boundary=a",
             b"--a\r\nContent-Disposition: form-data; name=x\r\n\r\nno end", "no closing boundary"),
            ("multipart/form-data; boundary=a", b"--a\r\nContent-Type: text/plain\r\n\r\nx\r\n--a--",
             "no Content-Disposition"),
            ("multipart/form-data; boundary=a", b"--a\r\nContent-Disposition: form-data\r\n\r\nx\r\n--a--",
             "no name"),
            ("multipart/form-data; boundary=a", b"--aX\r\n", "not followed by CRLF"),
        ]
        for content_type, body, words in cases:
            with self.assertRaises(stt_server.RequestError, msg=words) as caught:
                stt_server.parse_multipart(body, content_type)
            self.assertEqual(caught.exception.status, 400)
            self.assertIn(words, caught.exception.message)


def venv_python() -> Optional[str]:
    explicit = os.environ.get("STT_PYTHON")
    if explicit:
        return explicit
    candidate = os.path.join(ROOT, "target", "stt-venv", "bin", "python")
    return candidate if os.path.exists(candidate) else None


class ServerTest(unittest.TestCase):
    """The real server over real sockets, against the engine's direct decode."""

    proc: subprocess.Popen
    host: str
    port: int
    direct: Dict[str, str]
    refs: Dict[str, str]

    @classmethod
    def setUpClass(cls):
        python = venv_python()
        if python is None:
            message = "no venv with pocketsphinx: run scripts/stt-venv.sh (or set STT_PYTHON)"
            if os.environ.get("CI"):
                raise RuntimeError(message)
            raise unittest.SkipTest(message)
        if not os.path.exists(os.path.join(SPEECH_DIR, "sentences.tsv")):
            subprocess.run([os.path.join(HERE, "make_speech.sh"), SPEECH_DIR], check=True)
        with open(os.path.join(SPEECH_DIR, "sentences.tsv"), encoding="utf-8") as f:
            cls.refs = dict(line.rstrip("\n").split("\t") for line in f if line.strip())
        # The same engine, same settings, decoding the files directly.
        script = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); import stt_server\n"
            "d = stt_server.make_decoder(); out = {}\n"
            "for p in sys.argv[2:]:\n"
            "    out[p] = stt_server.transcribe(d, stt_server.read_wav(open(p, 'rb').read()).pcm16k).text\n"
            "print(json.dumps(out))\n"
        )
        paths = [os.path.join(SPEECH_DIR, name) for name in cls.refs]
        run = subprocess.run([python, "-c", script, SERVER_DIR, *paths], capture_output=True, text=True,
                             timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"direct decode failed: {run.stderr}")
        cls.direct = {os.path.basename(p): t for p, t in json.loads(run.stdout).items()}
        cls.proc = subprocess.Popen(
            [python, os.path.join(SERVER_DIR, "stt_server.py"), "--host", "127.0.0.1", "--port", "0",
             "--workers", "2", "--quiet", "--api-key", API_KEY, "--max-bytes", str(MAX_BYTES)],
            stdout=subprocess.PIPE, text=True)
        line = cls.proc.stdout.readline() if cls.proc.stdout else ""
        if not line.startswith("listening on http://127.0.0.1:"):
            cls.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        cls.host = "127.0.0.1"
        cls.port = int(line.strip().rsplit(":", 1)[1])

    @classmethod
    def tearDownClass(cls):
        proc = getattr(cls, "proc", None)
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)

    # -- helpers

    def request(self, method: str, path: str, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
                key: Optional[str] = API_KEY, conn: Optional[http.client.HTTPConnection] = None,
                chunked: bool = False) -> Tuple[int, Dict[str, str], bytes]:
        own = conn is None
        conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=60)
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        try:
            if chunked:
                conn.request(method, path, body=iter([body[:1000], body[1000:]]), headers=all_headers,
                             encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            if own:
                conn.close()

    def transcribe(self, wav: bytes, fields: Optional[Dict[str, str]] = None, **kwargs):
        boundary = "b" + uuid.uuid4().hex
        parts = [(k, None, v.encode()) for k, v in (fields or {"model": "whisper-1"}).items()]
        parts.append(("file", "utterance.wav", wav))
        body = multipart(parts, boundary)
        return self.request("POST", "/v1/audio/transcriptions", body,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"}, **kwargs)

    def speech(self, name: str) -> bytes:
        with open(os.path.join(SPEECH_DIR, name), "rb") as f:
            return f.read()

    def assert_error(self, reply, status: int, words: str):
        code, headers, body = reply
        self.assertEqual(code, status, body)
        self.assertEqual(headers["content-type"], "application/json")
        error = json.loads(body)["error"]
        self.assertIn(words, error["message"])
        self.assertIn(error["type"], ("invalid_request_error", "server_error"))

    # -- tests

    def test_health(self):
        status, _, body = self.request("GET", "/health", key=None)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["workers"], 2)

    def test_every_sentence_matches_the_direct_decode(self):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)  # one kept-alive connection
        try:
            for name in self.refs:
                status, headers, body = self.transcribe(self.speech(name), conn=conn)
                self.assertEqual(status, 200, body)
                self.assertEqual(json.loads(body), {"text": self.direct[name]}, name)
                self.assertGreaterEqual(int(headers["openai-processing-ms"]), 1)
        finally:
            conn.close()
        pooled = wer.corpus((self.refs[n], self.direct[n]) for n in self.refs)
        self.assertGreaterEqual(pooled.accuracy, 0.9, "make_speech.sh's sentences should be recognizable")

    def test_response_formats(self):
        name = next(iter(self.refs))
        wav = self.speech(name)
        status, headers, body = self.transcribe(wav, {"model": "m1", "response_format": "text", "language": "en",
                                                      "prompt": "a walk"})
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/plain"))
        self.assertEqual(body.decode(), self.direct[name] + "\n")
        status, _, body = self.transcribe(wav, {"model": "m1", "response_format": "verbose_json"})
        self.assertEqual(status, 200)
        reply = json.loads(body)
        with wave.open(os.path.join(SPEECH_DIR, name)) as w:
            duration_s = w.getnframes() / w.getframerate()
        self.assertAlmostEqual(reply["duration"], duration_s, places=3)
        self.assertEqual((reply["text"], reply["model"], reply["language"]), (self.direct[name], "m1", "english"))
        self.assertEqual(" ".join(w["word"] for w in reply["words"]), reply["text"])
        times = [t for w in reply["words"] for t in (w["start"], w["end"])]
        self.assertEqual(times, sorted(times))
        self.assertLessEqual(times[-1], duration_s + 0.01)

    def test_silence_and_tiny_input_are_answered(self):
        # No hypothesis at all (pocketsphinx's seg() is then None) must not
        # fail the request. What the engine makes of silence is its business
        # (it sometimes says "i'll"), so only the shape of the reply is checked.
        for frames in (1, 160, 16000):
            status, _, body = self.transcribe(wav_bytes(s16([0] * frames), 16000, 1, 16),
                                              {"response_format": "verbose_json"})
            self.assertEqual(status, 200, body)
            reply = json.loads(body)
            self.assertEqual(" ".join(w["word"] for w in reply["words"]), reply["text"])
            self.assertAlmostEqual(reply["duration"], frames / 16000, places=3)

    def test_chunked_upload(self):
        name = next(iter(self.refs))
        status, _, body = self.transcribe(self.speech(name), chunked=True)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["text"], self.direct[name])

    def test_webhook_json_and_raw_wav(self):
        name = list(self.refs)[1]
        wav = self.speech(name)
        payload = json.dumps({"audio_base64": base64.b64encode(wav).decode(), "session_id": "s1", "channel": 0})
        status, _, body = self.request("POST", "/webhook", payload.encode(), {"Content-Type": "application/json"})
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["text"], self.direct[name])
        status, _, body = self.request("POST", "/webhook", wav, {"Content-Type": "audio/wav"})
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["text"], self.direct[name])
        self.assert_error(self.request("POST", "/webhook", b'{"audio_base64": "%%%"}',
                                       {"Content-Type": "application/json"}), 400, "not valid base64")
        self.assert_error(self.request("POST", "/webhook", b"{nope", {"Content-Type": "application/json"}),
                          400, "not valid JSON")
        self.assert_error(self.request("POST", "/webhook", b"{}", {"Content-Type": "application/json"}),
                          400, "audio_base64")
        self.assert_error(self.request("POST", "/webhook", wav, {"Content-Type": "text/plain"}), 415, "WAV")

    def test_other_rates_and_channels_are_converted(self):
        # 44.1 kHz stereo 24-bit and 8 kHz mono, made by sox from the 16 kHz
        # sentence, go through the server's own converter.
        names = list(self.refs)[:3]
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                for spec in (["-r", "44100", "-c", "2", "-b", "24"], ["-r", "22050", "-c", "1", "-e", "float", "-b", "32"]):
                    out = os.path.join(tmp, "converted.wav")
                    subprocess.run(["sox", "-R", os.path.join(SPEECH_DIR, name), *spec, out], check=True)
                    with open(out, "rb") as f:
                        status, _, body = self.transcribe(f.read())
                    self.assertEqual(status, 200, body)
                    accuracy = wer.word_accuracy(self.refs[name], json.loads(body)["text"])
                    self.assertGreaterEqual(accuracy, wer.word_accuracy(self.refs[name], self.direct[name]) - 0.15,
                                            f"{name} {spec}: {body!r}")

    def test_concurrent_requests_all_get_their_own_text(self):
        names = list(self.refs)[:4]
        results: Dict[str, Tuple[int, bytes]] = {}

        def one(n: str):
            status, _, body = self.transcribe(self.speech(n))
            results[n] = (status, body)

        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for n in names:
            status, body = results[n]
            self.assertEqual(status, 200, body)
            self.assertEqual(json.loads(body)["text"], self.direct[n])

    def test_client_errors(self):
        wav = self.speech(next(iter(self.refs)))
        self.assert_error(self.transcribe(wav, key=None), 401, "API key")
        self.assert_error(self.transcribe(wav, key="wrong"), 401, "API key")
        self.assert_error(self.transcribe(b"ID3 this is an mp3"), 415, "not a WAV")
        self.assert_error(self.transcribe(wav, {"model": "m", "response_format": "srt"}), 400, "response_format")
        self.assert_error(self.transcribe(wav, {"model": "m", "language": "de"}), 400, "only English")
        boundary = "zz"
        body = multipart([("model", None, b"m")], boundary)
        self.assert_error(self.request("POST", "/v1/audio/transcriptions", body,
                                       {"Content-Type": "multipart/form-data; boundary=zz"}), 400, "'file'")
        self.assert_error(self.request("POST", "/v1/audio/transcriptions", b"--zz\r\nbroken",
                                       {"Content-Type": "multipart/form-data; boundary=zz"}), 400, "malformed")
        self.assert_error(self.request("POST", "/v1/audio/transcriptions", b"{}",
                                       {"Content-Type": "application/json"}), 415, "multipart/form-data")
        self.assert_error(self.transcribe(b"\x00" * (MAX_BYTES + 1)), 413, "larger than the limit")
        self.assert_error(self.request("GET", "/v1/audio/transcriptions"), 405, "takes POST")
        self.assert_error(self.request("GET", "/nope"), 404, "no such path")
        self.assert_error(self.request("POST", "/nope", b"x"), 404, "no such path")
        # The server is still well after all of that.
        status, _, body = self.transcribe(wav)
        self.assertEqual(status, 200, body)


if __name__ == "__main__":
    unittest.main()
