//! `/vonage`: the Vonage Voice API WebSocket as its documentation describes
//! it: a `websocket:connected` text frame with the content type and the
//! NCCO endpoint's headers flattened in, then 20 ms binary L16 frames,
//! `websocket:dtmf` events, and the call ends with a Close frame.

use serde_json::json;

use crate::dialect_client::*;
use crate::harness::*;

#[tokio::test]
async fn an_l16_call_is_recorded_sample_exact_with_its_headers_as_metadata() {
    let server = Server::start();
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let mut client = DialectClient::connect(&server, "/vonage?sinks=record", &[]).await;
    client
        .send_json(&json!({
            "event": "websocket:connected",
            "content-type": "audio/l16;rate=16000",
            "prop1": "value1",
            "customer": {"id": 42}
        }))
        .await;
    let bytes = s16_bytes(&speech);
    for (k, frame) in bytes.chunks(640).enumerate() {
        client.send_binary(frame).await;
        if k == 10 {
            client
                .send_json(&json!({"event": "websocket:dtmf", "digit": "5", "duration": 100}))
                .await;
        }
    }
    let frames = client.hang_up().await;
    assert!(frames.texts.is_empty(), "Vonage gets no JSON of ours");

    let recordings = wait_recordings(&server, 1);
    let wav = recordings[0].samples();
    assert_eq!((wav.spec.sample_rate, wav.spec.channels), (16000, 1));
    assert!(wav.samples == speech, "not sample-exact");
    let metadata = &recordings[0].sidecar["metadata"];
    assert_eq!(metadata["prop1"], "value1");
    assert_eq!(metadata["customer"]["id"], 42);
    assert_eq!(metadata["dialect"]["name"], "vonage");
}

#[tokio::test]
async fn eight_khz_calls_too() {
    let server = Server::start();
    let speech = read_wav_i16(&fixture("speech-8k.wav")).samples;
    let mut client = DialectClient::connect(&server, "/vonage", &[]).await;
    client
        .send_json(&json!({"event": "websocket:connected", "content-type": "audio/l16;rate=8000"}))
        .await;
    for frame in s16_bytes(&speech).chunks(320) {
        client.send_binary(frame).await;
    }
    client.hang_up().await;
    let wav = wait_recordings(&server, 1)[0].samples();
    assert_eq!(wav.spec.sample_rate, 8000);
    assert!(wav.samples == speech);
}

#[tokio::test]
async fn malformed_vonage_messages_close_with_their_code_and_the_server_goes_on() {
    let server = Server::start();
    let connected = json!({"event": "websocket:connected", "content-type": "audio/l16;rate=16000"});
    let cases = [
        (
            "audio first",
            None,
            Some(vec![0u8; 640]),
            1002,
            "audio_before_start",
        ),
        (
            "not L16",
            Some(json!({"event": "websocket:connected", "content-type": "audio/pcmu;rate=8000"})),
            None,
            1003,
            "unsupported_media_format",
        ),
        (
            "no content type",
            Some(json!({"event": "websocket:connected"})),
            None,
            1002,
            "invalid_message",
        ),
        (
            "half a sample",
            Some(connected.clone()),
            Some(vec![0u8; 641]),
            1007,
            "partial_frame",
        ),
    ];
    for (name, text, binary, code, reason) in cases {
        let mut client = DialectClient::connect(&server, "/vonage", &[]).await;
        if let Some(text) = text {
            client.send_json(&text).await;
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
    }
    let mut client = DialectClient::connect(&server, "/vonage", &[]).await;
    client.send_text("websocket:connected").await;
    client.finish().await.assert_closed(1007, "malformed_json");
    let client = DialectClient::connect(&server, "/vonage?rate=16000", &[]).await;
    client
        .finish()
        .await
        .assert_closed(1002, "unknown_parameter");
    assert_server_still_serves(&server).await;
}
