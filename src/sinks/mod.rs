//! Sinks: where decoded audio goes.
//!
//! A [`Sink`] is a synchronous state machine: it is handed blocks in media
//! order, with the time passed in, and never touches the socket. Each sink of
//! a session runs in its own task behind a bounded queue ([`spawn`]); what it
//! has to tell the client goes into the session's event channel as a
//! [`SinkEvent`], and the session task, which owns the socket, writes it out.

pub mod recorder;
pub mod transcriber;

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::Config;
use crate::pipeline::convert::OutputFormat;
use crate::pipeline::{AudioBlock, SharedBlock};
use crate::protocol::{ServerMessage, StreamFormat};
use crate::telemetry::names;

/// Names a client may put in `sinks=`.
pub const SINK_NAMES: [&str; 1] = [recorder::NAME];

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("unknown sink '{0}'; available: record")]
    UnknownSink(String),
    /// `transcribe=` named a backend that is not configured.
    #[error("{0}")]
    UnknownBackend(String),
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

    /// Commits everything received so far (the client sent `flush`).
    fn flush(&mut self, now: Instant) -> Result<(), SinkError>;

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

/// Checks that every name is a known sink.
pub fn check_names(names: &[String]) -> Result<(), SinkError> {
    match names.iter().find(|n| !SINK_NAMES.contains(&n.as_str())) {
        Some(unknown) => Err(SinkError::UnknownSink(unknown.clone())),
        None => Ok(()),
    }
}

/// The sample rate each sink of a session will want (`None`: the stream's
/// own), before the sinks exist: a container's Opus decoder is made from its
/// header, before the sinks can be (the recorder needs the channel count),
/// and its rate is chosen from these. Must agree with the sinks'
/// `output_format` (the session checks, in debug builds, once they are built).
pub fn wanted_rates(names: &[String], config: &Config, transcribe: bool) -> Vec<Option<u32>> {
    let mut rates = Vec::new();
    if names.iter().any(|n| n == recorder::NAME) {
        rates.push(config.recorder_settings().sample_rate);
    }
    if transcribe {
        rates.push(Some(transcriber::SAMPLE_RATE));
    }
    rates
}

/// Builds the named sinks for one session.
pub fn build(
    names: &[String],
    context: &SinkContext,
    config: &Config,
) -> Result<Vec<Box<dyn Sink>>, SinkError> {
    // Validate every name before creating anything, so an unknown name
    // leaves no half-made recording behind.
    check_names(names)?;
    let mut sinks: Vec<Box<dyn Sink>> = Vec::with_capacity(names.len());
    for name in names {
        if sinks.iter().any(|s| s.name() == name.as_str()) {
            continue;
        }
        match name.as_str() {
            recorder::NAME => {
                let settings = config.recorder_settings();
                for output in settings.outputs(context.format.channels) {
                    sinks.push(Box::new(recorder::Recorder::create(
                        context, &settings, output,
                    )?));
                }
            }
            other => return Err(SinkError::UnknownSink(other.to_owned())),
        }
    }
    Ok(sinks)
}

/// Commands from the session to one sink task.
#[derive(Debug)]
pub enum SinkCommand {
    /// A block, and the share of the sink's pending-bytes budget it holds
    /// until the sink has written it.
    Audio(SharedBlock, Option<tokio::sync::OwnedSemaphorePermit>),
    Flush,
}

/// What sink tasks tell the session.
#[derive(Debug)]
pub enum SinkEvent {
    /// A result for the client.
    Message(ServerMessage),
    /// Sink `index` has processed one more `flush`.
    Flushed { index: usize },
    /// Sink `index` failed and stopped; its audio is no longer taken.
    Failed { index: usize, error: SinkError },
}

/// The session's handle on a running sink task.
pub struct SinkHandle {
    pub name: &'static str,
    pub commands: mpsc::Sender<SinkCommand>,
}

/// Runs `sink` in its own task. The task ends when the session drops the
/// command sender: it then calls `finish` on the blocking pool and reports.
/// The task holds the only clone of `events` it was given, so once every sink
/// task of a session has ended, the session's event receiver yields `None`:
/// that, not a join handle, is how the session knows all sinks are done.
pub fn spawn(
    index: usize,
    sink: Box<dyn Sink>,
    queue_blocks: usize,
    events: mpsc::UnboundedSender<SinkEvent>,
) -> SinkHandle {
    let name = sink.name();
    let (commands, rx) = mpsc::channel(queue_blocks.max(1));
    let span = tracing::info_span!("sink", sink = name);
    tokio::spawn(run(index, sink, rx, events).instrument(span));
    SinkHandle { name, commands }
}

async fn run(
    index: usize,
    mut sink: Box<dyn Sink>,
    mut commands: mpsc::Receiver<SinkCommand>,
    events: mpsc::UnboundedSender<SinkEvent>,
) {
    // One timer, re-armed only when the sink's deadline moves.
    let far_future = tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365);
    let timer = tokio::time::sleep_until(far_future);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;

    // Blocking-pool work runs outside this task: carry the span (and with it
    // the session id) over by hand.
    let span = tracing::Span::current();

    let write_seconds = metrics::histogram!(names::SINK_WRITE_SECONDS, "sink" => sink.name());
    let failure = loop {
        let wanted = sink.next_deadline();
        if wanted != armed {
            armed = wanted;
            let at = wanted.map_or(far_future, tokio::time::Instant::from_std);
            timer.as_mut().reset(at);
        }
        let step = tokio::select! {
            command = commands.recv() => match command {
                Some(SinkCommand::Audio(block, _budget)) => {
                    let now = Instant::now();
                    let written = sink.write(&block, now);
                    write_seconds.record(now.elapsed().as_secs_f64());
                    written
                }
                Some(SinkCommand::Flush) => sink.flush(Instant::now()).map(|()| {
                    let _ = events.send(SinkEvent::Flushed { index });
                }),
                None => break None,
            },
            () = &mut timer, if armed.is_some() => {
                armed = None;
                timer.as_mut().reset(far_future);
                sink.on_deadline(Instant::now())
            }
        };
        if let Err(error) = step {
            break Some(error);
        }
    };

    match failure {
        Some(error) => {
            tracing::error!(%error, "sink failed");
            metrics::counter!(names::SINK_FAILURES_TOTAL, "sink" => sink.name()).increment(1);
            let reason = error.to_string();
            let _ = events.send(SinkEvent::Failed { index, error });
            // Close properly whatever was written, marked as incomplete.
            let _ =
                tokio::task::spawn_blocking(move || span.in_scope(|| sink.abort(&reason))).await;
        }
        None => {
            let name = sink.name();
            match tokio::task::spawn_blocking(move || span.in_scope(|| sink.finish())).await {
                Ok(Ok(messages)) => {
                    for message in messages {
                        let _ = events.send(SinkEvent::Message(message));
                    }
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, "sink failed to finish");
                    let _ = events.send(SinkEvent::Failed { index, error });
                }
                Err(join_error) => {
                    let error = SinkError::Failed {
                        sink: name,
                        message: format!("finish panicked: {join_error}"),
                    };
                    let _ = events.send(SinkEvent::Failed { index, error });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::pipeline::BlockSamples;

    /// Fails on its second block; records what the runner did with it.
    struct Flaky {
        writes: usize,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Sink for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn write(&mut self, _: &AudioBlock, _: Instant) -> Result<(), SinkError> {
            self.writes += 1;
            if self.writes == 2 {
                return Err(SinkError::Failed {
                    sink: "flaky",
                    message: "disk on fire".into(),
                });
            }
            Ok(())
        }
        fn flush(&mut self, _: Instant) -> Result<(), SinkError> {
            Ok(())
        }
        fn finish(self: Box<Self>) -> Result<Vec<ServerMessage>, SinkError> {
            self.log.lock().unwrap().push("finish".into());
            Ok(vec![])
        }
        fn abort(self: Box<Self>, reason: &str) {
            self.log.lock().unwrap().push(format!("abort: {reason}"));
        }
    }

    fn block() -> SharedBlock {
        std::sync::Arc::new(AudioBlock {
            start_frame: 0,
            frames: 1,
            channels: 1,
            samples: BlockSamples::Audio(vec![0.0]),
        })
    }

    #[tokio::test]
    async fn a_failing_sink_reports_once_and_is_aborted_not_finished() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let sink = Box::new(Flaky {
            writes: 0,
            log: log.clone(),
        });
        let handle = spawn(3, sink, 4, events_tx);
        handle.commands.send(SinkCommand::Flush).await.unwrap();
        handle
            .commands
            .send(SinkCommand::Audio(block(), None))
            .await
            .unwrap();
        handle
            .commands
            .send(SinkCommand::Audio(block(), None))
            .await
            .unwrap();

        assert!(matches!(
            events.recv().await,
            Some(SinkEvent::Flushed { index: 3 })
        ));
        match events.recv().await {
            Some(SinkEvent::Failed { index: 3, error }) => {
                assert!(error.to_string().contains("disk on fire"))
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        // The task ends on its own: the event channel closes.
        assert!(events.recv().await.is_none());
        assert_eq!(*log.lock().unwrap(), ["abort: flaky: disk on fire"]);
        // Later audio is refused, not silently swallowed.
        assert!(handle
            .commands
            .send(SinkCommand::Audio(block(), None))
            .await
            .is_err());
    }
}
