//! Test harness: a real `cochlea serve` process on port 0, real WebSocket
//! clients, and checks that every server message matches its JSON Schema.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream as TokioTcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const SCHEMAS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/schemas/server");

/// Every wait in these tests is bounded, so a hung server fails a test
/// instead of hanging CI.
pub const WAIT: Duration = Duration::from_secs(20);

/// A `cochlea serve` child process with its own recordings directory.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    recordings: PathBuf,
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(&[], &[])
    }

    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_in(None, args, env)
    }

    /// A server recording into `recordings` (a small disk, or the directory
    /// of an earlier server), instead of a fresh directory of its own.
    pub fn start_recording_into(recordings: &Path, args: &[&str]) -> Server {
        Self::start_in(Some(recordings.to_owned()), args, &[])
    }

    /// A server recording into `recordings` (when given), with `args` and
    /// environment `env`.
    pub fn start_full(recordings: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_in(recordings.map(Path::to_owned), args, env)
    }

    fn start_in(recordings: Option<PathBuf>, args: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let recordings = recordings.unwrap_or_else(|| dir.path().join("recordings"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_cochlea"));
        command
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--recordings-dir")
            .arg(&recordings)
            .args(args)
            .stdout(Stdio::piped());
        // Hermetic: no COCHLEA_* from the environment running the tests.
        for (key, _) in std::env::vars() {
            if key.starts_with("COCHLEA_") {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().copied());
        if std::env::var_os("COCHLEA_TEST_LOGS").is_none() {
            let log = std::fs::File::create(dir.path().join("server.log")).expect("log file");
            command.stderr(log);
        }
        let mut child = command.spawn().expect("spawn cochlea");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let addr = line
                    .strip_prefix("cochlea listening on http://")
                    .or_else(|| line.strip_prefix("cochlea listening on https://"));
                if let Some(addr) = addr {
                    let _ = tx.send(addr.parse::<SocketAddr>().expect("address"));
                }
            }
        });
        let addr = rx.recv_timeout(WAIT).unwrap_or_else(|_| {
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            panic!("server did not start; log:\n{log}")
        });
        Server {
            child,
            addr,
            dir,
            recordings,
        }
    }

    pub fn recordings_dir(&self) -> PathBuf {
        self.recordings.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server process's resident memory (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("server status")
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    pub fn url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("ws://{}/v1/stream", self.addr)
        } else {
            format!("ws://{}/v1/stream?{query}", self.addr)
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// A plain HTTP GET; returns (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A failing test shows what each of its servers said last.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("--- last lines of the server on {} ---\n{tail}", self.addr);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every `<kind>.schema.json` of `dir`, compiled, by kind.
pub fn schemas_in(dir: &str) -> HashMap<String, jsonschema::Validator> {
    let mut map = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(kind) = name.strip_suffix(".schema.json") else {
            continue;
        };
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let validator = jsonschema::validator_for(&schema)
            .unwrap_or_else(|e| panic!("{name} is not a valid schema: {e}"));
        map.insert(kind.to_owned(), validator);
    }
    map
}

fn schemas() -> &'static HashMap<String, jsonschema::Validator> {
    static SCHEMAS_BY_TYPE: OnceLock<HashMap<String, jsonschema::Validator>> = OnceLock::new();
    SCHEMAS_BY_TYPE.get_or_init(|| schemas_in(SCHEMAS))
}

/// Panics unless `message` is valid against the schema for its `type`.
pub fn assert_matches_schema(message: &Value) {
    let kind = message["type"]
        .as_str()
        .unwrap_or_else(|| panic!("server message without type: {message}"));
    let validator = schemas()
        .get(kind)
        .unwrap_or_else(|| panic!("no schema for server message type {kind}"));
    let errors: Vec<String> = validator
        .iter_errors(message)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "server message does not match proto/schemas/server/{kind}.schema.json: {errors:?}\n{message}"
    );
}

/// What a client saw, in order, until the connection ended.
#[derive(Debug)]
pub struct Transcript {
    pub messages: Vec<Value>,
    /// Close code and reason, if the server sent a Close frame.
    pub close: Option<(u16, String)>,
}

impl Transcript {
    pub fn of_type(&self, kind: &str) -> Vec<&Value> {
        self.messages.iter().filter(|m| m["type"] == kind).collect()
    }

    pub fn one(&self, kind: &str) -> &Value {
        let found = self.of_type(kind);
        assert_eq!(
            found.len(),
            1,
            "expected one {kind} in {:#?}",
            self.messages
        );
        found[0]
    }

    pub fn types(&self) -> Vec<&str> {
        self.messages
            .iter()
            .map(|m| m["type"].as_str().unwrap_or("?"))
            .collect()
    }

    pub fn close_code(&self) -> u16 {
        self.close
            .as_ref()
            .map(|c| c.0)
            .unwrap_or_else(|| panic!("no close frame; messages: {:#?}", self.messages))
    }

    /// Asserts a refusal: only an `error` with `code`, then the close frame.
    pub fn assert_refused(&self, code: &str, close_code: u16) {
        assert_eq!(self.types(), ["error"], "{:#?}", self.messages);
        assert_eq!(self.one("error")["code"], code);
        assert_eq!(self.close_code(), close_code);
        assert_eq!(self.close.as_ref().unwrap().1, code, "close reason");
    }

    /// Asserts an error with `code`, then `closed`, then a close frame with `close_code`.
    pub fn assert_error(&self, code: &str, close_code: u16) {
        let error = self.one("error");
        assert_eq!(error["code"], code, "{:#?}", self.messages);
        assert_eq!(error["fatal"], true);
        assert!(
            !error["message"].as_str().unwrap_or("").is_empty(),
            "error without a message"
        );
        let closed = self.one("closed");
        assert_eq!(closed["close_code"], close_code);
        assert_eq!(self.close_code(), close_code, "{:#?}", self.messages);
        assert_eq!(self.close.as_ref().unwrap().1, code, "close reason");
        assert_eq!(self.types().last(), Some(&"closed"));
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TokioTcpStream>>;

pub struct Client {
    pub ws: Ws,
    pub received: Vec<Value>,
}

impl Client {
    pub async fn connect(server: &Server, query: &str) -> Client {
        Self::connect_url(&server.url(query)).await
    }

    /// Connects to any WebSocket URL (a load balancer in front of servers).
    pub async fn connect_url(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timeout")
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Client {
            ws,
            received: Vec::new(),
        }
    }

    pub async fn send_json(&mut self, value: Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .expect("send text");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send text");
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::binary(bytes))
            .await
            .expect("send binary");
    }

    /// Sends one raw frame (for fragmented messages and invalid UTF-8).
    pub async fn send_frame(&mut self, payload: Vec<u8>, opcode: Data, fin: bool) {
        let frame = Frame::message(payload, OpCode::Data(opcode), fin);
        self.ws
            .send(Message::Frame(frame))
            .await
            .expect("send frame");
    }

    /// Sends whole frames of `chunk_bytes` each.
    pub async fn send_chunks(&mut self, bytes: &[u8], chunk_bytes: usize) {
        for chunk in bytes.chunks(chunk_bytes) {
            self.send_binary(chunk.to_vec()).await;
        }
    }

    /// Parses, schema-checks and keeps one server text message.
    fn take(&mut self, text: &str) -> Value {
        let value: Value = serde_json::from_str(text).expect("server sent bad JSON");
        assert_matches_schema(&value);
        self.received.push(value.clone());
        value
    }

    /// The types of the messages read so far, for a timeout's panic.
    fn received_kinds(&self) -> Vec<&str> {
        self.received
            .iter()
            .map(|m| m["type"].as_str().unwrap_or("?"))
            .collect()
    }

    /// Next server text message (schema-checked); panics on close or timeout.
    pub async fn next_message(&mut self) -> Value {
        loop {
            let Ok(next) = tokio::time::timeout(WAIT, self.ws.next()).await else {
                let kinds = self.received_kinds();
                panic!("timed out waiting for a server message; had {kinds:?}");
            };
            match next {
                Some(Ok(Message::Text(text))) => return self.take(&text),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    pub async fn expect(&mut self, kind: &str) -> Value {
        let message = self.next_message().await;
        assert_eq!(message["type"], kind, "unexpected message {message}");
        message
    }

    /// Reads until the connection ends; returns all messages (those already
    /// read included) and the close frame.
    pub async fn finish(mut self) -> Transcript {
        let mut close = None;
        loop {
            let Ok(next) = tokio::time::timeout(WAIT, self.ws.next()).await else {
                // What came before the silence says where the server stalled.
                let kinds = self.received_kinds();
                panic!("timed out waiting for the connection to end; received so far: {kinds:?}");
            };
            match next {
                Some(Ok(Message::Text(text))) => {
                    self.take(&text);
                }
                Some(Ok(Message::Close(frame))) => {
                    close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        Transcript {
            messages: self.received,
            close,
        }
    }

    /// Sends `stop` and reads to the end.
    pub async fn stop(mut self) -> Transcript {
        self.send_json(serde_json::json!({"type": "stop"})).await;
        self.finish().await
    }
}

/// Interleaved 16-bit samples and format of a PCM WAV file.
pub struct Wav {
    pub spec: hound::WavSpec,
    pub samples: Vec<i16>,
}

pub fn read_wav_i16(path: &Path) -> Wav {
    let mut reader =
        hound::WavReader::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let spec = reader.spec();
    let samples = reader
        .samples::<i16>()
        .collect::<Result<Vec<_>, _>>()
        .expect("samples");
    Wav { spec, samples }
}

pub fn read_wav_f32(path: &Path) -> (hound::WavSpec, Vec<f32>) {
    let mut reader = hound::WavReader::open(path).expect("open wav");
    let spec = reader.spec();
    let samples = reader
        .samples::<f32>()
        .collect::<Result<Vec<_>, _>>()
        .expect("samples");
    (spec, samples)
}

/// The raw `data` chunk of a RIFF/WAVE file (hound cannot read G.711 files).
pub fn wav_data_chunk(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("read wav");
    assert_eq!(&bytes[0..4], b"RIFF");
    assert_eq!(&bytes[8..12], b"WAVE");
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        if id == b"data" {
            return bytes[at + 8..at + 8 + len].to_vec();
        }
        at += 8 + len + (len & 1);
    }
    panic!("no data chunk in {}", path.display());
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

pub fn s16_bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

pub fn seq_message(seq: u32, timestamp: u64, audio: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(12 + audio.len());
    message.extend_from_slice(&seq.to_le_bytes());
    message.extend_from_slice(&timestamp.to_le_bytes());
    message.extend_from_slice(audio);
    message
}

pub fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).expect("read");
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks that the server still serves a fresh session end to end.
pub async fn assert_server_still_serves(server: &Server) {
    let samples: Vec<i16> = (0..1600).map(|i| ((i * 37) % 2000 - 1000) as i16).collect();
    let mut client = Client::connect(server, "encoding=pcm_s16le&sample_rate=16000").await;
    client.expect("started").await;
    client.send_chunks(&s16_bytes(&samples), 640).await;
    let transcript = client.stop().await;
    assert_eq!(transcript.close_code(), 1000, "{:#?}", transcript.messages);
    let recording = transcript.one("recording");
    let wav = read_wav_i16(Path::new(recording["path"].as_str().unwrap()));
    assert_eq!(wav.samples, samples);
}

/// Opus packets of an Ogg file, read by a minimal page parser written for
/// this test alone (independent of the server's demuxer): the two header
/// packets are dropped.
pub fn ogg_packets_independently(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let mut packets = Vec::new();
    let mut partial = Vec::new();
    let mut at = 0;
    while at + 27 <= bytes.len() {
        assert_eq!(&bytes[at..at + 4], b"OggS");
        let segments = bytes[at + 26] as usize;
        let table = &bytes[at + 27..at + 27 + segments];
        let mut body = at + 27 + segments;
        for &lace in table {
            partial.extend_from_slice(&bytes[body..body + lace as usize]);
            body += lace as usize;
            if lace < 255 {
                packets.push(std::mem::take(&mut partial));
            }
        }
        at = body;
    }
    packets.split_off(2)
}

/// Best normalized cross-correlation of `a` against `b` over lags within
/// `max_lag` samples (mono signals at the same rate).
pub fn aligned_correlation(a: &[i16], b: &[i16], max_lag: usize) -> (f64, isize) {
    let mut best = (f64::MIN, 0);
    for lag in -(max_lag as isize)..=(max_lag as isize) {
        let (x, y) = if lag >= 0 {
            (&a[lag as usize..], b)
        } else {
            (a, &b[(-lag) as usize..])
        };
        let n = x.len().min(y.len());
        let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
        for i in 0..n {
            let (p, q) = (f64::from(x[i]), f64::from(y[i]));
            xy += p * q;
            xx += p * p;
            yy += q * q;
        }
        let c = xy / (xx.sqrt() * yy.sqrt()).max(1e-9);
        if c > best.0 {
            best = (c, lag);
        }
    }
    best
}
