//! Starting the stream: what the dialect made of a message, the format
//! negotiation, the sink plan, and building the sinks once the format is known.

use super::*;

impl SessionCore {
    pub(super) fn on_text(
        &mut self,
        text: &str,
        now: Instant,
    ) -> Result<Option<EndReason>, SessionError> {
        let mut inbound = std::mem::take(&mut self.inbound);
        inbound.clear();
        let parsed = self.dialect.on_text(text, &mut inbound);
        let result = parsed
            .map_err(SessionError::from)
            .and_then(|()| self.on_inbound(&mut inbound, now));
        self.inbound = inbound;
        result
    }

    pub(super) fn on_binary(
        &mut self,
        data: &Bytes,
        now: Instant,
    ) -> Result<Option<EndReason>, SessionError> {
        let mut inbound = std::mem::take(&mut self.inbound);
        inbound.clear();
        let parsed = self.dialect.on_binary(data, &mut inbound);
        let result = parsed
            .map_err(SessionError::from)
            .and_then(|()| self.on_inbound(&mut inbound, now));
        self.inbound = inbound;
        result
    }

    /// What the dialect made of a message, in the session's terms.
    pub(super) fn on_inbound(
        &mut self,
        inputs: &mut Vec<Inbound>,
        now: Instant,
    ) -> Result<Option<EndReason>, SessionError> {
        for input in inputs.drain(..) {
            match input {
                Inbound::Start {
                    request,
                    max_session_ms,
                } => {
                    if self.active.is_some() {
                        return Err(ProtocolError::AlreadyStarted.into());
                    }
                    if max_session_ms.is_some() {
                        self.apply_limits(SessionLimits { max_session_ms });
                    }
                    self.last_activity = now;
                    self.start(request, now)?;
                }
                Inbound::Audio(data) => self.on_audio(&data, now)?,
                Inbound::Keepalive => self.last_activity = now,
                Inbound::Flush => {
                    self.last_activity = now;
                    self.flush(now)?;
                }
                Inbound::Stop => return Ok(Some(EndReason::Stop)),
                Inbound::WebrtcOffer(offer) => {
                    if !self.webrtc || self.whip || self.active.is_none() {
                        return Err(ProtocolError::InvalidMessage(
                            "webrtc_offer is only for a started transport webrtc session".into(),
                        )
                        .into());
                    }
                    self.last_activity = now;
                    self.outputs.push_back(Output::Negotiate { offer });
                }
                Inbound::Reply(text) => self.outputs.push_back(Output::Text(text)),
                Inbound::Event { name, detail } => {
                    self.last_activity = now;
                    tracing::info!(event = name, %detail, "dialect event");
                    metrics::counter!(
                        names::DIALECT_EVENTS_TOTAL,
                        "dialect" => self.dialect.kind().name(),
                        "event" => name
                    )
                    .increment(1);
                }
            }
        }
        Ok(None)
    }

    /// Resolves the format, plans the sinks and creates the pipeline. The
    /// sinks are built, and `started` is sent, as soon as the stream format
    /// is known: at once, or for a container once its header has arrived.
    pub(super) fn start(&mut self, start: StartRequest, now: Instant) -> Result<(), SessionError> {
        let request = std::mem::take(&mut self.query).merged_with(start);
        let (request, offer) = self.webrtc_request(request)?;
        let format = request.resolve()?;
        let mut planned = self
            .factory
            .plan(request.sinks.as_deref(), request.transcribe.as_deref())?;
        let record_format = self.allowed_record_format(request.record_format.as_deref())?;
        if request.interim == Some(true) {
            planned.plan = planned.plan.with_interim();
        }
        let mut pipeline = Pipeline::new(format, self.config.max_gap_ms)?;
        // Opus is decoded straight at the rate the sinks need, when that is
        // lower than the stream's: cheaper than decoding and resampling.
        pipeline.decode_for_sinks(
            &planned
                .plan
                .wanted_pcm_rates(format.encoding, record_format),
        )?;
        // Sinks that record Opus as sent take the packets; with no sink
        // wanting PCM, the decoder never runs.
        let (pcm, packets) = planned.plan.wanted_inputs(format.encoding, record_format);
        pipeline.set_outputs(pcm, packets);
        if format.framing == Framing::Seq
            && self.config.resume_window_ms > 0
            && self.dialect.resumable()
            && !self.whip
        {
            // 122 random bits: the only thing standing between a session id,
            // which appears in logs and file names, and taking the stream over.
            let token = uuid::Uuid::new_v4().simple().to_string();
            self.outputs.push_back(Output::Resumable {
                token: token.clone(),
            });
            self.resume_token = Some(token);
            // A WebRTC session's media reaches this node only: no other
            // node could take it over, so it is not journalled.
            if self.config.cluster.enabled() && !self.webrtc {
                self.journaled = true;
                self.journal_request = Some(request.clone());
            }
        }
        let encoding = format.encoding.as_str();
        let counters = AudioCounters {
            bytes: metrics::counter!(names::AUDIO_RECEIVED_BYTES_TOTAL, "encoding" => encoding),
            frames: metrics::counter!(names::AUDIO_RECEIVED_FRAMES_TOTAL, "encoding" => encoding),
            sample_frames: metrics::counter!(
                names::AUDIO_DECODED_SAMPLE_FRAMES_TOTAL,
                "encoding" => encoding,
                "sample_rate" => format.sample_rate.to_string()
            ),
        };
        self.active = Some(Active {
            pipeline,
            sinks: Vec::new(),
            groups: Vec::new(),
            pending: Some(PendingSinks {
                plan: planned.plan,
                transcribe: planned.transcribe,
                metadata: request.metadata,
                record_format,
            }),
            packet_sinks: Vec::new(),
            packets: Vec::new(),
            exported: PipelineStats::default(),
            damage_reported_at: None,
            blocks: Vec::with_capacity(2),
            converted: Vec::with_capacity(2),
            counters,
        });
        self.last_ack_at = now;
        self.open_sinks_when_format_known()?;
        if let Some(offer) = offer {
            self.outputs.push_back(Output::Negotiate { offer });
        }
        Ok(())
    }

    /// A `transport: webrtc` request becomes an Opus `framing=seq` stream
    /// in the offer's channel count; the offer is returned for the driver
    /// to negotiate once the stream has started.
    fn webrtc_request(
        &mut self,
        mut request: StartRequest,
    ) -> Result<(StartRequest, Option<String>), SessionError> {
        if !request.webrtc()? {
            if request.sdp.is_some() {
                return Err(ProtocolError::InvalidMessage(
                    "sdp is only for transport webrtc".into(),
                )
                .into());
            }
            return Ok((request, None));
        }
        let Some(offer) = request.sdp.take() else {
            return Err(ProtocolError::InvalidMessage(
                "transport webrtc needs sdp: the client's SDP offer".into(),
            )
            .into());
        };
        request.transport = None;
        // A format named beside the offer is refused before the offer is read.
        let mut request = request.for_webrtc(1)?;
        request.channels = Some(crate::server::webrtc::sdp::opus_offer(&offer)?.channels);
        self.webrtc = true;
        Ok((request, Some(offer)))
    }

    pub(super) fn open_sinks_when_format_known(&mut self) -> Result<(), SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let Some(format) = active.pipeline.format().copied() else {
            return Ok(());
        };
        let Some(pending) = active.pending.take() else {
            return Ok(());
        };
        let Some(events) = self.events.clone() else {
            return Ok(());
        };
        let context = SinkContext {
            session_id: self.id.clone(),
            format,
            metadata: pending.metadata.clone(),
            started_at: self.started_at,
            record_format: pending.record_format,
            opus_pre_skip: active.pipeline.opus_pre_skip(),
        };
        let built = pending.plan.build(&context, events)?;
        // The blocks come at the pipeline's block rate, which for Opus may
        // be below the stream's; a sink's "the stream's own rate" still means
        // the declared one, so it is resolved before the converter is made.
        let block_rate = active.pipeline.block_rate();
        let mut groups: Vec<SinkGroup> = Vec::new();
        let mut packet_sinks = Vec::new();
        for (index, (_, sink)) in built.iter().enumerate() {
            if sink.takes_opus_packets() {
                packet_sinks.push(index);
                continue;
            }
            let asked = sink.output_format();
            let wanted = OutputFormat {
                sample_rate: Some(asked.rate(format.sample_rate)),
                ..asked
            };
            match groups.iter_mut().find(|g| g.converter.format() == wanted) {
                Some(group) => group.members.push(index),
                None => groups.push(SinkGroup {
                    converter: Converter::new(block_rate, format.channels, wanted)?,
                    members: vec![index],
                }),
            }
        }
        active.groups = groups;
        active.packet_sinks = packet_sinks;
        active.sinks = built
            .into_iter()
            .map(|(name, sink)| SinkSlot {
                name,
                sink: Some(sink),
                failed: false,
                flushes_done: 0,
                commits_wanted: 0,
                commits_done: 0,
            })
            .collect();
        let started = StartedInfo {
            protocol_version: PROTOCOL_VERSION,
            session_id: self.id.clone(),
            format,
            // Sink names, once each (a split recorder runs one sink per channel).
            sinks: active.sinks.iter().fold(Vec::new(), |mut names, s| {
                if !names.contains(&s.name) {
                    names.push(s.name.clone());
                }
                names
            }),
            transcribe: pending.transcribe,
            metadata: pending.metadata,
            max_message_bytes: self.config.max_message_bytes,
            idle_timeout_ms: self.config.idle_timeout_ms,
            resume_token: self.resume_token.clone(),
            resume_from_seq: None,
        };
        tracing::info!(
            encoding = format.encoding.as_str(),
            sample_rate = format.sample_rate,
            channels = format.channels,
            framing = format.framing.as_str(),
            sinks = ?started.sinks,
            "stream started"
        );
        self.send(&ServerMessage::Started(started.clone()));
        self.started_info = Some(started);
        Ok(())
    }

    /// The recording format a client asked for, if the server lets clients
    /// choose it (`recorder.client_formats`).
    fn allowed_record_format(
        &self,
        asked: Option<&str>,
    ) -> Result<Option<RecordFormat>, SinkError> {
        let Some(asked) = asked else {
            return Ok(None);
        };
        let allowed = &self.config.recorder.client_formats;
        let names = || {
            if allowed.is_empty() {
                "this server lets clients choose none (recorder.client_formats)".to_owned()
            } else {
                let names: Vec<&str> = allowed.iter().map(|f| f.name()).collect();
                format!("this server allows: {}", names.join(", "))
            }
        };
        match RecordFormat::parse(asked) {
            Some(format) if allowed.contains(&format) => Ok(Some(format)),
            Some(format) => Err(SinkError::RecordFormatRefused(format!(
                "record_format '{}' is not allowed; {}",
                format.name(),
                names()
            ))),
            None => Err(SinkError::RecordFormatRefused(format!(
                "unknown record_format '{}' (wav, flac or ogg_opus); {}",
                asked.chars().take(32).collect::<String>(),
                names()
            ))),
        }
    }

    /// Checks the stream parameters a resuming connection repeated: the
    /// session's own are fine (a client may simply add `resume=` to its old
    /// URL); one that differs is refused, by name.
    pub fn check_resume_request(&self, request: &StartRequest) -> Result<(), ProtocolError> {
        let Some(started) = &self.started_info else {
            return Ok(());
        };
        let format = &started.format;
        let conflict = |name: &str, asked: String, has: String| {
            Err(ProtocolError::InvalidMessage(format!(
                "resume: {name}={asked} differs from the session's {name} ({has}); omit it or repeat the session's own"
            )))
        };
        if let Some(encoding) = &request.encoding {
            if encoding != format.encoding.as_str() {
                return conflict(
                    "encoding",
                    encoding.clone(),
                    format.encoding.as_str().into(),
                );
            }
        }
        if let Some(rate) = request.sample_rate {
            if rate != format.sample_rate {
                return conflict(
                    "sample_rate",
                    rate.to_string(),
                    format.sample_rate.to_string(),
                );
            }
        }
        if let Some(channels) = request.channels {
            if channels != format.channels {
                return conflict(
                    "channels",
                    channels.to_string(),
                    format.channels.to_string(),
                );
            }
        }
        if let Some(framing) = &request.framing {
            if framing != format.framing.as_str() {
                return conflict("framing", framing.clone(), format.framing.as_str().into());
            }
        }
        if let Some(sinks) = &request.sinks {
            if *sinks != started.sinks {
                return conflict("sinks", sinks.join(","), started.sinks.join(","));
            }
        }
        if let Some(transcribe) = &request.transcribe {
            let has = started.transcribe.clone().unwrap_or_else(|| "none".into());
            if *transcribe != has {
                return conflict("transcribe", transcribe.clone(), has);
            }
        }
        Ok(())
    }
}
