//! Logs (tracing) and metrics (Prometheus text via metrics-exporter-prometheus).

use std::io::IsTerminal;

use metrics::{describe_counter, describe_gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::LogFormat;

/// Metric names, in one place so the code and the docs agree.
pub mod names {
    pub const SESSIONS_ACTIVE: &str = "cochlea_sessions_active";
    pub const SESSIONS_TOTAL: &str = "cochlea_sessions_total";
    pub const SESSIONS_REJECTED_TOTAL: &str = "cochlea_sessions_rejected_total";
    pub const SESSIONS_PARKED: &str = "cochlea_sessions_parked";
    pub const RESUMES_TOTAL: &str = "cochlea_resumes_total";
    pub const RESUMES_REJECTED_TOTAL: &str = "cochlea_resumes_rejected_total";
    pub const AUDIO_RECEIVED_BYTES_TOTAL: &str = "cochlea_audio_received_bytes_total";
    pub const AUDIO_RECEIVED_FRAMES_TOTAL: &str = "cochlea_audio_received_frames_total";
    pub const AUDIO_DECODED_SAMPLE_FRAMES_TOTAL: &str = "cochlea_audio_decoded_sample_frames_total";
    pub const AUDIO_GAP_SAMPLE_FRAMES_TOTAL: &str = "cochlea_audio_gap_sample_frames_total";
    pub const AUDIO_DUPLICATE_MESSAGES_TOTAL: &str = "cochlea_audio_duplicate_messages_total";
    pub const AUDIO_DAMAGED_PACKETS_TOTAL: &str = "cochlea_audio_damaged_packets_total";
    pub const JITTER_LOST_PACKETS_TOTAL: &str = "cochlea_jitter_lost_packets_total";
    pub const JITTER_LATE_PACKETS_TOTAL: &str = "cochlea_jitter_late_packets_total";
    pub const JITTER_CONCEALED_SAMPLE_FRAMES_TOTAL: &str =
        "cochlea_jitter_concealed_sample_frames_total";
    pub const SESSION_ERRORS_TOTAL: &str = "cochlea_session_errors_total";
    pub const AUTH_FAILURES_TOTAL: &str = "cochlea_auth_failures_total";
    pub const DIALECT_SESSIONS_TOTAL: &str = "cochlea_dialect_sessions_total";
    pub const DIALECT_EVENTS_TOTAL: &str = "cochlea_dialect_events_total";
    pub const INGEST_LATENCY_SECONDS: &str = "cochlea_ingest_latency_seconds";
    pub const SINK_WRITE_SECONDS: &str = "cochlea_sink_write_seconds";
    pub const LIMIT_HITS_TOTAL: &str = "cochlea_limit_hits_total";
    pub const SINK_FAILURES_TOTAL: &str = "cochlea_sink_failures_total";
    pub const RECORDINGS_TOTAL: &str = "cochlea_recordings_total";
    pub const TRANSCRIBE_UTTERANCES_TOTAL: &str = "cochlea_transcribe_utterances_total";
    pub const TRANSCRIBE_UTTERANCES_SHED_TOTAL: &str = "cochlea_transcribe_utterances_shed_total";
    pub const TRANSCRIBE_PARTIALS_TOTAL: &str = "cochlea_transcribe_partials_total";
    pub const TRANSCRIBE_PARTIALS_SHED_TOTAL: &str = "cochlea_transcribe_partials_shed_total";
    pub const TRANSCRIBE_REQUESTS_TOTAL: &str = "cochlea_transcribe_requests_total";
    pub const TRANSCRIBE_REQUEST_SECONDS: &str = "cochlea_transcribe_request_seconds";
    pub const TRANSCRIBE_INFLIGHT_REQUESTS: &str = "cochlea_transcribe_inflight_requests";
    pub const TRANSCRIBE_UPSTREAM_CONNECTS_TOTAL: &str =
        "cochlea_transcribe_upstream_connects_total";
    pub const TRANSCRIBE_UPSTREAM_DROPS_TOTAL: &str = "cochlea_transcribe_upstream_drops_total";
    pub const TRANSCRIBE_UPSTREAM_LOST_SPANS_TOTAL: &str =
        "cochlea_transcribe_upstream_lost_spans_total";
    pub const TRANSCRIBE_UPSTREAM_LAG_SECONDS: &str = "cochlea_transcribe_upstream_lag_seconds";
    pub const UPLOADS_TOTAL: &str = "cochlea_uploads_total";
    pub const UPLOAD_BYTES_TOTAL: &str = "cochlea_upload_bytes_total";
    pub const UPLOAD_FAILURES_TOTAL: &str = "cochlea_upload_failures_total";
    pub const WEBRTC_PEERS: &str = "cochlea_webrtc_peers";
    pub const WEBRTC_SESSIONS_TOTAL: &str = "cochlea_webrtc_sessions_total";
    pub const WEBRTC_DATAGRAMS_DROPPED_TOTAL: &str = "cochlea_webrtc_datagrams_dropped_total";
    pub const WEBRTC_PACKETS_DROPPED_TOTAL: &str = "cochlea_webrtc_packets_dropped_total";
}

/// Installs the global tracing subscriber. `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    // Logs go to stderr; stdout is kept for the one "listening on" line that
    // scripts and tests read.
    let _ = match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

/// Installs the global metrics recorder and describes every metric.
pub fn init_metrics() -> Result<PrometheusHandle, String> {
    // Real histograms (not summaries) for latencies, with buckets around
    // the 20 ms frame that matters here. Ingest of one message takes tens of
    // microseconds, so the low end is fine-grained too: percentiles are
    // interpolated within a bucket (scripts/loadbench.py), and a bucket as
    // wide as its lower edge is still an honest 2x bound.
    let buckets = [
        0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.007_5,
        0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 1.0,
    ];
    // Backend requests take from tens of milliseconds to many seconds.
    let request_buckets = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(names::TRANSCRIBE_REQUEST_SECONDS.into()),
            &request_buckets,
        )
        .map_err(|e| format!("cannot configure histogram buckets: {e}"))?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                names::TRANSCRIBE_UPSTREAM_LAG_SECONDS.into(),
            ),
            &request_buckets,
        )
        .map_err(|e| format!("cannot configure histogram buckets: {e}"))?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &buckets,
        )
        .map_err(|e| format!("cannot configure histogram buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("cannot install metrics recorder: {e}"))?;
    describe();
    register_at_zero();
    Ok(handle)
}

/// Unlabelled series exist from the start, so dashboards and `promtool`
/// see them before the first session.
fn register_at_zero() {
    use names::*;
    metrics::gauge!(SESSIONS_ACTIVE).set(0.0);
    metrics::gauge!(SESSIONS_PARKED).set(0.0);
    metrics::gauge!(TRANSCRIBE_INFLIGHT_REQUESTS).set(0.0);
    metrics::gauge!(WEBRTC_PEERS).set(0.0);
    for name in [
        SESSIONS_TOTAL,
        AUDIO_DUPLICATE_MESSAGES_TOTAL,
        AUDIO_GAP_SAMPLE_FRAMES_TOTAL,
        AUDIO_DAMAGED_PACKETS_TOTAL,
        JITTER_LOST_PACKETS_TOTAL,
        JITTER_LATE_PACKETS_TOTAL,
        JITTER_CONCEALED_SAMPLE_FRAMES_TOTAL,
        RESUMES_TOTAL,
        RESUMES_REJECTED_TOTAL,
        RECORDINGS_TOTAL,
        TRANSCRIBE_UTTERANCES_TOTAL,
        TRANSCRIBE_UTTERANCES_SHED_TOTAL,
        TRANSCRIBE_PARTIALS_TOTAL,
        TRANSCRIBE_PARTIALS_SHED_TOTAL,
        UPLOADS_TOTAL,
        UPLOAD_BYTES_TOTAL,
        UPLOAD_FAILURES_TOTAL,
        WEBRTC_DATAGRAMS_DROPPED_TOTAL,
        WEBRTC_PACKETS_DROPPED_TOTAL,
    ] {
        metrics::counter!(name).absolute(0);
    }
}

fn describe() {
    use names::*;
    describe_gauge!(SESSIONS_ACTIVE, "WebSocket stream sessions now open.");
    describe_counter!(SESSIONS_TOTAL, "Stream sessions accepted since start.");
    describe_gauge!(
        SESSIONS_PARKED,
        "Sessions whose connection dropped, waiting to be resumed."
    );
    describe_counter!(RESUMES_TOTAL, "Sessions resumed on a new connection.");
    describe_counter!(
        RESUMES_REJECTED_TOTAL,
        "Resume attempts refused (unknown session, wrong token, busy)."
    );
    describe_counter!(
        SESSIONS_REJECTED_TOTAL,
        "Stream sessions refused at connect, by reason."
    );
    describe_counter!(
        AUDIO_RECEIVED_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes of binary audio messages received, headers included."
    );
    describe_counter!(
        AUDIO_RECEIVED_FRAMES_TOTAL,
        "Binary audio messages (WebSocket frames) received."
    );
    describe_counter!(
        AUDIO_DECODED_SAMPLE_FRAMES_TOTAL,
        "Sample frames (one sample per channel) decoded, by encoding and sample rate."
    );
    describe_counter!(
        AUDIO_GAP_SAMPLE_FRAMES_TOTAL,
        "Sample frames of silence inserted for framing=seq timestamp gaps."
    );
    describe_counter!(
        AUDIO_DUPLICATE_MESSAGES_TOTAL,
        "framing=seq messages dropped as already received."
    );
    describe_counter!(
        AUDIO_DAMAGED_PACKETS_TOTAL,
        "Opus packets or container pages that could not be decoded and were concealed or skipped."
    );
    describe_counter!(
        JITTER_LOST_PACKETS_TOTAL,
        "framing=seq messages that never arrived; their media time was filled."
    );
    describe_counter!(
        JITTER_LATE_PACKETS_TOTAL,
        "framing=seq messages that arrived after their place was filled (discarded)."
    );
    describe_counter!(
        JITTER_CONCEALED_SAMPLE_FRAMES_TOTAL,
        "Sample frames filled with silence or Opus concealment for missing audio."
    );
    describe_counter!(
        SESSION_ERRORS_TOTAL,
        "Sessions ended by an error, by error code (kind)."
    );
    describe_counter!(SINK_FAILURES_TOTAL, "Sinks that failed, by sink.");
    metrics::describe_histogram!(
        INGEST_LATENCY_SECONDS,
        Unit::Seconds,
        "From a binary message's arrival until its audio is queued with every sink."
    );
    metrics::describe_histogram!(
        SINK_WRITE_SECONDS,
        Unit::Seconds,
        "Time a sink takes to take one block, by sink."
    );
    describe_counter!(
        DIALECT_SESSIONS_TOTAL,
        "Sessions opened on a dialect endpoint (twilio, vonage, audiofork, deepgram)."
    );
    describe_counter!(
        DIALECT_EVENTS_TOTAL,
        "Platform events on dialect endpoints (DTMF, marks, extra text), by dialect and event."
    );
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        "Requests refused before the upgrade, by reason."
    );
    describe_counter!(
        LIMIT_HITS_TOTAL,
        "Limits reached, by limit (also counted in session errors when fatal)."
    );
    describe_counter!(RECORDINGS_TOTAL, "Recordings completed.");
    describe_counter!(
        UPLOADS_TOTAL,
        "Recordings uploaded to the object store, sidecar included."
    );
    describe_counter!(
        UPLOAD_BYTES_TOTAL,
        Unit::Bytes,
        "Recording bytes sent to the object store."
    );
    describe_counter!(
        UPLOAD_FAILURES_TOTAL,
        "Object store requests that failed (each is retried with backoff)."
    );
    describe_gauge!(WEBRTC_PEERS, "WebRTC peers (ICE, DTLS, SRTP) now open.");
    describe_counter!(
        WEBRTC_SESSIONS_TOTAL,
        "WebRTC sessions negotiated, by signalling (whip, websocket)."
    );
    describe_counter!(
        WEBRTC_DATAGRAMS_DROPPED_TOTAL,
        "UDP datagrams dropped because their peer's queue was full."
    );
    describe_counter!(
        WEBRTC_PACKETS_DROPPED_TOTAL,
        "RTP packets dropped because their session was not reading (parked, or a sink over budget); concealed as losses."
    );
    describe_counter!(
        TRANSCRIBE_UTTERANCES_TOTAL,
        "Utterances cut by voice activity detection for transcription."
    );
    describe_counter!(
        TRANSCRIBE_UTTERANCES_SHED_TOTAL,
        "Utterances dropped unsent because a session's transcription backlog was full."
    );
    describe_counter!(
        TRANSCRIBE_PARTIALS_TOTAL,
        "Partial transcripts sent to clients (sessions with interim=true)."
    );
    describe_counter!(
        TRANSCRIBE_PARTIALS_SHED_TOTAL,
        "Partial requests not sent because the server-wide interim budget or the request limit was used up (finals are never shed for them)."
    );
    describe_counter!(
        TRANSCRIBE_REQUESTS_TOTAL,
        "Backend request attempts, by backend and outcome (ok, retried, failed)."
    );
    metrics::describe_histogram!(
        TRANSCRIBE_REQUEST_SECONDS,
        Unit::Seconds,
        "Duration of one backend request attempt, by backend."
    );
    metrics::describe_gauge!(
        TRANSCRIBE_INFLIGHT_REQUESTS,
        "Backend requests in flight, over all sessions."
    );
    describe_counter!(
        TRANSCRIBE_UPSTREAM_CONNECTS_TOTAL,
        "Connection attempts to streaming upstreams, by backend and outcome (ok, failed)."
    );
    describe_counter!(
        TRANSCRIBE_UPSTREAM_DROPS_TOTAL,
        "Streaming upstream connections lost before the end of their stream, by backend."
    );
    describe_counter!(
        TRANSCRIBE_UPSTREAM_LOST_SPANS_TOTAL,
        "Stretches of audio (per channel) a streaming upstream did not transcribe, each reported to the client as transcribe_failed: dropped while it lagged, or older than the replay buffer after a drop, by backend."
    );
    metrics::describe_histogram!(
        TRANSCRIBE_UPSTREAM_LAG_SECONDS,
        Unit::Seconds,
        "Time from sending the audio a streaming upstream's result ends with to receiving the result, by backend."
    );
}
