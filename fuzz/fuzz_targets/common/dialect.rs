//! The driver shared by the dialect targets (`dialect_*`): one connection to
//! a dialect endpoint, from the query string to the end of the stream.
//!
//! Input: `QUERY\n` then messages, each `[tag][len u16 LE][payload]`: an odd
//! tag is a binary message, an even one a text message (the payload read as
//! UTF-8, invalid sequences replaced: a WebSocket text frame is valid UTF-8).
//! The query is split on `&` and `=` like a (percent-decoded) query string.
//! Without a newline the whole input is the query. As in the server, the
//! first failing message ends the stream; then the dialect's `finish` runs.
//!
//! Checked for every dialect: at most one start, and none when the query
//! already started the stream; a start that resolves has its rate and
//! channels in range; no audio before the stream has started. Each target
//! checks its own dialect's audio on top.

use cochlea::protocol::{
    StartRequest, StreamFormat, MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE,
};
use cochlea::server::dialect::{prepare, DialectKind, Inbound, Prepared};

/// What one connection produced.
pub struct Run {
    /// The stream's format, once started (by the query or a `Start`) and
    /// resolved.
    pub format: Option<StreamFormat>,
    /// Every `Audio` message, in order.
    pub audio: Vec<Vec<u8>>,
}

fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn resolved(request: &StartRequest) -> Option<StreamFormat> {
    let format = request.resolve().ok()?;
    assert!(
        (MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&format.sample_rate),
        "resolved sample_rate {} out of range",
        format.sample_rate
    );
    assert!(
        (1..=MAX_CHANNELS).contains(&format.channels),
        "resolved channels {} out of range",
        format.channels
    );
    Some(format)
}

pub fn drive(kind: DialectKind, data: &[u8]) -> Run {
    let (query, mut rest) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let pairs = query_pairs(&String::from_utf8_lossy(query));
    let Prepared { mut dialect, query } = prepare(kind, "fuzz-session", &pairs, None);
    assert_eq!(dialect.kind(), kind);
    let mut run = Run {
        format: None,
        audio: Vec::new(),
    };
    let Ok(query) = query else {
        // The session ends at once on a query error.
        return run;
    };
    let mut started = query.encoding.is_some();
    run.format = resolved(&query);

    let mut out = Vec::new();
    let mut check = |out: &mut Vec<Inbound>, run: &mut Run| {
        for inbound in out.drain(..) {
            match inbound {
                Inbound::Start { request, .. } => {
                    assert!(!started, "a second start, or a start after the query's");
                    started = true;
                    run.format = resolved(&request);
                }
                Inbound::Audio(bytes) => {
                    assert!(started, "audio before the stream started");
                    run.audio.push(bytes.to_vec());
                }
                Inbound::Keepalive
                | Inbound::Flush
                | Inbound::Stop
                | Inbound::Reply(_)
                | Inbound::Event { .. } => {}
                // Only the native protocol negotiates WebRTC.
                Inbound::WebrtcOffer(_) => panic!("a telephony dialect produced a WebRTC offer"),
            }
        }
    };
    while let Some((&[tag, lo, hi], tail)) = rest.split_first_chunk::<3>() {
        let len = usize::from(u16::from_le_bytes([lo, hi])).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        rest = tail;
        let result = if tag & 1 == 1 {
            dialect.on_binary(&payload.to_vec().into(), &mut out)
        } else {
            dialect.on_text(&String::from_utf8_lossy(payload), &mut out)
        };
        let failed = result.is_err();
        check(&mut out, &mut run);
        if failed {
            break;
        }
    }
    dialect.finish(&mut out);
    check(&mut out, &mut run);
    run
}
