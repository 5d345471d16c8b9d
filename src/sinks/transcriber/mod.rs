//! The transcription sink: voice activity → utterances → a speech-to-text
//! backend → `transcript` messages, per channel.
//!
//! The audio path only runs the detector and copies samples: everything that
//! waits on the network happens in two tasks the sink starts.
//!
//! ```text
//! write() ─ segmenter per channel ─┬─ vad events ───────────────────────────────┐
//!                                  └─ utterances → Queue (bounded; sheds oldest) │
//!   sender task: takes the oldest when a session and a global permit are free,   │
//!                one request task each (timeout, retries with backoff)           │
//!   orderer task: puts results back in utterance order per channel ──────────────┴→ session
//! ```
//!
//! The session learns that the sink is done when its event channel closes;
//! the tasks hold clones of that sender, so `closed` waits for the last
//! transcript, and `stop_wait_ms` bounds that wait.

pub mod backend;
mod config;
mod detector;
mod order;
mod queue;
pub mod segment;
mod sender;
mod service;
mod sink;

pub use self::config::{TranscriptionConfig, VadConfig};
pub use self::detector::Earshot;
pub use self::service::TranscriptionService;
pub use self::sink::Transcriber;

pub const NAME: &str = "transcribe";
/// Backends and the detector work on 16 kHz mono.
pub const SAMPLE_RATE: u32 = 16_000;
/// The backend sessions use when they do not say (`transcribe=none` opts out).
pub const DEFAULT_BACKEND: &str = "default";
