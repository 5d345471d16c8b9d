//! `cochlea loadgen` against the real server: a short, small, loopback run
//! (no timing assertions: speed belongs in BENCHMARKS.md).

use std::process::Command;

use serde_json::Value;

use crate::harness::*;

/// Runs `cochlea loadgen` to completion; returns its exit code, its final
/// JSON report and everything it printed.
fn loadgen(args: &[&str]) -> (i32, Value, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_cochlea"))
        .arg("loadgen")
        .args(args)
        .output()
        .expect("run cochlea loadgen");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or(Value::Null);
    (
        output.status.code().unwrap_or(-1),
        report,
        format!("{stdout}\n{stderr}"),
    )
}

#[test]
fn five_pcm_streams_are_all_acknowledged_and_recorded_in_order() {
    let server = Server::start();
    let url = format!("ws://{}/v1/stream", server.addr);
    let input = fixture("speech-16k.wav");
    let (code, report, output) = loadgen(&[
        "--url",
        &url,
        "--connections",
        "5",
        "--duration-s",
        "2",
        "--ramp-s",
        "0.5",
        "--sinks",
        "record",
        "--input",
        input.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{output}");
    assert_eq!(report["completed"], 5, "{output}");
    assert_eq!(report["failures"], 0, "{output}");
    // 2 s of 20 ms messages per stream, every one acknowledged, and the
    // server's own count in `closed` agrees.
    assert_eq!(report["frames_sent"], 500, "{output}");
    assert_eq!(report["frames_acked"], report["frames_sent"], "{output}");
    assert_eq!(report["frames_lost"], 0, "{output}");
    assert_eq!(report["server_audio_messages"], 500, "{output}");
    assert!(output.contains("open "), "no per-second line:\n{output}");

    // Each recording is 2 s of the fixture, looped from a whole-message
    // offset: the generator sent real audio, in order, nothing twice.
    let speech = read_wav_i16(&input).samples;
    let looped: Vec<i16> = speech[..speech.len() / 320 * 320].to_vec();
    let wavs: Vec<_> = std::fs::read_dir(server.recordings_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wav"))
        .collect();
    assert_eq!(wavs.len(), 5);
    for path in wavs {
        let recorded = read_wav_i16(&path).samples;
        assert_eq!(recorded.len(), 32_000, "{}", path.display());
        let start = (0..looped.len() / 320).map(|m| m * 320).find(|&offset| {
            (0..recorded.len()).all(|i| recorded[i] == looped[(offset + i) % looped.len()])
        });
        assert!(
            start.is_some(),
            "{} is not the fixture looped from a message boundary",
            path.display()
        );
    }
}

#[test]
fn opus_streams_are_all_acknowledged() {
    let server = Server::start_with(&["--recorder-sample-rate", "16000"], &[]);
    let url = format!("ws://{}/v1/stream", server.addr);
    let (code, report, output) = loadgen(&[
        "--url",
        &url,
        "--connections",
        "3",
        "--duration-s",
        "1",
        "--ramp-s",
        "0.3",
        "--encoding",
        "opus",
        "--sample-rate",
        "48000",
        "--quiet",
    ]);
    assert_eq!(code, 0, "{output}");
    assert_eq!(report["frames_sent"], 150, "{output}");
    assert_eq!(report["frames_acked"], 150, "{output}");
    assert_eq!(report["server_audio_messages"], 150, "{output}");
    assert!(
        report["warnings"].as_object().unwrap().is_empty(),
        "{output}"
    );
    // 48 kHz Opus recorded at 16 kHz: one second each.
    for entry in std::fs::read_dir(server.recordings_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "wav") {
            let wav = read_wav_i16(&path);
            assert_eq!(wav.spec.sample_rate, 16_000);
            assert_eq!(wav.samples.len(), 16_000, "{}", path.display());
        }
    }
}

#[test]
fn idle_streams_start_and_stop_cleanly() {
    let server = Server::start();
    let url = format!("ws://{}/v1/stream", server.addr);
    let (code, report, output) = loadgen(&[
        "--url",
        &url,
        "--connections",
        "20",
        "--duration-s",
        "1",
        "--ramp-s",
        "0.2",
        "--idle",
        "--keepalive-ms",
        "300",
        "--sinks",
        "none",
        "--quiet",
    ]);
    assert_eq!(code, 0, "{output}");
    assert_eq!(report["completed"], 20, "{output}");
    assert_eq!(report["frames_sent"], 0, "{output}");
}

#[test]
fn refuses_targets_that_are_not_loopback() {
    let (code, _, output) = loadgen(&["--url", "ws://192.0.2.1:8080/v1/stream"]);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("only targets loopback"), "{output}");
}

#[test]
fn a_refused_stream_is_a_failure_with_its_code() {
    let server = Server::start_with(&["--max-sessions", "2"], &[]);
    let url = format!("ws://{}/v1/stream", server.addr);
    let (code, report, output) = loadgen(&[
        "--url",
        &url,
        "--connections",
        "4",
        "--duration-s",
        "1",
        "--ramp-s",
        "0",
        "--sinks",
        "none",
        "--quiet",
    ]);
    assert_eq!(code, 1, "{output}");
    assert_eq!(report["completed"], 2, "{output}");
    assert_eq!(
        report["failure_kinds"]["refused:server_full"], 2,
        "{output}"
    );
}
