//! Sinks: where decoded audio goes.
//!
//! A [`Sink`] is a synchronous state machine: the session core hands it
//! blocks in media order, in place, with the time passed in, and it never
//! touches the socket. Work that is slow or may block (files, HTTP) it hands
//! to a thread or task of its own. What it has to tell the client goes
//! through its [`registry::Emitter`] into the session's event channel as a
//! [`SinkEvent`]; the session task, which owns the socket, writes it out.
//!
//! Which sinks exist, and how a session's are chosen and built, is the
//! [`registry`]'s business; its docs say how to add a sink.

pub mod recorder;
pub mod registry;
pub mod transcriber;

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use serde_json::{Map, Value};

use crate::pipeline::convert::OutputFormat;
use crate::pipeline::{AudioBlock, OpusPacket};
use crate::protocol::{ServerMessage, StreamFormat};
use recorder::RecordFormat;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("unknown sink '{name}'; available: {available}")]
    UnknownSink { name: String, available: String },
    /// `transcribe=` named a backend that is not configured.
    #[error("{0}")]
    UnknownBackend(String),
    /// `record_format=` named no format, or one clients may not choose.
    #[error("{0}")]
    RecordFormatRefused(String),
    #[error("{sink}: {action} {path}: {source}")]
    Io {
        sink: &'static str,
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{sink}: writing WAV: {source}")]
    Wav {
        sink: &'static str,
        source: hound::Error,
    },
    #[error("{sink}: {message}")]
    Failed { sink: &'static str, message: String },
}

/// What a sink knows about the session it serves.
#[derive(Debug, Clone)]
pub struct SinkContext {
    pub session_id: String,
    pub format: StreamFormat,
    pub metadata: Map<String, Value>,
    pub started_at: SystemTime,
    /// The recording format the client chose (`record_format`), already
    /// allowed by `recorder.client_formats`; `None`: the configured one.
    pub record_format: Option<RecordFormat>,
    /// The Opus pre-skip of the client's stream (48 kHz samples): an Ogg
    /// or WebM header's, 0 for raw packets.
    pub opus_pre_skip: u16,
}

/// A consumer of a session's audio.
///
/// Calls come in this order: `write`/`flush`/`on_deadline` any number of
/// times, then `finish` once. `write` and friends run on the async runtime and
/// must not block for long (buffered file writes are fine; network calls are
/// not: spawn them). `finish` runs on the blocking pool.
pub trait Sink: Send + 'static {
    fn name(&self) -> &'static str;

    /// The format this sink wants its blocks in. The session converts once
    /// per distinct format, whatever the number of sinks sharing it.
    fn output_format(&self) -> OutputFormat {
        OutputFormat::NATIVE
    }

    /// Takes the next block; blocks arrive in media order with no holes.
    fn write(&mut self, block: &AudioBlock, now: Instant) -> Result<(), SinkError>;

    /// True for a sink that takes the client's Opus packets as sent
    /// ([`Sink::write_packets`]) instead of PCM blocks. A session whose
    /// sinks all take packets never runs the Opus decoder. Asked once, when
    /// the sink is built; its spec must say the same beforehand
    /// ([`registry::SinkSpec::takes_opus_packets`]).
    fn takes_opus_packets(&self) -> bool {
        false
    }

    /// Takes the next packets (and holes), in media order, no overlaps;
    /// only called on a sink that [`Sink::takes_opus_packets`].
    fn write_packets(&mut self, packets: &[OpusPacket], now: Instant) -> Result<(), SinkError> {
        let _ = (packets, now);
        Ok(())
    }

    /// Commits everything received so far (the client sent `flush`).
    /// [`Completion::Later`]: the sink reports [`SinkEvent::Flushed`] once
    /// done (its writes run off the session's thread).
    fn flush(&mut self, now: Instant) -> Result<Completion, SinkError>;

    /// Makes everything written so far durable as far as a process crash
    /// goes (handed to the OS, and readable as such: a recorder's header
    /// covers it). Called before every `ack`, so that an acknowledged `seq`
    /// survives a crash of the server (PROTOCOL.md, "What an ack means").
    /// [`Completion::Later`]: the sink reports [`SinkEvent::Committed`] once
    /// done; the ack waits for it.
    fn commit(&mut self, _now: Instant) -> Result<Completion, SinkError> {
        Ok(Completion::Done)
    }

    /// Audio handed to the sink that it has not yet written (bytes). Over
    /// `max_pending_bytes_per_sink`, the session stops reading the socket
    /// (TCP pushes back on the client) until the sink catches up, and ends
    /// with `sink_overloaded` if it has not within `sink_stall_timeout_ms`.
    fn pending_bytes(&self) -> usize {
        0
    }

    /// The session is ending with `error` (a fatal protocol error, a limit,
    /// another sink's failure): what this sink keeps must say so. Called
    /// before `finish`.
    fn session_failed(&mut self, _error: &str) {}

    /// When the sink next wants [`Sink::on_deadline`] called, if ever. A sink
    /// with nothing pending returns `None`, so idle sessions arm no timer.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    fn on_deadline(&mut self, _now: Instant) -> Result<(), SinkError> {
        Ok(())
    }

    /// Ends the stream; returns what to tell the client (e.g. `recording`).
    fn finish(self: Box<Self>) -> Result<Vec<ServerMessage>, SinkError>;

    /// Ends the stream after this sink failed (`reason`): keep what can be
    /// kept, mark it as incomplete, report nothing. Runs on the blocking pool.
    fn abort(self: Box<Self>, reason: &str) {
        let _ = reason;
        let _ = self.finish();
    }
}

/// Whether a flush or commit is done when the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Done,
    /// The sink reports it through its emitter when done.
    Later,
}

/// What sinks tell the session.
#[derive(Debug)]
pub enum SinkEvent {
    /// A result for the client.
    Message(ServerMessage),
    /// Sink `index` has processed one more `flush`.
    Flushed { index: usize },
    /// Sink `index` has made one more `commit` durable.
    Committed { index: usize },
    /// Sink `index` failed and stopped; its audio is no longer taken.
    Failed { index: usize, error: SinkError },
}
