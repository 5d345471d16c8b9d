//! `cochlea stream FILE...`: replays audio files to a cochlea server, the way
//! a live client would, and reports what the server made of them.
//!
//! Each file is one session (`framing=seq`, 20 ms messages, or one Opus
//! packet per message), resumed after a dropped connection. While files
//! stream, a progress bar per file shows media time sent and the latest
//! transcript line (on a terminal; otherwise events are printed as lines on
//! stderr). At the end a summary goes to stdout: recording path, duration,
//! transcript, or why a file failed. The exit status is 0 only if every file
//! was recorded in full.

mod connection;
pub mod source;
pub mod stream;
pub mod whip;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use stream::{Event, Options, Outcome, Speed, StreamError};

/// Flags of `cochlea stream`.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// WAV files (PCM 8/16/24/32-bit, float, G.711 μ-law/A-law; mono or
    /// stereo, 8000 to 48000 Hz) or Ogg/Opus files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// The server's stream endpoint; without a path (`ws://host:8080`),
    /// `/v1/stream` on that server.
    #[arg(
        long,
        env = "COCHLEA_URL",
        default_value = "ws://127.0.0.1:8080/v1/stream"
    )]
    pub url: String,
    /// API key or token (sent as `Authorization: Bearer`).
    #[arg(long, env = "COCHLEA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Send at real time, as a live call would (the default).
    #[arg(long, conflicts_with = "speed")]
    pub realtime: bool,
    /// Send N media seconds per wall second (e.g. 10), or `max` for as fast
    /// as the server takes it.
    #[arg(long, value_name = "N|max", value_parser = parse_speed)]
    pub speed: Option<Speed>,
    /// Ask the server to transcribe with this backend (`transcribe=NAME`).
    #[arg(long, value_name = "NAME")]
    pub transcribe: Option<String>,
    /// Files streamed at the same time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    /// After a dropped connection, keep trying to resume for this long
    /// (the server's `resume_window_ms` is 30000 by default).
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    pub resume_timeout_ms: u64,
    /// Print the summary as JSON, one object per file and line.
    #[arg(long)]
    pub json: bool,
}

fn parse_speed(text: &str) -> Result<Speed, String> {
    if text.eq_ignore_ascii_case("max") {
        return Ok(Speed::Max);
    }
    match text.parse::<f64>() {
        Ok(factor) if factor.is_finite() && factor > 0.0 => Ok(Speed::Factor(factor)),
        _ => Err(format!(
            "'{text}' is not a speed: give a number above 0 (1 is real time) or `max`"
        )),
    }
}

/// What happened to one file.
struct FileResult {
    path: PathBuf,
    result: Result<Outcome, StreamError>,
}

/// Progress display for all files, or plain lines when stderr is no terminal.
struct Display {
    multi: MultiProgress,
}

impl Display {
    fn new() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
        }
    }

    /// A line above the bars; on stderr as it is when there are no bars.
    fn line(&self, text: &str) {
        if self.multi.is_hidden() {
            eprintln!("{text}");
        } else {
            let _ = self.multi.println(text);
        }
    }
}

fn clock(seconds: f64) -> String {
    let tenths = (seconds.max(0.0) * 10.0).round() as u64;
    format!(
        "{:02}:{:02}.{}",
        tenths / 600,
        tenths / 10 % 60,
        tenths % 10
    )
}

fn transcript_line(t: &Value) -> String {
    format!(
        "[{}–{} ch{}] {}",
        clock(t["start"].as_f64().unwrap_or(0.0)),
        clock(t["end"].as_f64().unwrap_or(0.0)),
        t["channel"].as_u64().unwrap_or(0),
        t["text"].as_str().unwrap_or("").trim()
    )
}

async fn stream_one(path: PathBuf, options: Options, display: std::rc::Rc<Display>) -> FileResult {
    let source = match source::load(&path) {
        Ok(source) => source,
        Err(e) => {
            display.line(&format!("failed: {e}"));
            return FileResult {
                path,
                result: Err(e.into()),
            };
        }
    };
    let name = source.name();
    let total_s = source.duration_seconds();
    let bar = display
        .multi
        .add(ProgressBar::new(source.total_frames.max(1)));
    bar.set_style(
        ProgressStyle::with_template("{prefix:.bold} [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(name.clone());
    display.line(&format!(
        "{name}: {} ({:.2} s), {} messages",
        source.description,
        total_s,
        source.chunks.len()
    ));
    for note in &source.notes {
        display.line(&format!("{name}: note: {note}"));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let streaming = stream::stream(&source, &options, &tx);
    tokio::pin!(streaming);
    let mut last_text = String::new();
    let result = loop {
        tokio::select! {
            result = &mut streaming => break result,
            Some(event) = rx.recv() => match event {
                Event::Started { session_id } => {
                    display.line(&format!("{name}: session {session_id}"));
                }
                Event::Sent(frames) => {
                    bar.set_position(frames);
                    let at = frames as f64 / f64::from(source.sample_rate);
                    bar.set_message(format!("{} / {} {last_text}", clock(at), clock(total_s)));
                }
                Event::Lost { at_seconds, error } => display.line(&format!(
                    "{name}: connection lost at {}: {error}; resuming",
                    clock(at_seconds)
                )),
                Event::Resumed { from_seq, at_seconds } => display.line(&format!(
                    "{name}: resumed at seq {from_seq} ({})",
                    clock(at_seconds)
                )),
                Event::Transcript(t) => {
                    let line = transcript_line(&t);
                    last_text = t["text"].as_str().unwrap_or("").trim().to_owned();
                    display.line(&format!("{name}: {line}"));
                }
                Event::Vad(v) => {
                    if !display.multi.is_hidden() {
                        continue;
                    }
                    display.line(&format!(
                        "{name}: {} ch{} at {}",
                        v["event"].as_str().unwrap_or("?"),
                        v["channel"].as_u64().unwrap_or(0),
                        clock(v["time"].as_f64().unwrap_or(0.0))
                    ));
                }
                Event::Warning(w) => display.line(&format!("{name}: warning: {w}")),
            },
        }
    };
    bar.finish_and_clear();
    display.multi.remove(&bar);
    match &result {
        Ok(outcome) => display.line(&format!(
            "{name}: done, {} recording(s){}",
            outcome.recordings.len(),
            if outcome.resumes > 0 {
                format!(", {} resume(s)", outcome.resumes)
            } else {
                String::new()
            }
        )),
        Err(e) => display.line(&format!("{name}: failed: {e}")),
    }
    FileResult { path, result }
}

fn summary_json(file: &FileResult) -> Value {
    match &file.result {
        Ok(o) => json!({
            "file": file.path,
            "ok": true,
            "session_id": o.session_id,
            "recordings": o.recordings,
            "transcripts": o.transcripts,
            "resumes": o.resumes,
            "resume_waits_ms": o.resume_waits_ms,
            "closed": o.closed,
        }),
        Err(e) => json!({ "file": file.path, "ok": false, "error": e.to_string() }),
    }
}

fn print_summary(file: &FileResult) {
    let name = file.path.display();
    match &file.result {
        Ok(o) => {
            println!("{name}: recorded (session {})", o.session_id);
            for r in &o.recordings {
                let channel = r["channel"]
                    .as_u64()
                    .map_or(String::new(), |c| format!(", channel {c}"));
                println!(
                    "  recording: {} ({:.2} s, {} sample frames{channel})",
                    r["path"].as_str().unwrap_or("?"),
                    r["duration_seconds"].as_f64().unwrap_or(0.0),
                    r["sample_frames"].as_u64().unwrap_or(0)
                );
            }
            if o.recordings.is_empty() {
                println!(
                    "  no recording (the session ran without the record sink, or with no audio); {:.2} s streamed",
                    o.closed["duration_seconds"].as_f64().unwrap_or(0.0)
                );
            }
            if o.resumes > 0 {
                println!("  resumed {} time(s) after a dropped connection", o.resumes);
            }
            for t in &o.transcripts {
                println!("  {}", transcript_line(t));
            }
        }
        Err(e) => println!("{name}: FAILED: {e}"),
    }
}

/// Runs `cochlea stream`.
pub fn run(args: StreamArgs) -> ExitCode {
    let speed = match (args.realtime, args.speed) {
        (true, _) | (false, None) => Speed::Factor(1.0),
        (false, Some(speed)) => speed,
    };
    let options = Options {
        url: stream::with_stream_path(&args.url),
        token: args.token.clone().filter(|t| !t.is_empty()),
        speed,
        transcribe: args.transcribe.clone(),
        resume_timeout: Duration::from_millis(args.resume_timeout_ms),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cochlea stream: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let display = std::rc::Rc::new(Display::new());
    let jobs = usize::from(args.jobs);
    let results: Vec<FileResult> = runtime.block_on(async {
        use futures_util::stream::StreamExt;
        let mut results: Vec<(usize, FileResult)> =
            futures_util::stream::iter(args.files.iter().cloned().enumerate())
                .map(|(i, path)| {
                    let options = options.clone();
                    let display = display.clone();
                    async move { (i, stream_one(path, options, display).await) }
                })
                .buffer_unordered(jobs)
                .collect()
                .await;
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, r)| r).collect()
    });
    let failed = results.iter().filter(|r| r.result.is_err()).count();
    for file in &results {
        if args.json {
            println!("{}", summary_json(file));
        } else {
            print_summary(file);
        }
    }
    if failed > 0 {
        eprintln!(
            "cochlea stream: {failed} of {} file(s) failed",
            results.len()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
