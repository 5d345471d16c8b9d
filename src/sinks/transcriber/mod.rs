//! The transcription sink: voice activity → utterances → a speech-to-text
//! backend → `transcript` messages, per channel.
//!
//! A session that transcribes gets this sink beside the recorder. It takes the
//! stream at 16 kHz with its channels kept, finds each channel's utterances
//! with a small neural voice detector, announces them to the client as `vad`
//! events, sends each utterance to the session's backend as one HTTP request,
//! and returns the text as `transcript` messages in utterance order. A slow or
//! failing backend costs transcripts (reported as `transcribe_failed` and
//! `transcribe_shed` errors), never audio: the recorder and the socket do not
//! wait for it.
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
//!
//! Where each part lives:
//!
//! | file          | job                                                        |
//! |---------------|------------------------------------------------------------|
//! | `config.rs`   | `[transcription]` settings and their validation            |
//! | `service.rs`  | what sessions share: backends, HTTP client, global limit   |
//! | `detector.rs` | the speech detector (earshot)                              |
//! | `segment.rs`  | speech decisions → utterances (pure, clock-free)           |
//! | `sink.rs`     | the sink: segmenters, `vad` events, feeding the queue      |
//! | `queue.rs`    | the bounded queue of utterances, shedding the oldest       |
//! | `sender.rs`   | the sender task and each request's timeout and retries     |
//! | `backend.rs`  | one HTTP request per utterance: OpenAI-style or webhook;   |
//! |               | `verbose_json` for word timings, `json` when refused       |
//! | `order.rs`    | results back in utterance order, gaps reported; partials   |
//! | `interim.rs`  | partials of open utterances (`interim=true`), their budget |
//! | `agreement.rs`| LocalAgreement-2: the stable prefix of partials (pure)     |
//! | `words.rs`    | word timings from `verbose_json` replies (pure)            |
//! | `persist.rs`  | final transcripts appended to `<id>.transcript.jsonl`      |
//! | `spec.rs`     | kind `transcribe` (`[sinks.<name>]`) and its registry spec |
//! | `streaming/`  | the streaming kinds (`deepgram`, `assemblyai`,             |
//! |               | `openai_realtime`, `vosk`), a folder each: one upstream    |
//! |               | WebSocket per session instead of all of the above          |

mod agreement;
pub mod backend;
mod config;
mod detector;
mod interim;
mod order;
pub mod persist;
mod queue;
pub mod segment;
mod sender;
mod service;
mod sink;
pub mod spec;
pub mod streaming;
pub mod words;

pub use self::config::{TranscriptionConfig, VadConfig};
pub use self::detector::Earshot;
pub use self::service::TranscriptionService;
pub use self::sink::Transcriber;

pub const NAME: &str = "transcribe";
/// Backends and the detector work on 16 kHz mono.
pub const SAMPLE_RATE: u32 = 16_000;
/// The backend sessions use when they do not say (`transcribe=none` opts out).
pub const DEFAULT_BACKEND: &str = "default";
