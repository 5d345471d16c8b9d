//! The end of a session: parking for resume, or the last audio, the last
//! ack and stats, the sinks finishing, `closed` and the close.

use super::*;

impl SessionCore {
    /// A dropped connection parks a resumable session; anything else ends it.
    pub(super) fn end_or_park(&mut self, reason: EndReason, now: Instant) {
        let dropped = matches!(reason, EndReason::ClientGone { .. } | EndReason::TakenOver);
        if dropped && self.resumable() && self.config.resume_window_ms > 0 {
            if let EndReason::TakenOver = reason {
                self.outputs.push_back(Output::CloseSuperseded);
            }
            tracing::info!(
                window_ms = self.config.resume_window_ms,
                "connection lost; session parked for resume"
            );
            self.outputs.push_back(Output::Park);
            return;
        }
        self.end(reason, now);
    }

    /// Ends the stream: the last audio to the sinks, the last ack and stats,
    /// then the sinks finish (off the workers) and `closed` follows.
    pub(super) fn end(&mut self, reason: EndReason, now: Instant) {
        if let EndReason::ClientGone { close_frame: true } = reason {
            self.outputs.push_back(Output::AnswerClose);
        }
        // Audio a dialect still holds (Twilio's track aligner) goes first.
        // If it cannot be used, that is how the session ends: a call whose
        // audio was lost is never reported as a clean stop (issue 15 item 2).
        let mut reason = reason;
        let mut held = Vec::new();
        self.dialect.finish(&mut held);
        for input in held {
            if let Inbound::Audio(data) = input {
                if let Err(error) = self.on_audio(&data, now) {
                    tracing::warn!(%error, "audio held by the dialect could not be used");
                    if !matches!(reason, EndReason::Error(_)) {
                        reason = EndReason::Error(error);
                    }
                    break;
                }
            }
        }
        let drain = reason.client_may_still_send();
        let client_may_listen = reason.client_may_listen();
        let (why, close_code, error) = match reason {
            EndReason::Stop => ("stop", codes::NORMAL, None),
            EndReason::ClientGone { .. } => ("client_gone", codes::NORMAL, None),
            EndReason::Shutdown => ("shutdown", codes::GOING_AWAY, None),
            EndReason::TakenOver => ("client_gone", codes::GOING_AWAY, None),
            EndReason::ResumeExpired => ("resume_expired", codes::NORMAL, None),
            EndReason::Error(e) => {
                let close_code = e.codes().1;
                let why = match e {
                    SessionError::IdleTimeout { .. } => "idle_timeout",
                    _ => "error",
                };
                (why, close_code, Some(e))
            }
        };
        let mut close_text = why;
        if let Some(error) = &error {
            let (code, _) = error.codes();
            close_text = code.as_str();
            tracing::warn!(%error, code = code.as_str(), close_code, "session error");
            metrics::counter!(names::SESSION_ERRORS_TOTAL, "kind" => code.as_str()).increment(1);
            self.send(&ServerMessage::Error {
                code,
                message: error.to_string(),
                fatal: true,
            });
            // What the sinks keep says the session failed (a recording's
            // sidecar: `complete: false` and the error). An idle timeout or
            // the session's length limit ends a session that lost nothing
            // it accepted: its recording is whole (and downloadable).
            if !matches!(
                error,
                SessionError::IdleTimeout { .. } | SessionError::MaxDuration { .. }
            ) {
                let note = format!("{code}: {error}");
                if let Some(active) = self.active.as_mut() {
                    for sink in active.sinks.iter_mut().filter_map(|s| s.sink.as_mut()) {
                        sink.session_failed(&note);
                    }
                }
            }
        }
        // Audio still held for missing packets goes out, holes filled.
        let mut failed_at_end = None;
        if let Some(active) = self.active.as_mut() {
            active.blocks.clear();
            active.pipeline.finish(&mut active.blocks);
            // A sink that fails now is aborted; the others still finish.
            let dispatched = self.dispatch(now);
            let tails = self.finish_conversions(now);
            failed_at_end = dispatched.and(tails).err();
        }
        // A last ack, so a client that is still there knows all arrived.
        // Sinks that commit off this thread make it wait: it then goes out
        // once they have finished, just before `closed`.
        self.ack_waiting = None;
        if let (Some(seq), true) = (self.handed_seq, client_may_listen) {
            if self.acked_seq != Some(seq) && self.commit_sinks(now).is_ok() {
                self.ack_waiting = Some(seq);
                self.persist(seq);
                self.send_ack_if_committed();
            }
        }
        self.export_jitter_metrics();
        // The last word on the stream's health, before the results.
        if self.config.stats_interval_ms > 0 && self.started_info.is_some() {
            if let Some(stats) = self.stream_stats() {
                self.send(&ServerMessage::Stats(stats));
            }
        }
        let mut summary = ClosedSummary {
            reason: why,
            close_code,
            duration_seconds: 0.0,
            sample_frames: 0,
            audio_messages: 0,
            audio_bytes: 0,
            gap_frames: 0,
            duplicate_messages: 0,
            damaged_packets: 0,
            concealed_frames: 0,
        };
        let mut sinks = Vec::new();
        if let Some(active) = self.active.as_mut() {
            let stats = active.pipeline.stats();
            let media_frames = active.pipeline.media_frames();
            let rate = active.pipeline.declared_format().sample_rate;
            summary.duration_seconds = media_frames as f64 / f64::from(rate);
            summary.sample_frames = media_frames;
            summary.audio_messages = stats.audio_messages;
            summary.audio_bytes = stats.audio_bytes;
            summary.gap_frames = stats.gap_frames;
            summary.duplicate_messages = stats.duplicate_messages;
            summary.damaged_packets = stats.damaged_packets;
            summary.concealed_frames = stats.concealed_frames;
            for (index, slot) in active.sinks.iter_mut().enumerate() {
                if let Some(sink) = slot.sink.take() {
                    sinks.push((index, sink));
                }
            }
        }
        // Every sink finishes and reports; the channel closes after the
        // last. Flushes the client asked for were answered in place.
        if let Some(events) = self.events.take() {
            self.outputs
                .push_back(Output::FinishSinks { sinks, events });
        }
        self.phase = Phase::Finishing(Finishing {
            reason: why,
            close_code,
            close_text,
            drain,
            summary,
        });
        // Its last audio is part of finishing: the client is told, and the
        // close carries the sink's error (PROTOCOL.md §6.9).
        if let Some(error) = failed_at_end {
            self.failed_while_finishing(error);
        }
    }

    /// While finishing: the sinks' last reports.
    pub(super) fn on_final_sink_event(&mut self, event: SinkEvent) {
        match event {
            SinkEvent::Message(message) => {
                if matches!(message, ServerMessage::Recording(_)) {
                    metrics::counter!(names::RECORDINGS_TOTAL).increment(1);
                }
                self.send(&message);
            }
            SinkEvent::Flushed { .. } | SinkEvent::Committed { .. } => {
                self.on_sink_progress(&event)
            }
            SinkEvent::Failed { error, .. } => {
                // What the waiting ack would cover may not have been written.
                self.ack_waiting = None;
                self.failed_while_finishing(error.into());
            }
        }
    }

    /// A sink failed after the session began to end: an extra `error`, and
    /// the close takes its code; `closed` keeps its reason.
    pub(super) fn failed_while_finishing(&mut self, error: SessionError) {
        let (code, close_code) = error.codes();
        tracing::error!(%error, "sink failed while finishing");
        if let Phase::Finishing(finishing) = &mut self.phase {
            finishing.close_code = close_code;
            finishing.close_text = code.as_str();
            finishing.summary.close_code = close_code;
        }
        self.send(&ServerMessage::Error {
            code,
            message: error.to_string(),
            fatal: true,
        });
    }

    /// Every sink is done: `closed`, then the close.
    pub(super) fn close(&mut self) {
        let Phase::Finishing(finishing) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return;
        };
        let media_seconds = finishing.summary.duration_seconds;
        let audio_messages = finishing.summary.audio_messages;
        // Every sink has finished: all it was given is written.
        if let Some(seq) = self.ack_waiting.take().filter(|seq| self.durable(*seq)) {
            self.acked_seq = Some(seq);
            self.send(&ServerMessage::Ack { seq });
        }
        self.send(&ServerMessage::Closed(finishing.summary));
        self.outputs.push_back(Output::Close {
            code: finishing.close_code,
            reason: finishing.close_text.to_owned(),
            drain: finishing.drain,
        });
        tracing::info!(
            reason = finishing.reason,
            close_code = finishing.close_code,
            media_seconds,
            audio_messages,
            "session closed"
        );
    }
}
