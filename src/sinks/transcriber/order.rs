//! The orderer task: results back in utterance order, per channel.

use std::collections::{BTreeMap, VecDeque};

use tokio::sync::mpsc;

use crate::protocol::{ServerMessage, TranscribeErrorInfo};
use crate::sinks::SinkEvent;

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
}

/// What the orderer holds for one utterance.
enum Slot {
    Waiting,
    Shed,
    Ready(ServerMessage),
}

/// Sends results in utterance order per channel, whatever order the backend
/// answers in. Shed utterances are reported as one count per run of them.
pub(super) async fn order(
    mut outcomes: mpsc::UnboundedReceiver<Outcome>,
    events: mpsc::UnboundedSender<SinkEvent>,
) {
    let mut channels: BTreeMap<u16, VecDeque<(u64, Slot)>> = BTreeMap::new();
    while let Some(outcome) = outcomes.recv().await {
        let (channel, id, slot) = match outcome {
            Outcome::Created { id, channel } => {
                channels
                    .entry(channel)
                    .or_default()
                    .push_back((id, Slot::Waiting));
                continue;
            }
            Outcome::Shed { id, channel } => (channel, id, Slot::Shed),
            Outcome::Done {
                id,
                channel,
                message,
            } => (channel, id, Slot::Ready(message)),
        };
        let Some(pending) = channels.get_mut(&channel) else {
            continue;
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
                    pending.pop_front();
                }
                Slot::Ready(_) => {
                    if shed > 0 {
                        send_shed(&events, channel, shed);
                        shed = 0;
                    }
                    if let Some((_, Slot::Ready(message))) = pending.pop_front() {
                        let _ = events.send(SinkEvent::Message(message));
                    }
                }
            }
        }
        if shed > 0 {
            send_shed(&events, channel, shed);
        }
    }
}

fn send_shed(events: &mpsc::UnboundedSender<SinkEvent>, channel: u16, dropped: u64) {
    let message = ServerMessage::TranscribeError(TranscribeErrorInfo {
        code: "transcribe_shed",
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
    });
    let _ = events.send(SinkEvent::Message(message));
}
