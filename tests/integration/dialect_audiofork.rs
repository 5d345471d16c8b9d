//! `/audiofork`: FreeSWITCH mod_audio_fork as its README and source
//! describe it: subprotocol `audio.drachtio.org`, the metadata of
//! `uuid_audio_fork <uuid> start <url> <mix-type> <rate> <metadata>` as the
//! first text frame, then binary L16, later text from `send_text`.

use crate::dialect_client::*;
use crate::harness::*;

const SUBPROTOCOL: (&str, &str) = ("sec-websocket-protocol", "audio.drachtio.org");

#[tokio::test]
async fn a_stereo_8k_fork_is_recorded_sample_exact() {
    let server = Server::start();
    let call = read_wav_i16(&fixture("call-stereo-8k.wav"));
    assert_eq!(call.spec.channels, 2);
    let mut client = DialectClient::connect(
        &server,
        "/audiofork?mix_type=stereo&sampling_rate=8k",
        &[SUBPROTOCOL],
    )
    .await;
    assert_eq!(client.protocol.as_deref(), Some("audio.drachtio.org"));
    client
        .send_text(r#"{"to":"6173333456","from":"2061236666","callid":"abc@10.0.0.1"}"#)
        .await;
    for frame in s16_bytes(&call.samples).chunks(640) {
        client.send_binary(frame).await;
    }
    client.send_text("dtmf:5").await;
    let frames = client.hang_up().await;
    assert!(frames.texts.is_empty(), "{:#?}", frames.texts);

    let recordings = wait_recordings(&server, 1);
    let wav = recordings[0].samples();
    assert_eq!((wav.spec.sample_rate, wav.spec.channels), (8000, 2));
    assert!(wav.samples == call.samples, "not sample-exact");
    let metadata = &recordings[0].sidecar["metadata"];
    assert_eq!(metadata["callid"], "abc@10.0.0.1");
    assert_eq!(metadata["dialect"]["mix_type"], "stereo");
}

#[tokio::test]
async fn the_plain_mono_16k_command_needs_no_query_and_metadata_is_optional() {
    let server = Server::start();
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let mut client = DialectClient::connect(&server, "/audiofork", &[SUBPROTOCOL]).await;
    for frame in s16_bytes(&speech).chunks(640) {
        client.send_binary(frame).await;
    }
    client.hang_up().await;
    let wav = wait_recordings(&server, 1)[0].samples();
    assert_eq!((wav.spec.sample_rate, wav.spec.channels), (16000, 1));
    assert!(wav.samples == speech);
}

#[tokio::test]
async fn malformed_forks_close_with_their_code() {
    let server = Server::start();
    let mut client =
        DialectClient::connect(&server, "/audiofork?mix_type=stereo", &[SUBPROTOCOL]).await;
    client.send_text("{}").await;
    // Stereo 16-bit is 4 bytes a sample frame.
    client.send_binary(&[0u8; 642]).await;
    let frames = client.finish().await;
    frames.assert_closed(1007, "partial_frame");
    let error = &frames.json()[0];
    assert_eq!(error["type"], "error", "mod_audio_fork's error event");
    assert_eq!(error["data"]["code"], "partial_frame");
    assert_eq!(error["data"]["fatal"], true);

    for (query, code, reason) in [
        ("mix_type=quad", 1003, "unsupported_channels"),
        ("sampling_rate=44k", 1003, "unsupported_sample_rate"),
        ("codec=pcmu", 1002, "unknown_parameter"),
    ] {
        let client =
            DialectClient::connect(&server, &format!("/audiofork?{query}"), &[SUBPROTOCOL]).await;
        client.finish().await.assert_closed(code, reason);
    }
    assert_server_still_serves(&server).await;
}
