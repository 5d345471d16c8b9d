#!/usr/bin/env python3
"""Stream a 16-bit PCM WAV file to cochlea over WebSocket.

    pip install websockets
    python3 stream_wav.py FILE.wav [--url ws://127.0.0.1:8080/v1/stream] [--fast]

Sends the file in 20 ms binary messages with framing=seq (12-byte header:
u32 seq, u64 timestamp = index of the first sample frame, little-endian), at
real-time pace unless --fast. Prints every server message as it arrives, then
the recording. Exit status: 0 if the server closed with code 1000, else 1.
Needs Python 3.9+ and the `websockets` package. Protocol: proto/PROTOCOL.md.
"""
import argparse
import asyncio
import json
import os
import struct
import sys
import wave

import websockets

MESSAGE_MS = 20


async def send_audio(ws, wav, started, fast):
    await started.wait()  # audio before `started` would be an error
    rate = wav.getframerate()
    frame_bytes = wav.getsampwidth() * wav.getnchannels()
    frames_per_message = rate * MESSAGE_MS // 1000
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    seq = position = 0
    while chunk := wav.readframes(frames_per_message):
        await ws.send(struct.pack("<IQ", seq, position) + chunk)
        seq += 1
        position += len(chunk) // frame_bytes
        if not fast:  # keep to the clock: message k leaves at t0 + k * 20 ms
            await asyncio.sleep(max(0.0, t0 + position / rate - loop.time()))
    await ws.send(json.dumps({"type": "stop"}))


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wav", help="16-bit PCM WAV, 8000-48000 Hz, mono or stereo")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/v1/stream")
    parser.add_argument("--fast", action="store_true", help="send as fast as possible")
    args = parser.parse_args()

    with wave.open(args.wav, "rb") as wav:
        if wav.getsampwidth() != 2:
            sys.exit(f"{args.wav}: not 16-bit PCM")
        start = {"type": "start", "encoding": "pcm_s16le",
                 "sample_rate": wav.getframerate(), "channels": wav.getnchannels(),
                 "framing": "seq", "metadata": {"source": os.path.basename(args.wav)}}
        recordings = []
        async with websockets.connect(args.url) as ws:
            await ws.send(json.dumps(start))
            started = asyncio.Event()
            sender = asyncio.create_task(send_audio(ws, wav, started, args.fast))
            try:
                async for text in ws:  # ends when the server closes
                    print("<", text, flush=True)
                    message = json.loads(text)
                    if message["type"] == "started":
                        started.set()
                    elif message["type"] == "recording":
                        recordings.append(message)
            except websockets.ConnectionClosed:
                pass  # abnormal close: the close code below tells
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        code = ws.close_code

    for r in recordings:
        print(f"recording: {r['path']} ({r['duration_seconds']:.2f} s, "
              f"{r['sample_frames']} sample frames) sha256 {r['sha256']}")
    print(f"closed with code {code}")
    return 0 if code == 1000 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
