//! The orderer: results back in utterance order, per channel.

use std::collections::{BTreeMap, VecDeque};

use tokio::sync::mpsc;
use tracing::Instrument;

use super::agreement::LocalAgreement;
use super::persist::TranscriptLog;
use super::TranscriptionService;
use crate::protocol::{ErrorCode, ServerMessage, TranscribeErrorInfo, Transcript};
use crate::sinks::SinkEvent;
use crate::telemetry::names;

/// What the orderer learns, from the sink and the request tasks.
pub(super) enum Outcome {
    /// A new utterance exists (sent before it is queued, so order is known).
    Created { id: u64, channel: u16 },
    /// Dropped from the queue unsent.
    Shed { id: u64, channel: u16 },
    /// The request finished: a transcript or an error message.
    Done {
        id: u64,
        channel: u16,
        message: ServerMessage,
    },
    /// A partial hypothesis of an utterance still open (`stable_text` is
    /// filled in here).
    Partial(Transcript),
}

/// What the orderer holds for one utterance.
enum Slot {
    Waiting,
    Shed,
    Ready(ServerMessage),
}

/// Puts results back in utterance order per channel, whatever order the
/// backend answers in. Pure: the task below feeds it and sends what it
/// releases. Shed utterances are reported as one count per run of them
/// that leaves together.
#[derive(Default)]
pub(super) struct Orderer {
    /// Per channel, the utterances not yet reported, oldest first.
    channels: BTreeMap<u16, VecDeque<(u64, Slot)>>,
    /// The stability of each utterance that has had a partial.
    agreements: BTreeMap<u64, LocalAgreement>,
}

impl Orderer {
    /// Takes one outcome and appends to `due` the messages it releases: the
    /// results at the front of the channel's line up to the first utterance
    /// still waiting. Outcomes for utterances never created are ignored.
    pub(super) fn handle(&mut self, outcome: Outcome, due: &mut Vec<ServerMessage>) {
        let (channel, id, slot) = match outcome {
            Outcome::Created { id, channel } => {
                self.channels
                    .entry(channel)
                    .or_default()
                    .push_back((id, Slot::Waiting));
                return;
            }
            Outcome::Partial(partial) => {
                self.partial(partial, due);
                return;
            }
            Outcome::Shed { id, channel } => (channel, id, Slot::Shed),
            Outcome::Done {
                id,
                channel,
                message,
            } => (channel, id, Slot::Ready(message)),
        };
        let Some(pending) = self.channels.get_mut(&channel) else {
            return;
        };
        if let Some(entry) = pending.iter_mut().find(|(i, _)| *i == id) {
            entry.1 = slot;
        }
        let mut shed = 0u64;
        while let Some((_, front)) = pending.front() {
            match front {
                Slot::Waiting => break,
                Slot::Shed => {
                    shed += 1;
                    if let Some((id, _)) = pending.pop_front() {
                        self.agreements.remove(&id);
                    }
                }
                Slot::Ready(_) => {
                    if shed > 0 {
                        due.push(shed_message(channel, shed));
                        shed = 0;
                    }
                    if let Some((id, Slot::Ready(message))) = pending.pop_front() {
                        self.agreements.remove(&id);
                        due.push(message);
                    }
                }
            }
        }
        if shed > 0 {
            due.push(shed_message(channel, shed));
        }
    }
}

impl Orderer {
    /// A partial goes out only while its utterance is the oldest one of its
    /// channel still waiting for its final: after the final it would be
    /// stale, and before earlier finals it would be out of order (the next
    /// partial will come). Its stable text is the LocalAgreement-2 prefix
    /// over the partials that went out.
    fn partial(&mut self, mut partial: Transcript, due: &mut Vec<ServerMessage>) {
        let front = self
            .channels
            .get(&partial.channel)
            .and_then(|pending| pending.front());
        if !matches!(front, Some((id, Slot::Waiting)) if *id == partial.utterance_id) {
            return;
        }
        let agreement = self.agreements.entry(partial.utterance_id).or_default();
        partial.stable_text = Some(agreement.push(&partial.text));
        metrics::counter!(names::TRANSCRIBE_PARTIALS_TOTAL).increment(1);
        due.push(ServerMessage::Transcript(partial));
    }
}

/// The orderer task: runs until every holder of the outcome sender (the
/// sink, the sender task, the request tasks) is gone, so the session's
/// event channel closes only after the last result.
///
/// With a `log`, final transcripts are appended to it after they are sent;
/// the task waits for each append, so by the time the session reports
/// `closed` its transcripts are on disk.
/// Starts a session's orderer task (with its transcript log, when the
/// service keeps transcripts); the sender its outcomes go to.
pub(super) fn start_orderer(
    service: &TranscriptionService,
    session_id: &str,
    events: &mpsc::UnboundedSender<SinkEvent>,
    span: &tracing::Span,
) -> mpsc::UnboundedSender<Outcome> {
    let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
    let log = service
        .transcripts_dir()
        .map(|dir| TranscriptLog::new(dir, session_id, service.uploader()));
    tokio::spawn(order(outcomes_rx, events.clone(), log).instrument(span.clone()));
    outcomes_tx
}

async fn order(
    mut outcomes: mpsc::UnboundedReceiver<Outcome>,
    events: mpsc::UnboundedSender<SinkEvent>,
    log: Option<TranscriptLog>,
) {
    let mut orderer = Orderer::default();
    let mut due = Vec::new();
    let mut finals = Vec::new();
    while let Some(outcome) = outcomes.recv().await {
        orderer.handle(outcome, &mut due);
        for message in due.drain(..) {
            if log.is_some() && matches!(&message, ServerMessage::Transcript(t) if t.is_final) {
                finals.push(message.clone());
            }
            let _ = events.send(SinkEvent::Message(message));
        }
        if let Some(log) = &log {
            if !finals.is_empty() {
                log.append(std::mem::take(&mut finals)).await;
            }
        }
    }
    if let Some(log) = log {
        log.close().await;
    }
}

fn shed_message(channel: u16, dropped: u64) -> ServerMessage {
    ServerMessage::TranscribeError(TranscribeErrorInfo {
        code: ErrorCode::TranscribeShed,
        message: format!(
            "the transcription backend is not keeping up: {dropped} utterance{} of channel {channel} dropped unsent",
            if dropped == 1 { "" } else { "s" }
        ),
        fatal: false,
        channel,
        utterance_id: None,
        start: None,
        end: None,
        dropped: Some(dropped),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Transcript;

    fn transcript(id: u64, channel: u16) -> ServerMessage {
        ServerMessage::Transcript(Transcript {
            utterance_id: id,
            channel,
            start: 0.0,
            end: 1.0,
            text: format!("text {id}"),
            stable_text: None,
            is_final: true,
            words: None,
            backend: "default".into(),
            backend_ms: 5,
        })
    }

    fn failed(id: u64, channel: u16) -> ServerMessage {
        ServerMessage::TranscribeError(TranscribeErrorInfo {
            code: ErrorCode::TranscribeFailed,
            message: format!("utterance {id}: HTTP 500"),
            fatal: false,
            channel,
            utterance_id: Some(id),
            start: Some(0.0),
            end: Some(1.0),
            dropped: None,
        })
    }

    fn created(id: u64, channel: u16) -> Outcome {
        Outcome::Created { id, channel }
    }

    fn shed(id: u64, channel: u16) -> Outcome {
        Outcome::Shed { id, channel }
    }

    fn done(id: u64, channel: u16, message: ServerMessage) -> Outcome {
        Outcome::Done {
            id,
            channel,
            message,
        }
    }

    /// A message in a short form the tests compare: `text 3@0`,
    /// `failed 1@0`, `shed 2@1`.
    fn describe(message: &ServerMessage) -> String {
        match message {
            ServerMessage::Transcript(t) => format!("{}@{}", t.text, t.channel),
            ServerMessage::TranscribeError(e) if e.code == ErrorCode::TranscribeFailed => {
                format!("failed {}@{}", e.utterance_id.unwrap(), e.channel)
            }
            ServerMessage::TranscribeError(e) if e.code == ErrorCode::TranscribeShed => {
                format!("shed {}@{}", e.dropped.unwrap(), e.channel)
            }
            _ => panic!("the orderer sends only transcripts and transcription errors"),
        }
    }

    /// Feeds outcomes one by one; returns what each released.
    fn run(orderer: &mut Orderer, outcomes: Vec<Outcome>) -> Vec<Vec<String>> {
        outcomes
            .into_iter()
            .map(|outcome| {
                let mut due = Vec::new();
                orderer.handle(outcome, &mut due);
                due.iter().map(describe).collect()
            })
            .collect()
    }

    #[test]
    fn results_wait_for_every_earlier_utterance_of_their_channel() {
        let mut orderer = Orderer::default();
        let released = run(
            &mut orderer,
            vec![
                created(0, 0),
                created(1, 0),
                created(2, 0),
                done(2, 0, transcript(2, 0)),
                done(1, 0, transcript(1, 0)),
                done(0, 0, transcript(0, 0)),
            ],
        );
        let nothing: Vec<String> = Vec::new();
        assert_eq!(released[..5], vec![nothing; 5]);
        assert_eq!(released[5], ["text 0@0", "text 1@0", "text 2@0"]);
    }

    #[test]
    fn a_result_at_the_front_leaves_at_once_and_frees_those_behind_it() {
        let mut orderer = Orderer::default();
        let released = run(
            &mut orderer,
            vec![
                created(0, 0),
                created(1, 0),
                created(2, 0),
                done(0, 0, transcript(0, 0)),
                done(2, 0, transcript(2, 0)),
                done(1, 0, transcript(1, 0)),
            ],
        );
        assert_eq!(released[3], ["text 0@0"]);
        assert!(released[4].is_empty());
        assert_eq!(released[5], ["text 1@0", "text 2@0"]);
    }

    #[test]
    fn a_failure_takes_its_utterance_s_place_in_the_order() {
        let mut orderer = Orderer::default();
        let released = run(
            &mut orderer,
            vec![
                created(0, 0),
                created(1, 0),
                created(2, 0),
                done(1, 0, failed(1, 0)),
                done(2, 0, transcript(2, 0)),
                done(0, 0, transcript(0, 0)),
            ],
        );
        assert!(released[3].is_empty() && released[4].is_empty());
        assert_eq!(released[5], ["text 0@0", "failed 1@0", "text 2@0"]);
    }

    #[test]
    fn shed_utterances_leave_a_gap_reported_once_per_run_with_its_count() {
        let mut orderer = Orderer::default();
        let released = run(
            &mut orderer,
            vec![
                created(0, 0),
                created(1, 0),
                created(2, 0),
                created(3, 0),
                created(4, 0),
                shed(1, 0),
                shed(2, 0),
                done(4, 0, transcript(4, 0)),
                done(0, 0, transcript(0, 0)),
                shed(3, 0),
            ],
        );
        // Sheds behind a waiting utterance say nothing yet.
        assert!(released[5..8].iter().all(Vec::is_empty), "{released:?}");
        // The two in a row are one report, in their place.
        assert_eq!(released[8], ["text 0@0", "shed 2@0"]);
        // A shed at the front is reported at once, then what it held back.
        assert_eq!(released[9], ["shed 1@0", "text 4@0"]);
    }

    #[test]
    fn a_shed_report_says_how_many_and_of_which_channel() {
        let mut orderer = Orderer::default();
        let mut due = Vec::new();
        for outcome in [
            created(0, 3),
            created(1, 3),
            created(2, 3),
            shed(1, 3),
            shed(2, 3),
            shed(0, 3),
        ] {
            orderer.handle(outcome, &mut due);
        }
        assert_eq!(due.len(), 1);
        let ServerMessage::TranscribeError(error) = &due[0] else {
            panic!("a transcription error");
        };
        assert_eq!(error.code, ErrorCode::TranscribeShed);
        assert_eq!((error.channel, error.dropped), (3, Some(3)));
        assert!(!error.fatal);
        assert_eq!(error.utterance_id, None);
        assert_eq!(
            error.message,
            "the transcription backend is not keeping up: 3 utterances of channel 3 dropped unsent"
        );
        let mut due = Vec::new();
        orderer.handle(created(3, 3), &mut due);
        orderer.handle(shed(3, 3), &mut due);
        let ServerMessage::TranscribeError(error) = &due[0] else {
            panic!("a transcription error");
        };
        assert!(
            error.message.contains(": 1 utterance of channel 3"),
            "{}",
            error.message
        );
    }

    #[test]
    fn channels_do_not_wait_for_each_other() {
        let mut orderer = Orderer::default();
        let released = run(
            &mut orderer,
            vec![
                created(0, 0),
                created(1, 1),
                created(2, 0),
                done(1, 1, transcript(1, 1)),
                done(2, 0, transcript(2, 0)),
                done(0, 0, transcript(0, 0)),
            ],
        );
        assert_eq!(released[3], ["text 1@1"]);
        assert!(released[4].is_empty());
        assert_eq!(released[5], ["text 0@0", "text 2@0"]);
    }

    #[test]
    fn outcomes_for_unknown_utterances_are_ignored() {
        let mut orderer = Orderer::default();
        let released = run(
            &mut orderer,
            vec![
                // A channel with no utterance, and an id never created.
                done(7, 5, transcript(7, 5)),
                shed(8, 5),
                created(0, 0),
                done(9, 0, transcript(9, 0)),
                shed(10, 0),
                done(0, 0, transcript(0, 0)),
                // Already reported: a second result is not sent again.
                done(0, 0, transcript(0, 0)),
            ],
        );
        assert!(released[..5].iter().all(Vec::is_empty), "{released:?}");
        assert_eq!(released[5], ["text 0@0"]);
        assert!(released[6].is_empty());
    }

    fn partial(id: u64, channel: u16, text: &str) -> Outcome {
        Outcome::Partial(Transcript {
            utterance_id: id,
            channel,
            start: 0.0,
            end: 1.0,
            text: text.into(),
            stable_text: None,
            is_final: false,
            words: None,
            backend: "default".into(),
            backend_ms: 3,
        })
    }

    fn stable_texts(due: &[ServerMessage]) -> Vec<(u64, String, String)> {
        due.iter()
            .map(|m| match m {
                ServerMessage::Transcript(t) => {
                    assert!(!t.is_final);
                    (
                        t.utterance_id,
                        t.text.clone(),
                        t.stable_text.clone().unwrap(),
                    )
                }
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn partials_of_the_oldest_open_utterance_go_out_with_their_stable_prefix() {
        let mut orderer = Orderer::default();
        let mut due = Vec::new();
        for outcome in [
            created(0, 0),
            partial(0, 0, "the whether"),
            partial(0, 0, "the weather is"),
            partial(0, 0, "the weather is nice"),
        ] {
            orderer.handle(outcome, &mut due);
        }
        assert_eq!(
            stable_texts(&due),
            [
                (0, "the whether".into(), "".into()),
                (0, "the weather is".into(), "the".into()),
                (0, "the weather is nice".into(), "the weather is".into()),
            ]
        );
        // After its final, a late partial is stale: dropped.
        let mut due = Vec::new();
        orderer.handle(done(0, 0, transcript(0, 0)), &mut due);
        orderer.handle(partial(0, 0, "the weather is nice today"), &mut due);
        assert_eq!(due.iter().map(describe).collect::<Vec<_>>(), ["text 0@0"]);
        assert!(
            orderer.agreements.is_empty(),
            "state of ended utterances is dropped"
        );
    }

    #[test]
    fn a_partial_behind_a_pending_final_is_dropped_and_another_channel_s_is_not() {
        let mut orderer = Orderer::default();
        let mut due = Vec::new();
        for outcome in [
            created(0, 0),
            created(1, 0),
            created(2, 1),
            partial(1, 0, "behind utterance zero"),
            partial(2, 1, "on its own channel"),
        ] {
            orderer.handle(outcome, &mut due);
        }
        assert_eq!(
            stable_texts(&due),
            [(2, "on its own channel".into(), "".into())]
        );
    }

    #[tokio::test]
    async fn the_task_keeps_only_finals_in_the_transcript_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = TranscriptLog::new(dir.path(), "s2", None);
        let (outcomes, outcomes_rx) = mpsc::unbounded_channel();
        let (events, mut events_rx) = mpsc::unbounded_channel();
        for outcome in [
            created(0, 0),
            partial(0, 0, "partial words"),
            partial(0, 0, "partial words again"),
            done(0, 0, transcript(0, 0)),
        ] {
            outcomes.send(outcome).unwrap();
        }
        drop(outcomes);
        order(outcomes_rx, events, Some(log)).await;
        let mut sent = 0;
        while events_rx.try_recv().is_ok() {
            sent += 1;
        }
        assert_eq!(sent, 3, "two partials and the final reach the client");
        let text = std::fs::read_to_string(dir.path().join("s2.transcript.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert_eq!(lines[0]["is_final"], true);
        assert_eq!(lines[0]["text"], "text 0");
    }

    #[tokio::test]
    async fn the_task_keeps_final_transcripts_in_order_before_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let log = TranscriptLog::new(dir.path(), "s1", None);
        let (outcomes, outcomes_rx) = mpsc::unbounded_channel();
        let (events, _events_rx) = mpsc::unbounded_channel();
        for outcome in [
            created(0, 0),
            created(1, 0),
            created(2, 0),
            done(2, 0, transcript(2, 0)),
            done(1, 0, failed(1, 0)),
            done(0, 0, transcript(0, 0)),
        ] {
            outcomes.send(outcome).unwrap();
        }
        drop(outcomes);
        order(outcomes_rx, events, Some(log)).await;
        // Written when the task ends: only transcripts, in utterance order.
        let text = std::fs::read_to_string(dir.path().join("s1.transcript.jsonl")).unwrap();
        let texts: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].to_string())
            .collect();
        assert_eq!(texts, ["\"text 0\"", "\"text 2\""]);
    }

    #[tokio::test]
    async fn the_task_sends_released_results_and_ends_when_its_senders_are_gone() {
        let (outcomes, outcomes_rx) = mpsc::unbounded_channel();
        let (events, mut events_rx) = mpsc::unbounded_channel();
        for outcome in [
            created(0, 0),
            created(1, 0),
            done(1, 0, transcript(1, 0)),
            done(0, 0, transcript(0, 0)),
        ] {
            outcomes.send(outcome).unwrap();
        }
        drop(outcomes);
        // Completes: the last sender is gone.
        order(outcomes_rx, events, None).await;
        let mut sent = Vec::new();
        while let Some(event) = events_rx.recv().await {
            let SinkEvent::Message(message) = event else {
                panic!("the orderer sends only messages");
            };
            sent.push(describe(&message));
        }
        // recv() returned None: the task dropped the events sender too.
        assert_eq!(sent, ["text 0@0", "text 1@0"]);
    }
}
