//! Recording formats (`recorder.format`, `record_format=`) checked against
//! decoders nobody here wrote: ffmpeg for FLAC (sample-exact), opusdec and
//! ffmpeg for Ogg Opus (exact media length across lost packets, audio as
//! libopus decodes the packets).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::harness::*;

/// `ffmpeg -i <path> -f s16le -`: the samples a stranger's decoder gets.
fn ffmpeg_s16(path: &Path, extra: &[&str]) -> Vec<i16> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(extra)
        .args(["-f", "s16le", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "ffmpeg failed on {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// `opusdec --rate <rate> --no-dither`: 16-bit samples as libopus decodes
/// the file (pre-skip and end trimming applied by opusdec).
fn opusdec_s16(path: &Path, rate_hz: u32) -> Wav {
    let out_path = path.with_extension("decoded.wav");
    let status = Command::new("opusdec")
        .args(["--quiet", "--no-dither", "--rate", &rate_hz.to_string()])
        .arg(path)
        .arg(&out_path)
        .status()
        .expect("opusdec runs");
    assert!(status.success(), "opusdec failed on {}", path.display());
    read_wav_i16(&out_path)
}

fn recording_path(transcript: &Transcript) -> PathBuf {
    assert_eq!(transcript.close_code(), 1000, "{:#?}", transcript.messages);
    PathBuf::from(transcript.one("recording")["path"].as_str().unwrap())
}

fn speech() -> Vec<i16> {
    read_wav_i16(&fixture("speech-16k.wav")).samples
}

async fn stream_pcm(server: &Server, query: &str, samples: &[i16]) -> Transcript {
    let mut client = Client::connect(server, query).await;
    for chunk in samples.chunks(640) {
        client.send_binary(s16_bytes(chunk)).await;
    }
    client.stop().await
}

#[tokio::test]
async fn pcm_recorded_as_flac_decodes_sample_exact_mono_and_stereo() {
    let server = Server::start_with(&["--recorder-format", "flac"], &[]);
    let mono = speech();
    let transcript = stream_pcm(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&channels=1",
        &mono,
    )
    .await;
    let path = recording_path(&transcript);
    let recording = transcript.one("recording");
    assert_eq!(recording["format"], "flac");
    assert!(path.extension().is_some_and(|e| e == "flac"));
    assert_eq!(recording["sample_frames"], mono.len() as u64);
    let decoded = ffmpeg_s16(&path, &[]);
    assert_eq!(decoded.len(), mono.len());
    assert!(decoded == mono, "FLAC is not sample-exact");
    // flac's own decoder checks the MD5 in STREAMINFO.
    let test = Command::new("flac").args(["-t", "-s"]).arg(&path).status();
    assert!(test.expect("flac runs").success(), "flac -t failed");
    let sidecar: serde_json::Value = serde_json::from_slice(
        &std::fs::read(recording["sidecar_path"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(sidecar["file_format"], "flac");
    assert_eq!(sidecar["complete"], true);

    // Stereo, left the speech and right a louder, different signal; odd
    // message sizes, so frames and blocks never line up.
    let stereo: Vec<i16> = mono
        .iter()
        .enumerate()
        .flat_map(|(i, &s)| [s, ((i as f32 * 0.07).sin() * 20_000.0) as i16])
        .collect();
    let mut client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000&channels=2").await;
    for chunk in stereo.chunks(2 * 999) {
        client.send_binary(s16_bytes(chunk)).await;
    }
    let transcript = client.stop().await;
    let decoded = ffmpeg_s16(&recording_path(&transcript), &[]);
    assert_eq!(decoded.len(), stereo.len());
    assert!(decoded == stereo, "stereo FLAC is not sample-exact");
}

/// 48 kHz samples of one Opus packet, from its TOC.
fn packet_48k(packet: &[u8]) -> usize {
    opus::packet::get_nb_samples(packet, 48_000).unwrap()
}

#[tokio::test]
async fn raw_opus_packets_with_losses_are_kept_as_sent_at_their_exact_length() {
    let server = Server::start_with(&["--recorder-format", "ogg_opus"], &[]);
    let packets = ogg_packets_independently(&fixture("speech-opusenc.opus"));
    let channels = opus::packet::get_nb_channels(&packets[0]).unwrap();
    let channel_count = match channels {
        opus::Channels::Mono => 1,
        opus::Channels::Stereo => 2,
    };
    let lost = [5usize, 6, 40];
    let mut client = Client::connect(
        &server,
        &format!("encoding=opus&sample_rate=48000&channels={channel_count}&framing=seq"),
    )
    .await;
    let mut timestamp = 0u64;
    for (seq, packet) in packets.iter().enumerate() {
        if !lost.contains(&seq) {
            client
                .send_binary(seq_message(seq as u32, timestamp, packet))
                .await;
        }
        timestamp += packet_48k(packet) as u64;
    }
    let transcript = client.stop().await;
    let path = recording_path(&transcript);
    assert_eq!(transcript.one("recording")["format"], "ogg_opus");
    assert!(path.extension().is_some_and(|e| e == "opus"));
    assert_eq!(transcript.one("recording")["sample_frames"], timestamp);

    // What libopus makes of the packets as sent, each lost one concealed
    // for its own duration.
    let mut decoder = opus::Decoder::new(48_000, channels).unwrap();
    let mut reference = Vec::new();
    let mut buf = vec![0f32; 5760 * channel_count];
    for (seq, packet) in packets.iter().enumerate() {
        let n = if lost.contains(&seq) {
            // A TOC-only packet: concealment of the TOC's duration.
            decoder.decode_float(&[packet[0] & !3], &mut buf, false)
        } else {
            decoder.decode_float(packet, &mut buf, false)
        }
        .unwrap();
        reference.extend(
            buf[..n * channel_count]
                .iter()
                .map(|&s| (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16),
        );
    }
    assert_eq!(reference.len(), timestamp as usize * channel_count);

    // opusdec: the exact media length, lost packets included.
    let decoded = opusdec_s16(&path, 48_000);
    assert_eq!(decoded.samples.len(), reference.len(), "opusdec length");
    // The same packets through another build of libopus (the system's,
    // not the one the opus crate bundles): float rounding differs by a few
    // steps (up to 68 of 32768 seen), nothing audible. A wrong packet,
    // order, granule or concealed length would shift or change whole 20 ms
    // frames, and the error would be as loud as the speech (0 dB); 40 dB
    // below the signal leaves room for rounding only.
    let (mut signal, mut error) = (0f64, 0f64);
    for (a, b) in decoded.samples.iter().zip(&reference) {
        signal += f64::from(*b).powi(2);
        error += (f64::from(*a) - f64::from(*b)).powi(2);
    }
    let snr_db = 10.0 * (signal / error.max(1.0)).log10();
    assert!(snr_db >= 40.0, "opusdec vs libopus: {snr_db:.1} dB");

    // ffmpeg agrees on the length.
    let by_ffmpeg = ffmpeg_s16(&path, &["-ar", "48000"]);
    assert_eq!(by_ffmpeg.len(), reference.len(), "ffmpeg length");
}

#[tokio::test]
async fn ogg_and_webm_opus_are_copied_not_decoded() {
    let server = Server::start_with(&["--recorder-format", "ogg_opus"], &[]);
    for (name, encoding) in [
        ("speech-opusenc.opus", "ogg_opus"),
        ("speech-ffmpeg.webm", "webm_opus"),
    ] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let mut client = Client::connect(&server, &format!("encoding={encoding}")).await;
        client.send_chunks(&bytes, 1000).await;
        let transcript = client.stop().await;
        let path = recording_path(&transcript);
        // Every packet of the input is in the recording, byte for byte.
        let recorded = ogg_packets_independently(&path);
        if encoding == "ogg_opus" {
            assert!(
                recorded == ogg_packets_independently(&fixture(name)),
                "{name}"
            );
        }
        // The input decoded by ffmpeg and the recording by opusdec: the
        // same audio, the same length.
        let ours = opusdec_s16(&path, 48_000).samples;
        let theirs = ffmpeg_s16(&fixture(name), &["-ar", "48000", "-ac", "1"]);
        let frames = transcript.one("recording")["sample_frames"]
            .as_u64()
            .unwrap() as usize;
        assert_eq!(ours.len(), frames, "{name}");
        assert!(
            (ours.len() as i64 - theirs.len() as i64).abs() <= 960,
            "{name}: {} vs {}",
            ours.len(),
            theirs.len()
        );
    }
}

#[tokio::test]
async fn pcm_recorded_as_ogg_opus_has_the_exact_length_and_sounds_the_same() {
    let server = Server::start_with(
        &[
            "--recorder-format",
            "ogg_opus",
            "--recorder-opus-bitrate-bps",
            "32000",
        ],
        &[],
    );
    let samples = speech();
    let transcript = stream_pcm(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&channels=1",
        &samples,
    )
    .await;
    let path = recording_path(&transcript);
    let decoded = opusdec_s16(&path, 16_000).samples;
    // The end granule trims the padded last frame: exactly the input.
    assert_eq!(decoded.len(), samples.len());
    // Lossy at 32 kb/s, but speech comes back in shape: 0.95 holds with
    // margin at this rate (a broken pre-skip or a shifted frame falls far
    // below it), aligned by opusdec's pre-skip so no lag search is needed
    // beyond a few samples.
    let c = aligned_correlation(&decoded, &samples, 8).0;
    assert!(c >= 0.95, "correlation {c}");
}

#[tokio::test]
async fn a_client_chooses_its_format_only_among_those_the_server_allows() {
    let server = Server::start_with(&["--recorder-client-formats", "flac,wav"], &[]);
    let samples = &speech()[..16_000];
    let transcript = stream_pcm(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&record_format=flac",
        samples,
    )
    .await;
    assert_eq!(transcript.one("recording")["format"], "flac");
    let mut client = Client::connect(&server, "").await;
    client
        .send_json(json!({"type": "start", "encoding": "pcm_s16le", "sample_rate": 16000, "record_format": "ogg_opus"}))
        .await;
    let refused = |t: &Transcript| {
        assert_eq!(
            t.one("error")["code"],
            "record_format_refused",
            "{:#?}",
            t.messages
        );
        assert_eq!(t.close_code(), 1003);
    };
    refused(&client.finish().await);
    let client = Client::connect(
        &server,
        "encoding=pcm_s16le&sample_rate=16000&record_format=mp3",
    )
    .await;
    let transcript = client.finish().await;
    refused(&transcript);
    let message = transcript.one("error")["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("mp3") && message.contains("flac, wav"),
        "{message}"
    );

    // A server that allows no choice refuses even its own format.
    let strict = Server::start();
    let client = Client::connect(
        &strict,
        "encoding=pcm_s16le&sample_rate=16000&record_format=wav",
    )
    .await;
    refused(&client.finish().await);
}

/// Sends `messages` (seq-framed, 20 ms each) at real-time pace, waits until
/// the server acknowledges the last, then kills it with SIGKILL. Returns
/// the session id.
async fn acked_then_killed(server: &mut Server, query: &str, messages: &[Vec<u8>]) -> String {
    let mut client = Client::connect(server, query).await;
    let id = client.expect("started").await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    for message in messages {
        tick.tick().await;
        client.send_binary(message.clone()).await;
    }
    let last = messages.len() as u64 - 1;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let message = tokio::time::timeout_at(deadline, client.next_message())
            .await
            .expect("the last seq acknowledged in time");
        if message["type"] == "ack" && message["seq"].as_u64() == Some(last) {
            break;
        }
    }
    server.signal("KILL");
    assert!(!server.wait_exit(WAIT).success(), "the server was killed");
    id
}

fn assert_recovered(dir: &Path, id: &str) {
    let server = Server::start_recording_into(dir, &[]);
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{id}.json"))).unwrap()).unwrap();
    assert_eq!(sidecar["complete"], false);
    assert_eq!(sidecar["error"], "recovered after crash");
    drop(server);
}

#[tokio::test]
async fn sigkill_mid_flac_recording_leaves_every_acked_sample_playable() {
    let mut server = Server::start_with(&["--recorder-format", "flac"], &[]);
    let speech = speech();
    let messages: Vec<Vec<u8>> = speech[..16_000 * 2]
        .chunks(320)
        .enumerate()
        .map(|(seq, chunk)| seq_message(seq as u32, seq as u64 * 320, &s16_bytes(chunk)))
        .collect();
    let id = acked_then_killed(
        &mut server,
        "encoding=pcm_s16le&sample_rate=16000&framing=seq",
        &messages,
    )
    .await;
    let path = server.recordings_dir().join(format!("{id}.flac"));
    // Before any repair: STREAMINFO still says "length unknown", and
    // ffmpeg plays every acknowledged sample.
    let decoded = ffmpeg_s16(&path, &[]);
    assert_eq!(
        decoded.len(),
        16_000 * 2,
        "every acked sample is in the file"
    );
    assert!(decoded[..] == speech[..decoded.len()]);
    assert_recovered(&server.recordings_dir(), &id);
    assert!(
        ffmpeg_s16(&path, &[]) == decoded,
        "recovery keeps the audio"
    );
}

#[tokio::test]
async fn sigkill_mid_ogg_opus_recording_leaves_a_playable_file() {
    let mut server = Server::start_with(&["--recorder-format", "ogg_opus"], &[]);
    let packets = ogg_packets_independently(&fixture("speech-opusenc.opus"));
    let channels = match opus::packet::get_nb_channels(&packets[0]).unwrap() {
        opus::Channels::Mono => 1,
        opus::Channels::Stereo => 2,
    };
    let mut timestamp = 0;
    let mut messages = Vec::new();
    for (seq, packet) in packets.iter().take(100).enumerate() {
        messages.push(seq_message(seq as u32, timestamp, packet));
        timestamp += packet_48k(packet) as u64;
    }
    let id = acked_then_killed(
        &mut server,
        &format!("encoding=opus&sample_rate=48000&channels={channels}&framing=seq"),
        &messages,
    )
    .await;
    let path = server.recordings_dir().join(format!("{id}.opus"));
    let by_ffmpeg = ffmpeg_s16(&path, &["-ar", "48000", "-ac", "1"]);
    let by_opusdec = opusdec_s16(&path, 48_000).samples;
    // Every acknowledged packet's page is in the file (no end-of-stream
    // page: the decoders play what the pages hold).
    assert_eq!(by_opusdec.len(), timestamp as usize * channels);
    assert!(
        by_ffmpeg.len() as u64 >= timestamp - 960,
        "{}",
        by_ffmpeg.len()
    );
    assert_recovered(&server.recordings_dir(), &id);
    assert_eq!(opusdec_s16(&path, 48_000).samples.len(), by_opusdec.len());
}
