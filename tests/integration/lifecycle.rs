//! Startup, configuration layers, health, metrics and graceful shutdown.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn sigterm_finishes_sessions_and_closes_1001() {
    let mut server = Server::start();
    let samples: Vec<i16> = (0..16000)
        .map(|i| ((i * 13) % 4000 - 2000) as i16)
        .collect();
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    client.expect("started").await;
    client.send_chunks(&s16_bytes(&samples), 640).await;
    // Make sure the server has taken the audio before the signal.
    client.send_json(json!({"type": "flush"})).await;
    client.expect("flushed").await;
    server.signal("TERM");
    let transcript = client.finish().await;
    assert_eq!(
        transcript.types(),
        ["started", "flushed", "stats", "recording", "closed"]
    );
    assert_eq!(transcript.one("closed")["reason"], "shutdown");
    assert_eq!(transcript.close_code(), 1001);
    let wav = read_wav_i16(Path::new(
        transcript.one("recording")["path"].as_str().unwrap(),
    ));
    assert!(wav.samples == samples);
    let status = server.wait_exit(WAIT);
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn sigint_with_no_sessions_exits_cleanly() {
    let mut server = Server::start();
    server.signal("INT");
    assert!(server.wait_exit(WAIT).success());
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let server = Server::start();
    let (status, body) = server.get("/healthz");
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(server.get("/readyz").0, 200);

    let (_, before) = server.get("/metrics");
    assert!(before.contains("cochlea_sessions_active 0"), "{before}");

    let mut client = Client::connect(&server, "encoding=mulaw").await;
    client.expect("started").await;
    client.send_chunks(&[0xFFu8; 1600], 160).await;
    client.stop().await;
    Client::connect(&server, "encoding=mp3")
        .await
        .finish()
        .await;

    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200);
    for expected in [
        "cochlea_sessions_total 2",
        "cochlea_sessions_active 0",
        "cochlea_audio_received_bytes_total{encoding=\"mulaw\"} 1600",
        "cochlea_audio_received_frames_total{encoding=\"mulaw\"} 10",
        "cochlea_audio_decoded_sample_frames_total{encoding=\"mulaw\",sample_rate=\"8000\"} 1600",
        "cochlea_session_errors_total{kind=\"unsupported_encoding\"} 1",
        "cochlea_recordings_total 1",
        "# TYPE cochlea_sessions_active gauge",
        "# TYPE cochlea_ingest_latency_seconds histogram",
        "cochlea_ingest_latency_seconds_count 10",
        // One file write: the recorder hands its audio to the file in
        // batches, here the whole 0.2 s at stop.
        "cochlea_sink_write_seconds_count{sink=\"record\"} 1",
        "# HELP cochlea_sessions_total",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // With real sessions behind it (labels, histograms), the exposition
    // passes promtool's lint; scripts/setup.sh installs promtool for CI.
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut promtool) => {
            use std::io::Write;
            promtool
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = promtool.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) => eprintln!("promtool not installed (scripts/setup.sh installs it): lint skipped"),
    }
}

#[test]
fn unknown_config_key_is_an_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cochlea.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\n[recorder]\nflush_intervl_ms = 500\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cochlea"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("flush_intervl_ms"), "{stderr}");
}

#[test]
fn configuration_layers_defaults_file_env_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cochlea.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:1111\"\nmax_sessions = 3\nidle_timeout_ms = 1234\n[recorder]\nflush_interval_ms = 250\n",
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_cochlea"));
    for (key, _) in std::env::vars() {
        if key.starts_with("COCHLEA_") {
            command.env_remove(key);
        }
    }
    let out = command
        .args(["serve", "--print-config", "--config"])
        .arg(&path)
        .args(["--idle-timeout-ms", "777"])
        .env("COCHLEA_MAX_SESSIONS", "4")
        .env("COCHLEA_IDLE_TIMEOUT_MS", "999")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(
        effective["listen"].as_str(),
        Some("127.0.0.1:1111"),
        "file beats default"
    );
    assert_eq!(
        effective["max_sessions"].as_integer(),
        Some(4),
        "env beats file"
    );
    assert_eq!(
        effective["idle_timeout_ms"].as_integer(),
        Some(777),
        "flag beats env"
    );
    assert_eq!(
        effective["recorder"]["flush_interval_ms"].as_integer(),
        Some(250)
    );
    assert_eq!(
        effective["recordings_dir"].as_str(),
        Some("./recordings"),
        "default"
    );
    assert_eq!(effective["max_message_bytes"].as_integer(), Some(65536));
}

#[test]
fn defaults_listen_on_loopback_8080_and_record_into_recordings() {
    let out = Command::new(env!("CARGO_BIN_EXE_cochlea"))
        .args(["serve", "--print-config"])
        .env_remove("COCHLEA_LISTEN")
        .env_remove("COCHLEA_RECORDINGS_DIR")
        .env_remove("COCHLEA_CONFIG")
        .output()
        .unwrap();
    let effective: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(effective["listen"].as_str(), Some("127.0.0.1:8080"));
    assert_eq!(effective["recordings_dir"].as_str(), Some("./recordings"));
}

#[tokio::test]
async fn session_logs_carry_the_session_id() {
    let server = Server::start();
    let mut client = Client::connect(&server, "encoding=mulaw").await;
    let id = client.expect("started").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    client.stop().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = server.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("session")).collect();
    for wanted in ["session opened", "stream started", "session closed"] {
        let line = lines
            .iter()
            .find(|l| l.contains(wanted))
            .unwrap_or_else(|| panic!("no '{wanted}' line in log:\n{log}"));
        assert!(
            line.contains(&id),
            "'{wanted}' line lacks the session id: {line}"
        );
    }
}

#[test]
fn healthcheck_command_reflects_the_server() {
    let server = Server::start();
    let url = format!("http://{}/healthz", server.addr);
    let ok = Command::new(env!("CARGO_BIN_EXE_cochlea"))
        .args(["healthcheck", "--url", &url])
        .status()
        .unwrap();
    assert!(ok.success());
    drop(server);
    let down = Command::new(env!("CARGO_BIN_EXE_cochlea"))
        .args(["healthcheck", "--url", &url, "--timeout-ms", "500"])
        .output()
        .unwrap();
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot reach"));
}
