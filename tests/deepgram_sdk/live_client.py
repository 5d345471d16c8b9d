"""The official Deepgram Python SDK (PyPI `deepgram-sdk`, unmodified) as a
client of cochlea's Deepgram-compatible endpoint.

Starts a speech-to-text stand-in (an OpenAI-compatible
POST /v1/audio/transcriptions on 127.0.0.1, port 0), starts `cochlea serve`
with it as the default backend and an API key, then streams a WAV file
through the SDK's live client pointed at cochlea's base URL at twice real
time, with interim_results, and checks that SpeechStarted, partial Results
(is_final false), final Results with word timings, UtteranceEnd and Metadata
arrive as the SDK's own types. Exit status 0 when every check passes.

    python live_client.py <path to the cochlea binary> <16 kHz mono WAV>
"""

import io
import json
import subprocess
import sys
import tempfile
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from deepgram import DeepgramClient, DeepgramClientEnvironment
from deepgram.core.events import EventType
from deepgram.listen.v1.types import (
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)

API_KEY = "sdk-test-key-0123456789abcdef"
STUB_TEXT = "hello from the stand-in backend"
TIMEOUT_S = 60


def audio_seconds(body):
    """Seconds of audio in the WAV file of a multipart request."""
    riff = body.find(b"RIFF")
    with wave.open(io.BytesIO(body[riff:]), "rb") as w:
        return w.getnframes() / w.getframerate()


class Backend(BaseHTTPRequestHandler):
    """Finals (response_format=verbose_json): a fixed text, its words spread
    over the audio. Partials (json): the first words of it, more as the
    utterance grows."""

    finals = 0
    partials = 0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("content-length", "0"))
        request = self.rfile.read(length)
        seconds = audio_seconds(request)
        words = STUB_TEXT.split()
        if b'name="response_format"\r\n\r\nverbose_json' in request:
            Backend.finals += 1
            step = seconds / len(words)
            reply = {
                "text": STUB_TEXT,
                "duration": seconds,
                "words": [{"word": f" {w}", "start": i * step, "end": (i + 1) * step}
                          for i, w in enumerate(words)],
            }
        else:
            Backend.partials += 1
            reply = {"text": " ".join(words[:max(1, min(len(words), int(seconds)))])}
        body = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_cochlea(binary, backend_url, recordings):
    process = subprocess.Popen(
        [
            binary, "serve",
            "--listen", "127.0.0.1:0",
            "--recordings-dir", recordings,
            "--api-key", API_KEY,
            "--transcribe-url", backend_url,
        ],
        stdout=subprocess.PIPE,
        stderr=open(f"{recordings}/server.log", "w"),
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("cochlea listening on http://"):
            return process, line.strip().rsplit("http://", 1)[1]
        if not line and process.poll() is not None:
            break
    process.kill()
    sys.exit(f"cochlea did not start; see {recordings}/server.log")


def speech_with_pauses(path):
    """The file twice, with silence before and after each copy, for the
    voice detector to find two utterances."""
    with wave.open(path, "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2), path
        speech = w.readframes(w.getnframes())
    silence = bytes(2 * 16000 // 2)
    pause = bytes(2 * 16000 * 12 // 10)
    return silence + speech + pause + speech + pause


def main():
    binary, wav_path = sys.argv[1], sys.argv[2]
    backend = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    backend_url = f"http://127.0.0.1:{backend.server_address[1]}"

    with tempfile.TemporaryDirectory() as recordings:
        server, addr = start_cochlea(binary, backend_url, recordings)
        try:
            failures = run_client(addr, speech_with_pauses(wav_path))
        finally:
            server.terminate()
            server.wait(timeout=20)
        if failures:
            with open(f"{recordings}/server.log") as log:
                sys.stderr.write(log.read()[-4000:])

    print(f"deepgram-sdk live client: {len(CHECKS) - len(failures)} passed, {len(failures)} failed")
    for failure in failures:
        print(f"  FAILED: {failure}")
    return 1 if failures else 0


CHECKS = []


def check(condition, what):
    CHECKS.append(what)
    return [] if condition else [what]


def run_client(addr, audio):
    environment = DeepgramClientEnvironment(
        base=f"http://{addr}",
        production=f"ws://{addr}",
        agent=f"ws://{addr}",
        agent_rest=f"http://{addr}",
    )
    client = DeepgramClient(api_key=API_KEY, environment=environment)
    received = []
    errors = []
    closed = threading.Event()

    with client.listen.v1.connect(
        model="nova-3",
        encoding="linear16",
        sample_rate=16000,
        channels=1,
        interim_results="true",
        utterance_end_ms="1000",
        vad_events="true",
        punctuate="true",
    ) as connection:
        connection.on(EventType.MESSAGE, received.append)
        connection.on(EventType.ERROR, errors.append)
        connection.on(EventType.CLOSE, lambda _: closed.set())
        listener = threading.Thread(target=connection.start_listening, daemon=True)
        listener.start()
        chunk = 3200  # 100 ms, sent every 50 ms: twice real time
        for i in range(0, len(audio), chunk):
            connection.send_media(audio[i:i + chunk])
            if i == chunk * 5:
                connection.send_keep_alive()
            time.sleep(0.05)
        connection.send_close_stream()
        listener.join(TIMEOUT_S)

    every_result = [m for m in received if isinstance(m, ListenV1Results)]
    results = [r for r in every_result if r.is_final]
    partials = [r for r in every_result if not r.is_final]
    metadata = [m for m in received if isinstance(m, ListenV1Metadata)]
    speech_started = [m for m in received if isinstance(m, ListenV1SpeechStarted)]
    utterance_ends = [m for m in received if isinstance(m, ListenV1UtteranceEnd)]
    for message in received:
        print(f"  < {type(message).__name__}: {message.json() if hasattr(message, 'json') else message}")

    failures = []
    failures += check(closed.is_set(), "the stream closed")
    failures += check(not errors, f"no SDK errors ({errors})")
    failures += check(len(speech_started) == 2, f"two SpeechStarted (got {len(speech_started)})")
    failures += check(len(results) == 2, f"two final Results (got {len(results)})")
    failures += check(len(partials) >= 2, f"partial Results (is_final false) (got {len(partials)})")
    failures += check(
        bool(every_result) and not every_result[0].is_final,
        "a partial comes before the first final",
    )
    failures += check(
        all(not p.speech_final and p.channel.alternatives[0].transcript for p in partials),
        "partials are not speech_final and carry a hypothesis",
    )
    failures += check(
        all(
            [w.word for w in r.channel.alternatives[0].words] == STUB_TEXT.split()
            and all(r.start - 1e-3 <= w.start <= w.end <= r.start + r.duration + 1e-3
                    for w in r.channel.alternatives[0].words)
            for r in results
        ),
        "finals carry their words, timed inside the result",
    )
    failures += check(
        all(r.channel.alternatives[0].transcript == STUB_TEXT for r in results),
        "each Results carries the backend's text",
    )
    failures += check(
        all(r.is_final and r.speech_final and r.channel_index == [0, 1] for r in results),
        "Results are final, speech_final, channel [0, 1]",
    )
    failures += check(
        all(r.duration > 1.0 and r.start >= 0.0 for r in results),
        "Results span the sentence",
    )
    failures += check(len(utterance_ends) == 2, f"two UtteranceEnd (got {len(utterance_ends)})")
    failures += check(len(metadata) == 1, f"one Metadata (got {len(metadata)})")
    expected_s = len(audio) / 2 / 16000
    failures += check(
        bool(metadata) and abs(metadata[0].duration - expected_s) < 1e-6,
        f"Metadata.duration is the audio's {expected_s} s",
    )
    failures += check(
        bool(metadata) and isinstance(received[-1], ListenV1Metadata),
        "Metadata comes last",
    )
    failures += check(Backend.finals == 2, f"two final backend requests (got {Backend.finals})")
    failures += check(Backend.partials >= len(partials), f"partial requests (got {Backend.partials})")
    return failures


if __name__ == "__main__":
    sys.exit(main())
