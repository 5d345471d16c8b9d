//! `cochlea stream` against the real server: every sample file arrives
//! exactly, a killed server is a clear failure, and a connection cut in the
//! middle (by a TCP proxy in the test) is resumed into one exact recording.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;
use crate::signal::{best_alignment, mulaw_decode, to_f64};

const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/samples/audio");

fn sample(name: &str) -> PathBuf {
    Path::new(SAMPLES).join(name)
}

fn stream_command(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cochlea"));
    command.arg("stream").arg("--url").arg(url).args(args);
    command
        .env_remove("COCHLEA_URL")
        .env_remove("COCHLEA_TOKEN");
    command
}

/// Runs `cochlea stream` to the end (bounded) and returns its output.
fn run_stream(url: &str, args: &[&str]) -> Output {
    let child = stream_command(url, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cochlea stream");
    wait_output(child, Duration::from_secs(60))
}

fn wait_output(mut child: std::process::Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cochlea stream did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `--json` summary lines, by file name.
fn summaries(output: &Output) -> Vec<Value> {
    text(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn summary_for<'a>(summaries: &'a [Value], file: &str) -> &'a Value {
    summaries
        .iter()
        .find(|s| s["file"].as_str().is_some_and(|f| f.ends_with(file)))
        .unwrap_or_else(|| panic!("no summary for {file} in {summaries:#?}"))
}

fn recording_path(summary: &Value) -> PathBuf {
    let recordings = summary["recordings"].as_array().expect("recordings");
    assert_eq!(recordings.len(), 1, "{summary}");
    PathBuf::from(recordings[0]["path"].as_str().expect("path"))
}

fn wav_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("recordings dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wav"))
        .collect();
    files.sort();
    files
}

/// The speech sample's PCM, sample for sample.
fn assert_pcm_exact(recording: &Path) {
    let recorded = read_wav_i16(recording);
    let source = read_wav_i16(&sample("speaker-16k.wav"));
    assert_eq!(recorded.spec.sample_rate, 16000);
    assert_eq!(recorded.spec.channels, 1);
    assert_eq!(recorded.samples.len(), source.samples.len());
    assert!(recorded.samples == source.samples, "samples differ");
}

/// The μ-law call decoded by the test's own G.711 decoder, both channels.
fn assert_mulaw_exact(recording: &Path) {
    let recorded = read_wav_i16(recording);
    assert_eq!(recorded.spec.sample_rate, 8000);
    assert_eq!(recorded.spec.channels, 2);
    let expected: Vec<i16> = wav_data_chunk(&sample("call-8k-mulaw.wav"))
        .into_iter()
        .map(mulaw_decode)
        .collect();
    assert_eq!(recorded.samples.len(), expected.len());
    assert!(recorded.samples == expected, "samples differ");
    // Two speakers taking turns: the channels are not copies.
    let (left, right): (Vec<i16>, Vec<i16>) =
        recorded.samples.chunks(2).map(|f| (f[0], f[1])).unzip();
    assert!(left.iter().any(|&s| s.abs() > 3000) && right.iter().any(|&s| s.abs() > 3000));
    assert_ne!(left, right);
}

/// The Ogg/Opus sample: packets read by the harness's own Ogg reader and
/// decoded here with libopus at 16 kHz. The client sends raw packets, so
/// the recording is every packet's full duration (pre-skip included) and
/// must be that decode.
fn assert_opus_matches(recording: &Path) {
    let packets = ogg_packets_independently(&sample("speaker.opus"));
    let mut decoder = opus::Decoder::new(16000, opus::Channels::Mono).expect("decoder");
    let mut decoded = Vec::new();
    let mut buffer = vec![0f32; 16000 * 120 / 1000];
    for packet in &packets {
        let n = decoder
            .decode_float(packet, &mut buffer, false)
            .expect("decode");
        decoded.extend(
            buffer[..n]
                .iter()
                .map(|s| (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16),
        );
    }
    let recorded = read_wav_i16(recording);
    assert_eq!(recorded.spec.sample_rate, 16000);
    assert_eq!(
        recorded.samples.len(),
        decoded.len(),
        "packets × 320 frames"
    );
    let (correlation, lag) = best_alignment(&to_f64(&recorded.samples), &to_f64(&decoded), 480, 0);
    eprintln!("opus: correlation {correlation:.5} at lag {lag}");
    assert!(correlation >= 0.99, "correlation {correlation}");
}

#[tokio::test]
async fn every_sample_file_is_recorded_exactly_with_three_jobs() {
    let server = Server::start();
    let files = ["speaker-16k.wav", "call-8k-mulaw.wav", "speaker.opus"];
    let paths: Vec<String> = files
        .iter()
        .map(|f| sample(f).display().to_string())
        .collect();
    let mut args = vec!["--speed", "max", "--jobs", "3", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let output = run_stream(&server.url(""), &args);
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    let summaries = summaries(&output);
    assert_eq!(summaries.len(), 3);
    assert!(summaries.iter().all(|s| s["ok"] == true), "{summaries:#?}");
    assert_pcm_exact(&recording_path(summary_for(&summaries, "speaker-16k.wav")));
    assert_mulaw_exact(&recording_path(summary_for(
        &summaries,
        "call-8k-mulaw.wav",
    )));
    assert_opus_matches(&recording_path(summary_for(&summaries, "speaker.opus")));
    assert_eq!(wav_files(&server.recordings_dir()).len(), 3);
    // The file name travels as metadata, and every session ended with stop.
    for summary in &summaries {
        assert_eq!(summary["closed"]["reason"], "stop");
        assert_eq!(summary["resumes"], 0);
    }
    let sidecar = recording_path(summary_for(&summaries, "speaker.opus")).with_extension("json");
    let sidecar: Value = serde_json::from_slice(&std::fs::read(sidecar).unwrap()).unwrap();
    assert_eq!(sidecar["metadata"]["source"], "speaker.opus");
    assert_eq!(sidecar["format"]["encoding"], "opus");
    assert_eq!(sidecar["format"]["framing"], "seq");
}

#[tokio::test]
async fn the_human_summary_names_the_recording_and_duration() {
    let server = Server::start();
    let file = sample("call-8k-mulaw.wav").display().to_string();
    let output = run_stream(&server.url(""), &["--speed", "20", &file]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let recording = wav_files(&server.recordings_dir()).remove(0);
    assert!(
        stdout.contains(&format!(
            "recording: {} (9.56 s, 76520 sample frames)",
            recording.display()
        )),
        "{stdout}"
    );
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("WAV 8000 Hz stereo G.711 μ-law (9.56 s)"),
        "{stderr}"
    );
}

/// `--url ws://host:port` is what a new user types: it must reach the stream
/// endpoint, not the page at `/` (which answered 200 and no upgrade).
#[tokio::test]
async fn a_url_without_a_path_streams_to_v1_stream() {
    let server = Server::start();
    let file = sample("call-8k-mulaw.wav").display().to_string();
    for url in [
        format!("ws://{}", server.addr),
        format!("ws://{}/", server.addr),
    ] {
        let output = run_stream(&url, &["--speed", "max", "--json", &file]);
        assert!(
            output.status.success(),
            "{url}: exit {:?}\n{}",
            output.status,
            text(&output.stderr)
        );
        let summaries = summaries(&output);
        assert_eq!(summaries[0]["closed"]["reason"], "stop", "{summaries:#?}");
        assert_mulaw_exact(&recording_path(&summaries[0]));
    }
    assert_eq!(wav_files(&server.recordings_dir()).len(), 2);
    // The query of a URL without a path still reaches the server.
    let url = format!("ws://{}?sinks=none", server.addr);
    let output = run_stream(&url, &["--speed", "max", "--json", &file]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let summaries = summaries(&output);
    assert_eq!(summaries[0]["recordings"], serde_json::json!([]));
    assert_eq!(wav_files(&server.recordings_dir()).len(), 2);
    // An explicit path is kept as it is, even a wrong one.
    let url = format!("ws://{}/v2/stream", server.addr);
    let output = run_stream(&url, &[&file]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("HTTP 404"),
        "{}",
        text(&output.stderr)
    );
    // A page where the upgrade was expected says what is wrong.
    let url = format!("ws://{}/style.css", server.addr);
    let output = run_stream(&url, &[&file]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("HTTP 200 (a web page, not the stream endpoint"),
        "{}",
        text(&output.stderr)
    );
}

/// Waits until the server has a recording open (its WAV exists).
fn wait_for_recording_file(dir: &Path) {
    let deadline = Instant::now() + WAIT;
    while wav_files(dir).is_empty() {
        assert!(Instant::now() < deadline, "no session started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_killed_server_is_a_clear_failure() {
    let mut server = Server::start();
    let file = sample("speaker-16k.wav").display().to_string();
    // Real time: the 6 s file is still streaming when the server dies.
    let child = stream_command(
        &server.url(""),
        &["--realtime", "--resume-timeout-ms", "1500", &file],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn");
    wait_for_recording_file(&server.recordings_dir());
    std::thread::sleep(Duration::from_millis(500));
    server.signal("KILL");
    server.wait_exit(WAIT);
    let output = wait_output(child, WAIT);
    let stderr = text(&output.stderr);
    eprintln!("cochlea stream said:\n{stderr}");
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("connection lost at") && stderr.contains("not resumed within"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 1 file(s) failed"), "{stderr}");
    // The resume token is a credential: never printed.
    assert!(!stderr.contains("resume_token"), "{stderr}");
    assert!(text(&output.stdout).contains("FAILED"));
}

#[tokio::test]
async fn a_server_shutting_down_is_a_clear_failure_with_the_partial_recording() {
    let server = Server::start();
    let file = sample("speaker-16k.wav").display().to_string();
    let child = stream_command(&server.url(""), &["--realtime", &file])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_for_recording_file(&server.recordings_dir());
    std::thread::sleep(Duration::from_millis(500));
    server.signal("TERM");
    let output = wait_output(child, WAIT);
    let stderr = text(&output.stderr);
    eprintln!("cochlea stream said:\n{stderr}");
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let recording = wav_files(&server.recordings_dir()).remove(0);
    assert!(
        stderr.contains("closed with 1001 (shutdown)")
            && stderr.contains(&format!("recorded in {}", recording.display())),
        "{stderr}"
    );
}

#[tokio::test]
async fn clear_failures_before_streaming() {
    // Nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}/v1/stream");
    let file = sample("speaker-16k.wav").display().to_string();
    let output = run_stream(&url, &[&file]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains(&format!("cannot connect to {url}")),
        "{}",
        text(&output.stderr)
    );

    // A server that wants a key.
    let key = "stream-cli-test-key-0123456789";
    let server = Server::start_with(&["--api-key", key], &[]);
    let output = run_stream(&server.url(""), &[&file]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("the server refused the connection: HTTP 401 auth_missing"),
        "{stderr}"
    );
    let output = run_stream(&server.url(""), &["--speed", "max", "--token", key, &file]);
    assert!(output.status.success(), "{}", text(&output.stderr));

    // Not audio; a format the server cannot take. Each file fails on its
    // own and the others still stream.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("notes.wav");
    std::fs::write(&junk, b"these are not samples").unwrap();
    let loud = dir.path().join("96k.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 96000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    hound::WavWriter::create(&loud, spec)
        .unwrap()
        .finalize()
        .unwrap();
    let output = run_stream(
        &server.url(""),
        &[
            "--speed",
            "max",
            "--token",
            key,
            junk.to_str().unwrap(),
            loud.to_str().unwrap(),
            &file,
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("not a WAV (RIFF/WAVE) or Ogg/Opus file"),
        "{stderr}"
    );
    assert!(stderr.contains("sample rate 96000 Hz"), "{stderr}");
    assert!(stderr.contains("2 of 3 file(s) failed"), "{stderr}");
    assert_eq!(wav_files(&server.recordings_dir()).len(), 2);

    // Usage errors are clap's: status 2.
    let output = run_stream(&server.url(""), &["--speed", "fast", &file]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("not a speed"));
}

/// A TCP proxy that cuts its first connection with a reset once
/// `cut_after` bytes have gone upstream, and passes later ones through.
struct CuttingProxy {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    limit: Option<usize>,
) {
    let mut buffer = vec![0u8; 4096];
    let mut passed = 0usize;
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let n = match limit {
            Some(limit) if passed + n >= limit => {
                let _ = to.write_all(&buffer[..limit - passed]).await;
                return;
            }
            _ => n,
        };
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        passed += n;
    }
    let _ = to.shutdown().await;
}

impl CuttingProxy {
    async fn start(upstream: std::net::SocketAddr, cut_after: usize) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(async move {
                    if number == 0 {
                        // Cut: both sides get a reset, as when a network dies.
                        let _ = client.set_zero_linger();
                        let _ = server.set_zero_linger();
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        let up = tokio::spawn(pipe(client_read, server_write, Some(cut_after)));
                        let down = tokio::spawn(pipe(server_read, client_write, None));
                        let _ = up.await;
                        down.abort();
                    } else {
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        let up = tokio::spawn(pipe(client_read, server_write, None));
                        let down = tokio::spawn(pipe(server_read, client_write, None));
                        let _ = tokio::join!(up, down);
                    }
                });
            }
        });
        CuttingProxy { addr, connections }
    }
}

#[tokio::test]
async fn a_cut_connection_is_resumed_into_one_exact_recording() {
    let server = Server::start();
    // About half of the 196 KB file (the upgrade and start are < 1 KB).
    let proxy = CuttingProxy::start(server.addr, 100_000).await;
    let url = format!("ws://{}/v1/stream", proxy.addr);
    let file = sample("speaker-16k.wav").display().to_string();
    let output = run_stream_off_runtime(&url, &["--speed", "4", "--json", &file]).await;
    let stderr = text(&output.stderr);
    eprintln!("cochlea stream said:\n{stderr}");
    assert!(
        output.status.success(),
        "{stderr}\n{}",
        text(&output.stdout)
    );
    assert!(
        stderr.contains("connection lost at") && stderr.contains("resumed at seq"),
        "{stderr}"
    );
    assert_eq!(
        proxy.connections.load(Ordering::SeqCst),
        2,
        "one cut, one resume"
    );
    let summaries = summaries(&output);
    let summary = &summaries[0];
    assert_eq!(summary["resumes"], 1);
    // One session, one recording, every sample once.
    let files = wav_files(&server.recordings_dir());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(recording_path(summary), files[0]);
    assert_pcm_exact(&files[0]);
    assert_eq!(summary["closed"]["gap_frames"], 0);
}

#[tokio::test]
async fn a_cut_connection_without_resume_is_a_clear_failure() {
    // Resume switched off: `started` carries no resume token.
    let server = Server::start_with(&["--resume-window-ms", "0"], &[]);
    let proxy = CuttingProxy::start(server.addr, 100_000).await;
    let url = format!("ws://{}/v1/stream", proxy.addr);
    let file = sample("speaker-16k.wav").display().to_string();
    let output = run_stream_off_runtime(&url, &["--speed", "max", &file]).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the session cannot be resumed (the server sent no resume token)"),
        "{stderr}"
    );
    assert_eq!(
        proxy.connections.load(Ordering::SeqCst),
        1,
        "no reconnect attempted"
    );
}

#[tokio::test]
async fn a_server_error_at_start_is_reported_with_its_code() {
    // `--transcribe` goes in `start`; a backend the server does not have is
    // refused with an `error` (whichever code the server picks for it).
    let server = Server::start();
    let file = sample("speaker-16k.wav").display().to_string();
    let output = run_stream(
        &server.url(""),
        &["--speed", "max", "--transcribe", "no-such-backend", &file],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("failed: server error ") && stderr.contains("(close 10"),
        "{stderr}"
    );
}

/// Runs `cochlea stream` to completion (at most 60 s) on a blocking thread,
/// so the test's runtime keeps serving the proxy it streams through.
async fn run_stream_off_runtime(url: &str, args: &[&str]) -> std::process::Output {
    let child = stream_command(url, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    tokio::task::spawn_blocking(move || wait_output(child, Duration::from_secs(60)))
        .await
        .unwrap()
}
