//! The page's files and the recordings route over plain HTTP: embedded
//! assets served from any working directory, recordings only by session id,
//! only finished ones, and with the same credentials as `/v1/stream`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::*;

const WEB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/samples/web");

/// A GET with extra header lines; returns (status, headers, body bytes).
fn get(addr: std::net::SocketAddr, path: &str, headers: &str) -> (u16, String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n"
    )
    .expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head, response[split + 4..].to_vec())
}

async fn one_recording(server: &Server, query: &str) -> (String, Vec<u8>) {
    let mut client = Client::connect(server, query).await;
    client.expect("started").await;
    let samples: Vec<i16> = (0..3200).map(|i| ((i * 53) % 4000 - 2000) as i16).collect();
    client.send_chunks(&s16_bytes(&samples), 640).await;
    let transcript = client.stop().await;
    let path = transcript.one("recording")["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let name = Path::new(&path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    (name, std::fs::read(&path).unwrap())
}

#[test]
fn the_page_is_embedded_and_served_from_any_directory() {
    // A working directory without samples/: the files come from the binary.
    let cwd = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cochlea"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--recordings-dir",
            "rec",
        ])
        .current_dir(cwd.path())
        .env_remove("COCHLEA_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("cochlea listening on http://")
        .unwrap()
        .parse()
        .unwrap();
    for (path, file, kind) in [
        ("/", "index.html", "text/html"),
        ("/app.js", "app.js", "text/javascript"),
        ("/worklet.js", "worklet.js", "text/javascript"),
        ("/style.css", "style.css", "text/css"),
        ("/recordings", "recordings.html", "text/html"),
        ("/recordings.js", "recordings.js", "text/javascript"),
        ("/recordings.css", "recordings.css", "text/css"),
    ] {
        let (status, head, body) = get(addr, path, "");
        assert_eq!(status, 200, "{path}");
        assert!(
            head.contains(&format!("content-type: {kind}")),
            "{path}: {head}"
        );
        assert!(
            head.contains("content-security-policy: default-src 'self'"),
            "{head}"
        );
        assert!(head.contains("x-content-type-options: nosniff"));
        let on_disk = std::fs::read(Path::new(WEB).join(file)).unwrap();
        assert!(body == on_disk, "{path} is not samples/web/{file}");
    }
    // Nothing from other sites: every script and stylesheet is our own.
    for page in ["index.html", "recordings.html"] {
        let html = std::fs::read_to_string(Path::new(WEB).join(page)).unwrap();
        assert!(!html.contains("http://") && !html.contains("https://"));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn finished_recordings_are_served_by_session_id_only() {
    let server = Server::start();
    let (name, bytes) = one_recording(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    let path = format!("/v1/recordings/{name}");
    let (status, head, body) = get(server.addr, &path, "");
    assert_eq!(status, 200);
    assert!(head.contains("content-type: audio/wav"), "{head}");
    assert!(body == bytes, "the served WAV is the file");
    // Range requests, so that a player can seek.
    let (status, head, body) = get(server.addr, &path, "Range: bytes=44-99\r\n");
    assert_eq!(status, 206, "{head}");
    assert_eq!(body, bytes[44..100]);

    let id = name.trim_end_matches(".wav");
    for bad in [
        format!("/v1/recordings/{id}.json"),
        format!("/v1/recordings/{}.wav", id.to_uppercase()),
        format!("/v1/recordings/{}.wav", id.replace('-', "")),
        format!("/v1/recordings/..%2F{name}"),
        format!("/v1/recordings/%2E%2E%2Frecordings%2F{name}"),
        "/v1/recordings/..%2F..%2Fetc%2Fpasswd".to_owned(),
        "/v1/recordings/00000000-0000-7000-8000-000000000000.wav".to_owned(),
        format!("/v1/recordings/{id}.ch2.wav"),
    ] {
        let (status, _, body) = get(server.addr, &bad, "");
        assert_eq!(status, 404, "{bad}");
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(body["error"], "not_found", "{bad}");
    }
    let (status, _, _) = get(server.addr, "/v1/recordings/../../etc/passwd", "");
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_recording_in_progress_is_not_served() {
    let server = Server::start();
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    let started = client.expect("started").await;
    client.send_binary(vec![0u8; 640]).await;
    client.send_json(serde_json::json!({"type": "flush"})).await;
    client.expect("flushed").await;
    let id = started["session_id"].as_str().unwrap();
    let (status, _, body) = get(server.addr, &format!("/v1/recordings/{id}.wav"), "");
    assert_eq!(status, 409);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "recording_unfinished");
    client.stop().await;
    let (status, _, _) = get(server.addr, &format!("/v1/recordings/{id}.wav"), "");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn split_channel_recordings_are_served_too() {
    let server = Server::start_with(&["--recorder-channels", "split"], &[]);
    let mut client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=8000&channels=2").await;
    client.expect("started").await;
    client.send_binary(vec![1u8; 640]).await;
    let transcript = client.stop().await;
    let recordings = transcript.of_type("recording");
    assert_eq!(recordings.len(), 2);
    for recording in recordings {
        let path = recording["path"].as_str().unwrap();
        let name = Path::new(path).file_name().unwrap().to_string_lossy();
        assert!(name.ends_with(".ch0.wav") || name.ends_with(".ch1.wav"));
        let (status, _, body) = get(server.addr, &format!("/v1/recordings/{name}"), "");
        assert_eq!(status, 200, "{name}");
        assert_eq!(body, std::fs::read(path).unwrap());
    }
}

#[tokio::test]
async fn recordings_need_the_stream_credentials() {
    let key = "page-test-key-0123456789abcdef";
    let server = Server::start_with(&["--api-key", key], &[]);
    let (name, bytes) = one_recording(
        &server,
        &format!("encoding=pcm_s16le&sample_rate=16000&token={key}"),
    )
    .await;
    let path = format!("/v1/recordings/{name}");
    // No credential, a wrong one: 401 with the auth error codes.
    let (status, head, body) = get(server.addr, &path, "");
    assert_eq!(status, 401);
    assert!(head.contains("www-authenticate: bearer"));
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["error"],
        "auth_missing"
    );
    let (status, _, body) = get(
        server.addr,
        &format!("{path}?token=wrong-key-0123456789"),
        "",
    );
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["error"],
        "auth_wrong_key"
    );
    // Without a credential even a bad name says 401, not whether it exists.
    let (status, _, _) = get(server.addr, "/v1/recordings/nothing.wav", "");
    assert_eq!(status, 401);
    // The key as a header or in the query, and a minted token, all work.
    let (status, _, body) = get(
        server.addr,
        &path,
        &format!("Authorization: Bearer {key}\r\n"),
    );
    assert_eq!(status, 200);
    assert!(body == bytes);
    let (status, _, _) = get(server.addr, &format!("{path}?token={key}"), "");
    assert_eq!(status, 200);
    let token = mint_token(&server, key);
    let (status, _, body) = get(server.addr, &format!("{path}?token={token}"), "");
    assert_eq!(status, 200);
    assert!(body == bytes);
    // The page itself is public: it holds no secret.
    let (status, _, _) = get(server.addr, "/", "");
    assert_eq!(status, 200);
}

fn mint_token(server: &Server, key: &str) -> String {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let body = r#"{"ttl_seconds":60}"#;
    write!(
        stream,
        "POST /v1/tokens HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let json = response.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str::<Value>(json).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}
