//! What the session tells and checks as it goes: acks (after the sinks
//! commit), stats, flushes, the sinks' reports and deadlines, backpressure,
//! the real-time limit and idleness.

use super::*;

impl SessionCore {
    /// Notes whether a sink holds more than its budget of unwritten audio.
    pub(super) fn watch_backlog(&mut self, now: Instant) {
        let budget = self.config.max_pending_bytes_per_sink;
        let over = self.active.as_ref().is_some_and(|a| {
            a.sinks
                .iter()
                .filter_map(|s| s.sink.as_ref())
                .any(|s| s.pending_bytes() > budget)
        });
        if !over {
            self.backlog_since = None;
            self.backlog_check_at = None;
            return;
        }
        if self.backlog_since.is_none() {
            self.backlog_since = Some(now);
            tracing::debug!("a sink is over its pending-bytes budget: not reading the socket");
        }
        // Writes complete off this thread: look again shortly.
        self.backlog_check_at = Some(now + BACKLOG_CHECK);
    }

    /// A sink over its budget for `sink_stall_timeout_ms` ends the session.
    pub(super) fn check_backlog_stall(&self, now: Instant) -> Result<(), SessionError> {
        let Some(since) = self.backlog_since else {
            return Ok(());
        };
        let stall = Duration::from_millis(self.config.sink_stall_timeout_ms);
        if now.saturating_duration_since(since) < stall {
            return Ok(());
        }
        let budget = self.config.max_pending_bytes_per_sink;
        let over = self.active.as_ref().and_then(|a| {
            a.sinks
                .iter()
                .filter_map(|s| s.sink.as_ref())
                .find(|s| s.pending_bytes() > budget)
        });
        match over {
            Some(sink) => {
                metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => "max_pending_bytes_per_sink")
                    .increment(1);
                Err(SessionError::SinkOverloaded {
                    sink: sink.name(),
                    pending_bytes: sink.pending_bytes(),
                    stall_ms: self.config.sink_stall_timeout_ms,
                })
            }
            None => Ok(()),
        }
    }

    /// Checks the audio rate against `max_realtime_factor`: a client over it
    /// is warned once, and closed if it is still over a second later, or at
    /// once if in that second it goes on past what the limit allows in one.
    ///
    /// Media is the stream's position, gaps included: a timestamp jump costs
    /// the server the disk of the audio it fills, whatever the client sent.
    /// Counted from the first audio, so time lost to a stall or a dropped
    /// connection is room to catch up afterwards.
    pub(super) fn check_rate(&mut self, now: Instant) -> Result<(), SessionError> {
        const TOO_FAST_GRACE: Duration = Duration::from_secs(1);
        let limit = self.config.max_realtime_factor;
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        if limit <= 0.0 {
            return Ok(());
        }
        let first = *self.first_audio_at.get_or_insert(now);
        let elapsed = now.saturating_duration_since(first).as_secs_f64();
        let rate = f64::from(active.pipeline.declared_format().sample_rate);
        let media = active.pipeline.media_frames() as f64 / rate;
        let burst = self.config.realtime_burst_ms as f64 / 1000.0;
        let allowed = burst + elapsed * limit;
        if media <= allowed {
            self.too_fast_since = None;
            return Ok(());
        }
        // At elapsed 0 any excess is "infinitely" fast; a millisecond keeps
        // the message a number.
        let factor = (media - burst).max(0.0) / elapsed.max(0.001);
        // The grace second is for slowing down, not for sending more: a
        // client past the allowance by more than the limit lets through in a
        // second is closed now. Without this, one second of 10 s timestamp
        // jumps could claim unbounded disk.
        let grace_ceiling = allowed + limit * TOO_FAST_GRACE.as_secs_f64();
        match self.too_fast_since {
            _ if media > grace_ceiling => {
                if self.too_fast_since.is_none() {
                    metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => "max_realtime_factor")
                        .increment(1);
                }
                Err(SessionError::TooFast { factor, limit })
            }
            None => {
                self.too_fast_since = Some(now);
                metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => "max_realtime_factor")
                    .increment(1);
                self.send(&ServerMessage::Error {
                    code: ErrorCode::AudioTooFast,
                    message: format!(
                        "audio arrives {factor:.1}x faster than real time (limit {limit:.1}x); slow down or the session closes within 1 s"
                    ),
                    fatal: false,
                });
                Ok(())
            }
            Some(since) if now.saturating_duration_since(since) >= TOO_FAST_GRACE => {
                Err(SessionError::TooFast { factor, limit })
            }
            Some(_) => Ok(()),
        }
    }

    pub(super) fn flush(&mut self, now: Instant) -> Result<(), SessionError> {
        self.flushes_requested += 1;
        let mut failed = None;
        if let Some(active) = self.active.as_mut() {
            for (index, slot) in active.sinks.iter_mut().enumerate() {
                let Some(sink) = slot.sink.as_mut() else {
                    continue;
                };
                match sink.flush(now) {
                    Ok(Completion::Done) => slot.flushes_done += 1,
                    Ok(Completion::Later) => {}
                    Err(error) => {
                        failed = Some((index, error));
                        break;
                    }
                }
            }
        }
        if let Some((index, error)) = failed {
            return Err(self.sink_failed(index, error));
        }
        self.report_flushes();
        Ok(())
    }

    /// Sends `flushed` for every flush that all live sinks have processed.
    pub(super) fn report_flushes(&mut self) {
        let done = self
            .active
            .as_ref()
            .and_then(|a| {
                a.sinks
                    .iter()
                    .filter(|s| !s.failed)
                    .map(|s| s.flushes_done)
                    .min()
            })
            .unwrap_or(self.flushes_requested);
        while self.flushes_reported < done.min(self.flushes_requested) {
            self.flushes_reported += 1;
            self.send(&ServerMessage::Flushed);
        }
    }

    pub(super) fn on_sink_event(
        &mut self,
        event: SinkEvent,
    ) -> Result<Option<EndReason>, SessionError> {
        match event {
            SinkEvent::Message(message) => {
                if matches!(message, ServerMessage::Recording(_)) {
                    metrics::counter!(names::RECORDINGS_TOTAL).increment(1);
                }
                self.send(&message);
                Ok(None)
            }
            SinkEvent::Flushed { .. } | SinkEvent::Committed { .. } => {
                self.on_sink_progress(&event);
                Ok(None)
            }
            SinkEvent::Failed { index, error } => Err(self.sink_failed(index, error)),
        }
    }

    /// A flush or commit that a sink finished off the session's thread.
    pub(super) fn on_sink_progress(&mut self, event: &SinkEvent) {
        let (SinkEvent::Flushed { index } | SinkEvent::Committed { index }) = *event else {
            return;
        };
        let Some(slot) = self.active.as_mut().and_then(|a| a.sinks.get_mut(index)) else {
            return;
        };
        if let SinkEvent::Flushed { .. } = event {
            slot.flushes_done += 1;
            self.report_flushes();
        } else {
            // Never beyond what it was asked for.
            slot.commits_done = (slot.commits_done + 1).min(slot.commits_wanted);
            self.send_ack_if_committed();
        }
    }

    /// Idleness, the session's end, held audio, sinks' deadlines, and due
    /// acks and stats.
    pub(super) fn on_timeout(&mut self, now: Instant) -> Result<Option<EndReason>, SessionError> {
        if self.ends_at.is_some_and(|at| now >= at) {
            metrics::counter!(names::LIMIT_HITS_TOTAL, "limit" => "max_session_duration")
                .increment(1);
            return Err(SessionError::MaxDuration {
                max_ms: self.session_limit_ms,
            });
        }
        if now >= self.idle_check_at {
            let idle_until = self.last_activity + self.config.idle_timeout();
            if now >= idle_until {
                return Err(SessionError::IdleTimeout {
                    idle_timeout_ms: self.config.idle_timeout_ms,
                    close_code: self.config.idle_close_code,
                });
            }
            self.idle_check_at = idle_until;
        }
        self.check_backlog_stall(now)?;
        if let Some(active) = self.active.as_mut() {
            // Audio the jitter buffer stopped waiting for.
            active.blocks.clear();
            active.pipeline.poll(now, &mut active.blocks);
            self.dispatch(now)?;
            self.sink_deadlines(now)?;
        }
        self.send_due_reports(now)?;
        Ok(None)
    }

    pub(super) fn sink_deadlines(&mut self, now: Instant) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut failed = None;
        for (index, slot) in active.sinks.iter_mut().enumerate() {
            let Some(sink) = slot.sink.as_mut() else {
                continue;
            };
            if sink.next_deadline().is_some_and(|due| now >= due) {
                if let Err(error) = sink.on_deadline(now) {
                    failed = Some((index, error));
                    break;
                }
            }
        }
        match failed {
            Some((index, error)) => Err(self.sink_failed(index, error)),
            None => Ok(()),
        }
    }

    /// Sends an ack and stats if they are due; also runs on the message path,
    /// so a streaming session needs no timer wake-ups for them.
    pub(super) fn send_due_reports(&mut self, now: Instant) -> Result<(), SessionError> {
        if let Some(seq) = self.handed_seq {
            if self.acked_seq != Some(seq)
                && self.ack_waiting.is_none()
                && now >= self.last_ack_at + self.ack_interval()
            {
                self.last_ack_at = now;
                self.ack_waiting = Some(seq);
                self.persist(seq);
                self.commit_sinks(now)?;
                self.send_ack_if_committed();
            }
        }
        if self.audio_since_stats
            && self.config.stats_interval_ms > 0
            && now >= self.last_stats_at + self.stats_interval()
        {
            self.last_stats_at = now;
            self.audio_since_stats = false;
            self.export_jitter_metrics();
            if let Some(stats) = self.stream_stats() {
                self.send(&ServerMessage::Stats(stats));
            }
        }
        Ok(())
    }

    /// Asks every sink to make what it was given durable, before an ack
    /// says so; the ack goes out once all have ([`Self::send_ack_if_committed`]).
    pub(super) fn commit_sinks(&mut self, now: Instant) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut failed = None;
        for (index, slot) in active.sinks.iter_mut().enumerate() {
            if let Some(sink) = slot.sink.as_mut() {
                slot.commits_wanted += 1;
                match sink.commit(now) {
                    Ok(Completion::Done) => slot.commits_done += 1,
                    Ok(Completion::Later) => {}
                    Err(error) => {
                        failed = Some((index, error));
                        break;
                    }
                }
            }
        }
        match failed {
            Some((index, error)) => Err(self.sink_failed(index, error)),
            None => Ok(()),
        }
    }

    /// Sends the waiting ack once every live sink has committed it.
    pub(super) fn send_ack_if_committed(&mut self) {
        let Some(seq) = self.ack_waiting else {
            return;
        };
        let committed = self.active.as_ref().is_none_or(|a| {
            a.sinks
                .iter()
                .filter(|s| !s.failed)
                .all(|s| s.commits_done >= s.commits_wanted)
        });
        if committed && self.durable(seq) {
            self.ack_waiting = None;
            self.acked_seq = Some(seq);
            self.send(&ServerMessage::Ack { seq });
        }
    }

    /// Adds what the jitter counters gained since the last report to the
    /// server-wide metrics (once per report, not per message).
    pub(super) fn export_jitter_metrics(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let now = active.pipeline.stats();
        let was = std::mem::replace(&mut active.exported, now);
        metrics::counter!(names::JITTER_LOST_PACKETS_TOTAL)
            .increment(now.lost_messages.saturating_sub(was.lost_messages));
        metrics::counter!(names::JITTER_LATE_PACKETS_TOTAL)
            .increment(now.late_messages.saturating_sub(was.late_messages));
        metrics::counter!(names::JITTER_CONCEALED_SAMPLE_FRAMES_TOTAL)
            .increment(now.filled_frames().saturating_sub(was.filled_frames()));
    }

    pub(super) fn stream_stats(&self) -> Option<StreamStats> {
        let active = self.active.as_ref()?;
        let stats = active.pipeline.stats();
        let rate = f64::from(active.pipeline.declared_format().sample_rate);
        Some(StreamStats {
            media_seconds: active.pipeline.media_frames() as f64 / rate,
            packets_received: stats.audio_messages,
            packets_duplicated: stats.duplicate_messages,
            packets_late: stats.late_messages,
            packets_lost: stats.lost_messages,
            packets_damaged: stats.damaged_packets,
            concealed_frames: stats.filled_frames(),
            current_delay_ms: stats.current_delay_ms,
            target_delay_ms: stats.target_delay_ms,
            resumes: self.resumes,
            webrtc: self.webrtc_stats,
        })
    }
}
