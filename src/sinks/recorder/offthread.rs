//! The recorder's file work, off the async workers.
//!
//! The session calls the recorder in place for every block; the recorder
//! only copies the samples into a batch. Batches, header checkpoints and
//! syncs go to an [`OffThread`] queue, which a job on tokio's blocking pool
//! drains in order. One slow disk (or a full one) then holds up only the
//! recordings on it, never a worker thread and the other sessions on it.
//!
//! Order: each recorder has its own queue and at most one drain job at a
//! time; whoever holds the file lock takes the queued work, so work is
//! written in the order it was queued, including by `finish`, which drains
//! what is left on its own thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::pipeline::OpusPacket;
use crate::sinks::registry::Emitter;
use crate::sinks::{SinkError, SinkEvent};

/// One piece of work for the file, in order.
pub(super) enum Job {
    /// Interleaved samples in [-1, 1).
    Samples(Vec<f32>),
    /// This many zero samples.
    Silence(usize),
    /// The client's Opus packets (and holes), in media order.
    Packets(Vec<OpusPacket>),
    /// Patch the header to cover everything written (and sync, with
    /// `recorder.fsync`), then report.
    Checkpoint(Report),
}

/// What to tell the session once a checkpoint is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Report {
    Nothing,
    Committed,
    Flushed,
}

/// The file side: what the queued work is done to.
pub(super) trait FileSide: Send + 'static {
    fn write_samples(&mut self, samples: &[f32]) -> Result<(), SinkError>;
    fn write_silence(&mut self, samples: usize) -> Result<(), SinkError>;
    fn write_packets(&mut self, packets: &[OpusPacket]) -> Result<(), SinkError>;
    fn checkpoint(&mut self) -> Result<(), SinkError>;
    /// The file failed with `reason`: close what can be kept, marked so.
    fn failed(self, reason: &str);
}

struct Inbox {
    jobs: VecDeque<Job>,
    /// A drain job is queued or running.
    scheduled: bool,
}

struct Shared<F> {
    inbox: Mutex<Inbox>,
    /// `None` once the file failed: later work is dropped (the failure has
    /// been reported and ends the session).
    file: Mutex<Option<F>>,
    /// Bytes of samples queued and not yet written.
    pending_bytes: AtomicUsize,
    emitter: Emitter,
    write_seconds: metrics::Histogram,
}

/// A recorder's queue of file work.
pub(super) struct OffThread<F: FileSide> {
    shared: Arc<Shared<F>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single push, take or replace: a
    // panic cannot leave them half made.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl<F: FileSide> OffThread<F> {
    pub fn new(file: F, emitter: Emitter, write_seconds: metrics::Histogram) -> Self {
        Self {
            shared: Arc::new(Shared {
                inbox: Mutex::new(Inbox {
                    jobs: VecDeque::new(),
                    scheduled: false,
                }),
                file: Mutex::new(Some(file)),
                pending_bytes: AtomicUsize::new(0),
                emitter,
                write_seconds,
            }),
        }
    }

    /// Queues `jobs` and makes sure a drain job will write them. Outside a
    /// tokio runtime (unit tests) the work is done at once.
    pub fn submit(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut bytes = 0;
        let schedule = {
            let mut inbox = lock(&self.shared.inbox);
            for job in jobs {
                bytes += job_bytes(&job);
                inbox.jobs.push_back(job);
            }
            !std::mem::replace(&mut inbox.scheduled, true)
        };
        self.shared
            .pending_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        if !schedule {
            return;
        }
        let shared = self.shared.clone();
        let span = tracing::Span::current();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || span.in_scope(|| drain(&shared)));
            }
            Err(_) => drain(&shared),
        }
    }

    pub fn pending_bytes(&self) -> usize {
        self.shared.pending_bytes.load(Ordering::Relaxed)
    }

    /// On the blocking pool: writes what is still queued, then hands the
    /// file over (`None` if it failed).
    pub fn into_file(self) -> Option<F> {
        let mut file = lock(&self.shared.file);
        let jobs = std::mem::take(&mut lock(&self.shared.inbox).jobs);
        run_jobs(&self.shared, &mut file, jobs);
        file.take()
    }
}

/// The bytes of audio a job holds, for `pending_bytes`.
fn job_bytes(job: &Job) -> usize {
    match job {
        Job::Samples(samples) => std::mem::size_of_val(samples.as_slice()),
        Job::Packets(packets) => packets
            .iter()
            .map(|p| match p {
                OpusPacket::Data { data, .. } => data.len(),
                OpusPacket::Lost { .. } => 0,
            })
            .sum(),
        Job::Silence(_) | Job::Checkpoint(_) => 0,
    }
}

/// Writes queued work until there is none.
fn drain<F: FileSide>(shared: &Shared<F>) {
    loop {
        // The file lock first: whoever holds it writes the work it takes,
        // so work is never written out of order.
        let mut file = lock(&shared.file);
        let jobs = {
            let mut inbox = lock(&shared.inbox);
            if inbox.jobs.is_empty() {
                inbox.scheduled = false;
                return;
            }
            std::mem::take(&mut inbox.jobs)
        };
        run_jobs(shared, &mut file, jobs);
    }
}

fn run_jobs<F: FileSide>(shared: &Shared<F>, file: &mut Option<F>, jobs: VecDeque<Job>) {
    for job in jobs {
        let bytes = job_bytes(&job);
        if let Some(f) = file.as_mut() {
            let started = Instant::now();
            let result = match &job {
                Job::Samples(samples) => f.write_samples(samples),
                Job::Silence(n) => f.write_silence(*n),
                Job::Packets(packets) => f.write_packets(packets),
                Job::Checkpoint(_) => f.checkpoint(),
            };
            shared.write_seconds.record(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => {
                    if let Job::Checkpoint(report) = job {
                        let index = shared.emitter.index();
                        let event = match report {
                            Report::Nothing => None,
                            Report::Committed => Some(SinkEvent::Committed { index }),
                            Report::Flushed => Some(SinkEvent::Flushed { index }),
                        };
                        if let Some(event) = event {
                            shared.emitter.send(event);
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "recording failed");
                    if let Some(failed) = file.take() {
                        failed.failed(&error.to_string());
                    }
                    shared.emitter.failed(error);
                }
            }
        }
        shared.pending_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// Logs what it was asked; fails from the Nth write on.
    struct Log {
        written: Arc<Mutex<Vec<String>>>,
        fail_from: Option<usize>,
        writes: usize,
    }

    impl FileSide for Log {
        fn write_samples(&mut self, samples: &[f32]) -> Result<(), SinkError> {
            self.writes += 1;
            if self.fail_from.is_some_and(|n| self.writes >= n) {
                return Err(SinkError::Failed {
                    sink: "record",
                    message: "disk full".into(),
                });
            }
            lock(&self.written).push(format!("samples {}", samples.len()));
            Ok(())
        }
        fn write_silence(&mut self, samples: usize) -> Result<(), SinkError> {
            lock(&self.written).push(format!("silence {samples}"));
            Ok(())
        }
        fn write_packets(&mut self, packets: &[OpusPacket]) -> Result<(), SinkError> {
            lock(&self.written).push(format!("packets {}", packets.len()));
            Ok(())
        }
        fn checkpoint(&mut self) -> Result<(), SinkError> {
            lock(&self.written).push("checkpoint".into());
            Ok(())
        }
        fn failed(self, reason: &str) {
            lock(&self.written).push(format!("failed: {reason}"));
        }
    }

    fn setup(
        fail_from: Option<usize>,
    ) -> (
        OffThread<Log>,
        Arc<Mutex<Vec<String>>>,
        mpsc::UnboundedReceiver<SinkEvent>,
    ) {
        let written = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        let log = Log {
            written: written.clone(),
            fail_from,
            writes: 0,
        };
        let off = OffThread::new(
            log,
            Emitter::new(3, tx),
            metrics::histogram!("test_write_seconds"),
        );
        (off, written, rx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_is_written_in_order_off_the_thread_and_reported() {
        let (off, written, mut events) = setup(None);
        for k in 0..50 {
            off.submit([Job::Samples(vec![0.0; k + 1]), Job::Silence(k)]);
        }
        off.submit([Job::Checkpoint(Report::Committed)]);
        assert!(matches!(
            events.recv().await,
            Some(SinkEvent::Committed { index: 3 })
        ));
        let expected: Vec<String> = (0..50)
            .flat_map(|k| [format!("samples {}", k + 1), format!("silence {k}")])
            .chain(["checkpoint".to_owned()])
            .collect();
        assert_eq!(*lock(&written), expected);
        assert_eq!(off.pending_bytes(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finish_writes_what_is_left_after_what_came_before() {
        let (off, written, _events) = setup(None);
        off.submit([Job::Samples(vec![0.0; 10])]);
        off.submit([Job::Samples(vec![0.0; 20])]);
        let file = tokio::task::spawn_blocking(move || off.into_file())
            .await
            .unwrap();
        assert!(file.is_some());
        assert_eq!(*lock(&written), ["samples 10", "samples 20"]);
    }

    /// Blocks every write for `stall` (a disk that hangs).
    struct Stalled {
        stall: std::time::Duration,
    }

    impl FileSide for Stalled {
        fn write_samples(&mut self, _: &[f32]) -> Result<(), SinkError> {
            std::thread::sleep(self.stall);
            Ok(())
        }
        fn write_silence(&mut self, _: usize) -> Result<(), SinkError> {
            Ok(())
        }
        fn write_packets(&mut self, _: &[OpusPacket]) -> Result<(), SinkError> {
            Ok(())
        }
        fn checkpoint(&mut self) -> Result<(), SinkError> {
            Ok(())
        }
        fn failed(self, _: &str) {}
    }

    /// Issue 14 part 3: one recording whose disk hangs for 2 s holds up
    /// only itself. The runtime has one worker thread, as an actix worker
    /// does: the commits of another recording keep completing (and the
    /// worker stays free) while the stalled write is in progress.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stalled_file_holds_up_only_its_own_recording() {
        let (tx_a, mut events_a) = mpsc::unbounded_channel();
        let stalled = OffThread::new(
            Stalled {
                stall: std::time::Duration::from_secs(2),
            },
            Emitter::new(0, tx_a),
            metrics::histogram!("test_write_seconds"),
        );
        let (healthy, _written, mut events_b) = setup(None);
        let started = Instant::now();
        stalled.submit([
            Job::Samples(vec![0.0; 16]),
            Job::Checkpoint(Report::Committed),
        ]);
        let mut commits = 0;
        while started.elapsed() < std::time::Duration::from_millis(1500) {
            healthy.submit([
                Job::Samples(vec![0.0; 16]),
                Job::Checkpoint(Report::Committed),
            ]);
            let event = tokio::time::timeout(std::time::Duration::from_secs(1), events_b.recv())
                .await
                .expect("the healthy recording's commit completed while the other was stalled");
            assert!(matches!(event, Some(SinkEvent::Committed { index: 3 })));
            commits += 1;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            events_a.try_recv().is_err(),
            "the stalled recording cannot have committed yet"
        );
        assert!(commits >= 10, "only {commits} commits in 1.5 s");
        // The stalled one completes in its own time.
        assert!(matches!(
            events_a.recv().await,
            Some(SinkEvent::Committed { index: 0 })
        ));
        assert!(started.elapsed() >= std::time::Duration::from_secs(2));
    }

    #[test]
    fn a_failed_file_reports_once_and_takes_no_more_work() {
        let (off, written, mut events) = setup(Some(2));
        off.submit([Job::Samples(vec![0.0; 1])]);
        off.submit([Job::Samples(vec![0.0; 2])]);
        off.submit([Job::Samples(vec![0.0; 3]), Job::Checkpoint(Report::Flushed)]);
        match events.try_recv() {
            Ok(SinkEvent::Failed { index: 3, error }) => {
                assert!(error.to_string().contains("disk full"))
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(events.try_recv().is_err(), "no flush reported after it");
        assert_eq!(*lock(&written), ["samples 1", "failed: record: disk full"]);
        assert_eq!(off.pending_bytes(), 0, "dropped work is not pending");
        assert!(off.into_file().is_none());
    }
}
