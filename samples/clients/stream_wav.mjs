#!/usr/bin/env node
// Stream a 16-bit PCM WAV file to cochlea over WebSocket (Node 18+, `ws`).
//
//     npm install ws        (or: npm ci, in samples/clients/)
//     node stream_wav.mjs FILE.wav [--url ws://127.0.0.1:8080/v1/stream] [--fast] [--token KEY]
//
// Sends the file in 20 ms binary messages with framing=seq (12-byte header:
// u32 seq, u64 timestamp = index of the first sample frame, little-endian),
// at real-time pace unless --fast. Prints every server message, then the
// recording. Exit status: 0 if the server closed with code 1000, else 1.
// Protocol: proto/PROTOCOL.md.

import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import WebSocket from "ws";

const MESSAGE_MS = 20;

function parseArgs(argv) {
  const args = { url: "ws://127.0.0.1:8080/v1/stream", fast: false, token: null, file: null };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--url") args.url = argv[++i];
    else if (argv[i] === "--fast") args.fast = true;
    else if (argv[i] === "--token") args.token = argv[++i];
    else args.file = argv[i];
  }
  if (!args.file) {
    console.error("usage: node stream_wav.mjs FILE.wav [--url URL] [--fast] [--token KEY]");
    process.exit(2);
  }
  return args;
}

// The fmt and data chunks of a RIFF/WAVE file.
function readWav(path) {
  const bytes = readFileSync(path);
  if (bytes.toString("latin1", 0, 4) !== "RIFF" || bytes.toString("latin1", 8, 12) !== "WAVE") {
    throw new Error(`${path}: not a WAV file`);
  }
  let fmt = null;
  for (let at = 12; at + 8 <= bytes.length; ) {
    const id = bytes.toString("latin1", at, at + 4);
    const size = bytes.readUInt32LE(at + 4);
    const body = bytes.subarray(at + 8, Math.min(at + 8 + size, bytes.length));
    if (id === "fmt ") {
      fmt = {
        format: body.readUInt16LE(0),
        channels: body.readUInt16LE(2),
        sampleRate: body.readUInt32LE(4),
        bits: body.readUInt16LE(14),
      };
    } else if (id === "data") {
      if (!fmt || fmt.format !== 1 || fmt.bits !== 16) throw new Error(`${path}: not 16-bit PCM`);
      return { ...fmt, data: body };
    }
    at += 8 + size + (size & 1);
  }
  throw new Error(`${path}: no data chunk`);
}

const args = parseArgs(process.argv.slice(2));
const wav = readWav(args.file);
const frameBytes = 2 * wav.channels;
const framesPerMessage = (wav.sampleRate * MESSAGE_MS) / 1000;

const ws = new WebSocket(args.url, {
  headers: args.token ? { Authorization: `Bearer ${args.token}` } : {},
});
const recordings = [];

async function sendAudio() {
  const t0 = performance.now();
  let seq = 0;
  for (let at = 0; at < wav.data.length; at += framesPerMessage * frameBytes) {
    const chunk = wav.data.subarray(at, at + framesPerMessage * frameBytes);
    const header = Buffer.alloc(12);
    header.writeUInt32LE(seq++, 0);
    header.writeBigUInt64LE(BigInt(at / frameBytes), 4);
    ws.send(Buffer.concat([header, chunk]));
    if (!args.fast) {
      // Keep to the clock: the next message leaves when its audio is due.
      const due = t0 + (((at + chunk.length) / frameBytes) * 1000) / wav.sampleRate;
      await sleep(Math.max(0, due - performance.now()));
    }
  }
  ws.send(JSON.stringify({ type: "stop" }));
}

ws.on("open", () => {
  ws.send(
    JSON.stringify({
      type: "start",
      encoding: "pcm_s16le",
      sample_rate: wav.sampleRate,
      channels: wav.channels,
      framing: "seq",
      metadata: { source: basename(args.file) },
    }),
  );
});

ws.on("message", (data, isBinary) => {
  if (isBinary) return;
  const text = data.toString();
  console.log("<", text);
  const message = JSON.parse(text);
  if (message.type === "started") {
    sendAudio().catch((e) => console.error(e));
  } else if (message.type === "recording") {
    recordings.push(message);
  }
});

ws.on("unexpected-response", (request, response) => {
  console.error(`the server refused the connection: HTTP ${response.statusCode}`);
  process.exit(1);
});

ws.on("error", (e) => {
  console.error(`WebSocket error: ${e.message}`);
  process.exit(1);
});

ws.on("close", (code) => {
  for (const r of recordings) {
    console.log(
      `recording: ${r.path} (${r.duration_seconds.toFixed(2)} s, ${r.sample_frames} sample frames) sha256 ${r.sha256}`,
    );
  }
  console.log(`closed with code ${code}`);
  process.exit(code === 1000 ? 0 : 1);
});
