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

/// Utterances waiting for a request slot: filled by the sink on the audio
/// path, drained by the sender task.
pub(super) struct Queue {
    state: Mutex<QueueState>,
    changed: Notify,
}

struct QueueState {
    pending: VecDeque<Utterance>,
    closed: bool,
}

impl Queue {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(QueueState {
                pending: VecDeque::new(),
                closed: false,
            }),
            changed: Notify::new(),
        }
    }

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

    /// Completes once the queue is closed.
    pub(super) async fn wait_closed(&self) {
        loop {
            let notified = self.changed.notified();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn utterance(id: u64) -> Utterance {
        Utterance {
            id,
            channel: 0,
            start: 0,
            samples: Vec::new(),
        }
    }

    fn ids(utterances: &[Utterance]) -> Vec<u64> {
        utterances.iter().map(|u| u.id).collect()
    }

    #[test]
    fn utterance_times_are_seconds_of_16_khz_samples() {
        let utterance = Utterance {
            id: 0,
            channel: 1,
            start: 24_000,
            samples: vec![0; 8_000],
        };
        assert_eq!(utterance.start_seconds(), 1.5);
        assert_eq!(utterance.end_seconds(), 2.0);
    }

    #[test]
    fn a_full_queue_sheds_its_oldest_and_keeps_the_newest() {
        let queue = Queue::new();
        for id in 0..3 {
            assert!(queue.push(utterance(id), 3).is_empty());
        }
        assert_eq!(ids(&queue.push(utterance(3), 3)), [0]);
        assert_eq!(ids(&queue.push(utterance(4), 3)), [1]);
        // A smaller capacity sheds several at once, oldest first.
        assert_eq!(ids(&queue.push(utterance(5), 1)), [2, 3, 4]);
        assert_eq!(queue.pop().map(|u| u.id), Some(5));
        assert!(queue.pop().is_none());
    }

    #[test]
    fn utterances_leave_in_the_order_they_came() {
        let queue = Queue::new();
        for id in 0..4 {
            queue.push(utterance(id), 16);
        }
        let popped: Vec<u64> = std::iter::from_fn(|| queue.pop()).map(|u| u.id).collect();
        assert_eq!(popped, [0, 1, 2, 3]);
    }

    #[test]
    fn waiting_for_work_ends_with_work_or_when_closed_and_empty() {
        let queue = Queue::new();
        // Open and empty: nothing to do yet.
        assert_eq!(queue.wait_for_work().now_or_never(), None);
        assert_eq!(queue.wait_closed().now_or_never(), None);
        queue.push(utterance(0), 16);
        assert_eq!(queue.wait_for_work().now_or_never(), Some(true));
        // Closing keeps what is queued: the sender still gets it.
        queue.close();
        assert!(queue.is_closed());
        assert_eq!(queue.wait_for_work().now_or_never(), Some(true));
        assert_eq!(queue.wait_closed().now_or_never(), Some(()));
        assert_eq!(queue.pop().map(|u| u.id), Some(0));
        assert_eq!(queue.wait_for_work().now_or_never(), Some(false));
    }

    #[tokio::test]
    async fn a_waiting_sender_wakes_on_a_push_and_on_close() {
        let queue = std::sync::Arc::new(Queue::new());
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.wait_for_work().await }
        });
        tokio::task::yield_now().await;
        queue.push(utterance(0), 16);
        assert!(waiter.await.unwrap());
        queue.pop();

        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { (queue.wait_for_work().await, queue.wait_closed().await) }
        });
        tokio::task::yield_now().await;
        queue.close();
        assert_eq!(waiter.await.unwrap(), (false, ()));
    }
}
