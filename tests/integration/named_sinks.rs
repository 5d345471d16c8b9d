//! Named sink instances from the configuration file (`[sinks.<name>]`),
//! picked by name in `sinks=`: two recorders of one session in different
//! formats, each with its own files, and the startup checks.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::harness::*;
use crate::stt_stub::{Reply, Stub};

/// A recorder at the stream's own rate and channels, one at 16 kHz mono,
/// and one split per channel; `[recorder]` itself is left at its defaults.
const CONFIG: &str = r#"
[sinks.archive]
kind = "record"
sample_rate = 0
channels = "keep"

[sinks.asr16k]
kind = "record"
sample_rate = 16000
channels = "mono"

[sinks.speakers]
kind = "record"
channels = "split"
"#;

fn server_with_config(text: &str) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cochlea.toml");
    std::fs::write(&path, text).unwrap();
    let server = Server::start_with(&["--config", path.to_str().unwrap()], &[]);
    (server, dir)
}

/// The `recording` message of sink `name` (absent `sink`: the built-in one).
fn recording_of<'a>(transcript: &'a Transcript, name: Option<&str>) -> Vec<&'a Value> {
    transcript
        .of_type("recording")
        .into_iter()
        .filter(|r| r["sink"].as_str() == name)
        .collect()
}

fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[tokio::test]
async fn two_recorders_of_one_session_write_their_own_files_in_their_own_formats() {
    let (server, _config) = server_with_config(CONFIG);
    let call = read_wav_i16(&fixture("call-stereo-8k.wav"));
    let frames = call.samples.len() / 2;
    let mut client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=8000&channels=2&sinks=archive,asr16k",
    )
    .await;
    let started = client.expect("started").await;
    assert_eq!(started["sinks"], serde_json::json!(["archive", "asr16k"]));
    let id = started["session_id"].as_str().unwrap().to_owned();
    client.send_chunks(&s16_bytes(&call.samples), 640).await;
    let transcript = client.stop().await;
    assert_eq!(transcript.close_code(), 1000);
    assert_eq!(transcript.of_type("recording").len(), 2);

    // Native: the client's samples exactly.
    let archive = recording_of(&transcript, Some("archive"));
    let archive = archive[0];
    assert_eq!(
        file_name(archive["path"].as_str().unwrap()),
        format!("{id}.archive.wav")
    );
    assert_eq!(
        file_name(archive["sidecar_path"].as_str().unwrap()),
        format!("{id}.archive.json")
    );
    assert_eq!(archive["sample_rate"], 8000);
    assert_eq!(archive["channels"], 2);
    let kept = read_wav_i16(Path::new(archive["path"].as_str().unwrap()));
    assert_eq!((kept.spec.sample_rate, kept.spec.channels), (8000, 2));
    assert!(
        kept.samples == call.samples,
        "the archive is not the stream"
    );

    // 16 kHz mono: twice the frames, the same duration, the same audio.
    let asr = recording_of(&transcript, Some("asr16k"))[0];
    assert_eq!(
        file_name(asr["path"].as_str().unwrap()),
        format!("{id}.asr16k.wav")
    );
    assert_eq!(asr["sample_rate"], 16000);
    assert_eq!(asr["channels"], 1);
    let resampled = read_wav_i16(Path::new(asr["path"].as_str().unwrap()));
    assert_eq!(
        (resampled.spec.sample_rate, resampled.spec.channels),
        (16000, 1)
    );
    assert_eq!(resampled.samples.len(), frames * 2);
    assert_eq!(asr["duration_seconds"], archive["duration_seconds"]);
    assert_eq!(
        asr["duration_seconds"].as_f64().unwrap(),
        frames as f64 / 8000.0
    );
    // Every other 16 kHz sample lines up with the stereo stream's average.
    let mixed: Vec<f64> = call
        .samples
        .chunks(2)
        .map(|lr| (f64::from(lr[0]) + f64::from(lr[1])) / 2.0)
        .collect();
    let (dot, a, b) = mixed.iter().zip(resampled.samples.iter().step_by(2)).fold(
        (0f64, 0f64, 0f64),
        |(d, x, y), (&p, &q)| {
            let q = f64::from(q);
            (d + p * q, x + p * p, y + q * q)
        },
    );
    let correlation = dot / (a.sqrt() * b.sqrt());
    eprintln!("asr16k vs the stream's mono mix: correlation {correlation:.4}");
    assert!(correlation > 0.95, "correlation {correlation}");

    // Each recorder has its own sidecar, and the built-in one did not run.
    for recording in [archive, asr] {
        let sidecar: Value = serde_json::from_slice(
            &std::fs::read(recording["sidecar_path"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(sidecar["complete"], true);
        assert_eq!(
            sidecar["recording"].as_str().unwrap(),
            file_name(recording["path"].as_str().unwrap())
        );
        assert_eq!(sidecar["sha256"], recording["sha256"]);
    }
    let mut files: Vec<String> = std::fs::read_dir(server.recordings_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            format!("{id}.archive.json"),
            format!("{id}.archive.wav"),
            format!("{id}.asr16k.json"),
            format!("{id}.asr16k.wav"),
        ]
    );
}

#[tokio::test]
async fn the_built_in_recorder_keeps_its_names_beside_a_split_instance() {
    let (server, _config) = server_with_config(CONFIG);
    let call = read_wav_i16(&fixture("call-stereo-8k.wav"));
    let mut client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=8000&channels=2&sinks=record,speakers",
    )
    .await;
    let started = client.expect("started").await;
    assert_eq!(started["sinks"], serde_json::json!(["record", "speakers"]));
    let id = started["session_id"].as_str().unwrap().to_owned();
    client.send_chunks(&s16_bytes(&call.samples), 640).await;
    let transcript = client.stop().await;

    // `record` is what it always was: no `sink` field, `<id>.wav`.
    let plain = recording_of(&transcript, None);
    assert_eq!(plain.len(), 1, "{:#?}", transcript.messages);
    assert_eq!(
        file_name(plain[0]["path"].as_str().unwrap()),
        format!("{id}.wav")
    );
    let mut split = recording_of(&transcript, Some("speakers"));
    split.sort_by_key(|r| r["channel"].as_u64());
    assert_eq!(split.len(), 2, "{:#?}", transcript.messages);
    for (channel, recording) in split.iter().enumerate() {
        assert_eq!(recording["channel"], channel);
        assert_eq!(
            file_name(recording["path"].as_str().unwrap()),
            format!("{id}.speakers.ch{channel}.wav")
        );
        let wav = read_wav_i16(Path::new(recording["path"].as_str().unwrap()));
        let expected: Vec<i16> = call
            .samples
            .iter()
            .skip(channel)
            .step_by(2)
            .copied()
            .collect();
        assert!(wav.samples == expected, "channel {channel}");
    }
}

#[tokio::test]
async fn default_sinks_may_name_an_instance_and_unknown_names_list_the_instances() {
    let (server, _config) = server_with_config(&format!("default_sinks = [\"asr16k\"]\n{CONFIG}"));
    let mut client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=8000").await;
    assert_eq!(
        client.expect("started").await["sinks"],
        serde_json::json!(["asr16k"])
    );
    client.send_binary(s16_bytes(&[0; 800])).await;
    let transcript = client.stop().await;
    let recording = transcript.one("recording");
    assert_eq!(recording["sink"], "asr16k");
    assert_eq!(recording["sample_rate"], 16000);
    assert_eq!(recording["sample_frames"], 1600);

    let client = Client::connect(&server, "encoding=pcm_s16le&sample_rate=8000&sinks=tape").await;
    let transcript = client.finish().await;
    transcript.assert_error("unknown_sink", 1003);
    let message = transcript.one("error")["message"].as_str().unwrap();
    assert_eq!(
        message,
        "unknown sink 'tape'; available: archive, asr16k, record, speakers"
    );
}

#[tokio::test]
async fn a_transcriber_picked_by_name_runs_instead_of_the_default_one() {
    let stub = Stub::start(|_, _| Reply::text("words")).await;
    let (server, _config) = server_with_config(&format!(
        "[transcription.backends.default]\nurl = \"{}\"\n\
         [sinks.notes]\nkind = \"transcribe\"\nbackend = \"default\"\n",
        stub.url
    ));
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    let mut samples = vec![0i16; 8_000];
    samples.extend_from_slice(&speech);
    samples.extend(std::iter::repeat_n(0i16, 16_000));

    let mut client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&sinks=record,notes",
    )
    .await;
    let started = client.expect("started").await;
    assert_eq!(started["sinks"], serde_json::json!(["record", "notes"]));
    // `transcribe` names the backend of `transcribe=`'s sink, not running here.
    assert!(started.get("transcribe").is_none(), "{started}");
    client.send_chunks(&s16_bytes(&samples), 640).await;
    let transcript = client.stop().await;
    let texts = transcript.of_type("transcript");
    assert!(!texts.is_empty(), "{:#?}", transcript.messages);
    let mut ids: Vec<u64> = texts
        .iter()
        .map(|t| t["utterance_id"].as_u64().unwrap())
        .collect();
    ids.dedup();
    // One transcriber: each utterance once, and one request for it.
    assert_eq!(ids.len(), texts.len(), "{texts:#?}");
    assert_eq!(stub.requests().len(), texts.len());
    for text in &texts {
        assert_eq!(text["backend"], "default");
        assert_eq!(text["text"], "words");
    }
    assert_eq!(transcript.of_type("recording").len(), 1);

    // Without a transcribing sink named, the default backend joins as ever.
    let client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000&sinks=record").await;
    let transcript = client.stop().await;
    let started = transcript.one("started");
    assert_eq!(
        started["sinks"],
        serde_json::json!(["record", "transcribe"])
    );
    assert_eq!(started["transcribe"], "default");
}

#[test]
fn a_bad_sink_table_stops_the_server_at_startup_naming_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        (
            "[sinks.asr16k]\nkind = \"record\"\nsample_rate = 4000\n",
            "sinks.asr16k: sample_rate must be 0 (the stream's) or from 8000 to 48000, not 4000",
        ),
        (
            "[sinks.transcribe]\nkind = \"record\"\n",
            "sinks.transcribe: the name 'transcribe' is taken by a built-in sink",
        ),
        (
            "[sinks.notes]\nkind = \"transcribe\"\nbackend = \"crm\"\n",
            "sinks.notes: unknown transcription backend 'crm': none is configured",
        ),
        (
            "[sinks.tape1]\nkind = \"tape\"\n",
            "[sinks.tape1]: unknown variant `tape`, expected `record` or `transcribe`",
        ),
    ] {
        let path = dir.path().join("cochlea.toml");
        std::fs::write(&path, text).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_cochlea"));
        for (key, _) in std::env::vars() {
            if key.starts_with("COCHLEA_") {
                command.env_remove(key);
            }
        }
        let out = command
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(expected), "{text}: {stderr}");
    }
}
