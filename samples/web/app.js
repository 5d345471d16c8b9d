// cochlea microphone page: getUserMedia → AudioWorklet (16 kHz mono, 20 ms
// frames) → WebSocket /v1/stream with framing=seq, as PCM s16 or, with
// WebCodecs, as Opus packets. Shows the level, the server's vad, transcript
// and stats messages, errors, and finally a link to the recording.
//
// No build step and nothing from other sites: the server embeds this file.
// With transport=webrtc the microphone track goes over WebRTC instead
// (Opus over SRTP, negotiated on the same socket: `start` carries the SDP
// offer, `webrtc_answer` the answer); events still come on the socket.
// Page query: token=… (API key or token), encoding=pcm|opus,
// transport=webrtc, transcribe=NAME, autostart=1, seconds=N (stop after N
// seconds).

const RATE = 16000; // what the page sends (and the server records)
const FRAME = 320; // samples per message: 20 ms at 16 kHz
const OPUS_BITRATE = 32000;
const MAX_LOG = 300;

const params = new URLSearchParams(location.search);
const token = params.get("token") || "";
const autostart = params.get("autostart") === "1";
const autoStopSeconds = Number(params.get("seconds")) || 0;

const $ = (id) => document.getElementById(id);
const ui = {
  start: $("start"),
  stop: $("stop"),
  encoding: $("encoding"),
  transcribe: $("transcribe"),
  levelBar: $("level-bar"),
  levelText: $("level-text"),
  clock: $("clock"),
  status: $("status"),
  error: $("error"),
  recording: $("recording"),
  player: $("player"),
  download: $("download"),
  recordingInfo: $("recording-info"),
  transcript: $("transcript"),
  vad: $("vad"),
  stats: $("stats"),
  log: $("log"),
};

// What the page did, for people debugging and for the end-to-end test.
const state = {
  phase: "idle", // idle, starting, streaming, stopping, done, failed
  sessionId: null,
  encoding: null,
  sampleRate: null, // the AudioContext's rate
  framesSent: 0,
  recording: null,
  closed: null,
  error: null,
  closeCode: null, // the server's close code, as the page shows it
  closeEventCode: null, // the browser's close event code (1006: no Close frame)
  messages: [],
};
window.cochlea = state;

function setPhase(phase) {
  state.phase = phase;
  document.body.dataset.state = phase;
  ui.start.disabled = !["idle", "done", "failed"].includes(phase);
  ui.stop.disabled = !["starting", "streaming"].includes(phase);
  const busy = ui.start.disabled;
  ui.encoding.disabled = busy;
  ui.transcribe.disabled = busy;
}

function status(text) {
  ui.status.textContent = text;
}

function showError(text) {
  state.error = text;
  ui.error.textContent = text;
  ui.error.hidden = false;
  console.error("cochlea:", text);
}

function clock(seconds) {
  const tenths = Math.max(0, Math.round(seconds * 10));
  const mm = String(Math.floor(tenths / 600)).padStart(2, "0");
  const ss = String(Math.floor(tenths / 10) % 60).padStart(2, "0");
  return `${mm}:${ss}.${tenths % 10}`;
}

function addLine(list, time, text, className) {
  const li = document.createElement("li");
  if (time !== null) {
    const t = document.createElement("span");
    t.className = "time";
    t.textContent = time;
    li.append(t);
  }
  li.append(document.createTextNode(text));
  if (className) li.className = className;
  list.append(li);
  while (list.children.length > MAX_LOG) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
}

// ---------------------------------------------------------------- support

function unsupportedReason() {
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return (
      `The microphone is only available to secure pages: open this page over https:// or on ` +
      `localhost (it was opened as ${location.origin}).`
    );
  }
  if (typeof AudioWorkletNode === "undefined" || typeof AudioContext === "undefined") {
    return "This browser lacks AudioWorklet: use a current Chrome, Edge, Firefox or Safari.";
  }
  if (typeof WebSocket === "undefined") {
    return "This browser lacks WebSocket.";
  }
  return null;
}

async function opusSupported() {
  if (typeof AudioEncoder === "undefined" || typeof AudioData === "undefined") return false;
  try {
    const { supported } = await AudioEncoder.isConfigSupported(opusConfig());
    return supported;
  } catch {
    return false;
  }
}

function opusConfig() {
  return {
    codec: "opus",
    sampleRate: RATE,
    numberOfChannels: 1,
    bitrate: Number(params.get("bitrate")) || OPUS_BITRATE,
    opus: { frameDuration: 20000 },
  };
}

function microphoneError(e) {
  switch (e && e.name) {
    case "NotAllowedError":
    case "SecurityError":
      return (
        "Microphone access was denied. Allow it for this site (in the address bar's site " +
        "settings) and press Start again."
      );
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Connect one and press Start again.";
    case "NotReadableError":
    case "AbortError":
      return "The microphone could not be opened: another application may be using it.";
    default:
      return `The microphone could not be opened: ${e && e.name}: ${e && e.message}`;
  }
}

// ---------------------------------------------------------------- session

let session = null;

function seqMessage(seq, timestamp, payload) {
  const message = new Uint8Array(12 + payload.byteLength);
  const view = new DataView(message.buffer);
  view.setUint32(0, seq, true);
  view.setBigUint64(4, BigInt(timestamp), true);
  message.set(payload, 12);
  return message;
}

function toS16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    out[i] = Math.round(s * 32767);
  }
  return new Uint8Array(out.buffer);
}

function streamUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = new URL(`${scheme}//${location.host}/v1/stream`);
  // A credential goes in the subprotocol list where it can (it stays out of
  // access logs); one with characters a subprotocol cannot hold, in the query.
  if (token && !/^[A-Za-z0-9._~-]+$/.test(token)) url.searchParams.set("token", token);
  return url.toString();
}

function subprotocols() {
  return token && /^[A-Za-z0-9._~-]+$/.test(token) ? ["cochlea.v1", `token.${token}`] : [];
}

function recordingUrl(path) {
  const name = String(path).split(/[\\/]/).pop();
  const url = new URL(`/v1/recordings/${encodeURIComponent(name)}`, location.href);
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

class Session {
  constructor(encoding, transcribe) {
    this.encoding = encoding; // "pcm", "opus" or "webrtc"
    this.transcribe = transcribe;
    this.seq = 0;
    this.timestamp = 0; // sample frames at 16 kHz
    this.pending = []; // messages made before `started`
    this.started = false;
    this.closedMessage = null;
    this.fatal = null;
    this.captureEnded = false;
    this.stopTimer = null;
  }

  async start() {
    setPhase("starting");
    status("Opening the microphone…");
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: {
          channelCount: 1,
          // What the microphone hears, unprocessed: recordings and speech
          // recognition both do better without the call-style filters.
          echoCancellation: false,
          noiseSuppression: false,
          autoGainControl: false,
        },
      });
    } catch (e) {
      throw new Error(microphoneError(e));
    }
    await this.openAudio();
    status("Connecting to the server…");
    if (this.encoding === "webrtc") {
      await this.openPeer();
    }
    this.openSocket();
  }

  // The offer is complete (all candidates gathered) before it is sent:
  // one message, no trickle ICE.
  async openPeer() {
    const pc = new RTCPeerConnection({ iceServers: [] });
    this.pc = pc;
    for (const track of this.stream.getAudioTracks()) pc.addTrack(track, this.stream);
    pc.onconnectionstatechange = () => {
      state.peerState = pc.connectionState;
      if (pc.connectionState === "failed") this.fail("The WebRTC connection failed.");
    };
    await pc.setLocalDescription(await pc.createOffer());
    if (pc.iceGatheringState !== "complete") {
      await new Promise((resolve) => {
        const done = () => pc.iceGatheringState === "complete" && resolve();
        pc.addEventListener("icegatheringstatechange", done);
        setTimeout(resolve, 3000);
      });
    }
  }

  async openAudio() {
    // 16 kHz straight from the browser's own resampler where it allows it;
    // otherwise the native rate, and the worklet resamples.
    // (`?resample=worklet` takes the second path on purpose, for testing it
    // in a browser that would allow the first.)
    let context = null;
    let source = null;
    try {
      if (params.get("resample") === "worklet") throw new Error("resampling in the worklet");
      context = new AudioContext({ sampleRate: RATE });
      source = context.createMediaStreamSource(this.stream);
    } catch {
      if (context) context.close();
      context = new AudioContext();
      source = context.createMediaStreamSource(this.stream);
    }
    this.context = context;
    state.sampleRate = context.sampleRate;
    await context.audioWorklet.addModule("/worklet.js");
    this.node = new AudioWorkletNode(context, "cochlea-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { targetRate: RATE, frameSamples: FRAME },
    });
    this.node.port.onmessage = (event) => this.onWorklet(event.data);
    // A muted path to the output keeps the graph pulling audio through the
    // worklet in every browser; nothing is heard.
    const mute = new GainNode(context, { gain: 0 });
    source.connect(this.node).connect(mute).connect(context.destination);
    this.source = source;
    if (context.state === "suspended") {
      await context.resume();
    }
    if (context.state === "suspended") {
      throw new Error("The browser keeps audio paused until you interact with the page: press Start.");
    }
    if (this.encoding === "opus") {
      this.encoder = new AudioEncoder({
        output: (chunk) => this.onOpus(chunk),
        error: (e) => this.fail(`The Opus encoder failed: ${e.message}`),
      });
      this.encoder.configure(opusConfig());
    }
  }

  openSocket() {
    const ws = new WebSocket(streamUrl(), subprotocols());
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      if (this.pc) {
        const start = {
          type: "start",
          transport: "webrtc",
          sdp: this.pc.localDescription.sdp,
          metadata: { source: "browser", user_agent: navigator.userAgent },
        };
        if (this.transcribe) start.transcribe = this.transcribe;
        ws.send(JSON.stringify(start));
        return;
      }
      const start = {
        type: "start",
        encoding: this.encoding === "opus" ? "opus" : "pcm_s16le",
        sample_rate: RATE,
        channels: 1,
        framing: "seq",
        metadata: { source: "browser", user_agent: navigator.userAgent },
      };
      if (this.transcribe) start.transcribe = this.transcribe;
      ws.send(JSON.stringify(start));
    };
    ws.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this.onServer(message);
    };
    ws.onclose = (event) => this.onClose(event);
  }

  onWorklet(data) {
    if (data.type === "flushed") {
      if (this.flushed) this.flushed();
      return;
    }
    if (data.type !== "audio") return;
    showLevel(data.rms, data.peak);
    const samples = data.samples;
    if (this.encoding === "webrtc") {
      // The level meter only: the track itself goes over WebRTC.
      this.timestamp += samples.length;
    } else if (this.encoding === "opus") {
      const audio = new AudioData({
        format: "f32-planar",
        sampleRate: RATE,
        numberOfFrames: samples.length,
        numberOfChannels: 1,
        timestamp: Math.round((this.timestamp * 1e6) / RATE),
        data: samples,
      });
      this.timestamp += samples.length;
      this.encoder.encode(audio);
      audio.close();
    } else {
      this.send(seqMessage(this.seq++, this.timestamp, toS16(samples)));
      this.timestamp += samples.length;
    }
    ui.clock.textContent = clock(this.timestamp / RATE);
  }

  onOpus(chunk) {
    const payload = new Uint8Array(chunk.byteLength);
    chunk.copyTo(payload);
    // Timestamps count 16 kHz sample frames; the encoder's are microseconds.
    const timestamp = Math.round((chunk.timestamp * RATE) / 1e6);
    this.send(seqMessage(this.seq++, timestamp, payload));
  }

  send(message) {
    if (this.fatal) return;
    if (!this.started) {
      this.pending.push(message);
      return;
    }
    if (this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(message);
      state.framesSent++;
    }
  }

  onServer(message) {
    state.messages.push(message);
    if (message.type !== "ack") {
      addLine(ui.log, null, JSON.stringify(message));
    }
    switch (message.type) {
      case "started": {
        this.started = true;
        state.sessionId = message.session_id;
        state.encoding = message.format.encoding;
        setPhase("streaming");
        status(
          `Streaming ${message.format.encoding} at ${message.format.sample_rate} Hz ` +
            `(session ${message.session_id}). Talk!`,
        );
        for (const m of this.pending.splice(0)) this.send(m);
        if (autoStopSeconds > 0) {
          this.stopTimer = setTimeout(() => this.stop(), autoStopSeconds * 1000);
        }
        break;
      }
      case "vad":
        addLine(
          ui.vad,
          clock(message.time),
          `${message.event === "speech_started" ? "speech started" : "speech ended"} (channel ${message.channel})`,
        );
        break;
      case "transcript":
        addLine(ui.transcript, `${clock(message.start)}–${clock(message.end)}`, message.text);
        break;
      case "stats":
        showStats(message);
        break;
      case "error":
        if (message.fatal) {
          // The session is over: stop the microphone and send nothing more
          // (the server waits for quiet before its Close frame).
          this.fatal = message;
          clearTimeout(this.stopTimer);
          this.endCapture();
          showError(`Server error ${message.code}: ${message.message}`);
        } else {
          addLine(ui.vad, null, `${message.code}: ${message.message}`, "warn");
        }
        break;
      case "webrtc_answer":
        this.pc
          .setRemoteDescription({ type: "answer", sdp: message.sdp })
          .catch((e) => this.fail(`The server's WebRTC answer was refused: ${e.message}`));
        break;
      case "recording":
        showRecording(message);
        break;
      case "closed":
        this.closedMessage = message;
        state.closed = message;
        break;
      default:
        break;
    }
  }

  onClose(event) {
    clearTimeout(this.stopTimer);
    this.endCapture();
    const closed = this.closedMessage;
    // `closed` says which close code the server sent; the event's own code
    // is 1006 whenever the connection broke before the Close frame arrived.
    const code = closed ? closed.close_code : event.code;
    state.closeCode = code;
    state.closeEventCode = event.code;
    if (closed && closed.close_code === 1000 && !this.fatal) {
      status(`Done: ${closed.duration_seconds.toFixed(2)} s recorded (close code ${code}).`);
      setPhase("done");
      return;
    }
    if (this.fatal) {
      showError(`Server error ${this.fatal.code}: ${this.fatal.message} (close code ${code}).`);
    } else if (closed) {
      showError(`The server ended the session: ${closed.reason}, close code ${closed.close_code}.`);
    } else if (!this.started && event.code === 1006) {
      showError(
        "Could not connect to the server's /v1/stream (close code 1006). The server may be " +
          "down, or it refused the connection: with API keys configured, open this page with " +
          "?token=<API key or token>.",
      );
    } else {
      showError(
        `The connection closed unexpectedly (close code ${event.code}` +
          `${event.reason ? `, ${event.reason}` : ""}).`,
      );
    }
    status("Stopped.");
    setPhase("failed");
  }

  endCapture() {
    if (this.captureEnded) return;
    this.captureEnded = true;
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    if (this.pc) this.pc.close();
    if (this.source) this.source.disconnect();
    if (this.context) this.context.close();
    showLevel(0, 0);
  }

  async stop() {
    if (!["starting", "streaming"].includes(state.phase)) return;
    clearTimeout(this.stopTimer);
    setPhase("stopping");
    status("Finishing: sending the last audio…");
    // Every captured sample goes out: the worklet's partial frame, then
    // what the Opus encoder still holds.
    if (this.node) {
      await new Promise((resolve) => {
        this.flushed = resolve;
        this.node.port.postMessage({ type: "flush" });
        setTimeout(resolve, 1000);
      });
    }
    if (this.pc) {
      // What is on the wire and in the server's jitter buffer gets there
      // before the stop does; the stop goes before the peer closes, so the
      // server ends the session as stopped, not as a lost peer.
      await new Promise((resolve) => setTimeout(resolve, 300));
      if (this.ws && this.ws.readyState === WebSocket.OPEN && this.started) {
        this.ws.send(JSON.stringify({ type: "stop" }));
        this.stopSent = true;
      }
    }
    this.endCapture();
    if (this.encoder && this.encoder.state === "configured") {
      try {
        await this.encoder.flush();
      } catch {
        // A failed flush loses at most the encoder's last packet.
      }
    }
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      if (!this.started) {
        this.ws.close(1000, "stopped before start");
        return;
      }
      if (!this.stopSent) this.ws.send(JSON.stringify({ type: "stop" }));
      status("Finishing: waiting for the server…");
    } else if (this.ws && this.ws.readyState === WebSocket.CONNECTING) {
      this.ws.close();
    }
  }

  fail(text) {
    showError(text);
    this.endCapture();
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "client failed");
    setPhase("failed");
  }
}

function showLevel(rms, peak) {
  const db = rms > 0 ? 20 * Math.log10(rms) : -Infinity;
  // -60 dBFS … 0 dBFS across the bar.
  const width = Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
  ui.levelBar.style.width = `${width.toFixed(1)}%`;
  ui.levelText.textContent = Number.isFinite(db) ? `${db.toFixed(0)} dBFS` : "– dBFS";
  ui.levelText.title = `peak ${peak.toFixed(3)}`;
}

function showStats(message) {
  const rows = [
    ["media", `${message.media_seconds.toFixed(1)} s`],
    ["received", message.packets_received],
    ["lost", message.packets_lost],
    ["late", message.packets_late],
    ["duplicated", message.packets_duplicated],
    ["damaged", message.packets_damaged],
    ["resumes", message.resumes],
  ];
  ui.stats.replaceChildren(
    ...rows.flatMap(([name, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = String(value);
      return [dt, dd];
    }),
  );
}

function showRecording(message) {
  state.recording = message;
  const url = recordingUrl(message.path);
  ui.player.src = url;
  ui.download.href = url;
  ui.recordingInfo.textContent =
    `${message.duration_seconds.toFixed(2)} s, ${message.sample_rate} Hz, ` +
    `${message.channels === 1 ? "mono" : "stereo"}, ${(message.bytes / 1024).toFixed(0)} KiB`;
  ui.recording.hidden = false;
}

// ---------------------------------------------------------------- wiring

async function start() {
  ui.error.hidden = true;
  state.error = null;
  ui.recording.hidden = true;
  const reason = unsupportedReason();
  if (reason) {
    showError(reason);
    setPhase("failed");
    return;
  }
  let encoding = ui.encoding.value;
  if (encoding === "opus" && !(await opusSupported())) {
    addLine(ui.log, null, "WebCodecs Opus is not available here: sending PCM.", "warn");
    encoding = "pcm";
  }
  session = new Session(encoding, ui.transcribe.value.trim());
  try {
    await session.start();
  } catch (e) {
    session.fail(e.message);
    status("Stopped.");
  }
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", () => session && session.stop());

async function init() {
  if (params.get("transcribe")) ui.transcribe.value = params.get("transcribe");
  const wanted = params.get("encoding");
  const opus = await opusSupported();
  if (!opus) {
    ui.encoding.querySelector('option[value="opus"]').disabled = true;
    ui.encoding.querySelector('option[value="opus"]').textContent = "Opus (needs WebCodecs)";
  }
  if (wanted === "opus" || wanted === "pcm") ui.encoding.value = wanted;
  if (params.get("transport") === "webrtc") ui.encoding.value = "webrtc";
  const reason = unsupportedReason();
  if (reason) {
    showError(reason);
    ui.start.disabled = true;
    return;
  }
  setPhase("idle");
  if (autostart) start();
}

init();
