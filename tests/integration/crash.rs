//! A process killed with SIGKILL mid-stream leaves a readable recording.

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
