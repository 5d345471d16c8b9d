//! Every row of PROTOCOL.md's bad-input table, each on its own, each checked
//! for its error code, its close code, and a server that keeps serving.

use std::path::Path;

use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::Data;

use crate::harness::*;

/// Connects with `query`, runs `act`, and checks the error and close code.
async fn expect_error<F, Fut>(server: &Server, query: &str, act: F, code: &str, close_code: u16)
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Client>,
{
    let client = Client::connect(server, query).await;
    let client = act(client).await;
    let transcript = client.finish().await;
    transcript.assert_error(code, close_code);
}

#[tokio::test]
async fn malformed_json_closes_1007() {
    let server = Server::start();
    expect_error(
        &server,
        "",
        |mut c| async move {
            c.send_text("{\"type\": \"start\", ").await;
            c
        },
        "malformed_json",
        1007,
    )
    .await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn text_that_is_not_utf8_closes_1007() {
    let server = Server::start();
    expect_error(
        &server,
        "",
        |mut c| async move {
            c.send_frame(vec![b'{', 0xff, 0xfe, b'}'], Data::Text, true)
                .await;
            c
        },
        "invalid_utf8",
        1007,
    )
    .await;
    // Also when the bad bytes arrive in a fragmented text message.
    expect_error(
        &server,
        "",
        |mut c| async move {
            c.send_frame(vec![b'{', b'"'], Data::Text, false).await;
            c.send_frame(vec![0xc3], Data::Continue, true).await;
            c
        },
        "invalid_utf8",
        1007,
    )
    .await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn audio_before_the_format_is_known_closes_1002() {
    let server = Server::start();
    expect_error(
        &server,
        "",
        |mut c| async move {
            c.send_binary(vec![0; 640]).await;
            c
        },
        "audio_before_start",
        1002,
    )
    .await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn unknown_encoding_closes_1003() {
    let server = Server::start();
    expect_error(
        &server,
        "",
        |mut c| async move {
            c.send_json(json!({"type": "start", "encoding": "mp3", "sample_rate": 44100}))
                .await;
            c
        },
        "unsupported_encoding",
        1003,
    )
    .await;
    expect_error(
        &server,
        "encoding=flac",
        |c| async move { c },
        "unsupported_encoding",
        1003,
    )
    .await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn unsupported_rate_or_channels_close_1003() {
    let server = Server::start();
    for (query, code) in [
        (
            "encoding=pcm_s16le&sample_rate=96000",
            "unsupported_sample_rate",
        ),
        (
            "encoding=pcm_s16le&sample_rate=7999",
            "unsupported_sample_rate",
        ),
        (
            "encoding=pcm_s16le&sample_rate=16k",
            "unsupported_sample_rate",
        ),
        ("encoding=mulaw&channels=3", "unsupported_channels"),
        ("encoding=mulaw&channels=0", "unsupported_channels"),
        ("encoding=mulaw&framing=rtp", "unsupported_framing"),
    ] {
        expect_error(&server, query, |c| async move { c }, code, 1003).await;
    }
    expect_error(
        &server,
        "",
        |mut c| async move {
            c.send_json(json!({"type": "start", "encoding": "alaw", "channels": 6}))
                .await;
            c
        },
        "unsupported_channels",
        1003,
    )
    .await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn partial_sample_frame_closes_1007_and_keeps_earlier_audio() {
    let server = Server::start();
    let samples: Vec<i16> = (0..3200).map(|i| (i % 300) as i16).collect();
    let mut client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000&channels=2").await;
    client.expect("started").await;
    client.send_chunks(&s16_bytes(&samples), 640).await;
    // 642 bytes: 160 stereo frames and half of one more.
    client.send_binary(vec![0; 642]).await;
    let transcript = client.finish().await;
    transcript.assert_error("partial_frame", 1007);
    assert_eq!(
        transcript.types(),
        ["started", "error", "stats", "recording", "closed"],
        "the audio before the error is still delivered"
    );
    let wav = read_wav_i16(Path::new(
        transcript.one("recording")["path"].as_str().unwrap(),
    ));
    assert!(wav.samples == samples);
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn message_over_the_size_limit_closes_1009() {
    let server = Server::start();
    expect_error(
        &server,
        "encoding=pcm_s16le&sample_rate=16000",
        |mut c| async move {
            c.send_binary(vec![0; 64 * 1024 + 2]).await;
            c
        },
        "message_too_big",
        1009,
    )
    .await;
    // The limit holds for a message split into fragments, too.
    expect_error(
        &server,
        "encoding=pcm_s16le&sample_rate=16000",
        |mut c| async move {
            c.send_frame(vec![0; 4000], Data::Binary, false).await;
            for _ in 0..20 {
                c.send_frame(vec![0; 4000], Data::Continue, false).await;
            }
            c
        },
        "message_too_big",
        1009,
    )
    .await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn the_size_limit_is_configurable() {
    let server = Server::start_with(&["--max-message-bytes", "2048"], &[]);
    expect_error(
        &server,
        "encoding=pcm_s16le&sample_rate=16000",
        |mut c| async move {
            c.send_binary(vec![0; 2050]).await;
            c
        },
        "message_too_big",
        1009,
    )
    .await;
}

#[tokio::test]
async fn bad_seq_headers_close_with_their_codes() {
    let server = Server::start();
    let q = "encoding=pcm_s16le&sample_rate=16000&framing=seq";
    expect_error(
        &server,
        q,
        |mut c| async move {
            c.send_binary(vec![1, 2, 3, 4, 5]).await;
            c
        },
        "seq_header_truncated",
        1002,
    )
    .await;
    expect_error(
        &server,
        q,
        |mut c| async move {
            c.send_binary(seq_message(0, 0, &[0; 640])).await;
            c.send_binary(seq_message(1, 100, &[0; 640])).await; // overlaps 0..320
            c
        },
        "timestamp_backwards",
        1002,
    )
    .await;
    expect_error(
        &server,
        q,
        |mut c| async move {
            c.send_binary(seq_message(0, 320, &[0; 640])).await;
            c.send_binary(seq_message(1, 0, &[0; 640])).await;
            c
        },
        "timestamp_backwards",
        1002,
    )
    .await;
    expect_error(
        &server,
        q,
        |mut c| async move {
            c.send_binary(seq_message(0, u64::MAX / 2, &[0; 640])).await;
            c
        },
        "gap_too_large",
        1008,
    )
    .await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn protocol_misuse_closes_1002() {
    let server = Server::start();
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("", json!({"type": "dance"}), "unknown_message_type"),
        ("", json!({"kind": "start"}), "invalid_message"),
        (
            "",
            json!({"type": "start", "encoding": "mulaw", "samplerate": 8000}),
            "invalid_message",
        ),
        (
            "",
            json!({"type": "start", "encoding": "pcm_s16le"}),
            "missing_sample_rate",
        ),
    ];
    for (query, message, code) in cases {
        expect_error(
            &server,
            query,
            |mut c| async move {
                c.send_json(message).await;
                c
            },
            code,
            1002,
        )
        .await;
    }
    expect_error(
        &server,
        "encoding=mulaw",
        |mut c| async move {
            c.send_json(json!({"type": "start", "encoding": "mulaw"}))
                .await;
            c
        },
        "already_started",
        1002,
    )
    .await;
    expect_error(
        &server,
        "encoding=mulaw&samplerate=8000",
        |c| async move { c },
        "unknown_parameter",
        1002,
    )
    .await;
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn unknown_sink_closes_1003_and_leaves_no_file() {
    let server = Server::start();
    expect_error(
        &server,
        "encoding=mulaw&sinks=record,tape",
        |c| async move { c },
        "unknown_sink",
        1003,
    )
    .await;
    assert_eq!(
        std::fs::read_dir(server.recordings_dir()).unwrap().count(),
        0
    );
    assert_server_still_serves(&server).await;
}

#[tokio::test]
async fn idle_session_is_closed_with_the_configured_code() {
    let server = Server::start_with(&["--idle-timeout-ms", "300"], &[]);
    let mut client = Client::connect(&server, "encoding=mulaw").await;
    client.expect("started").await;
    client.send_binary(vec![0xFF; 160]).await;
    let transcript = client.finish().await;
    transcript.assert_error("idle_timeout", 1000);
    assert_eq!(transcript.one("closed")["reason"], "idle_timeout");
    assert_eq!(
        transcript.one("recording")["sample_frames"],
        160,
        "audio before the timeout is kept"
    );
    // Also before any start message.
    let transcript = Client::connect(&server, "").await.finish().await;
    transcript.assert_error("idle_timeout", 1000);

    let server = Server::start_with(
        &["--idle-timeout-ms", "300", "--idle-close-code", "1001"],
        &[],
    );
    let transcript = Client::connect(&server, "encoding=mulaw")
        .await
        .finish()
        .await;
    transcript.assert_error("idle_timeout", 1001);
}

#[tokio::test]
async fn keepalive_holds_an_idle_session_open() {
    let server = Server::start_with(&["--idle-timeout-ms", "400"], &[]);
    let mut client = Client::connect(&server, "encoding=mulaw").await;
    client.expect("started").await;
    for _ in 0..8 {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        client.send_json(json!({"type": "keepalive"})).await;
    }
    // 1.2 s passed with no audio: keepalives kept it open.
    let transcript = client.stop().await;
    assert_eq!(transcript.close_code(), 1000);
    assert_eq!(transcript.one("closed")["reason"], "stop");
    assert!(transcript.of_type("error").is_empty());
}

#[tokio::test]
async fn full_server_refuses_with_1013_without_disturbing_others() {
    let server = Server::start_with(&["--max-sessions", "2"], &[]);
    let samples: Vec<i16> = (0..8000).map(|i| ((i * 7) % 1000) as i16).collect();
    let mut first = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    first.expect("started").await;
    let mut second = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    second.expect("started").await;
    first.send_chunks(&s16_bytes(&samples[..4000]), 640).await;

    let refused = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000")
        .await
        .finish()
        .await;
    refused.assert_refused("server_full", 1013);

    first.send_chunks(&s16_bytes(&samples[4000..]), 640).await;
    second.send_chunks(&s16_bytes(&samples), 640).await;
    for client in [first, second] {
        let transcript = client.stop().await;
        let wav = read_wav_i16(Path::new(
            transcript.one("recording")["path"].as_str().unwrap(),
        ));
        assert!(wav.samples == samples, "a running session was disturbed");
    }
    // Slots are released: a new session is admitted again.
    assert_server_still_serves(&server).await;
}

/// One good session streams while every kind of bad client comes and goes.
#[tokio::test]
async fn bad_clients_do_not_disturb_a_good_session() {
    let server = Server::start();
    let samples = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let mut good = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    good.expect("started").await;
    let bytes = s16_bytes(&samples);
    let chunks: Vec<&[u8]> = bytes.chunks(640).collect();
    let bad_inputs: Vec<(&str, Vec<u8>, bool)> = vec![
        ("", b"{nope".to_vec(), true),
        ("", vec![0; 10], false),
        ("encoding=pcm_s16le&sample_rate=16000", vec![0; 3], false),
        (
            "encoding=pcm_s16le&sample_rate=16000&framing=seq",
            vec![0; 4],
            false,
        ),
        ("encoding=opus9", vec![], false),
        (
            "encoding=pcm_s16le&sample_rate=16000",
            vec![0; 70_000],
            false,
        ),
    ];
    for (i, chunk) in chunks.iter().enumerate() {
        good.send_binary(chunk.to_vec()).await;
        // Between the good session's frames, one bad client at a time.
        if let Some((query, payload, is_text)) = bad_inputs.get(i) {
            let mut bad = Client::connect(&server, query).await;
            if *is_text {
                bad.send_text(std::str::from_utf8(payload).unwrap()).await;
            } else if !payload.is_empty() {
                bad.send_binary(payload.clone()).await;
            }
            let transcript = bad.finish().await;
            assert!(
                transcript.close_code() >= 1002,
                "{:#?}",
                transcript.messages
            );
        }
    }
    let transcript = good.stop().await;
    assert_eq!(transcript.close_code(), 1000);
    let wav = read_wav_i16(Path::new(
        transcript.one("recording")["path"].as_str().unwrap(),
    ));
    assert!(wav.samples == samples, "good session disturbed");
}

#[tokio::test]
async fn unusable_recordings_directory_closes_1011_and_the_server_lives_on() {
    let server = Server::start();
    // Replace the recordings directory with a plain file after startup.
    let dir = server.recordings_dir();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    expect_error(
        &server,
        "encoding=mulaw",
        |c| async move { c },
        "sink_failed",
        1011,
    )
    .await;
    // A session without the recorder is unaffected.
    let mut client = Client::connect(&server, "encoding=mulaw&sinks=none").await;
    client.expect("started").await;
    client.send_binary(vec![0xFF; 160]).await;
    assert_eq!(client.stop().await.close_code(), 1000);
    // And once the directory is back, recording works again.
    std::fs::remove_file(&dir).unwrap();
    assert_server_still_serves(&server).await;
}
