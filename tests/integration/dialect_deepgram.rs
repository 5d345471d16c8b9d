//! `/v1/listen`: Deepgram's live streaming API as its documentation and its
//! SDKs speak it: query parameters, `Authorization: Token`, the
//! `token, <key>` subprotocol, binary audio cut anywhere, `KeepAlive`,
//! `Finalize`, `CloseStream`, and `Metadata` on close. (The official Python
//! SDK itself is run against this endpoint by scripts/deepgram-sdk-test.sh.)

use serde_json::{json, Value};
use sha2::Digest;

use crate::dialect_client::*;
use crate::harness::*;

pub const KEY: &str = "deepgram-key-0123456789abcdef";

pub fn secured() -> Server {
    Server::start_with(&["--api-key", KEY], &[])
}

pub fn token_header() -> (&'static str, String) {
    ("authorization", format!("Token {KEY}"))
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Sends `bytes` in `chunk`-byte messages, then CloseStream; returns what
/// the server sent.
async fn listen(server: &Server, query: &str, bytes: &[u8], chunk: usize) -> Frames {
    let (name, value) = token_header();
    let mut client =
        DialectClient::connect(server, &format!("/v1/listen?{query}"), &[(name, &value)]).await;
    for (k, piece) in bytes.chunks(chunk).enumerate() {
        client.send_binary(piece).await;
        if k == 3 {
            client.send_json(&json!({"type": "KeepAlive"})).await;
            client.send_json(&json!({"type": "Finalize"})).await;
        }
    }
    client.send_json(&json!({"type": "CloseStream"})).await;
    client.finish().await
}

fn assert_metadata(metadata: &Value, audio: &[u8], duration: f64, channels: u64) {
    assert_eq!(metadata["type"], "Metadata");
    assert_eq!(metadata["transaction_key"], "deprecated");
    assert!(metadata["request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(
        metadata["sha256"],
        sha256_hex(audio),
        "sha256 of the audio sent"
    );
    assert!(metadata["created"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
    assert_eq!(metadata["duration"], duration);
    assert_eq!(metadata["channels"], channels);
}

#[tokio::test]
async fn linear16_cut_anywhere_is_recorded_sample_exact_and_metadata_closes_the_stream() {
    let server = secured();
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let bytes = s16_bytes(&speech);
    // 1001-byte messages split samples between messages, as Deepgram allows.
    let frames = listen(
        &server,
        "model=nova-3&encoding=linear16&sample_rate=16000&channels=1&punctuate=true&interim_results=false",
        &bytes,
        1001,
    )
    .await;
    frames.assert_closed(1000, "stop");
    let messages = frames.json();
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert_metadata(&messages[0], &bytes, 4.825, 1);

    let recordings = wait_recordings(&server, 1);
    let wav = recordings[0].samples();
    assert_eq!((wav.spec.sample_rate, wav.spec.channels), (16000, 1));
    assert!(wav.samples == speech, "not sample-exact");
    let ignored = &recordings[0].sidecar["metadata"]["dialect"]["ignored_parameters"];
    assert_eq!(ignored["model"], "nova-3");
}

#[tokio::test]
async fn mulaw_is_recorded_as_its_g711_decoding() {
    let server = secured();
    let coded = wav_data_chunk(&fixture("speech-8k-mulaw.wav"));
    let frames = listen(&server, "encoding=mulaw&sample_rate=8000", &coded, 333).await;
    frames.assert_closed(1000, "stop");
    assert_metadata(&frames.json()[0], &coded, coded.len() as f64 / 8000.0, 1);
    let wav = wait_recordings(&server, 1)[0].samples();
    let decoded = read_wav_i16(&fixture("speech-8k-mulaw-decoded.wav")).samples;
    assert!(wav.samples == decoded, "not the G.711 decoding");
}

#[tokio::test]
async fn containers_without_encoding_are_recognised_from_their_bytes() {
    let server = secured();
    // A WAV file as it is on disk, header and all, in 999-byte messages.
    let file = std::fs::read(fixture("call-stereo-8k.wav")).unwrap();
    let frames = listen(&server, "model=nova-3", &file, 999).await;
    frames.assert_closed(1000, "stop");
    let call = read_wav_i16(&fixture("call-stereo-8k.wav"));
    assert_metadata(
        &frames.json()[0],
        &file,
        (call.samples.len() / 2) as f64 / 8000.0,
        2,
    );
    let wav = wait_recordings(&server, 1)[0].samples();
    assert_eq!((wav.spec.sample_rate, wav.spec.channels), (8000, 2));
    assert!(wav.samples == call.samples, "WAV payload not sample-exact");

    // Ogg/Opus as opusenc writes it.
    let server = secured();
    let ogg = std::fs::read(fixture("speech-opusenc.opus")).unwrap();
    let frames = listen(&server, "", &ogg, 1000).await;
    frames.assert_closed(1000, "stop");
    let wav = wait_recordings(&server, 1)[0].samples();
    assert_eq!(wav.spec.sample_rate, 48000);
    // 2.5 s of speech at 48 kHz, pre-skip and end trimming applied.
    assert_eq!(wav.samples.len(), 120_000);
}

#[tokio::test]
async fn keys_by_header_or_subprotocol_and_refusals_before_the_upgrade() {
    let server = secured();
    let url = "/v1/listen?encoding=linear16&sample_rate=16000";
    assert_eq!(
        DialectClient::try_connect(&server, url, &[]).await.err(),
        Some(401)
    );
    assert_eq!(
        DialectClient::try_connect(&server, url, &[("authorization", "Token wrong")])
            .await
            .err(),
        Some(401)
    );
    // Browsers: Sec-WebSocket-Protocol: token, <key>; the server selects `token`.
    let protocols = format!("token, {KEY}");
    let client = DialectClient::connect(
        &server,
        url,
        &[("sec-websocket-protocol", protocols.as_str())],
    )
    .await;
    assert_eq!(client.protocol.as_deref(), Some("token"));
    let frames = client.hang_up().await;
    assert!(frames.close.is_some());
    // Temporary tokens from POST /v1/tokens go in as Bearer.
    let bearer = format!("Bearer {KEY}");
    let client = DialectClient::connect(&server, url, &[("authorization", bearer.as_str())]).await;
    client.hang_up().await;
}

#[tokio::test]
async fn bad_requests_get_a_deepgram_error_then_the_close_code() {
    let server = secured();
    let (name, value) = token_header();
    let headers = [(name, value.as_str())];
    // (query, text sent, binary sent, close code, error code)
    type Case<'a> = (&'a str, Option<&'a str>, Option<&'a [u8]>, u16, &'a str);
    let cases: [Case; 5] = [
        (
            "encoding=linear16&sample_rate=16000",
            Some(r#"{"type":"Dance"}"#),
            None,
            1002,
            "unknown_message_type",
        ),
        (
            "encoding=linear16&sample_rate=16000",
            Some("KeepAlive"),
            None,
            1007,
            "malformed_json",
        ),
        (
            "encoding=flac&sample_rate=16000",
            None,
            None,
            1003,
            "unsupported_encoding",
        ),
        ("encoding=linear16", None, None, 1002, "missing_sample_rate"),
        (
            "model=nova-3",
            None,
            Some(b"ID3\x04\x00\x00\x00\x00\x00\x00mp3 frames"),
            1003,
            "unsupported_encoding",
        ),
    ];
    for (query, text, binary, code, reason) in cases {
        let mut client =
            DialectClient::connect(&server, &format!("/v1/listen?{query}"), &headers).await;
        if let Some(text) = text {
            client.send_text(text).await;
        }
        if let Some(bytes) = binary {
            client.send_binary(bytes).await;
        }
        let frames = client.finish().await;
        frames.assert_closed(code, reason);
        let messages = frames.json();
        assert_eq!(messages[0]["type"], "Error", "{query}: {messages:#?}");
        assert_eq!(messages[0]["variant"], reason);
        assert!(messages[0]["description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()));
        assert_eq!(messages.last().unwrap()["type"], "Metadata");
    }
    assert_server_still_serves_with_key(&server).await;
}

/// `assert_server_still_serves` for a server that wants a key.
async fn assert_server_still_serves_with_key(server: &Server) {
    let speech: Vec<i16> = (0..1600).map(|i| ((i * 37) % 2000 - 1000) as i16).collect();
    let bytes = s16_bytes(&speech);
    let before = complete(server);
    let frames = listen(server, "encoding=linear16&sample_rate=16000", &bytes, 640).await;
    frames.assert_closed(1000, "stop");
    let recordings = wait_recordings(server, before + 1);
    assert!(recordings.iter().any(|r| r.samples().samples == speech));
}

fn complete(server: &Server) -> usize {
    std::fs::read_dir(server.recordings_dir())
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path())
                        .ok()
                        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                        .is_some_and(|v| v["complete"] == true)
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_full_server_refuses_in_each_platform_shape() {
    let server = Server::start_with(&["--api-key", KEY, "--max-sessions", "1"], &[]);
    let (name, value) = token_header();
    let url = "/v1/listen?encoding=linear16&sample_rate=16000";
    // Admission happens before the upgrade completes.
    let first = DialectClient::connect(&server, url, &[(name, &value)]).await;
    let frames = DialectClient::connect(&server, url, &[(name, &value)])
        .await
        .finish()
        .await;
    frames.assert_closed(1013, "server_full");
    let messages = frames.json();
    assert_eq!(messages.len(), 1, "a refusal: no Metadata, nothing began");
    assert_eq!(messages[0]["type"], "Error");
    assert_eq!(messages[0]["variant"], "server_full");
    // Twilio reads no JSON of ours: only the close frame.
    let frames = DialectClient::connect(&server, "/twilio", &[])
        .await
        .finish()
        .await;
    frames.assert_closed(1013, "server_full");
    assert!(frames.texts.is_empty());
    first.hang_up().await;
}
