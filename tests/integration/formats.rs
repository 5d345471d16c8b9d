//! Sinks in another format than the stream's: resampled, downmixed, or
//! split into one file per channel, with exact lengths.

use std::path::Path;

use crate::harness::*;

fn recording_paths(transcript: &Transcript) -> Vec<(Option<u64>, String)> {
    transcript
        .of_type("recording")
        .iter()
        .map(|r| {
            (
                r["channel"].as_u64(),
                r["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn stereo_call_split_into_one_exact_file_per_speaker() {
    let server = Server::start_with(&["--recorder-channels", "split"], &[]);
    let call = read_wav_i16(&fixture("call-stereo-8k.wav"));
    let mut client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=8000&channels=2").await;
    client.expect("started").await;
    client.send_chunks(&s16_bytes(&call.samples), 640).await;
    let transcript = client.stop().await;
    let mut files = recording_paths(&transcript);
    files.sort();
    assert_eq!(files.len(), 2, "{:#?}", transcript.messages);
    for (channel, path) in files {
        let channel = channel.expect("split recordings name their channel") as usize;
        assert!(path.ends_with(&format!(".ch{channel}.wav")), "{path}");
        let wav = read_wav_i16(Path::new(&path));
        assert_eq!(wav.spec.channels, 1);
        let expected: Vec<i16> = call
            .samples
            .iter()
            .skip(channel)
            .step_by(2)
            .copied()
            .collect();
        assert!(
            wav.samples == expected,
            "channel {channel} is not the speaker's own audio"
        );
    }
}

#[tokio::test]
async fn mulaw_recorded_at_16k_mono_has_the_exact_resampled_length() {
    let server = Server::start_with(
        &[
            "--recorder-sample-rate",
            "16000",
            "--recorder-channels",
            "mono",
        ],
        &[],
    );
    let coded = wav_data_chunk(&fixture("speech-8k-mulaw.wav"));
    let mut client = Client::connect(&server, "encoding=mulaw").await;
    client.expect("started").await;
    client.send_chunks(&coded, 160).await;
    let transcript = client.stop().await;
    let recording = transcript.one("recording");
    assert_eq!(recording["sample_rate"], 16000);
    let wav = read_wav_i16(Path::new(recording["path"].as_str().unwrap()));
    // 8 kHz to 16 kHz: exactly twice as many frames, delay compensated.
    assert_eq!(wav.samples.len(), coded.len() * 2);
    // Time-aligned: every other output sample lines up with the source at
    // lag 0, not shifted by the resampler's delay.
    let source = read_wav_i16(&fixture("speech-8k-mulaw-decoded.wav")).samples;
    let decimated: Vec<i16> = wav.samples.iter().step_by(2).copied().collect();
    let correlation_at = |lag: i64| {
        let (mut dot, mut a, mut b) = (0f64, 0f64, 0f64);
        for (i, &s) in source.iter().enumerate() {
            let j = i as i64 + lag;
            if let Some(&r) = usize::try_from(j).ok().and_then(|j| decimated.get(j)) {
                let (p, q) = (f64::from(s), f64::from(r));
                dot += p * q;
                a += p * p;
                b += q * q;
            }
        }
        dot / (a.sqrt() * b.sqrt())
    };
    let (best_lag, best) = (-3..=3)
        .map(|lag| (lag, correlation_at(lag)))
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .unwrap();
    eprintln!("8k->16k: best lag {best_lag}, correlation {best:.4}");
    assert_eq!(best_lag, 0, "resampler delay not compensated");
    assert!(best > 0.95, "correlation {best}");
}

#[tokio::test]
async fn opus_at_48k_recorded_at_16k_matches_opusdec() {
    let server = Server::start_with(&["--recorder-sample-rate", "16000"], &[]);
    let bytes = std::fs::read(fixture("speech-opusenc.opus")).unwrap();
    let mut client = Client::connect(&server, "encoding=ogg_opus").await;
    client.send_chunks(&bytes, 1000).await;
    let transcript = client.stop().await;
    assert_eq!(transcript.one("started")["format"]["sample_rate"], 48000);
    let recording = transcript.one("recording");
    assert_eq!(recording["sample_rate"], 16000);
    let wav = read_wav_i16(Path::new(recording["path"].as_str().unwrap()));
    let reference = read_wav_i16(&fixture("speech-opusenc-ref16k.wav")).samples;
    // 120000 frames at 48 kHz become exactly 40000 at 16 kHz.
    assert_eq!(wav.samples.len(), reference.len());
    let (dot, a, b) =
        wav.samples
            .iter()
            .zip(&reference)
            .fold((0f64, 0f64, 0f64), |(d, x, y), (&p, &q)| {
                let (p, q) = (f64::from(p), f64::from(q));
                (d + p * q, x + p * p, y + q * q)
            });
    let correlation = dot / (a.sqrt() * b.sqrt());
    eprintln!(
        "48k decode resampled to 16k vs opusdec at 16k: correlation {correlation:.4} at lag 0"
    );
    assert!(correlation >= 0.99, "correlation {correlation}");
}
