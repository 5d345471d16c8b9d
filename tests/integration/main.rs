//! Integration tests: one binary, each module one behaviour, all against a
//! real `cochlea serve` process on 127.0.0.1 port 0 through real WebSockets.
//!
//! - `streaming`:   every encoding recorded exactly; seq framing; flush; fragments
//! - `bad_input`:   every row of PROTOCOL.md's bad-input table, on its own
//! - `concurrency`: 200 sessions at once, each with its own recording
//! - `crash`:       SIGKILL mid-stream leaves a valid WAV
//! - `full_disk`:   a disk filling up mid-recording (a small tmpfs, as root)
//! - `lifecycle`:   config layers, health, metrics, logs, graceful shutdown
//! - `transcribe`:  VAD segmentation and backends against a scripted HTTP stub
//! - `interim`:     partial transcripts (LocalAgreement-2), word timings, the
//!   verbose_json fallback and the partials' budget, against the same stub
//! - `named_sinks`: `[sinks.<name>]` instances: two recorders of one session
//!   in their own formats and files; startup checks
//! - `opus`:        raw packets, Ogg and WebM streams vs opusdec/ffmpeg; damage
//! - `record_formats`: FLAC and Ogg Opus recordings vs ffmpeg/opusdec/flac;
//!   Opus kept as sent across lost packets; the client's choice of format
//! - `page`:        the page's embedded files; recordings over HTTP (ids, auth)
//! - `recordings_api`: list (paging, filters), detail with transcripts, Range
//!   downloads, delete, credentials, names, retention (proto/schemas/http)
//! - `browser`:     the microphone page in headless Chromium with a fake microphone
//! - `snippets`:    the Python and Node sample clients
//! - `stream_cli`:  `cochlea stream` on the sample files; killed servers; resumes
//! - `loadgen`:     `cochlea loadgen` against the server: every frame acknowledged
//! - `frame_limit`: oversized frames and messages refused at their headers,
//!   on every WebSocket route, with the server's memory bounded
//! - `cluster_infra`: the cluster tests' services (`cluster_support`:
//!   nats-server, moto's S3, haproxy) started, paused, killed and restarted
//! - `dialect_*`:   /twilio, /vonage, /audiofork, /v1/listen replayed from the
//!   platforms' documented messages; transcripts in each one's shapes
//!
//! Every server text message is validated against proto/schemas by the harness
//! (the dialect endpoints' messages are the platforms' shapes: `dialect_client`
//! reads them unvalidated, and each test checks the shape itself).

mod bad_input;
mod browser;
mod cluster_infra;
mod cluster_support;
mod concurrency;
mod crash;
mod dialect_audiofork;
mod dialect_client;
mod dialect_deepgram;
mod dialect_transcribe;
mod dialect_twilio;
mod dialect_vonage;
mod formats;
mod frame_limit;
mod full_disk;
mod harness;
mod interim;
mod lifecycle;
mod loadgen;
mod named_sinks;
mod object_storage;
mod opus;
mod page;
mod record_formats;
mod recordings_api;
mod resume;
mod scale_out;
mod security;
mod signal;
mod snippets;
mod stream_cli;
mod streaming;
mod stt_stub;
mod transcribe;
mod upstream_deepgram;
mod upstream_fakes;
mod webrtc;
