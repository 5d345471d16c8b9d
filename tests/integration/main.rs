//! Integration tests: one binary, each module one behaviour, all against a
//! real `cochlea serve` process on 127.0.0.1 port 0 through real WebSockets.
//!
//! - `streaming`:   every encoding recorded exactly; seq framing; flush; fragments
//! - `bad_input`:   every row of PROTOCOL.md's bad-input table, on its own
//! - `concurrency`: 200 sessions at once, each with its own recording
//! - `crash`:       SIGKILL mid-stream leaves a valid WAV
//! - `lifecycle`:   config layers, health, metrics, logs, graceful shutdown
//! - `opus`:        raw packets, Ogg and WebM streams vs opusdec/ffmpeg; damage
//! - `loadgen`:     `cochlea loadgen` against the server: every frame acknowledged
//!
//! Every server text message is validated against proto/schemas by the harness.

mod bad_input;
mod concurrency;
mod crash;
mod formats;
mod harness;
mod lifecycle;
mod loadgen;
mod opus;
mod resume;
mod security;
mod streaming;
