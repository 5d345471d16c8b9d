//! Audio in every encoding, streamed as 20 ms frames, recorded exactly.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::Data;

use crate::harness::*;

fn speech_16k() -> Vec<i16> {
    read_wav_i16(&fixture("speech-16k.wav")).samples
}

/// Checks the `recording` message against the file it names.
fn check_recording(recording: &serde_json::Value, sample_rate: u32, channels: u16, frames: u64) {
    let path = Path::new(recording["path"].as_str().unwrap());
    assert_eq!(recording["sample_rate"], sample_rate);
    assert_eq!(recording["channels"], channels);
    assert_eq!(recording["sample_frames"], frames);
    let duration = recording["duration_seconds"].as_f64().unwrap();
    assert!((duration - frames as f64 / f64::from(sample_rate)).abs() < 1e-9);
    assert_eq!(
        recording["bytes"].as_u64().unwrap(),
        std::fs::metadata(path).unwrap().len()
    );
    assert_eq!(recording["sha256"].as_str().unwrap(), sha256_hex(path));
    let sidecar: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(recording["sidecar_path"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(sidecar["complete"], true);
    assert_eq!(sidecar["sample_frames"], frames);
    assert_eq!(sidecar["sha256"], recording["sha256"]);
}

#[tokio::test]
async fn pcm_s16le_recording_is_sample_exact() {
    let server = Server::start();
    let samples = speech_16k();
    let mut client = Client::connect(&server, "").await;
    client
        .send_json(json!({
            "type": "start", "encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1,
            "metadata": {"call_id": "abc-123", "agent": {"name": "Ada"}}
        }))
        .await;
    let started = client.expect("started").await;
    assert_eq!(started["format"]["encoding"], "pcm_s16le");
    assert_eq!(started["format"]["sample_rate"], 16000);
    assert_eq!(started["format"]["framing"], "raw");
    assert_eq!(started["sinks"], json!(["record"]));
    let session_id = started["session_id"].as_str().unwrap().to_owned();

    client.send_chunks(&s16_bytes(&samples), 640).await;
    let sent_at = Instant::now();
    let transcript = client.stop().await;
    eprintln!(
        "last frame sent -> end of session: {:?} (includes stop round trip)",
        sent_at.elapsed()
    );
    assert_eq!(
        transcript.types(),
        ["started", "stats", "recording", "closed"]
    );
    assert_eq!(transcript.close_code(), 1000);

    let recording = transcript.one("recording");
    check_recording(recording, 16000, 1, samples.len() as u64);
    let path = Path::new(recording["path"].as_str().unwrap());
    assert_eq!(
        path.file_name().unwrap().to_string_lossy(),
        format!("{session_id}.wav"),
        "file named after the session id"
    );
    let wav = read_wav_i16(path);
    assert_eq!(wav.spec.sample_rate, 16000);
    assert_eq!(wav.spec.channels, 1);
    assert_eq!(wav.spec.bits_per_sample, 16);
    assert!(wav.samples == samples, "recording differs from input");

    let sidecar: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(recording["sidecar_path"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(sidecar["session_id"], session_id.as_str());
    assert_eq!(sidecar["metadata"]["agent"]["name"], "Ada");
    assert_eq!(sidecar["format"]["encoding"], "pcm_s16le");

    let closed = transcript.one("closed");
    assert_eq!(closed["reason"], "stop");
    assert_eq!(closed["sample_frames"], samples.len() as u64);
    assert_eq!(closed["audio_bytes"], samples.len() as u64 * 2);
    assert_eq!(closed["audio_messages"], samples.len().div_ceil(320) as u64);
}

#[tokio::test]
async fn pcm_f32le_recording_keeps_floats_exactly() {
    let server = Server::start();
    let floats: Vec<f32> = speech_16k()
        .iter()
        .map(|&s| f32::from(s) / 32768.0 * 0.9)
        .collect();
    let bytes: Vec<u8> = floats.iter().flat_map(|s| s.to_le_bytes()).collect();
    let mut client = Client::connect(&server, "encoding=pcm_f32le&sample_rate=16000").await;
    client.expect("started").await;
    client.send_chunks(&bytes, 320 * 4).await;
    let transcript = client.stop().await;
    let recording = transcript.one("recording");
    assert_eq!(recording["sample_format"], "f32");
    check_recording(recording, 16000, 1, floats.len() as u64);
    let (spec, recorded) = read_wav_f32(Path::new(recording["path"].as_str().unwrap()));
    assert_eq!(spec.sample_format, hound::SampleFormat::Float);
    assert!(recorded == floats, "float recording differs from input");
}

/// G.711 input must record as the standard decode of that input; the
/// reference decode was made by sox (tests/fixtures/generate.sh).
async fn g711_case(encoding: &str, input: &str, reference: &str) {
    let server = Server::start();
    let coded = wav_data_chunk(&fixture(input));
    let expected = read_wav_i16(&fixture(reference)).samples;
    assert_eq!(coded.len(), expected.len());
    let mut client = Client::connect(&server, &format!("encoding={encoding}")).await;
    let started = client.expect("started").await;
    assert_eq!(
        started["format"]["sample_rate"], 8000,
        "G.711 defaults to 8 kHz"
    );
    client.send_chunks(&coded, 160).await;
    let transcript = client.stop().await;
    let recording = transcript.one("recording");
    check_recording(recording, 8000, 1, coded.len() as u64);
    let wav = read_wav_i16(Path::new(recording["path"].as_str().unwrap()));
    let mismatches = wav
        .samples
        .iter()
        .zip(&expected)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        mismatches, 0,
        "{encoding}: samples differ from sox's decode"
    );
}

#[tokio::test]
async fn mulaw_recording_equals_independent_g711_decode() {
    g711_case(
        "mulaw",
        "speech-8k-mulaw.wav",
        "speech-8k-mulaw-decoded.wav",
    )
    .await;
}

#[tokio::test]
async fn alaw_recording_equals_independent_g711_decode() {
    g711_case("alaw", "speech-8k-alaw.wav", "speech-8k-alaw-decoded.wav").await;
}

#[tokio::test]
async fn stereo_call_keeps_both_channels() {
    let server = Server::start();
    let call = read_wav_i16(&fixture("call-stereo-8k.wav"));
    assert_eq!(call.spec.channels, 2);
    let mut client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=8000&channels=2").await;
    client.expect("started").await;
    // 20 ms of 8 kHz stereo s16: 160 frames * 2 channels * 2 bytes.
    client.send_chunks(&s16_bytes(&call.samples), 640).await;
    let transcript = client.stop().await;
    let recording = transcript.one("recording");
    check_recording(recording, 8000, 2, call.samples.len() as u64 / 2);
    let wav = read_wav_i16(Path::new(recording["path"].as_str().unwrap()));
    assert!(wav.samples == call.samples, "stereo recording differs");
}

#[tokio::test]
async fn seq_framing_fills_gaps_with_silence_and_drops_duplicates() {
    let server = Server::start();
    let samples = speech_16k();
    let frames: Vec<&[i16]> = samples.chunks(320).collect();
    let mut client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    client.expect("started").await;
    let skipped = 5;
    for (i, frame) in frames.iter().enumerate() {
        if i == skipped {
            continue; // the client lost this capture frame
        }
        let message = seq_message(i as u32, i as u64 * 320, &s16_bytes(frame));
        client.send_binary(message.clone()).await;
        if i == 3 {
            client.send_binary(message).await; // a resend
        }
    }
    let transcript = client.stop().await;
    let closed = transcript.one("closed");
    assert_eq!(closed["gap_frames"], 320);
    assert_eq!(closed["duplicate_messages"], 1);
    assert_eq!(closed["sample_frames"], samples.len() as u64);

    let mut expected = samples.clone();
    expected[skipped * 320..(skipped + 1) * 320].fill(0);
    let recording = transcript.one("recording");
    let wav = read_wav_i16(Path::new(recording["path"].as_str().unwrap()));
    assert_eq!(
        wav.samples.len(),
        expected.len(),
        "recording time = media time"
    );
    assert!(wav.samples == expected, "gap not silent or audio misplaced");
}

#[tokio::test]
async fn flush_is_acknowledged_once_the_file_holds_everything() {
    let server = Server::start();
    let samples = speech_16k();
    let second = &samples[..16000];
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    let started = client.expect("started").await;
    let id = started["session_id"].as_str().unwrap().to_owned();
    client.send_chunks(&s16_bytes(second), 640).await;
    client.send_json(json!({"type": "flush"})).await;
    client.expect("flushed").await;
    // While the session is still open, a standard reader sees every sample.
    let wav = read_wav_i16(&server.recordings_dir().join(format!("{id}.wav")));
    assert!(wav.samples == second, "flushed file lacks audio");
    let transcript = client.stop().await;
    assert_eq!(
        transcript.types(),
        ["started", "flushed", "stats", "recording", "closed"]
    );
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let server = Server::start();
    let samples = speech_16k();
    let mut client = Client::connect(&server, "").await;
    let start = br#"{"type":"start","encoding":"pcm_s16le","sample_rate":16000}"#;
    client
        .send_frame(start[..10].to_vec(), Data::Text, false)
        .await;
    client
        .send_frame(start[10..].to_vec(), Data::Continue, true)
        .await;
    client.expect("started").await;
    let bytes = s16_bytes(&samples[..9600]);
    // One message in three fragments, split inside samples.
    client
        .send_frame(bytes[..1001].to_vec(), Data::Binary, false)
        .await;
    client
        .send_frame(bytes[1001..7777].to_vec(), Data::Continue, false)
        .await;
    client
        .send_frame(bytes[7777..].to_vec(), Data::Continue, true)
        .await;
    let transcript = client.stop().await;
    let wav = read_wav_i16(Path::new(
        transcript.one("recording")["path"].as_str().unwrap(),
    ));
    assert!(wav.samples == samples[..9600], "reassembled audio differs");
}

#[tokio::test]
async fn query_can_choose_no_sinks() {
    let server = Server::start();
    let mut client = Client::connect(&server, "encoding=mulaw&sinks=none").await;
    let started = client.expect("started").await;
    assert_eq!(started["sinks"], json!([]));
    client.send_chunks(&[0xFFu8; 1600], 160).await;
    let transcript = client.stop().await;
    assert_eq!(transcript.types(), ["started", "stats", "closed"]);
    assert_eq!(transcript.one("closed")["sample_frames"], 1600);
    let files = std::fs::read_dir(server.recordings_dir()).unwrap().count();
    assert_eq!(files, 0, "no recording without the record sink");
}

#[tokio::test]
async fn sessions_that_end_without_audio_leave_no_files() {
    // Issue 15: 1,000 idle WebSockets left 2,002 files.
    let server = Server::start_with(&["--idle-timeout-ms", "500"], &[]);
    let dir = server.recordings_dir();
    let files = || std::fs::read_dir(&dir).map_or(0, |d| d.count());

    // Stopped, after a flush (answered), and with the channels split.
    let mut stopped = Client::connect(&server, "encoding=mulaw").await;
    stopped.expect("started").await;
    stopped.send_json(json!({"type": "flush"})).await;
    stopped.expect("flushed").await;
    let transcript = stopped.stop().await;
    assert_eq!(transcript.close_code(), 1000);
    assert!(
        transcript.of_type("recording").is_empty(),
        "{:#?}",
        transcript.messages
    );
    // Timed out idle, ended by an error, and gone without a word.
    let idle = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000&channels=2").await;
    let mut failed = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    failed.expect("started").await;
    failed.send_binary(vec![0; 3]).await;
    let gone = Client::connect(&server, "encoding=alaw").await;
    drop(gone);
    let transcript = failed.finish().await;
    transcript.assert_error("partial_frame", 1007);
    assert!(transcript.of_type("recording").is_empty());
    let transcript = idle.finish().await;
    transcript.assert_error("idle_timeout", 1000);
    assert!(transcript.of_type("recording").is_empty());
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, health) = server.get("/healthz");
        let health: serde_json::Value = serde_json::from_str(&health).unwrap();
        if health["sessions_active"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "sessions still open: {health}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(files(), 0, "files of sessions without audio were left");

    // One block of audio is a recording, as before.
    let mut client = Client::connect(&server, "encoding=mulaw").await;
    client.expect("started").await;
    client.send_binary(vec![0xFF; 160]).await;
    let transcript = client.stop().await;
    assert_eq!(transcript.one("recording")["sample_frames"], 160);
    assert_eq!(files(), 2);
}

#[tokio::test]
async fn client_that_vanishes_still_gets_a_complete_recording() {
    let server = Server::start();
    let samples = speech_16k();
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    let id = client.expect("started").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    client.send_chunks(&s16_bytes(&samples), 640).await;
    drop(client); // no stop, no close frame: the TCP connection just ends
    let sidecar_path = server.recordings_dir().join(format!("{id}.json"));
    let deadline = Instant::now() + WAIT;
    loop {
        let complete = std::fs::read_to_string(&sidecar_path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["complete"] == true);
        if complete {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "recording never completed; sidecar: {:?}",
            std::fs::read_to_string(&sidecar_path)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wav = read_wav_i16(&server.recordings_dir().join(format!("{id}.wav")));
    assert_eq!(
        wav.samples.len(),
        samples.len(),
        "audio lost when the client vanished"
    );
    assert!(
        wav.samples == samples,
        "audio changed when the client vanished"
    );
}
