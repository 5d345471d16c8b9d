//! A session's utterances between the sink and the sender task.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::SAMPLE_RATE;

/// One utterance on its way to the backend.
pub(super) struct Utterance {
    pub(super) id: u64,
    pub(super) channel: u16,
    pub(super) start: u64,
    pub(super) samples: Vec<i16>,
}

impl Utterance {
    pub(super) fn start_seconds(&self) -> f64 {
        self.start as f64 / f64::from(SAMPLE_RATE)
    }
    pub(super) fn end_seconds(&self) -> f64 {
        (self.start + self.samples.len() as u64) as f64 / f64::from(SAMPLE_RATE)
    }
}

/// Utterances waiting for a request slot.
pub(super) struct Queue {
    pub(super) state: Mutex<QueueState>,
    pub(super) changed: Notify,
}

pub(super) struct QueueState {
    pub(super) pending: VecDeque<Utterance>,
    pub(super) closed: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an utterance; returns those dropped to make room.
    pub(super) fn push(&self, utterance: Utterance, capacity: usize) -> Vec<Utterance> {
        let mut state = self.lock();
        state.pending.push_back(utterance);
        let excess = state.pending.len().saturating_sub(capacity);
        let shed = state.pending.drain(..excess).collect();
        drop(state);
        self.changed.notify_one();
        shed
    }

    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_one();
    }

    /// Waits until an utterance is pending (true) or the queue is closed
    /// and empty (false).
    pub(super) async fn wait_for_work(&self) -> bool {
        loop {
            let notified = self.changed.notified();
            {
                let state = self.lock();
                if !state.pending.is_empty() {
                    return true;
                }
                if state.closed {
                    return false;
                }
            }
            notified.await;
        }
    }

    pub(super) fn pop(&self) -> Option<Utterance> {
        self.lock().pending.pop_front()
    }

    pub(super) fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

pub(super) async fn wait_closed(queue: &Queue) {
    loop {
        let notified = queue.changed.notified();
        if queue.is_closed() {
            return;
        }
        notified.await;
    }
}
