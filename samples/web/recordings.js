// cochlea recordings page: lists GET /v1/recordings (search by metadata and
// time range, paged), and opens a session (GET /v1/recordings/<id>) to an
// <audio> player (the Range download route), a waveform drawn from the
// decoded audio (one lane per channel, or per file for split channels),
// and its transcript lines, placed at their times; clicking one seeks.
//
// No build step and nothing from other sites: the server embeds this file.
// Page query: token=… (API key or token; sent as a Bearer header to the API,
// and in the query of the <audio> source, which cannot carry a header),
// open=<session id> (open that session once listed).
//
// State for tests and tools: window.cochleaRecordings, and
// document.body.dataset.phase (loading, listed, opening, open, failed).

"use strict";

const params = new URLSearchParams(location.search);
let token = params.get("token") || "";
const openOnLoad = params.get("open") || "";

const $ = (id) => document.getElementById(id);
const ui = {
  search: $("search"), meta: $("meta"), since: $("since"), until: $("until"), clear: $("clear"),
  login: $("login"), key: $("key"), status: $("status"), error: $("error"),
  list: $("recordings"), more: $("more"), detail: $("detail"), title: $("detail-title"),
  info: $("detail-info"), player: $("player"), canvas: $("waveform"), playhead: $("playhead"),
  timeline: $("timeline"), transcript: $("transcript"), files: $("files"), raw: $("raw"),
};

const state = {
  phase: "loading", listed: 0, nextCursor: null, opened: null, lanes: 0, waveformDrawn: false,
  peak: 0, transcriptLines: 0, seekedTo: null, playerSrc: null, error: null,
};
window.cochleaRecordings = state;

function setPhase(phase) {
  state.phase = phase;
  document.body.dataset.phase = phase;
}

function showError(message) {
  state.error = message;
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function apiUrl(path, query) {
  const url = new URL(path, location.href);
  for (const [k, v] of query || []) url.searchParams.append(k, v);
  return url;
}

function withToken(path) {
  const url = apiUrl(path);
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

async function api(path, query) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(apiUrl(path, query), { headers });
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) {
    const error = new Error(body && body.message ? `${body.message} (${body.error}, HTTP ${response.status})`
      : `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function clock(seconds) {
  if (!Number.isFinite(seconds)) return "–";
  const m = Math.floor(seconds / 60);
  const s = seconds - m * 60;
  return `${String(m).padStart(2, "0")}:${s.toFixed(1).padStart(4, "0")}`;
}

function when(rfc3339) {
  const date = new Date(rfc3339);
  return Number.isNaN(date.getTime()) ? rfc3339 : date.toLocaleString();
}

// "agent=ada queue=7" → [["meta.agent","ada"],["meta.queue","7"]]
function searchQuery() {
  const query = [];
  for (const pair of ui.meta.value.trim().split(/\s+/).filter(Boolean)) {
    const at = pair.indexOf("=");
    if (at <= 0) throw new Error(`metadata filters are key=value, not "${pair}"`);
    query.push([`meta.${pair.slice(0, at)}`, pair.slice(at + 1)]);
  }
  for (const [name, input] of [["since", ui.since], ["until", ui.until]]) {
    if (input.value) query.push([name, new Date(input.value).toISOString()]);
  }
  return query;
}

async function load(append) {
  showError("");
  let query;
  try {
    query = searchQuery();
  } catch (e) {
    showError(e.message);
    return;
  }
  query.push(["limit", "50"]);
  if (append && state.nextCursor) query.push(["cursor", state.nextCursor]);
  ui.status.textContent = "Loading…";
  try {
    const page = await api("/v1/recordings", query);
    if (!append) {
      ui.list.replaceChildren();
      state.listed = 0;
    }
    for (const recording of page.recordings) ui.list.append(listItem(recording));
    state.listed += page.recordings.length;
    state.nextCursor = page.next_cursor;
    ui.more.hidden = !page.next_cursor;
    ui.status.textContent = state.listed === 0 ? "No recordings match." :
      `${state.listed} recording${state.listed === 1 ? "" : "s"}${page.next_cursor ? " (more below)" : ""}.`;
    ui.login.hidden = true;
    setPhase("listed");
    if (openOnLoad && !state.opened) open(openOnLoad);
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      ui.login.hidden = false;
      ui.status.textContent = "This server needs an API key or token to show recordings.";
    }
    showError(e.message);
    setPhase("failed");
  }
}

function listItem(recording) {
  const li = document.createElement("li");
  li.tabIndex = 0;
  li.dataset.id = recording.session_id;
  const head = document.createElement("div");
  const time = document.createElement("span");
  time.className = "when";
  time.textContent = when(recording.started_at);
  head.append(time);
  if (recording.in_progress) head.append(badge("recording", "live"));
  else if (!recording.complete) head.append(badge("incomplete"));
  if (recording.transcript) head.append(badge("transcript"));
  const facts = document.createElement("div");
  facts.className = "facts";
  const channels = recording.files.map((f) => f.channels || 1).reduce((a, b) => a + b, 0);
  facts.textContent = `${clock(recording.duration_seconds ?? NaN)} · ${recording.files.length} file` +
    `${recording.files.length === 1 ? "" : "s"} · ${channels} ch`;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = Object.entries(recording.metadata || {})
    .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join("  ");
  li.append(head, facts, meta);
  const go = () => open(recording.session_id);
  li.addEventListener("click", go);
  li.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
  return li;
}

function badge(text, kind) {
  const span = document.createElement("span");
  span.className = `badge ${kind || ""}`;
  span.textContent = text;
  return span;
}

// The files drawn as lanes: the built-in recorder's (<id>.<ext>, or its
// split channels <id>.ch<N>.<ext>); a session with only named recorders
// shows its first file.
function laneFiles(detail) {
  const own = new RegExp(`^${detail.session_id}(\\.ch\\d+)?\\.[a-z]+$`);
  const files = detail.files.filter((f) => f.complete && own.test(f.name));
  if (files.length > 0) return files;
  const complete = detail.files.filter((f) => f.complete);
  return complete.slice(0, 1);
}

let openGeneration = 0;

async function open(id) {
  const generation = ++openGeneration;
  setPhase("opening");
  showError("");
  for (const li of ui.list.children) li.classList.toggle("open", li.dataset.id === id);
  Object.assign(state, { opened: id, lanes: 0, waveformDrawn: false, peak: 0, transcriptLines: 0, seekedTo: null });
  try {
    const detail = await api(`/v1/recordings/${encodeURIComponent(id)}`);
    if (generation !== openGeneration) return;
    ui.detail.hidden = false;
    ui.title.textContent = detail.session_id;
    ui.info.textContent = `${when(detail.started_at)} · ${clock(detail.duration_seconds ?? NaN)}` +
      (detail.in_progress ? " · still recording" : detail.complete ? "" : " · incomplete");
    ui.raw.textContent = JSON.stringify({ metadata: detail.metadata, sidecars: detail.sidecars }, null, 2);
    showFiles(detail);
    const lanes = laneFiles(detail);
    const duration = detail.duration_seconds || 0;
    showTranscript(detail.transcript || [], duration);
    if (lanes.length === 0) {
      ui.player.removeAttribute("src");
      clearCanvas();
      ui.status.textContent = "Nothing to play: the recording is not finished.";
      setPhase("open");
      return;
    }
    state.playerSrc = withToken(lanes[0].url);
    ui.player.src = state.playerSrc;
    await drawWaveform(lanes, generation);
    if (generation !== openGeneration) return;
    ui.status.textContent = `Opened ${detail.session_id}.`;
    setPhase("open");
  } catch (e) {
    if (generation !== openGeneration) return;
    showError(e.message);
    setPhase("failed");
  }
}

function showFiles(detail) {
  ui.files.replaceChildren();
  for (const file of detail.files) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = withToken(file.url);
    a.download = file.name;
    a.textContent = file.name;
    li.append(a, ` ${file.content_type}, ${file.bytes ?? "?"} bytes` +
      `${file.channel != null ? `, channel ${file.channel}` : ""}${file.error ? ` (${file.error})` : ""}`);
    ui.files.append(li);
  }
}

function showTranscript(lines, duration) {
  ui.transcript.replaceChildren();
  ui.timeline.replaceChildren();
  const sorted = [...lines].filter((l) => typeof l.text === "string")
    .sort((a, b) => a.start - b.start || a.channel - b.channel);
  for (const line of sorted) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.start = line.start;
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = `${clock(line.start)}–${clock(line.end)}`;
    const ch = document.createElement("span");
    ch.className = "ch";
    ch.textContent = `ch${line.channel}`;
    const text = document.createElement("span");
    text.textContent = line.text;
    button.append(time, ch, text);
    button.addEventListener("click", () => seek(line.start));
    const li = document.createElement("li");
    li.append(button);
    ui.transcript.append(li);
    if (duration > 0) {
      // The same line on the timeline, under the waveform, where it was said.
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = `ch${line.channel}`;
      chip.title = line.text;
      chip.textContent = line.text;
      chip.style.left = `${Math.min(100, (line.start / duration) * 100)}%`;
      chip.style.top = `${Math.min(line.channel, 1) * 1.5}rem`;
      chip.style.width = `${Math.max(0.5, ((line.end - line.start) / duration) * 100)}%`;
      chip.addEventListener("click", () => seek(line.start));
      ui.timeline.append(chip);
    }
  }
  state.transcriptLines = sorted.length;
}

function seek(seconds) {
  state.seekedTo = seconds;
  ui.player.currentTime = seconds;
  highlight(seconds);
  movePlayhead(seconds);
}

function highlight(now) {
  let current = null;
  for (const button of ui.transcript.querySelectorAll("button")) {
    if (Number(button.dataset.start) <= now + 0.05) current = button;
    button.classList.remove("current");
  }
  if (current) current.classList.add("current");
}

let waveDuration = 0;

function movePlayhead(seconds) {
  if (waveDuration <= 0) return;
  const fraction = Math.min(1, Math.max(0, seconds / waveDuration));
  ui.playhead.style.left = `${fraction * 100}%`;
}

ui.player.addEventListener("timeupdate", () => {
  highlight(ui.player.currentTime);
  movePlayhead(ui.player.currentTime);
});

function clearCanvas() {
  const ctx = ui.canvas.getContext("2d");
  ctx.clearRect(0, 0, ui.canvas.width, ui.canvas.height);
  waveDuration = 0;
}

// Decodes each lane file (fetch + decodeAudioData) and draws min/max per
// pixel column, one lane per channel.
async function drawWaveform(files, generation) {
  const decoder = new OfflineAudioContext(1, 1, 44100);
  const channels = [];
  let duration = 0;
  for (const file of files) {
    const response = await fetch(withToken(file.url));
    if (!response.ok) throw new Error(`${file.name}: HTTP ${response.status}`);
    const audio = await decoder.decodeAudioData(await response.arrayBuffer());
    for (let c = 0; c < audio.numberOfChannels; c++) channels.push(audio.getChannelData(c));
    duration = Math.max(duration, audio.duration);
  }
  if (generation !== openGeneration) return;
  const canvas = ui.canvas;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.max(200, Math.round(canvas.clientWidth * ratio));
  canvas.height = Math.round(160 * ratio);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const style = getComputedStyle(document.documentElement);
  const colors = [style.getPropertyValue("--lane0").trim() || "#2a7ab0", style.getPropertyValue("--lane1").trim() || "#3a9d5d"];
  const laneHeight = canvas.height / channels.length;
  let peak = 0;
  channels.forEach((samples, lane) => {
    const mid = laneHeight * lane + laneHeight / 2;
    const step = samples.length / canvas.width;
    ctx.fillStyle = colors[lane % colors.length];
    for (let x = 0; x < canvas.width; x++) {
      let min = 0;
      let max = 0;
      const end = Math.min(samples.length, Math.floor((x + 1) * step));
      for (let i = Math.floor(x * step); i < end; i++) {
        const s = samples[i];
        if (s < min) min = s;
        if (s > max) max = s;
      }
      peak = Math.max(peak, max, -min);
      const top = mid - max * (laneHeight / 2 - 2);
      const height = Math.max(1, (max - min) * (laneHeight / 2 - 2));
      ctx.fillRect(x, top, 1, height);
    }
    if (lane > 0) {
      ctx.fillStyle = "rgba(128,128,128,0.5)";
      ctx.fillRect(0, laneHeight * lane, canvas.width, 1);
    }
  });
  waveDuration = duration;
  state.lanes = channels.length;
  state.peak = peak;
  state.waveformDrawn = true;
  movePlayhead(ui.player.currentTime || 0);
}

ui.search.addEventListener("submit", (e) => {
  e.preventDefault();
  load(false);
});
ui.clear.addEventListener("click", () => {
  ui.meta.value = "";
  ui.since.value = "";
  ui.until.value = "";
  load(false);
});
ui.more.addEventListener("click", () => load(true));
ui.login.addEventListener("submit", (e) => {
  e.preventDefault();
  token = ui.key.value.trim();
  load(false);
});

load(false);
