//! The audio path: one message through the pipeline, then each block to
//! every sink in its group's format, in place; a failing sink leaves.

use super::*;

impl SessionCore {
    pub(super) fn on_audio(&mut self, data: &[u8], now: Instant) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Err(ProtocolError::AudioBeforeStart.into());
        };
        self.last_activity = now;
        let before = active.pipeline.stats();
        active.blocks.clear();
        let pushed = active.pipeline.push(data, now, &mut active.blocks);
        let after = active.pipeline.stats();
        let damage = active.pipeline.take_damage();
        if after.damaged_packets > before.damaged_packets {
            metrics::counter!(names::AUDIO_DAMAGED_PACKETS_TOTAL)
                .increment(after.damaged_packets - before.damaged_packets);
        }
        active.counters.bytes.increment(data.len() as u64);
        active.counters.frames.increment(1);
        active
            .counters
            .sample_frames
            .increment(after.decoded_frames - before.decoded_frames);
        if after.gap_frames > before.gap_frames {
            metrics::counter!(names::AUDIO_GAP_SAMPLE_FRAMES_TOTAL)
                .increment(after.gap_frames - before.gap_frames);
        }
        if after.duplicate_messages > before.duplicate_messages {
            metrics::counter!(names::AUDIO_DUPLICATE_MESSAGES_TOTAL).increment(1);
        }
        // A container's header may have come with this message.
        self.open_sinks_when_format_known()?;
        if let Some(damage) = damage {
            self.report_damage(damage, after.damaged_packets, now);
        }
        // Even when the push failed, what it completed before goes out.
        self.dispatch(now)?;
        self.audio_since_stats = true;
        self.send_due_reports(now)?;
        pushed?;
        self.check_rate(now)
    }

    /// Hands the blocks waiting in `active.blocks` to every live sink, in
    /// order, each group in its format.
    pub(super) fn dispatch(&mut self, now: Instant) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut blocks = std::mem::take(&mut active.blocks);
        let mut converted = std::mem::take(&mut active.converted);
        // A sink that fails leaves at once; the others still get every
        // block, which the acks say they have.
        let mut failed = Vec::new();
        for block in &blocks {
            for group in active.groups.iter_mut() {
                if group.converter.is_identity() {
                    write_to(&mut active.sinks, &group.members, block, now, &mut failed);
                } else {
                    group.converter.convert(block, &mut converted);
                    for out in &converted {
                        write_to(&mut active.sinks, &group.members, out, now, &mut failed);
                    }
                    group.converter.recycle(&mut converted);
                }
            }
        }
        // Opus packets as sent, to the sinks that take them.
        let mut packets = std::mem::take(&mut active.packets);
        active.pipeline.take_packets(&mut packets);
        if !packets.is_empty() {
            for &index in &active.packet_sinks {
                let Some(slot) = active.sinks.get_mut(index) else {
                    continue;
                };
                let Some(sink) = slot.sink.as_mut() else {
                    continue;
                };
                if let Err(error) = sink.write_packets(&packets, now) {
                    slot.failed = true;
                    failed.extend(slot.sink.take().map(|sink| (sink, error)));
                }
            }
            packets.clear();
        }
        active.packets = packets;
        // The sample buffers serve the next message: no allocation per message.
        active.pipeline.recycle(&mut blocks);
        active.blocks = blocks;
        active.converted = converted;
        if let Some(seq) = active.pipeline.last_seq() {
            self.handed_seq = Some(seq);
        }
        self.sinks_failed(failed)
    }

    /// End of stream: the converters' tails, so every sink gets exact lengths.
    pub(super) fn finish_conversions(&mut self, now: Instant) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut tail = Vec::new();
        let mut failed = Vec::new();
        for group in active.groups.iter_mut() {
            group.converter.finish(&mut tail);
            for out in tail.drain(..) {
                write_to(&mut active.sinks, &group.members, &out, now, &mut failed);
            }
        }
        self.sinks_failed(failed)
    }

    /// Takes a failed sink out of the session (it is closed off the workers,
    /// marked incomplete); the session then ends with its error.
    pub(super) fn sink_failed(&mut self, index: usize, error: SinkError) -> SessionError {
        tracing::error!(%error, "sink failed");
        let slot = self.active.as_mut().and_then(|a| a.sinks.get_mut(index));
        if let Some(slot) = slot {
            slot.failed = true;
            if let Some(sink) = slot.sink.take() {
                self.abort_sink(sink, &error);
            }
        }
        error.into()
    }

    /// The sinks [`write_to`] took out: each is aborted; the first failure
    /// is the session's error.
    pub(super) fn sinks_failed(&mut self, failed: Vec<FailedSink>) -> Result<(), SessionError> {
        let mut first = None;
        for (sink, error) in failed {
            tracing::error!(%error, "sink failed");
            self.abort_sink(sink, &error);
            first.get_or_insert(error);
        }
        first.map_or(Ok(()), |error| Err(error.into()))
    }

    pub(super) fn abort_sink(&mut self, sink: Box<dyn Sink>, error: &SinkError) {
        metrics::counter!(names::SINK_FAILURES_TOTAL, "sink" => sink.name()).increment(1);
        self.outputs.push_back(Output::AbortSink {
            sink,
            reason: error.to_string(),
        });
    }

    /// Tells the client that audio was damaged and concealed: a non-fatal
    /// `error`, at most once a second so a broken stream cannot flood it.
    pub(super) fn report_damage(&mut self, damage: String, damaged_so_far: u64, now: Instant) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active
            .damage_reported_at
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        active.damage_reported_at = Some(now);
        tracing::warn!(%damage, damaged_so_far, "damaged audio concealed");
        self.send(&ServerMessage::Error {
            code: ErrorCode::AudioDamaged,
            message: format!("{damage}; concealed ({damaged_so_far} damaged so far)"),
            fatal: false,
        });
    }
}

/// A sink taken out of the session because it failed, and why.
type FailedSink = (Box<dyn Sink>, SinkError);

/// Writes one block to each member sink. One that fails is taken out of its
/// slot at once, so it gets nothing more, and put in `failed`; the others
/// still get the block.
fn write_to(
    sinks: &mut [SinkSlot],
    members: &[usize],
    block: &AudioBlock,
    now: Instant,
    failed: &mut Vec<FailedSink>,
) {
    for &index in members {
        let Some(slot) = sinks.get_mut(index) else {
            continue;
        };
        let Some(sink) = slot.sink.as_mut() else {
            continue;
        };
        if let Err(error) = sink.write(block, now) {
            slot.failed = true;
            failed.extend(slot.sink.take().map(|sink| (sink, error)));
        }
    }
}
