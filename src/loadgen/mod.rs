//! `cochlea loadgen`: N concurrent real-time WebSocket streams against a
//! cochlea server (or `examples/baseline_sink.rs`), on loopback only.
//!
//! Each stream is one task: it connects at its slot in the ramp, waits for
//! `started`, sends one `framing=seq` message per period at real-time pace (a
//! late message goes out at once, so the pace catches up instead of
//! drifting), counts the server's acks, then sends `stop` and waits for
//! `closed`. The audio is prepared once, before the first connection (PCM
//! looped from a WAV file, Opus packets encoded once), so the generator
//! spends its CPU on the sockets, not on codecs.
//!
//! Output: one line a second (streams open, messages sent and acknowledged),
//! a summary, and last a single JSON line for scripts (see [`Report`]).

mod audio;
mod histogram;
mod stream;
mod webrtc;

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

pub use histogram::Histogram;
use stream::{Counters, Plan};

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("invalid URL '{url}': {reason}")]
    Url { url: String, reason: String },
    #[error(
        "refusing to load '{host}' ({addrs}): loadgen only targets loopback addresses (127.0.0.0/8, ::1)"
    )]
    NotLoopback { host: String, addrs: String },
    #[error("cannot read input {path}: {source}")]
    Input { path: PathBuf, source: hound::Error },
    #[error("input {path}: {reason}")]
    InputFormat { path: PathBuf, reason: String },
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error("Opus encoder: {0}")]
    Opus(String),
    #[error("resampling the input: {0}")]
    Resample(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// What the streams send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadEncoding {
    /// 16-bit PCM from the input file, at `--sample-rate`.
    #[value(name = "pcm_s16le")]
    PcmS16le,
    /// G.711 μ-law at `--sample-rate` (8000 for telephony).
    #[value(name = "mulaw")]
    Mulaw,
    /// Opus packets encoded once at 48 kHz; the server decodes them at
    /// `--sample-rate`.
    #[value(name = "opus")]
    Opus,
}

impl LoadEncoding {
    fn as_str(self) -> &'static str {
        match self {
            LoadEncoding::PcmS16le => "pcm_s16le",
            LoadEncoding::Mulaw => "mulaw",
            LoadEncoding::Opus => "opus",
        }
    }
}

/// Flags of `cochlea loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// Stream endpoint, `ws://` on a loopback address.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/stream")]
    pub url: String,
    /// Concurrent streams.
    #[arg(long, short = 'c', default_value_t = 100)]
    pub connections: usize,
    /// How long each stream sends (or, with --idle, stays), in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Streams start evenly spread over this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub ramp_s: f64,
    #[arg(long, value_enum, default_value = "pcm_s16le")]
    pub encoding: LoadEncoding,
    /// The stream's `sample_rate`: the PCM rate sent, or the rate the server
    /// decodes Opus to.
    #[arg(long, default_value_t = 16_000)]
    pub sample_rate: u32,
    #[arg(long, default_value_t = 1)]
    pub channels: u16,
    /// Audio per message, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub frame_ms: u32,
    /// WAV file to loop (any rate 8000..=48000, averaged to mono); default a
    /// built-in speech-like signal.
    #[arg(long, value_name = "WAV")]
    pub input: Option<PathBuf>,
    /// Opus bitrate in bits per second.
    #[arg(long, default_value_t = 32_000)]
    pub opus_bitrate: i32,
    /// The `sinks` query parameter (e.g. `record`, `none`); default: the
    /// server's default sinks.
    #[arg(long)]
    pub sinks: Option<String>,
    /// Connect and start, then send nothing but a keepalive every
    /// --keepalive-ms (to measure what idle sessions cost).
    #[arg(long)]
    pub idle: bool,
    #[arg(long, default_value_t = 10_000)]
    pub keepalive_ms: u64,
    /// Runtime worker threads; 1 runs everything on one thread, the cheapest
    /// for the machine being measured.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Time to connect and get `started`, per stream.
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    /// Time to get `closed` after `stop`, per stream.
    #[arg(long, default_value_t = 30_000)]
    pub close_timeout_ms: u64,
    /// No per-second lines.
    #[arg(long)]
    pub quiet: bool,
    /// `webrtc`: each stream pushes its Opus packets over WebRTC (WHIP on
    /// the same host and port, str0m as the client) instead of the
    /// WebSocket; needs `--encoding opus` and 20 ms frames.
    #[arg(long, value_enum, default_value = "websocket")]
    pub transport: LoadTransport,
}

/// How the streams reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadTransport {
    Websocket,
    Webrtc,
}

/// Send lateness percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Lateness {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Messages sent 20 ms or more after they were due.
    pub over_20ms: u64,
}

/// The final report; printed last as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub encoding: &'static str,
    pub sample_rate: u32,
    pub channels: u16,
    pub idle: bool,
    pub connections: usize,
    /// Streams that got `started`.
    pub started: usize,
    /// Streams that ended with `closed` and close code 1000.
    pub completed: usize,
    pub failures: usize,
    /// Failures by kind (`connect:...`, `refused:server_full`, ...).
    pub failure_kinds: BTreeMap<String, u64>,
    /// Non-fatal server errors by code.
    pub warnings: BTreeMap<String, u64>,
    pub frames_sent: u64,
    /// Messages the server acknowledged (handed to every sink).
    pub frames_acked: u64,
    /// Sent but never acknowledged.
    pub frames_lost: u64,
    /// Sum of `closed.audio_messages` over the streams that got `closed`.
    pub server_audio_messages: u64,
    /// Audio seconds sent, all streams together.
    pub stream_seconds: f64,
    pub lateness: Lateness,
    pub wall_seconds: f64,
    /// CPU time the generator itself used (user + system).
    pub loadgen_cpu_seconds: f64,
}

impl Report {
    /// Everything sent was acknowledged and no stream failed.
    pub fn clean(&self) -> bool {
        self.failures == 0 && self.frames_lost == 0
    }
}

/// Runs the load; prints progress to stdout and returns the report.
pub fn run(args: &LoadgenArgs) -> Result<Report, LoadgenError> {
    let (addr, url) = target(args)?;
    let plan = plan(args, addr, url)?;
    match crate::rlimit::raise_nofile_limit() {
        Ok(limit) => {
            if (limit.soft as usize) < args.connections + 64 {
                eprintln!(
                    "loadgen: warning: open-files limit {} is below {} connections",
                    limit.soft, args.connections
                );
            }
        }
        Err(e) => eprintln!("loadgen: warning: {e}"),
    }
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .map_err(LoadgenError::Runtime)?;
    Ok(runtime.block_on(drive(args, plan)))
}

/// The target address, checked to be loopback, and the URL with its query.
fn target(args: &LoadgenArgs) -> Result<(SocketAddr, String), LoadgenError> {
    use tokio_tungstenite::tungstenite::http::Uri;
    let bad = |reason: &str| LoadgenError::Url {
        url: args.url.clone(),
        reason: reason.to_owned(),
    };
    let uri: Uri = args.url.parse().map_err(|e| LoadgenError::Url {
        url: args.url.clone(),
        reason: format!("{e}"),
    })?;
    if uri.scheme_str() != Some("ws") {
        return Err(bad(
            "the scheme must be ws:// (loadgen speaks plain WebSocket on loopback)",
        ));
    }
    if uri.query().is_some() {
        return Err(bad(
            "give no query string: loadgen writes it from its options",
        ));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(&format!("cannot resolve {host}: {e}")))?
        .collect();
    let listed = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let Some(&first) = addrs.first() else {
        return Err(bad("the host resolves to no address"));
    };
    if !addrs.iter().all(|a| a.ip().is_loopback()) {
        return Err(LoadgenError::NotLoopback {
            host: host.to_owned(),
            addrs: listed,
        });
    }
    let mut query = format!(
        "encoding={}&sample_rate={}&channels={}&framing=seq",
        args.encoding.as_str(),
        args.sample_rate,
        args.channels
    );
    if let Some(sinks) = &args.sinks {
        query.push_str("&sinks=");
        query.push_str(sinks);
    }
    Ok((first, format!("{}?{query}", args.url)))
}

fn plan(args: &LoadgenArgs, addr: SocketAddr, url: String) -> Result<Plan, LoadgenError> {
    let invalid = |m: String| Err(LoadgenError::Invalid(m));
    if args.connections == 0 {
        return invalid("--connections must be at least 1".into());
    }
    if !(args.duration_s > 0.0 && args.duration_s <= 86_400.0) {
        return invalid(format!(
            "--duration-s must be in (0, 86400], not {}",
            args.duration_s
        ));
    }
    if !(0.0..=3_600.0).contains(&args.ramp_s) {
        return invalid(format!(
            "--ramp-s must be in [0, 3600], not {}",
            args.ramp_s
        ));
    }
    if !(1..=2).contains(&args.channels) {
        return invalid(format!("--channels must be 1 or 2, not {}", args.channels));
    }
    if !(8_000..=48_000).contains(&args.sample_rate) {
        return invalid(format!(
            "--sample-rate must be 8000..=48000, not {}",
            args.sample_rate
        ));
    }
    if args.keepalive_ms == 0 {
        return invalid("--keepalive-ms must be at least 1".into());
    }
    if args.transport == LoadTransport::Webrtc
        && (args.encoding != LoadEncoding::Opus || args.frame_ms != 20 || args.idle)
    {
        return invalid("--transport webrtc sends 20 ms Opus packets: --encoding opus, --frame-ms 20, no --idle".into());
    }
    if args.encoding == LoadEncoding::Opus {
        if ![8_000, 12_000, 16_000, 24_000, 48_000].contains(&args.sample_rate) {
            return invalid(format!(
                "Opus decodes at 8000, 12000, 16000, 24000 or 48000 Hz, not {}",
                args.sample_rate
            ));
        }
        if ![10, 20, 40, 60].contains(&args.frame_ms) {
            return invalid(format!(
                "Opus frames are 10, 20, 40 or 60 ms, not {}",
                args.frame_ms
            ));
        }
    } else if !(1..=100).contains(&args.frame_ms)
        || (u64::from(args.sample_rate) * u64::from(args.frame_ms)) % 1000 != 0
    {
        return invalid(format!(
            "--frame-ms {} must be 1..=100 and hold whole sample frames at {} Hz",
            args.frame_ms, args.sample_rate
        ));
    }
    let message_period = Duration::from_millis(u64::from(args.frame_ms));
    let messages_per_stream = (args.duration_s * 1000.0 / f64::from(args.frame_ms)).round() as u64;
    if messages_per_stream > u64::from(u32::MAX) {
        return invalid("the run is too long for 32-bit seq numbers".into());
    }
    let prepared = audio::prepare(&audio::AudioSpec {
        input: args.input.as_deref(),
        encoding: args.encoding,
        sample_rate: args.sample_rate,
        channels: args.channels,
        frame_ms: args.frame_ms,
        opus_bitrate: args.opus_bitrate,
    })?;
    if prepared.payloads.is_empty() {
        return invalid("the input holds less than one message of audio".into());
    }
    Ok(Plan {
        addr,
        url,
        payloads: prepared.payloads,
        loop_seconds: prepared.loop_seconds,
        frames_per_message: prepared.frames_per_message,
        message_period,
        messages_per_stream: messages_per_stream.max(1),
        duration: Duration::from_secs_f64(args.duration_s),
        idle: args.idle,
        keepalive: Duration::from_millis(args.keepalive_ms),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        close_timeout: Duration::from_millis(args.close_timeout_ms),
    })
}

async fn drive(args: &LoadgenArgs, plan: Plan) -> Report {
    let plan = Arc::new(plan);
    let counters = Arc::new(Counters::default());
    let cpu_at_start = cpu_seconds();
    let t0 = Instant::now();
    let n = args.connections;
    println!(
        "loadgen: {n} {} streams ({} Hz, {} ch, {} ms messages{}, looping {:.1} s of audio) to {} over {:.1} s ramp, {:.1} s each",
        args.encoding.as_str(),
        args.sample_rate,
        args.channels,
        args.frame_ms,
        if args.idle { ", idle" } else { "" },
        plan.loop_seconds,
        plan.addr,
        args.ramp_s,
        args.duration_s,
    );

    let ramp = Duration::from_secs_f64(args.ramp_s);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let start_at = t0 + ramp.mul_f64(i as f64 / n as f64);
            match args.transport {
                LoadTransport::Websocket => {
                    tokio::spawn(stream::run(i, plan.clone(), counters.clone(), start_at))
                }
                LoadTransport::Webrtc => tokio::spawn(webrtc::run(
                    i,
                    plan.clone(),
                    counters.clone(),
                    start_at,
                    args.channels,
                    args.sinks.clone(),
                )),
            }
        })
        .collect();

    let reporter = (!args.quiet).then(|| tokio::spawn(report_every_second(counters.clone(), n)));

    let mut outcomes = Vec::with_capacity(n);
    for task in tasks {
        match task.await {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => outcomes.push(stream::Outcome {
                failure: Some(format!("task:{e}")),
                ..Default::default()
            }),
        }
    }
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    let wall_seconds = t0.elapsed().as_secs_f64();
    let report = summarize(
        args,
        &plan,
        &counters,
        &outcomes,
        wall_seconds,
        cpu_at_start,
    );
    print_summary(&report);
    report
}

async fn report_every_second(counters: Arc<Counters>, n: usize) {
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last_sent = 0;
    let mut announced = false;
    loop {
        tick.tick().await;
        let sent = counters.sent.load(Ordering::Relaxed);
        let started = counters.started.load(Ordering::Relaxed);
        println!(
            "[{:>4.0} s] open {:>5}/{n}  sent {:>6}/s  total sent {:>9}  acked {:>9}  failures {}",
            t0.elapsed().as_secs_f64(),
            counters.open.load(Ordering::Relaxed),
            sent - last_sent,
            sent,
            counters.acked.load(Ordering::Relaxed),
            counters.failures.load(Ordering::Relaxed),
        );
        last_sent = sent;
        // A marker for scripts: from here on, the load is complete.
        if !announced && started == n {
            announced = true;
            println!("loadgen: all {n} streams started");
        }
    }
}

fn summarize(
    args: &LoadgenArgs,
    plan: &Plan,
    counters: &Counters,
    outcomes: &[stream::Outcome],
    wall_seconds: f64,
    cpu_at_start: f64,
) -> Report {
    let mut failure_kinds = BTreeMap::new();
    let mut warnings = BTreeMap::new();
    for outcome in outcomes {
        if let Some(kind) = &outcome.failure {
            *failure_kinds.entry(kind.clone()).or_insert(0) += 1;
        }
        for code in &outcome.warnings {
            *warnings.entry(code.clone()).or_insert(0) += 1;
        }
    }
    let frames_sent: u64 = outcomes.iter().map(|o| o.sent).sum();
    let frames_acked: u64 = outcomes.iter().map(|o| o.acked.min(o.sent)).sum();
    let h = &counters.lateness;
    Report {
        url: plan.url.clone(),
        encoding: args.encoding.as_str(),
        sample_rate: args.sample_rate,
        channels: args.channels,
        idle: args.idle,
        connections: args.connections,
        started: counters.started.load(Ordering::Relaxed),
        completed: outcomes.iter().filter(|o| o.failure.is_none()).count(),
        failures: outcomes.iter().filter(|o| o.failure.is_some()).count(),
        failure_kinds,
        warnings,
        frames_sent,
        frames_acked,
        frames_lost: frames_sent - frames_acked,
        server_audio_messages: outcomes
            .iter()
            .filter_map(|o| o.server_audio_messages)
            .sum(),
        stream_seconds: frames_sent as f64 * plan.message_period.as_secs_f64(),
        lateness: Lateness {
            p50_ms: h.quantile_us(0.5) / 1000.0,
            p99_ms: h.quantile_us(0.99) / 1000.0,
            p999_ms: h.quantile_us(0.999) / 1000.0,
            max_ms: h.max_us() as f64 / 1000.0,
            over_20ms: h.count_at_least(20_000),
        },
        wall_seconds,
        loadgen_cpu_seconds: cpu_seconds() - cpu_at_start,
    }
}

fn print_summary(r: &Report) {
    println!(
        "loadgen: {} streams, {} started, {} completed, {} failed {:?}",
        r.connections, r.started, r.completed, r.failures, r.failure_kinds
    );
    println!(
        "loadgen: frames sent {}, acknowledged {}, lost {}; server counted {}",
        r.frames_sent, r.frames_acked, r.frames_lost, r.server_audio_messages
    );
    println!(
        "loadgen: send lateness p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms; {} sent 20 ms late or more",
        r.lateness.p50_ms, r.lateness.p99_ms, r.lateness.p999_ms, r.lateness.max_ms, r.lateness.over_20ms
    );
    if !r.warnings.is_empty() {
        println!("loadgen: non-fatal server errors {:?}", r.warnings);
    }
    println!(
        "loadgen: {:.1} stream-seconds in {:.1} s; generator CPU {:.2} s",
        r.stream_seconds, r.wall_seconds, r.loadgen_cpu_seconds
    );
    match serde_json::to_string(r) {
        Ok(json) => println!("{json}"),
        Err(e) => eprintln!("loadgen: cannot encode the report: {e}"),
    }
}

/// This process's CPU time (user + system), in seconds.
fn cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        // SAFETY: zeroed is a valid `rusage` (plain integers), and getrusage
        // writes one through a valid, exclusive pointer.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return 0.0;
        }
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }
    #[cfg(not(unix))]
    {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    fn args(extra: &[&str]) -> LoadgenArgs {
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).args
    }

    #[test]
    fn only_loopback_targets() {
        let (addr, url) = target(&args(&["--url", "ws://127.0.0.1:9/v1/stream"])).unwrap();
        assert!(addr.ip().is_loopback());
        assert!(url.ends_with("?encoding=pcm_s16le&sample_rate=16000&channels=1&framing=seq"));
        assert!(target(&args(&["--url", "ws://[::1]:9/v1/stream"])).is_ok());
        let err = target(&args(&["--url", "ws://192.0.2.1:80/v1/stream"])).unwrap_err();
        assert!(err.to_string().contains("only targets loopback"), "{err}");
        let err = target(&args(&["--url", "wss://127.0.0.1:9/v1/stream"])).unwrap_err();
        assert!(err.to_string().contains("ws://"), "{err}");
        let err = target(&args(&["--url", "ws://127.0.0.1:9/v1/stream?x=1"])).unwrap_err();
        assert!(err.to_string().contains("query"), "{err}");
    }

    #[test]
    fn bad_options_are_refused_with_a_reason() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let check = |extra: &[&str], needle: &str| {
            let Err(e) = plan(&args(extra), addr, String::new()) else {
                panic!("{extra:?} accepted");
            };
            assert!(e.to_string().contains(needle), "{e}");
        };
        check(&["--connections", "0"], "--connections");
        check(&["--encoding", "opus", "--sample-rate", "44100"], "Opus");
        check(
            &["--frame-ms", "7", "--sample-rate", "44100"],
            "whole sample",
        );
        check(&["--duration-s", "0"], "--duration-s");
        let plan = plan(&args(&["--duration-s", "2"]), addr, String::new()).unwrap();
        assert_eq!(plan.messages_per_stream, 100);
    }
}
