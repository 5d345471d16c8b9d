//! The recordings API against a real server: real audio streamed so real
//! recordings exist, then listed (paging, order, time and metadata filters),
//! detailed (sidecars and kept transcripts), downloaded with Range requests,
//! deleted, refused without credentials or with made-up names, and expired
//! by retention. Every JSON response is checked against proto/schemas/http/.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use crate::harness::*;
use crate::stt_stub::{Reply, Stub};

const HTTP_SCHEMAS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/schemas/http");

/// An HTTP response: status, lower-cased header lines, body.
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The JSON body, checked against proto/schemas/http/<schema>.schema.json.
    pub fn checked(&self, schema: &str) -> Value {
        let body = self.json();
        assert_http_schema(schema, &body);
        body
    }

    /// An error response with `code`, checked against the error schema.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let body = self.checked("error");
        assert_eq!(body["error"], code, "{body}");
    }
}

pub fn assert_http_schema(schema: &str, body: &Value) {
    static VALIDATORS: OnceLock<HashMap<String, jsonschema::Validator>> = OnceLock::new();
    let validators = VALIDATORS.get_or_init(|| schemas_in(HTTP_SCHEMAS));
    let validator = validators
        .get(schema)
        .unwrap_or_else(|| panic!("no schema proto/schemas/http/{schema}.schema.json"));
    let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "response does not match proto/schemas/http/{schema}.schema.json: {errors:?}\n{body}"
    );
}

/// One HTTP/1.1 request over a fresh connection.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n"
    )
    .expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size");
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..line_end])
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .expect("chunk size");
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        out.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
}

pub fn get(server: &Server, path: &str) -> Response {
    request(server.addr, "GET", path, "")
}

/// Streams `seconds` of the 8 kHz stereo call fixture as one session with
/// `metadata`; returns the session id once the session has closed.
pub async fn record_call(server: &Server, query: &str, metadata: Value, seconds: f64) -> String {
    let call = read_wav_i16(&fixture("call-stereo-8k.wav")).samples;
    let take = ((seconds * 8000.0) as usize * 2).min(call.len());
    let mut client = Client::connect(server, query).await;
    client
        .send_json(json!({
            "type": "start", "encoding": "pcm_s16le", "sample_rate": 8000, "channels": 2,
            "metadata": metadata
        }))
        .await;
    let started = client.expect("started").await;
    client.send_chunks(&s16_bytes(&call[..take]), 640).await;
    let transcript = client.stop().await;
    assert!(!transcript.of_type("recording").is_empty());
    started["session_id"].as_str().unwrap().to_owned()
}

/// Lists until `wanted` recordings show (the index may be up to 2 s old).
pub fn list_until(server: &Server, query: &str, wanted: usize) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let response = get(server, &format!("/v1/recordings?{query}"));
        assert_eq!(
            response.status,
            200,
            "{}",
            String::from_utf8_lossy(&response.body)
        );
        let body = response.checked("recordings_list");
        if body["recordings"].as_array().unwrap().len() >= wanted {
            return body;
        }
        assert!(Instant::now() < deadline, "only {body} listed");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ids(page: &Value) -> Vec<String> {
    page["recordings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["session_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn recordings_are_listed_newest_first_paged_and_filtered() {
    let server = Server::start();
    let mut made = Vec::new();
    for (n, agent) in [(1, "ada"), (2, "bob"), (3, "ada")] {
        made.push(record_call(&server, "", json!({"agent": agent, "n": n}), 0.3).await);
        // Distinct start times (milliseconds) for the time filters.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all = list_until(&server, "", 3);
    let newest_first: Vec<String> = made.iter().rev().cloned().collect();
    assert_eq!(ids(&all), newest_first);
    assert_eq!(all["next_cursor"], Value::Null);
    let first = &all["recordings"][0];
    assert_eq!(first["metadata"], json!({"agent": "ada", "n": 3}));
    assert_eq!(first["complete"], true);
    assert_eq!(first["files"][0]["channels"], 2);
    assert_eq!(first["files"][0]["content_type"], "audio/wav");

    // Pages of 2: the cursor leads to the rest, with nothing repeated.
    let page1 = list_until(&server, "limit=2", 2);
    assert_eq!(ids(&page1), newest_first[..2]);
    let cursor = page1["next_cursor"].as_str().expect("a next page");
    let page2 =
        get(&server, &format!("/v1/recordings?limit=2&cursor={cursor}")).checked("recordings_list");
    assert_eq!(ids(&page2), newest_first[2..]);
    assert_eq!(page2["next_cursor"], Value::Null);

    // Metadata: strings and numbers.
    let ada = get(&server, "/v1/recordings?meta.agent=ada").checked("recordings_list");
    assert_eq!(ids(&ada), [made[2].clone(), made[0].clone()]);
    let two = get(&server, "/v1/recordings?meta.n=2&meta.agent=bob").checked("recordings_list");
    assert_eq!(ids(&two), [made[1].clone()]);

    // Time: since is inclusive, until exclusive; RFC 3339 or unix seconds.
    let second_start = all["recordings"][1]["started_at"].as_str().unwrap();
    let since =
        get(&server, &format!("/v1/recordings?since={second_start}")).checked("recordings_list");
    assert_eq!(ids(&since), newest_first[..2]);
    let until =
        get(&server, &format!("/v1/recordings?until={second_start}")).checked("recordings_list");
    assert_eq!(ids(&until), [made[0].clone()]);
    let future = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let none = get(&server, &format!("/v1/recordings?since={future}")).checked("recordings_list");
    assert_eq!(ids(&none), Vec::<String>::new());
    let every = get(&server, "/v1/recordings?since=0").checked("recordings_list");
    assert_eq!(ids(&every).len(), 3);

    for bad in [
        "limit=0",
        "limit=501",
        "limit=x",
        "cursor=not-a-cursor",
        "since=yesterday",
        "sort=asc",
        "meta.=x",
    ] {
        get(&server, &format!("/v1/recordings?{bad}")).assert_error(400, "invalid_query");
    }
}

#[tokio::test]
async fn a_recording_is_detailed_downloaded_in_ranges_and_deleted() {
    let server = Server::start();
    let id = record_call(&server, "", json!({"call": "x1"}), 1.0).await;
    let wav_name = format!("{id}.wav");
    let on_disk = std::fs::read(server.recordings_dir().join(&wav_name)).unwrap();

    let detail = get(&server, &format!("/v1/recordings/{id}")).checked("recording_detail");
    assert_eq!(detail["session_id"], id.as_str());
    assert_eq!(detail["metadata"]["call"], "x1");
    assert_eq!(detail["files"][0]["name"], wav_name.as_str());
    assert_eq!(detail["files"][0]["bytes"], on_disk.len());
    assert_eq!(detail["sidecars"][0]["complete"], true);
    assert_eq!(detail["transcript"], json!([]));
    let url = detail["files"][0]["url"].as_str().unwrap().to_owned();
    assert_eq!(url, format!("/v1/recordings/{id}/files/{wav_name}"));

    // The whole file, streamed: it hashes to the sidecar's sha256.
    let full = get(&server, &url);
    assert_eq!(full.status, 200);
    assert_eq!(full.header("content-type"), Some("audio/wav"));
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    assert_eq!(
        full.header("content-length"),
        Some(&*on_disk.len().to_string())
    );
    assert!(full.header("last-modified").is_some());
    let e_tag = full.header("etag").expect("an ETag").to_owned();
    assert!(full.body == on_disk);
    let copy = server.dir.path().join("downloaded.wav");
    std::fs::write(&copy, &full.body).unwrap();
    assert_eq!(
        sha256_hex(&copy),
        detail["sidecars"][0]["sha256"].as_str().unwrap()
    );
    // ffmpeg reads the download as the stereo 8 kHz call it is.
    let probe = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=channels,sample_rate",
            "-of",
            "csv=p=0",
        ])
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), "8000,2");

    let size = on_disk.len();
    let range = |spec: &str| request(server.addr, "GET", &url, &format!("Range: {spec}\r\n"));
    let first = range("bytes=0-99");
    assert_eq!(first.status, 206);
    assert_eq!(
        first.header("content-range"),
        Some(&*format!("bytes 0-99/{size}"))
    );
    assert!(first.body == on_disk[..100]);
    let tail = range("bytes=-100");
    assert_eq!(tail.status, 206);
    assert_eq!(
        tail.header("content-range"),
        Some(&*format!("bytes {}-{}/{size}", size - 100, size - 1))
    );
    assert!(tail.body == on_disk[size - 100..]);
    let open = range(&format!("bytes={}-", size - 10));
    assert!(open.body == on_disk[size - 10..]);
    let beyond = range(&format!("bytes={size}-"));
    beyond.assert_error(416, "range_not_satisfiable");
    assert_eq!(
        beyond.header("content-range"),
        Some(&*format!("bytes */{size}"))
    );
    // The old name-only route is the same download.
    let legacy = request(
        server.addr,
        "GET",
        &format!("/v1/recordings/{wav_name}"),
        "Range: bytes=0-3\r\n",
    );
    assert_eq!((legacy.status, legacy.body.as_slice()), (206, &b"RIFF"[..]));
    let cached = request(
        server.addr,
        "GET",
        &url,
        &format!("If-None-Match: {e_tag}\r\n"),
    );
    assert_eq!(cached.status, 304);

    let deleted = request(server.addr, "DELETE", &format!("/v1/recordings/{id}"), "");
    assert_eq!(deleted.status, 200);
    let deleted = deleted.checked("recording_deleted");
    let mut names: Vec<&str> = deleted["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [format!("{id}.json"), wav_name.clone()]);
    assert_eq!(
        std::fs::read_dir(server.recordings_dir()).unwrap().count(),
        0
    );
    get(&server, &format!("/v1/recordings/{id}")).assert_error(404, "not_found");
    get(&server, &url).assert_error(404, "not_found");
    request(server.addr, "DELETE", &format!("/v1/recordings/{id}"), "")
        .assert_error(404, "not_found");
    assert_eq!(
        ids(&get(&server, "/v1/recordings").checked("recordings_list")).len(),
        0
    );
}

#[tokio::test]
async fn a_session_still_recording_is_neither_served_nor_deleted() {
    let server = Server::start();
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    let started = client.expect("started").await;
    let id = started["session_id"].as_str().unwrap().to_owned();
    client.send_binary(vec![0u8; 640]).await;
    client.send_json(json!({"type": "flush"})).await;
    client.expect("flushed").await;
    let listed = list_until(&server, "", 1);
    assert_eq!(listed["recordings"][0]["in_progress"], true);
    assert_eq!(listed["recordings"][0]["ended_at"], Value::Null);
    request(server.addr, "DELETE", &format!("/v1/recordings/{id}"), "")
        .assert_error(409, "recording_in_progress");
    get(&server, &format!("/v1/recordings/{id}/files/{id}.wav"))
        .assert_error(409, "recording_unfinished");
    client.stop().await;
    let deleted = request(server.addr, "DELETE", &format!("/v1/recordings/{id}"), "");
    assert_eq!(deleted.status, 200);
    deleted.checked("recording_deleted");
}

#[tokio::test]
async fn every_route_needs_the_stream_credentials_and_a_server_made_name() {
    let key = "recordings-test-key-0123456789abcdef";
    let server = Server::start_with(&["--api-key", key], &[]);
    let id = record_call(&server, &format!("token={key}"), json!({}), 0.3).await;
    let file = format!("/v1/recordings/{id}/files/{id}.wav");
    let routes = [
        ("GET", "/v1/recordings".to_owned()),
        ("GET", format!("/v1/recordings/{id}")),
        ("GET", file.clone()),
        ("DELETE", format!("/v1/recordings/{id}")),
    ];
    for (method, path) in &routes {
        let refused = request(server.addr, method, path, "");
        refused.assert_error(401, "auth_missing");
        assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
        let sep = if path.contains('?') { '&' } else { '?' };
        request(
            server.addr,
            method,
            &format!("{path}{sep}token=wrong-key-0123456789"),
            "",
        )
        .assert_error(401, "auth_wrong_key");
    }
    let bearer = format!("Authorization: Bearer {key}\r\n");
    let listed = request(server.addr, "GET", "/v1/recordings", &bearer);
    assert_eq!(listed.status, 200);
    listed.checked("recordings_list");
    assert_eq!(
        request(server.addr, "GET", &format!("{file}?token={key}"), "").status,
        200
    );

    let other = "01a1fe8b-654d-72fd-99f9-7c0fa87dd94a";
    for path in [
        "/v1/recordings/not-a-session".to_owned(),
        format!("/v1/recordings/{}", id.to_uppercase()),
        format!("/v1/recordings/{other}"),
        format!("/v1/recordings/{id}/files/{other}.wav"),
        format!("/v1/recordings/{id}/files/{id}.json"),
        format!("/v1/recordings/{id}/files/{id}.transcript.jsonl"),
        format!("/v1/recordings/{id}/files/..%2F..%2Fetc%2Fpasswd"),
        format!("/v1/recordings/{id}/files/{id}.ch9.wav"),
        format!("/v1/recordings/{other}/files/{id}.wav"),
    ] {
        request(server.addr, "GET", &path, &bearer).assert_error(404, "not_found");
    }
    for path in [
        "/v1/recordings/..%2Fx".to_owned(),
        format!("/v1/recordings/{id}.wav"),
        format!("/v1/recordings/{other}"),
    ] {
        request(server.addr, "DELETE", &path, &bearer).assert_error(404, "not_found");
    }
    // Nothing was deleted by any of that.
    assert_eq!(request(server.addr, "GET", &file, &bearer).status, 200);
}

/// A finished recording made on disk as the recorder makes them, started
/// `age` ago.
fn craft_recording(dir: &Path, id: &str, age: Duration) {
    let started = SystemTime::now() - age;
    let wav = dir.join(format!("{id}.wav"));
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(&wav, spec).unwrap();
    for i in 0..800 {
        writer.write_sample(((i * 37) % 2000) as i16).unwrap();
    }
    writer.finalize().unwrap();
    let sidecar = json!({
        "session_id": id, "recording": format!("{id}.wav"),
        "format": {"encoding": "pcm_s16le", "sample_rate": 8000, "channels": 1, "framing": "raw"},
        "sample_rate": 8000, "channels": 1, "channel": null, "sample_format": "s16",
        "metadata": {"crafted": true},
        "started_at": humantime::format_rfc3339_millis(started).to_string(),
        "ended_at": humantime::format_rfc3339_millis(started + Duration::from_millis(100)).to_string(),
        "duration_seconds": 0.1, "sample_frames": 800, "sha256": sha256_hex(&wav),
        "complete": true, "error": null,
    });
    std::fs::write(dir.join(format!("{id}.json")), sidecar.to_string()).unwrap();
    std::fs::write(
        dir.join(format!("{id}.transcript.jsonl")),
        "{\"type\":\"transcript\",\"utterance_id\":0,\"channel\":0,\"start\":0.0,\"end\":0.1,\"text\":\"old\",\"final\":true,\"backend\":\"x\",\"backend_ms\":1}\n",
    )
    .unwrap();
}

#[test]
fn retention_deletes_old_recordings_at_start_and_keeps_fresh_ones() {
    let dir = tempfile::tempdir().unwrap();
    let old = "01a1fe8b-654d-72fd-99f9-000000000001";
    let fresh = "01a1fe8b-654d-72fd-99f9-000000000002";
    craft_recording(dir.path(), old, Duration::from_secs(2 * 86_400));
    craft_recording(dir.path(), fresh, Duration::from_secs(3600));
    let server = Server::start_recording_into(dir.path(), &["--recordings-retention-days", "1"]);
    let deadline = Instant::now() + WAIT;
    while dir.path().join(format!("{old}.json")).exists() {
        assert!(
            Instant::now() < deadline,
            "not swept; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for suffix in [".wav", ".json", ".transcript.jsonl"] {
        assert!(
            !dir.path().join(format!("{old}{suffix}")).exists(),
            "{suffix}"
        );
        assert!(
            dir.path().join(format!("{fresh}{suffix}")).exists(),
            "{suffix}"
        );
    }
    let listed = list_until(&server, "", 1);
    assert_eq!(ids(&listed), [fresh.to_owned()]);
    // The kept one is whole: detail with its transcript, and its audio.
    let detail = get(&server, &format!("/v1/recordings/{fresh}")).checked("recording_detail");
    assert_eq!(detail["transcript"][0]["text"], "old");
    assert_eq!(
        get(
            &server,
            &format!("/v1/recordings/{fresh}/files/{fresh}.wav")
        )
        .status,
        200
    );
    assert!(server.log().contains("retention: recording deleted"));
}

#[tokio::test]
async fn transcripts_are_kept_beside_the_recording_and_returned_with_it() {
    let stub = Stub::start(|n, _| Reply::text(&format!("line {n}"))).await;
    let server = Server::start_with(&["--transcribe-url", stub.url.as_str()], &[]);
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let mut samples = vec![0i16; 8000];
    samples.extend_from_slice(&speech);
    samples.extend(std::iter::repeat_n(0i16, 16000));
    samples.extend_from_slice(&speech);
    samples.extend(std::iter::repeat_n(0i16, 8000));
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    let started = client.expect("started").await;
    let id = started["session_id"].as_str().unwrap().to_owned();
    client.send_chunks(&s16_bytes(&samples), 640).await;
    let transcript = client.stop().await;
    let sent: Vec<&Value> = transcript.of_type("transcript");
    assert!(sent.len() >= 2, "{:?}", transcript.types());
    // On disk as soon as the session closed.
    let kept = std::fs::read_to_string(
        server
            .recordings_dir()
            .join(format!("{id}.transcript.jsonl")),
    )
    .unwrap();
    assert_eq!(kept.lines().count(), sent.len());
    let detail = get(&server, &format!("/v1/recordings/{id}")).checked("recording_detail");
    let lines = detail["transcript"].as_array().unwrap();
    assert_eq!(lines.len(), sent.len());
    for (line, sent) in lines.iter().zip(&sent) {
        assert_eq!(line, *sent, "kept as sent");
        assert_matches_schema(line);
    }
    assert!(lines[1]["start"].as_f64().unwrap() > lines[0]["end"].as_f64().unwrap());
    let listed = list_until(&server, "", 1);
    assert_eq!(listed["recordings"][0]["transcript"], true);
}
