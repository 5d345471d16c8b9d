//! Issue 15, item 1: a frame, or a fragmented message, announced over
//! `max_message_bytes` is refused when its header arrives, on every
//! WebSocket route, and the server's memory stays bounded. Raw sockets,
//! upgraded by hand, so that the client can announce what a WebSocket
//! library never would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Server, WAIT};

/// Far longer than any wait below: a connection that ends only by idling
/// out fails these tests.
const IDLE_TIMEOUT_MS: &str = "120000";
/// A refusal must come this soon after the header.
const PROMPT: Duration = Duration::from_secs(10);
/// The server may grow by this much while the client sends (today's code
/// grew by all it was sent: 1,021 MiB for 1 GiB).
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

/// Each WebSocket route, the subprotocol it needs, and how its platform
/// shows an error in a text frame (Twilio and Vonage have no such message:
/// the close frame alone says why).
type ShowsError = fn(&Value) -> bool;
const ROUTES: [(&str, &str, Option<ShowsError>); 5] = [
    (
        "/v1/stream?encoding=pcm_s16le&sample_rate=16000",
        "",
        Some(|m| m["type"] == "error" && m["code"] == "message_too_big" && m["fatal"] == true),
    ),
    ("/twilio", "", None),
    ("/vonage", "", None),
    (
        "/audiofork?mix_type=mono&sampling_rate=16k",
        "audio.drachtio.org",
        Some(|m| m["type"] == "error" && m["data"]["code"] == "message_too_big"),
    ),
    (
        "/v1/listen?encoding=linear16&sample_rate=16000",
        "",
        Some(|m| m["type"] == "Error" && m["variant"] == "message_too_big"),
    ),
];

/// What the client read from the server.
#[derive(Debug)]
struct Seen {
    texts: Vec<String>,
    close: Option<(u16, String)>,
    /// When the Close frame arrived.
    closed_at: Option<Instant>,
}

/// Upgrades a raw TCP connection to `path`; returns it with any bytes of
/// WebSocket frames that came with the 101 response.
fn upgrade(server: &Server, path: &str, protocol: &str) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        server.addr
    );
    if !protocol.is_empty() {
        request.push_str(&format!("Sec-WebSocket-Protocol: {protocol}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("send upgrade");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(at) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).expect("read upgrade response");
        assert!(n > 0, "connection closed during the upgrade");
        response.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&response[..end]);
    assert!(head.starts_with("HTTP/1.1 101"), "{path}: {head}");
    (stream, response[end..].to_vec())
}

/// Reads server frames (unmasked) until a Close frame, the end of the
/// connection, or the read timeout.
fn read_frames(mut stream: TcpStream, mut buffered: Vec<u8>) -> Seen {
    let mut seen = Seen {
        texts: Vec::new(),
        close: None,
        closed_at: None,
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some((opcode, payload, used)) = parse_server_frame(&buffered) {
            buffered.drain(..used);
            match opcode {
                0x1 => seen
                    .texts
                    .push(String::from_utf8_lossy(&payload).into_owned()),
                0x8 => {
                    seen.closed_at = Some(Instant::now());
                    if payload.len() >= 2 {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
                        seen.close = Some((code, reason));
                    }
                    return seen;
                }
                _ => {}
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return seen,
            Ok(n) => buffered.extend_from_slice(&buf[..n]),
        }
    }
}

/// One complete unmasked frame at the start of `bytes`: opcode, payload and
/// the bytes it takes.
fn parse_server_frame(bytes: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if bytes.len() < 2 {
        return None;
    }
    let (len, start) = match bytes[1] & 0x7F {
        126 => (
            usize::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        short => (usize::from(short), 2),
    };
    let payload = bytes.get(start..start + len)?;
    Some((bytes[0] & 0x0F, payload.to_vec(), start + len))
}

/// What happened while the client sent.
struct Sent {
    header_at: Instant,
    payload_mib: usize,
    peak_growth_kib: u64,
}

/// Sends `first` (a frame header, or frames ending in one), then up to
/// `payload_mib` MiB of zeros a MiB at a time, as long as the server
/// takes them, and stops early if the server's memory grows past the limit
/// (today's code: the bytes pile up in the server).
fn send_and_watch(
    server: &Server,
    stream: &mut TcpStream,
    first: &[u8],
    payload_mib: usize,
) -> Sent {
    let baseline_kib = server.rss_kib();
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    let header_at = Instant::now();
    let mut sent = Sent {
        header_at,
        payload_mib: 0,
        peak_growth_kib: 0,
    };
    if stream.write_all(first).is_err() {
        return sent;
    }
    let mib = vec![0u8; 1 << 20];
    for _ in 0..payload_mib {
        // A refused connection ends: the write fails, the test goes on.
        if stream.write_all(&mib).is_err() {
            break;
        }
        sent.payload_mib += 1;
        let growth = server.rss_kib().saturating_sub(baseline_kib);
        sent.peak_growth_kib = sent.peak_growth_kib.max(growth);
        if growth > RSS_GROWTH_LIMIT_KIB {
            break;
        }
    }
    let growth = server.rss_kib().saturating_sub(baseline_kib);
    sent.peak_growth_kib = sent.peak_growth_kib.max(growth);
    sent
}

/// Checks the refusal: close 1009 `message_too_big` soon after the header,
/// the platform's error message where it has one, and the server's memory
/// far below what was sent.
fn check_refused(
    path: &str,
    seen: Option<&Seen>,
    sent: &Sent,
    shows_error: Option<ShowsError>,
) -> Result<(), String> {
    let Some(seen) = seen else {
        return Err(format!(
            "{path}: no close within {PROMPT:?} of the header; {} MiB sent after it; server RSS grew by {} KiB",
            sent.payload_mib, sent.peak_growth_kib
        ));
    };
    let waited = seen
        .closed_at
        .map(|at| at.saturating_duration_since(sent.header_at))
        .unwrap_or(Duration::MAX);
    let outcome = format!(
        "{path}: close {:?} after {waited:?}; {} MiB sent after the header; server RSS grew by {} KiB",
        seen.close, sent.payload_mib, sent.peak_growth_kib
    );
    eprintln!("{outcome}");
    let fail = |what: &str| Err(format!("{what}: {outcome}; texts: {:#?}", seen.texts));
    if seen
        .close
        .as_ref()
        .map(|(code, reason)| (*code, reason.as_str()))
        != Some((1009, "message_too_big"))
    {
        return fail("not closed 1009 message_too_big");
    }
    if waited >= PROMPT {
        return fail("closed late");
    }
    if sent.peak_growth_kib >= RSS_GROWTH_LIMIT_KIB {
        return fail("memory not bounded");
    }
    if let Some(shows_error) = shows_error {
        let errors = seen
            .texts
            .iter()
            .filter_map(|t| serde_json::from_str::<Value>(t).ok())
            .filter(shows_error)
            .count();
        if errors != 1 {
            return fail("not one message_too_big error message");
        }
    }
    Ok(())
}

/// Sends `first` then up to `payload_mib` MiB on a fresh connection to
/// each route, and checks each refusal (every route is tried before the
/// test fails, so a failure names all the routes that failed).
fn refused_on_every_route(first: &[u8], payload_mib: usize) {
    let server = Server::start_with(&["--idle-timeout-ms", IDLE_TIMEOUT_MS], &[]);
    let mut failures = Vec::new();
    for (path, protocol, shows_error) in ROUTES {
        let (mut stream, buffered) = upgrade(&server, path, protocol);
        let reader = stream.try_clone().expect("clone");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_frames(reader, buffered));
        });
        let sent = send_and_watch(&server, &mut stream, first, payload_mib);
        let deadline = sent.header_at + PROMPT;
        let seen = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok();
        // Ends this connection (and its reader) before the next route.
        let _ = stream.shutdown(std::net::Shutdown::Both);
        if let Err(failure) = check_refused(path, seen.as_ref(), &sent, shows_error) {
            failures.push(failure);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The reproduction of the issue, byte for byte: a masked binary frame
/// (zero mask) announcing 2^40 bytes, then 1 GiB of zeros.
#[test]
fn a_frame_announcing_2_pow_40_bytes_is_refused_at_its_header_on_every_route() {
    let mut header = vec![0x82, 0xFF];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[0; 4]);
    refused_on_every_route(&header, 1024);
}

/// A fragmented message whose frames are each within the limit: the frame
/// whose header takes the sum over it is refused at that header, before its
/// payload (which this client never sends; today's code waited for it
/// until the idle timeout, and would have buffered it past the limit).
#[test]
fn a_fragmented_message_over_the_limit_is_refused_at_the_crossing_header_on_every_route() {
    // Default limit: 65536 bytes. 40,000 + 20,000 pass; 10,000 more do not.
    let mut first = frame(false, 0x2, &[0; 40_000]);
    first.extend(frame(false, 0x0, &[0; 20_000]));
    first.extend(header(false, 0x0, 10_000));
    refused_on_every_route(&first, 0);
}

/// A client frame header with a zero mask, announcing `payload_bytes`.
fn header(fin: bool, opcode: u8, payload_bytes: u64) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 | opcode } else { opcode }];
    if payload_bytes < 126 {
        out.push(0x80 | payload_bytes as u8);
    } else if let Ok(short) = u16::try_from(payload_bytes) {
        out.push(0x80 | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&payload_bytes.to_be_bytes());
    }
    out.extend_from_slice(&[0; 4]);
    out
}

fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = header(fin, opcode, payload.len() as u64);
    out.extend_from_slice(payload);
    out
}
