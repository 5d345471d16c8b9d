//! Recording onto a disk that fills up: a 2 MiB tmpfs the test mounts (as
//! root; skipped, with the reason printed, where mounting is not allowed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

/// A tmpfs mounted on a fresh directory; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None`, with the reason on stderr, where mounting is not permitted.
    fn mount(size: &str, test: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let result = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let reason = match result {
            Ok(out) if out.status.success() => return Some(Tmpfs { dir }),
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            Err(e) => format!("cannot run mount: {e}"),
        };
        // Straight to the process's stderr: the test harness would swallow
        // `eprintln!` of a passing test, and a skip must not look like a pass.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: cannot mount a {size} tmpfs (needs root): {reason}"
        );
        None
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process not yet reaped): detach it now, freed later.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Sends `messages` until the server stops taking them, then reads to the end.
async fn send_until_refused(
    mut client: Client,
    messages: impl Iterator<Item = Vec<u8>>,
) -> Transcript {
    for message in messages {
        if client.ws.send(Message::binary(message)).await.is_err() {
            break;
        }
    }
    let _ = client.ws.send(Message::text(r#"{"type":"stop"}"#)).await;
    client.finish().await
}

/// The `data` chunk's size field and where the samples start.
fn data_chunk(bytes: &[u8]) -> (u64, u64) {
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        if &bytes[at..at + 4] == b"data" {
            return (u64::from(len), at as u64 + 8);
        }
        at += 8 + len as usize + (len as usize & 1);
    }
    panic!("no data chunk");
}

#[tokio::test]
async fn a_full_disk_leaves_a_wav_covering_all_audio_on_it_and_a_sidecar_saying_why() {
    let test =
        "full_disk::a_full_disk_leaves_a_wav_covering_all_audio_on_it_and_a_sidecar_saying_why";
    let Some(disk) = Tmpfs::mount("2m", test) else {
        return;
    };
    let recordings: PathBuf = disk.path().to_owned();
    let server = Server::start_recording_into(&recordings, &[]);

    // 48 kHz stereo float: 384 kB per second of audio, so 2 MiB fill in about
    // 5.5 s of media. Every sample distinct from its neighbours, and stored
    // exactly (pcm_f32le is recorded as f32).
    let sample = |i: usize| ((i % 40_000) as f32 / 40_000.0) - 0.5;
    let frames_per_message = 960;
    let samples_per_message = frames_per_message * 2;
    let messages = (0..2_000).map(|m| {
        (0..samples_per_message)
            .flat_map(|k| sample(m * samples_per_message + k).to_le_bytes())
            .collect::<Vec<u8>>()
    });
    let mut client =
        Client::connect(&server, "encoding=pcm_f32le&sample_rate=48000&channels=2").await;
    let id = client.expect("started").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let transcript = send_until_refused(client, messages).await;
    transcript.assert_error("sink_failed", 1011);
    let message = transcript.one("error")["message"]
        .as_str()
        .unwrap()
        .to_owned();

    let wav_path = recordings.join(format!("{id}.wav"));
    let sidecar_path = recordings.join(format!("{id}.json"));

    // The header covers every whole frame on disk, and the file is exactly
    // the header and those frames.
    let bytes = std::fs::read(&wav_path).unwrap();
    let (data_bytes, data_start) = data_chunk(&bytes);
    assert_eq!(
        data_start + data_bytes,
        bytes.len() as u64,
        "header does not cover the file"
    );
    assert_eq!(data_bytes % 8, 0);
    let frames = data_bytes / 8;
    assert!(
        data_bytes > 1_900_000,
        "only {data_bytes} bytes of audio on a 2 MiB disk"
    );
    let (spec, samples) = read_wav_f32(&wav_path);
    assert_eq!((spec.channels, spec.sample_rate), (2, 48_000));
    assert_eq!(samples.len() as u64, frames * 2);
    let expected: Vec<f32> = (0..samples.len()).map(sample).collect();
    assert!(
        samples == expected,
        "the audio on disk is not the stream's prefix"
    );

    // The sidecar says what happened, when, and how much was kept.
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sidecar_path).unwrap()).unwrap();
    assert_eq!(sidecar["complete"], false);
    assert_eq!(sidecar["sample_frames"], frames);
    assert_eq!(sidecar["duration_seconds"], frames as f64 / 48_000.0);
    assert!(sidecar["ended_at"].is_string(), "{sidecar}");
    let error = sidecar["error"].as_str().unwrap_or_default();
    assert!(error.contains("No space left on device"), "{sidecar}");
    assert!(message.contains("No space left on device"), "{message}");
    // Nothing else is left: no temporary sidecar.
    assert_eq!(
        names_in(&recordings),
        [format!("{id}.json"), format!("{id}.wav")]
    );

    // A session started on the full disk fails the same way and leaves
    // nothing behind.
    let client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000").await;
    let transcript = send_until_refused(client, (0..50).map(|_| vec![0u8; 640])).await;
    let error = transcript.one("error");
    assert_eq!(error["code"], "sink_failed", "{:#?}", transcript.messages);
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("No space left on device"));
    assert_eq!(transcript.close_code(), 1011);
    assert_eq!(
        names_in(&recordings),
        [format!("{id}.json"), format!("{id}.wav")]
    );

    assert!(!server.log().contains("panicked"), "{}", server.log());
    drop(server);
}
