// Microphone → cochlea from any web page: a minimal, copyable version of
// what samples/web/app.js does. Paste it into a page (or the console of a
// page served over https:// or from localhost), then:
//
//   const recording = await streamMicrophone({ seconds: 5 });
//   console.log(recording.path);
//
// It captures mono audio at 16 kHz (an AudioContext at 16 kHz; Chrome and
// Safari allow it, Firefox may not: see samples/web/worklet.js for the
// resampling fallback), cuts it into 20 ms frames in an AudioWorklet, and
// sends each frame as PCM s16 with a 12-byte seq header (u32 seq, u64
// timestamp in sample frames, little-endian). Resolves with the server's
// `recording` message; rejects on a server error or a refused microphone.
// A token (API key or one from POST /v1/tokens) goes in the subprotocol list.

async function streamMicrophone({
  url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stream`,
  seconds = 5,
  token = null,
  onMessage = (m) => console.log(m),
} = {}) {
  const RATE = 16000;
  const FRAME = 320; // 20 ms

  // The worklet, inlined so that this file is all you need. (A page with a
  // Content-Security-Policy must allow blob: for scripts, or serve it.)
  const workletSource = `
    registerProcessor("frames", class extends AudioWorkletProcessor {
      constructor() { super(); this.buf = new Float32Array(${FRAME}); this.n = 0; }
      process([input]) {
        const ch = input[0];
        if (ch) for (let i = 0; i < ch.length; i++) {
          this.buf[this.n++] = ch[i];
          if (this.n === ${FRAME}) { this.port.postMessage(this.buf); this.buf = new Float32Array(${FRAME}); this.n = 0; }
        }
        return true;
      }
    });`;

  const mic = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  const context = new AudioContext({ sampleRate: RATE });
  const moduleUrl = URL.createObjectURL(new Blob([workletSource], { type: "text/javascript" }));
  await context.audioWorklet.addModule(moduleUrl);
  const source = context.createMediaStreamSource(mic);
  const node = new AudioWorkletNode(context, "frames");
  source.connect(node).connect(new GainNode(context, { gain: 0 })).connect(context.destination);

  const ws = new WebSocket(url, token ? ["cochlea.v1", `token.${token}`] : []);
  ws.binaryType = "arraybuffer";
  let seq = 0;
  let timestamp = 0;
  let started = false;

  node.port.onmessage = ({ data: samples }) => {
    if (!started || ws.readyState !== WebSocket.OPEN) return;
    const message = new DataView(new ArrayBuffer(12 + samples.length * 2));
    message.setUint32(0, seq++, true);
    message.setBigUint64(4, BigInt(timestamp), true);
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      message.setInt16(12 + i * 2, Math.round(s * 32767), true);
    }
    timestamp += samples.length;
    ws.send(message.buffer);
  };

  let capturing = true;
  const stopCapture = () => {
    if (!capturing) return;
    capturing = false;
    mic.getTracks().forEach((t) => t.stop());
    context.close();
    URL.revokeObjectURL(moduleUrl);
  };

  return new Promise((resolve, reject) => {
    let recording = null;
    let error = null;
    ws.onopen = () =>
      ws.send(JSON.stringify({ type: "start", encoding: "pcm_s16le", sample_rate: RATE, channels: 1, framing: "seq" }));
    ws.onmessage = ({ data }) => {
      const message = JSON.parse(data);
      onMessage(message);
      if (message.type === "started") {
        started = true;
        setTimeout(() => {
          stopCapture();
          // Frames already posted by the worklet go out first.
          setTimeout(() => ws.send(JSON.stringify({ type: "stop" })), 50);
        }, seconds * 1000);
      } else if (message.type === "recording") {
        recording = message;
      } else if (message.type === "error" && message.fatal) {
        error = new Error(`${message.code}: ${message.message}`);
        started = false; // send nothing more
        stopCapture();
      }
    };
    ws.onclose = (event) => {
      if (error || !recording) {
        stopCapture();
        reject(error || new Error(`connection closed (code ${event.code}) without a recording`));
      } else {
        resolve(recording);
      }
    };
  });
}
