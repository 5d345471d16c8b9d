//! A process killed with SIGKILL mid-stream leaves a readable recording, and
//! the next server on the directory repairs it.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

#[tokio::test]
async fn sigkill_mid_stream_leaves_a_valid_wav_with_all_but_the_last_second() {
    let mut server = Server::start();
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    let id = client.expect("started").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Real-time pace, 20 ms frames, for 3.5 s: then kill while streaming.
    let frames: Vec<&[i16]> = speech.chunks(320).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let started = Instant::now();
    let mut sent_samples = 0;
    for frame in &frames {
        tick.tick().await;
        client.send_binary(s16_bytes(frame)).await;
        sent_samples += frame.len();
        if started.elapsed() >= Duration::from_millis(3500) {
            break;
        }
    }
    server.signal("KILL");
    let status = server.wait_exit(WAIT);
    assert!(!status.success(), "the server was killed");

    let path = server.recordings_dir().join(format!("{id}.wav"));
    // hound is one standard reader...
    let wav = read_wav_i16(&path);
    assert!(
        wav.samples.len() + 16000 >= sent_samples,
        "only {} of {} samples survived: more than one second lost",
        wav.samples.len(),
        sent_samples
    );
    assert!(
        wav.samples[..] == speech[..wav.samples.len()],
        "the surviving audio is not the stream's prefix"
    );
    // ...and Python's wave module, where present, is another.
    if let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import sys, wave; w = wave.open(sys.argv[1]); print(w.getnframes())",
        ])
        .arg(&path)
        .output()
    {
        if out.status.success() {
            let frames: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            assert_eq!(frames, wav.samples.len());
        }
    }
    let sidecar: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(server.recordings_dir().join(format!("{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        sidecar["complete"], false,
        "a crashed session is marked incomplete"
    );
}

fn json_of(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The `data` chunk size field of one of our s16/f32 WAVs (44-byte header).
fn data_size_field(path: &std::path::Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[36..40], b"data");
    u64::from(u32::from_le_bytes(bytes[40..44].try_into().unwrap()))
}

#[tokio::test]
async fn a_restart_repairs_the_recordings_a_sigkill_left_unfinished() {
    let recordings = tempfile::tempdir().unwrap();
    let dir = recordings.path();
    // The header is rewritten only every 60 s: at the kill it covers none of
    // the audio on disk.
    let mut server = Server::start_recording_into(dir, &["--recorder-flush-interval-ms", "60000"]);
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let sent = &speech[..48_000];
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    let id = client.expect("started").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    client.send_chunks(&s16_bytes(sent), 640).await;
    // Wait until the file stops growing (the writer's buffer keeps the last
    // 16 KiB or less in memory, lost at the kill).
    let wav_path = dir.join(format!("{id}.wav"));
    let sidecar_path = dir.join(format!("{id}.json"));
    let size = || std::fs::metadata(&wav_path).map_or(0, |m| m.len());
    let deadline = Instant::now() + WAIT;
    let mut last = (size(), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = size();
        if now != last.0 {
            last = (now, Instant::now());
        } else if now >= 44 + 96_000 - 16_384 && last.1.elapsed() > Duration::from_millis(300) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the recording stopped at {now} bytes"
        );
    }
    server.signal("KILL");
    assert!(!server.wait_exit(WAIT).success());

    // As the crash left it: audio on disk beyond the header, sidecar open.
    let on_disk = size();
    assert!(data_size_field(&wav_path) + 44 < on_disk);
    let sidecar = json_of(&sidecar_path);
    assert_eq!(
        (&sidecar["complete"], &sidecar["ended_at"]),
        (&false.into(), &serde_json::Value::Null)
    );

    // The next server on the directory repairs it before it listens.
    let live = Server::start_recording_into(dir, &[]);
    let frames = (on_disk - 44) / 2;
    assert_eq!(size(), on_disk);
    assert_eq!(
        data_size_field(&wav_path),
        frames * 2,
        "the header does not cover the audio on disk"
    );
    let wav = read_wav_i16(&wav_path);
    assert!(
        wav.samples[..] == sent[..frames as usize],
        "the repaired audio is not what was sent"
    );
    let sidecar = json_of(&sidecar_path);
    assert_eq!(sidecar["complete"], false);
    assert_eq!(sidecar["error"], "recovered after crash");
    assert_eq!(sidecar["sample_frames"], frames);
    assert_eq!(sidecar["duration_seconds"], frames as f64 / 16_000.0);
    assert!(sidecar["ended_at"].is_string(), "{sidecar}");

    // A recording live in one server is not repaired by another one starting
    // on the same directory.
    let mut client = Client::connect(&live, "encoding=pcm_s16le&sample_rate=16000").await;
    let live_id = client.expect("started").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    client.send_chunks(&s16_bytes(&speech[..8_000]), 640).await;
    client.send_json(serde_json::json!({"type": "flush"})).await;
    client.expect("flushed").await;
    let live_sidecar = dir.join(format!("{live_id}.json"));
    let before = std::fs::read_to_string(&live_sidecar).unwrap();
    let another = Server::start_recording_into(dir, &[]);
    assert_eq!(
        std::fs::read_to_string(&live_sidecar).unwrap(),
        before,
        "a live recording was touched"
    );
    drop(another);
    let transcript = client.stop().await;
    assert_eq!(transcript.one("recording")["sample_frames"], 8_000);
    assert_eq!(json_of(&live_sidecar)["complete"], true);
}

/// Issue 15, item 6: an `ack` means the audio up to that `seq` is in the
/// recording, header included, so a SIGKILL right after loses none of it.
/// The header checkpoint interval is set far beyond the test, so only the
/// ack guarantee can keep the header up to date (before the fix, the header
/// lagged the acks by up to the one-second checkpoint interval).
#[tokio::test]
async fn sigkill_loses_no_acknowledged_audio() {
    let mut server = Server::start_with(
        &[
            "--recorder-flush-interval-ms",
            "60000",
            "--ack-interval-ms",
            "100",
        ],
        &[],
    );
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let mut client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    let id = client.expect("started").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // 20 ms messages at real-time pace for 2 s, reading acks as they come.
    let mut acked: Option<u64> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for (seq, frame) in speech.chunks(320).take(100).enumerate() {
        tick.tick().await;
        let timestamp = (seq * 320) as u64;
        let message = seq_message(seq as u32, timestamp, &s16_bytes(frame));
        client.send_binary(message).await;
        while let Ok(message) =
            tokio::time::timeout(Duration::from_millis(1), client.next_message()).await
        {
            if message["type"] == "ack" {
                acked = message["seq"].as_u64();
            }
        }
    }
    let acked = acked.expect("the server acknowledged some audio");
    server.signal("KILL");
    let status = server.wait_exit(WAIT);
    assert!(!status.success(), "the server was killed");

    let wav = read_wav_i16(&server.recordings_dir().join(format!("{id}.wav")));
    let acked_samples = (acked as usize + 1) * 320;
    assert!(
        wav.samples.len() >= acked_samples,
        "the header covers {} samples, but seq {acked} ({acked_samples} samples) was acknowledged",
        wav.samples.len()
    );
    assert!(wav.samples[..] == speech[..wav.samples.len()]);
}
