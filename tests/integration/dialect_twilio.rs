//! `/twilio`: Twilio Media Streams replayed from the message formats of
//! Twilio's documentation ("Media Streams - WebSocket Messages"): connected,
//! start, media (base64 μ-law, numbers as strings), dtmf, mark, stop.

use base64::Engine;
use serde_json::{json, Value};

use crate::dialect_client::*;
use crate::harness::*;

const STREAM_SID: &str = "MZ18ad3ab5a668481ce02b83e7395059f0";
const CALL_SID: &str = "CA1c4e0ed8c7c0b4bdb3ec5a7e9e1a6b92";
/// 20 ms of 8 kHz μ-law.
const CHUNK: usize = 160;

pub fn connected() -> Value {
    json!({"event": "connected", "protocol": "Call", "version": "1.0.0"})
}

pub fn start(tracks: &[&str], custom: Value) -> Value {
    json!({
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "AC0123456789abcdef0123456789abcdef",
            "streamSid": STREAM_SID,
            "callSid": CALL_SID,
            "tracks": tracks,
            "customParameters": custom,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        },
        "streamSid": STREAM_SID
    })
}

pub fn media(
    sequence: usize,
    track: &str,
    chunk: usize,
    timestamp_ms: usize,
    payload: &[u8],
) -> Value {
    json!({
        "event": "media",
        "sequenceNumber": sequence.to_string(),
        "media": {
            "track": track,
            "chunk": chunk.to_string(),
            "timestamp": timestamp_ms.to_string(),
            "payload": base64::engine::general_purpose::STANDARD.encode(payload)
        },
        "streamSid": STREAM_SID
    })
}

pub fn stop() -> Value {
    json!({
        "event": "stop",
        "sequenceNumber": "9999",
        "stop": {"accountSid": "AC0123456789abcdef0123456789abcdef", "callSid": CALL_SID},
        "streamSid": STREAM_SID
    })
}

/// The fixture's μ-law bytes and sox's decoding of them.
fn mulaw_fixture() -> (Vec<u8>, Vec<i16>) {
    let coded = wav_data_chunk(&fixture("speech-8k-mulaw.wav"));
    let decoded = read_wav_i16(&fixture("speech-8k-mulaw-decoded.wav")).samples;
    assert_eq!(coded.len(), decoded.len());
    (coded, decoded)
}

/// Streams `coded` as one track, 20 ms per media message, then stop.
pub async fn stream_one_track(client: &mut DialectClient, coded: &[u8]) {
    client.send_json(&connected()).await;
    client
        .send_json(&start(&["inbound"], json!({"agent": "ana"})))
        .await;
    for (k, chunk) in coded.chunks(CHUNK).enumerate() {
        client
            .send_json(&media(k + 2, "inbound", k + 1, k * 20, chunk))
            .await;
    }
    client
        .send_json(&json!({"event": "dtmf", "streamSid": STREAM_SID, "sequenceNumber": "5", "dtmf": {"track": "inbound_track", "digit": "1"}}))
        .await;
    client
        .send_json(&json!({"event": "mark", "sequenceNumber": "4", "streamSid": STREAM_SID, "mark": {"name": "my label"}}))
        .await;
    client.send_json(&stop()).await;
}

#[tokio::test]
async fn a_mulaw_call_is_recorded_as_its_g711_decoding() {
    let server = Server::start();
    let (coded, decoded) = mulaw_fixture();
    let mut client = DialectClient::connect(&server, "/twilio", &[]).await;
    stream_one_track(&mut client, &coded).await;
    let frames = client.finish().await;
    frames.assert_closed(1000, "stop");
    // Twilio reads only media, mark and clear: cochlea sends it nothing,
    // and does not echo the mark (that would be a mark of its own audio).
    assert!(frames.texts.is_empty(), "{:#?}", frames.texts);

    let recordings = wait_recordings(&server, 1);
    let wav = recordings[0].samples();
    assert_eq!((wav.spec.sample_rate, wav.spec.channels), (8000, 1));
    assert!(wav.samples == decoded, "not the G.711 decoding of the call");
    let metadata = &recordings[0].sidecar["metadata"];
    assert_eq!(metadata["agent"], "ana");
    assert_eq!(metadata["dialect"]["name"], "twilio");
    assert_eq!(metadata["dialect"]["callSid"], CALL_SID);
    assert_eq!(metadata["dialect"]["streamSid"], STREAM_SID);
    assert_eq!(recordings[0].sidecar["format"]["encoding"], "mulaw");

    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    for series in [
        r#"cochlea_dialect_sessions_total{dialect="twilio"} 1"#,
        r#"cochlea_dialect_events_total{dialect="twilio",event="dtmf"} 1"#,
        r#"cochlea_dialect_events_total{dialect="twilio",event="mark"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == series),
            "{series} missing:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn both_tracks_become_one_aligned_stereo_recording_with_gaps_silent() {
    let server = Server::start();
    let (coded, decoded) = mulaw_fixture();
    let chunks: Vec<&[u8]> = coded.chunks(CHUNK).collect();
    // The outbound track carries the same speech half a second later.
    let offset_chunks = 25;
    // Inbound skips 200 ms (its channel is silent there); around 2 s both
    // tracks skip 200 ms (a gap in the stream, silent on both channels).
    let inbound_lost = |slot: usize| (50..60).contains(&slot) || (100..110).contains(&slot);
    let outbound_lost = |slot: usize| (100..110).contains(&slot);
    let slots = chunks.len() + offset_chunks;

    let mut client = DialectClient::connect(&server, "/twilio", &[]).await;
    client.send_json(&connected()).await;
    client
        .send_json(&start(&["inbound", "outbound"], json!({})))
        .await;
    let mut sequence = 2;
    let (mut inbound_chunk, mut outbound_chunk) = (0, 0);
    // Twilio sends the tracks' messages interleaved; here the outbound one
    // runs 3 chunks ahead, so the server has to line them up.
    for slot in 0..slots + 3 {
        if slot < chunks.len() && !inbound_lost(slot) {
            inbound_chunk += 1;
            let m = media(sequence, "inbound", inbound_chunk, slot * 20, chunks[slot]);
            client.send_json(&m).await;
            sequence += 1;
        }
        let ahead = slot + 3;
        if ahead >= offset_chunks && ahead < slots && !outbound_lost(ahead) {
            outbound_chunk += 1;
            let m = media(
                sequence,
                "outbound",
                outbound_chunk,
                ahead * 20,
                chunks[ahead - offset_chunks],
            );
            client.send_json(&m).await;
            sequence += 1;
        }
    }
    client.send_json(&stop()).await;
    let frames = client.finish().await;
    frames.assert_closed(1000, "stop");

    let recordings = wait_recordings(&server, 1);
    let wav = recordings[0].samples();
    assert_eq!((wav.spec.sample_rate, wav.spec.channels), (8000, 2));
    let frames_total = coded.len() + offset_chunks * CHUNK;
    assert_eq!(
        wav.samples.len(),
        frames_total * 2,
        "length of the longer track"
    );
    let offset = offset_chunks * CHUNK;
    for i in 0..frames_total {
        let slot = i / CHUNK;
        let left = if i < coded.len() && !inbound_lost(slot) {
            decoded[i]
        } else {
            0
        };
        let right = if i >= offset && !outbound_lost(slot) {
            decoded[i - offset]
        } else {
            0
        };
        assert_eq!(
            (wav.samples[2 * i], wav.samples[2 * i + 1]),
            (left, right),
            "sample frame {i} (slot {slot})"
        );
    }
}

#[tokio::test]
async fn malformed_twilio_messages_close_with_their_code_and_the_server_goes_on() {
    let server = Server::start();
    let started = || vec![connected(), start(&["inbound"], json!({}))];
    // (name, messages, then a binary message, close code, error code)
    type Case = (&'static str, Vec<Value>, Option<Vec<u8>>, u16, &'static str);
    let cases: Vec<Case> = vec![
        ("binary frame", started(), Some(vec![0xFF; 160]), 1003, "binary_not_allowed"),
        ("media before start", vec![connected(), media(2, "inbound", 1, 0, &[0xFF; 160])], None, 1002, "audio_before_start"),
        (
            "bad base64",
            [started(), vec![json!({"event": "media", "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": "not base64!"}})]].concat(),
            None,
            1007,
            "invalid_media_payload",
        ),
        ("unannounced track", [started(), vec![media(2, "outbound", 1, 0, &[0xFF; 160])]].concat(), None, 1002, "unknown_track"),
        (
            "timestamp not a number",
            [started(), vec![json!({"event": "media", "media": {"track": "inbound", "chunk": "1", "timestamp": "later", "payload": "/w=="}})]].concat(),
            None,
            1002,
            "invalid_message",
        ),
        (
            "not mu-law",
            vec![json!({"event": "start", "start": {"tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}}})],
            None,
            1003,
            "unsupported_media_format",
        ),
        ("second start", [started(), vec![start(&["inbound"], json!({}))]].concat(), None, 1002, "already_started"),
        ("no event", vec![json!({"sequenceNumber": "1"})], None, 1002, "invalid_message"),
        (
            "gap over max_gap_ms",
            [started(), vec![media(2, "inbound", 1, 0, &[0xFF; 160]), media(3, "inbound", 2, 3_600_000, &[0xFF; 160])]].concat(),
            None,
            1008,
            "gap_too_large",
        ),
    ];
    for (name, messages, binary, code, reason) in cases {
        let mut client = DialectClient::connect(&server, "/twilio", &[]).await;
        for message in &messages {
            client.send_json(message).await;
        }
        if let Some(bytes) = binary {
            client.send_binary(&bytes).await;
        }
        let frames = client.finish().await;
        assert_eq!(
            frames.close.as_ref().map(|(c, r)| (*c, r.as_str())),
            Some((code, reason)),
            "{name}"
        );
        assert!(
            frames.texts.is_empty(),
            "{name}: Twilio gets no JSON of ours"
        );
    }
    // Not JSON at all.
    let mut client = DialectClient::connect(&server, "/twilio", &[]).await;
    client.send_text("{\"event\": media").await;
    client.finish().await.assert_closed(1007, "malformed_json");
    // A query parameter Twilio could not have sent.
    let client = DialectClient::connect(&server, "/twilio?encoding=pcm_s16le", &[]).await;
    client
        .finish()
        .await
        .assert_closed(1002, "unknown_parameter");
    assert_server_still_serves(&server).await;
}

const KEY: &str = "twilio-key-0123456789abcdef";

#[tokio::test]
async fn the_key_can_ride_in_a_custom_parameter_because_twilio_drops_query_strings() {
    let server = Server::start_with(&["--api-key", KEY, "--max-sessions-per-key", "1"], &[]);
    let (coded, decoded) = mulaw_fixture();

    // No credential anywhere: refused at start, 1008 auth_missing.
    let mut client = DialectClient::connect(&server, "/twilio", &[]).await;
    client.send_json(&connected()).await;
    client.send_json(&start(&["inbound"], json!({}))).await;
    client.finish().await.assert_closed(1008, "auth_missing");

    let mut client = DialectClient::connect(&server, "/twilio", &[]).await;
    client.send_json(&connected()).await;
    client
        .send_json(&start(&["inbound"], json!({"token": "wrong"})))
        .await;
    client.finish().await.assert_closed(1008, "auth_wrong_key");

    // Media before the authenticating start is refused too.
    let mut client = DialectClient::connect(&server, "/twilio", &[]).await;
    client
        .send_json(&media(1, "inbound", 1, 0, &[0xFF; 160]))
        .await;
    client
        .finish()
        .await
        .assert_closed(1002, "audio_before_start");

    // The right key: recorded, and counted against the key while it runs.
    let mut first = DialectClient::connect(&server, "/twilio", &[]).await;
    first.send_json(&connected()).await;
    first
        .send_json(&start(&["inbound"], json!({"token": KEY, "agent": "ana"})))
        .await;
    // Twilio gets no `started`: the recording, made with the first audio,
    // shows the stream began.
    let chunks: Vec<&[u8]> = coded.chunks(CHUNK).collect();
    first.send_json(&media(2, "inbound", 1, 0, chunks[0])).await;
    let deadline = std::time::Instant::now() + WAIT;
    while std::fs::read_dir(server.recordings_dir()).map_or(0, |d| d.count()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first stream never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut second = DialectClient::connect(&server, "/twilio", &[]).await;
    second.send_json(&connected()).await;
    second
        .send_json(&start(&["inbound"], json!({"token": KEY})))
        .await;
    second.finish().await.assert_closed(1013, "key_full");
    for (k, chunk) in chunks.iter().enumerate().skip(1) {
        first
            .send_json(&media(k + 2, "inbound", k + 1, k * 20, chunk))
            .await;
    }
    first.send_json(&stop()).await;
    first.finish().await.assert_closed(1000, "stop");
    let recordings = wait_recordings(&server, 1);
    assert!(recordings[0].samples().samples == decoded);
    let metadata = &recordings[0].sidecar["metadata"];
    assert_eq!(metadata["agent"], "ana");
    assert!(
        !metadata.to_string().contains(KEY),
        "the key must not be stored: {metadata}"
    );

    // A key in the request itself (a proxy that keeps the query) works as on /v1/stream.
    let wrong = DialectClient::try_connect(&server, "/twilio?token=nope", &[]).await;
    assert_eq!(wrong.err(), Some(401));
}

/// Issue 15, item 2: with both tracks, one bad timestamp used to hide the
/// rest of the call. The jump was held back by the track aligner, every
/// later chunk of both tracks was dropped as late behind it, and the
/// session closed 1000 `stop` with 20 ms recorded and a sidecar saying
/// `complete: true`. Now the jump reaches the session at once and is
/// refused as on one track (1008 gap_too_large), and the sidecar says the
/// recording is not complete.
#[tokio::test]
async fn a_timestamp_jump_on_a_two_track_call_is_refused_not_silently_lost() {
    for jump_ms in [99_999_999_999_999_999_u64, 60_000] {
        let server = Server::start();
        let mut client = DialectClient::connect(&server, "/twilio", &[]).await;
        client.send_json(&connected()).await;
        client
            .send_json(&start(&["inbound", "outbound"], json!({})))
            .await;
        client
            .send_json(&media(2, "inbound", 1, 0, &[0xFF; CHUNK]))
            .await;
        let mut jump = media(3, "inbound", 2, 0, &[0xFF; CHUNK]);
        jump["media"]["timestamp"] = json!(jump_ms.to_string());
        client.send_json(&jump).await;
        // Then 5 s of normal media on both tracks, and stop, as the
        // report's client did (sent while the server still reads).
        let mut sequence = 4;
        'call: for k in 1..=250 {
            for track in ["inbound", "outbound"] {
                let chunk = media(sequence, track, k + 1, k * 20, &[0x7F; CHUNK]);
                sequence += 1;
                if !client.try_send_json(&chunk).await {
                    break 'call;
                }
            }
        }
        client.try_send_json(&stop()).await;
        let frames = client.finish().await;
        assert_eq!(
            frames.close.as_ref().map(|(c, r)| (*c, r.as_str())),
            Some((1008, "gap_too_large")),
            "jump of {jump_ms} ms"
        );
        let sidecars: Vec<_> = std::fs::read_dir(server.recordings_dir())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        assert_eq!(sidecars.len(), 1, "{sidecars:?}");
        let sidecar: Value =
            serde_json::from_str(&std::fs::read_to_string(&sidecars[0]).unwrap()).unwrap();
        assert_eq!(sidecar["complete"], false, "{sidecar}");
        assert!(
            sidecar["error"]
                .as_str()
                .is_some_and(|e| e.contains("gap_too_large")),
            "{sidecar}"
        );
    }
}
