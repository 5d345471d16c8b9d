//! Recordings in an S3-compatible object store: a real S3 server (moto's,
//! from PyPI, in target/moto-venv) on 127.0.0.1, reached through a TCP proxy
//! the tests can cut to play an outage.
//!
//! moto was chosen over s3s-fs because it is a separate, widely used
//! implementation of the S3 API (multipart included) that nobody here wrote,
//! installable without building anything.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use serde_json::Value;

use crate::cluster_support::{s3_env, S3Server};
use crate::harness::*;

const BUCKET: &str = "calls";
const PREFIX: &str = "eu/2026";

/// moto's S3 server (shared with the cluster tests) with the bucket made.
fn moto() -> S3Server {
    let moto = S3Server::start();
    moto.create_bucket(BUCKET);
    moto
}

/// A TCP proxy in front of the store. Cut, it drops every connection it
/// has and every new one: the store is down as far as cochlea can tell.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (up2, open2) = (up.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut open = open2.lock().unwrap();
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, up, open }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

fn start_server(recordings: Option<&Path>, endpoint: SocketAddr) -> Server {
    let env = s3_env(endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start_full(
        recordings,
        &[
            "--recordings-url",
            &format!("s3://{BUCKET}/{PREFIX}"),
            "--max-realtime-factor",
            "0",
        ],
        &env,
    )
}

/// The test's own client of the bucket, straight to moto.
fn bucket(moto: &S3Server) -> AmazonS3 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    AmazonS3Builder::new()
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_bucket_name(BUCKET)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_region("us-east-1")
        .build()
        .unwrap()
}

async fn object(bucket: &AmazonS3, name: &str) -> Option<Vec<u8>> {
    let path = ObjectPath::from(format!("{PREFIX}/{name}"));
    let got = bucket.get(&path).await.ok()?;
    Some(got.bytes().await.ok()?.to_vec())
}

/// Waits until `name` is in the bucket.
async fn wait_for_object(bucket: &AmazonS3, name: &str, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(bytes) = object(bucket, name).await {
            return bytes;
        }
        assert!(Instant::now() < deadline, "{name} never reached the bucket");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Speech from the fixture, repeated to `samples` (16 kHz mono).
fn speech(samples: usize) -> Vec<i16> {
    let one = read_wav_i16(&fixture("speech-16k.wav")).samples;
    one.iter().copied().cycle().take(samples).collect()
}

/// The samples of a 16-bit mono WAV held in memory (44-byte header).
fn wav_samples(bytes: &[u8]) -> Vec<i16> {
    assert_eq!(&bytes[..4], b"RIFF");
    let reader = hound::WavReader::new(std::io::Cursor::new(bytes)).expect("a valid WAV");
    reader.into_samples::<i16>().map(Result::unwrap).collect()
}

fn spool_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// 11.5 MB of audio: parts 1 and 2 go up while the stream runs, part 0
/// (the header's) at the end.
#[tokio::test]
async fn a_recording_streams_to_the_bucket_as_a_multipart_upload_sample_exact() {
    let moto = moto();
    let server = start_server(None, moto.addr());
    let sent = speech(360_000 * 16); // 360 s
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    let id = client.expect("started").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    client.send_chunks(&s16_bytes(&sent), 32_000).await;
    let transcript = client.stop().await;
    let recording = transcript.one("recording");
    let name = format!("{id}.wav");
    assert_eq!(
        recording["uri"],
        format!("s3://{BUCKET}/{PREFIX}/{name}"),
        "{recording}"
    );
    assert_eq!(recording["uploaded"], true, "{recording}");

    let bucket = bucket(&moto);
    let wav = object(&bucket, &name)
        .await
        .expect("the recording is in the bucket");
    assert_eq!(wav.len() as u64, recording["bytes"].as_u64().unwrap());
    assert_eq!(sha256_bytes(&wav), recording["sha256"].as_str().unwrap());
    assert!(
        wav_samples(&wav) == sent,
        "the object holds exactly the audio sent"
    );

    let sidecar: Value = serde_json::from_slice(
        &object(&bucket, &format!("{id}.json"))
            .await
            .expect("sidecar"),
    )
    .unwrap();
    assert_eq!(sidecar["complete"], true);
    assert_eq!(sidecar["uri"], recording["uri"]);
    assert_eq!(sidecar["recording"], name);
    // Uploaded: nothing is left in the spool.
    assert_eq!(spool_files(&server.recordings_dir()), Vec::<PathBuf>::new());
    assert!(!server.log().contains("upload failed"), "{}", server.log());

    // The recordings API reads the bucket: the session is listed, and its
    // file downloads in ranges through cochlea.
    let url = recording["url"].as_str().unwrap();
    assert_eq!(url, format!("/v1/recordings/{id}/files/{name}"));
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = http_bytes(server.addr, &format!("/v1/recordings/{id}"), None);
        if status == 200 {
            let detail: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(detail["session_id"], id.as_str());
            assert_eq!(detail["complete"], true, "{detail}");
            break;
        }
        assert!(Instant::now() < deadline, "never listed: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, head) = http_bytes(server.addr, url, Some("bytes=0-99"));
    assert_eq!(status, 206);
    assert_eq!(head, wav[..100]);
    let (status, tail) = http_bytes(server.addr, url, Some("bytes=-1000"));
    assert_eq!(status, 206);
    assert_eq!(tail, wav[wav.len() - 1000..]);
}

/// A GET with an optional Range header; (status, body bytes).
fn http_bytes(addr: SocketAddr, path: &str, range: Option<&str>) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let range = range.map_or(String::new(), |r| format!("Range: {r}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{range}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "a download has a length: {head}"
    );
    (status, response[split + 4..].to_vec())
}

/// The store goes down in the middle of a stream: acks keep coming, the
/// client is told (not fatal), and once the store is back the recording
/// reaches it whole.
#[tokio::test]
async fn the_store_down_mid_stream_stalls_nothing_and_loses_nothing() {
    let moto = moto();
    let proxy = Proxy::start(moto.addr());
    let server = start_server(None, proxy.addr);
    let sent = speech(16_000 * 400); // 12.8 MB
    let mut client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    let id = client.expect("started").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let bytes = s16_bytes(&sent);
    let chunks: Vec<&[u8]> = bytes.chunks(32_000).collect();
    let half = chunks.len() / 2;
    for (seq, chunk) in chunks.iter().enumerate() {
        if seq == half {
            proxy.cut();
        }
        client
            .send_binary(seq_message(seq as u32, seq as u64 * 16_000, chunk))
            .await;
    }
    // Part 1 falls due (10 MiB on disk) while the store is down: the client
    // is told, and every message is still acked.
    let last = chunks.len() as u64 - 1;
    let (mut acked, mut told) = (0, false);
    let deadline = Instant::now() + WAIT;
    while acked < last || !told {
        let message = client.next_message().await;
        match message["type"].as_str() {
            Some("ack") => acked = message["seq"].as_u64().unwrap(),
            Some("error") => {
                assert_eq!(message["code"], "storage_unavailable", "{message}");
                assert_eq!(message["fatal"], false);
                told = true;
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "acked {acked} of {last}, told: {told}"
        );
    }
    let transcript = client.stop().await;
    let recording = transcript.one("recording");
    assert_eq!(recording["uploaded"], false, "{recording}");
    let name = format!("{id}.wav");
    assert!(
        server.recordings_dir().join(&name).exists(),
        "the audio waits in the spool"
    );

    proxy.restore();
    let bucket = bucket(&moto);
    let sidecar = wait_for_object(&bucket, &format!("{id}.json"), Duration::from_secs(90)).await;
    let wav = object(&bucket, &name).await.expect("recording");
    assert!(wav_samples(&wav) == sent, "nothing lost, nothing doubled");
    assert_eq!(sha256_bytes(&wav), recording["sha256"].as_str().unwrap());
    let sidecar: Value = serde_json::from_slice(&sidecar).unwrap();
    assert_eq!(sidecar["complete"], true);
    assert!(server.log().contains("upload failed"));
}

/// A server killed with SIGKILL mid-stream: the next one finds the spool
/// file and uploads it, marked incomplete, with every acked sample.
#[tokio::test]
async fn after_a_sigkill_the_next_start_uploads_the_spool_marked_incomplete() {
    let moto = moto();
    let spool = tempfile::tempdir().unwrap();
    let mut server = start_server(Some(spool.path()), moto.addr());
    let sent = speech(16_000 * 200); // 6.4 MB: more than one part
    let mut client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    let id = client.expect("started").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let bytes = s16_bytes(&sent);
    let mut acked = None;
    let chunks: Vec<&[u8]> = bytes.chunks(32_000).collect();
    for (seq, chunk) in chunks.iter().enumerate() {
        client
            .send_binary(seq_message(seq as u32, seq as u64 * 16_000, chunk))
            .await;
    }
    let last = chunks.len() as u64 - 1;
    let deadline = Instant::now() + WAIT;
    while acked != Some(last) {
        let message = client.next_message().await;
        if message["type"] == "ack" {
            acked = message["seq"].as_u64();
        }
        assert!(Instant::now() < deadline, "no ack for the last seq");
    }
    server.signal("KILL");
    assert!(!server.wait_exit(WAIT).success());
    let name = format!("{id}.wav");
    assert!(spool.path().join(&name).exists());

    let bucket = bucket(&moto);
    assert!(
        object(&bucket, &format!("{id}.json")).await.is_none(),
        "nothing is complete in the bucket before the restart"
    );
    let _next = start_server(Some(spool.path()), moto.addr());
    let sidecar = wait_for_object(&bucket, &format!("{id}.json"), WAIT).await;
    let sidecar: Value = serde_json::from_slice(&sidecar).unwrap();
    assert_eq!(sidecar["complete"], false, "{sidecar}");
    assert_eq!(sidecar["uri"], format!("s3://{BUCKET}/{PREFIX}/{name}"));
    let wav = object(&bucket, &name).await.expect("recording");
    assert!(
        wav_samples(&wav) == sent,
        "every acked sample is in the uploaded recording"
    );
    // Uploaded: the spool is empty again.
    let deadline = Instant::now() + WAIT;
    while !spool_files(spool.path()).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", spool_files(spool.path()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
