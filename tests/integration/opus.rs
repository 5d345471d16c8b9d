//! Opus in all three shapes, compared with independent decodes (opusdec and
//! ffmpeg, made by tests/fixtures/generate.sh) after alignment.

use std::path::Path;

use serde_json::json;

use crate::harness::*;

async fn stream_container(
    server: &Server,
    query: &str,
    bytes: &[u8],
    slices: &[usize],
) -> Transcript {
    let mut client = Client::connect(server, query).await;
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let n = slices[i % slices.len()].min(bytes.len() - at);
        client.send_binary(bytes[at..at + n].to_vec()).await;
        at += n;
        i += 1;
    }
    client.stop().await
}

fn recorded(transcript: &Transcript) -> Wav {
    read_wav_i16(Path::new(
        transcript.one("recording")["path"].as_str().unwrap(),
    ))
}

fn assert_matches_reference(transcript: &Transcript, reference: &str) {
    assert_eq!(transcript.close_code(), 1000, "{:#?}", transcript.messages);
    let wav = recorded(transcript);
    assert_eq!(wav.spec.sample_rate, 16000);
    let reference = read_wav_i16(&fixture(reference)).samples;
    let (correlation, lag) = aligned_correlation(&wav.samples, &reference, 480);
    eprintln!(
        "{reference_len} reference samples, {} recorded, correlation {correlation:.4} at lag {lag}",
        wav.samples.len(),
        reference_len = reference.len()
    );
    assert!(correlation >= 0.99, "correlation {correlation} < 0.99");
}

#[tokio::test]
async fn ogg_opus_from_opusenc_matches_opusdec() {
    let server = Server::start();
    let bytes = std::fs::read(fixture("speech-opusenc.opus")).unwrap();
    // Cut anywhere: odd sizes that split pages and headers.
    let transcript = stream_container(
        &server,
        "encoding=ogg_opus&sample_rate=16000",
        &bytes,
        &[700, 13, 4096, 1],
    )
    .await;
    let started = transcript.one("started");
    assert_eq!(started["format"]["channels"], 1);
    assert_matches_reference(&transcript, "speech-opusenc-ref16k.wav");
    // Pre-skip and end trimming make the length exact, as opusdec's is.
    let reference = read_wav_i16(&fixture("speech-opusenc-ref16k.wav")).samples;
    assert_eq!(recorded(&transcript).samples.len(), reference.len());
}

#[tokio::test]
async fn ogg_opus_from_ffmpeg_matches_ffmpeg() {
    let server = Server::start();
    let bytes = std::fs::read(fixture("speech-ffmpeg.ogg")).unwrap();
    let transcript = stream_container(
        &server,
        "encoding=ogg_opus&sample_rate=16000",
        &bytes,
        &[1000],
    )
    .await;
    assert_matches_reference(&transcript, "speech-ffmpeg-ogg-ref16k.wav");
}

#[tokio::test]
async fn webm_opus_in_mediarecorder_slices_matches_ffmpeg() {
    let server = Server::start();
    let bytes = std::fs::read(fixture("speech-ffmpeg.webm")).unwrap();
    // MediaRecorder hands out the header with the first chunk, then slices
    // of the stream that ignore element boundaries.
    let cluster = bytes
        .windows(4)
        .position(|w| w == [0x1F, 0x43, 0xB6, 0x75])
        .unwrap();
    let mut slices = vec![cluster + 7];
    slices.extend(std::iter::repeat_n(997, 40));
    let transcript = stream_container(
        &server,
        "encoding=webm_opus&sample_rate=16000",
        &bytes,
        &slices,
    )
    .await;
    assert_matches_reference(&transcript, "speech-ffmpeg-webm-ref16k.wav");
}

#[tokio::test]
async fn stereo_ogg_takes_its_channels_from_the_header() {
    let server = Server::start();
    let bytes = std::fs::read(fixture("call-stereo.opus")).unwrap();
    let transcript = stream_container(&server, "encoding=ogg_opus", &bytes, &[512]).await;
    assert_eq!(transcript.one("started")["format"]["channels"], 2);
    assert_eq!(transcript.one("started")["format"]["sample_rate"], 48000);
    let wav = recorded(&transcript);
    assert_eq!(wav.spec.channels, 2);
    // 2.5 s at 48 kHz, exactly, after pre-skip and end trimming.
    assert_eq!(wav.samples.len(), 2 * 120_000);
    let (left, right): (Vec<i16>, Vec<i16>) = wav.samples.chunks(2).map(|f| (f[0], f[1])).unzip();
    assert!(left.iter().any(|&s| s.abs() > 1000) && right.iter().any(|&s| s.abs() > 1000));
    assert_ne!(left, right, "the two speakers stay on their own channels");
}

/// Sends Opus packets one per message with seq headers, as a WebCodecs
/// AudioEncoder client would; `edit` may drop or damage some.
async fn stream_packets(
    server: &Server,
    packets: &[Vec<u8>],
    edit: impl Fn(usize, &[u8]) -> Option<Vec<u8>>,
) -> Transcript {
    let mut client = Client::connect(server, "encoding=opus&sample_rate=16000&framing=seq").await;
    let started = client.expect("started").await;
    assert_eq!(started["format"]["encoding"], "opus");
    for (i, packet) in packets.iter().enumerate() {
        if let Some(payload) = edit(i, packet) {
            client
                .send_binary(seq_message(i as u32, i as u64 * 320, &payload))
                .await;
        }
    }
    client.stop().await
}

#[tokio::test]
async fn opus_packets_match_opusdec() {
    let server = Server::start();
    let packets = ogg_packets_independently(&fixture("speech-opusenc.opus"));
    let transcript = stream_packets(&server, &packets, |_, p| Some(p.to_vec())).await;
    assert_matches_reference(&transcript, "speech-opusenc-ref16k.wav");
    assert_eq!(recorded(&transcript).samples.len(), packets.len() * 320);
}

#[tokio::test]
async fn damaged_opus_packets_are_concealed_counted_and_reported() {
    let server = Server::start();
    let packets = ogg_packets_independently(&fixture("speech-opusenc.opus"));
    let transcript = stream_packets(&server, &packets, |i, p| match i {
        40 => Some(vec![0xFF]), // code-3 TOC without its frame count
        41 => Some(vec![]),     // empty packet
        60..=62 => None,        // lost: a seq gap, concealed
        _ => Some(p.to_vec()),
    })
    .await;
    assert_eq!(transcript.close_code(), 1000);
    let warning = transcript.one("error");
    assert_eq!(warning["code"], "audio_damaged");
    assert_eq!(warning["fatal"], false);
    let closed = transcript.one("closed");
    assert_eq!(closed["damaged_packets"], 2);
    assert_eq!(closed["concealed_frames"], 5 * 320);
    assert_eq!(closed["gap_frames"], 3 * 320);
    // The final stats count each filled frame once (gaps concealed by
    // Opus are not also counted as silence).
    let stats = transcript.of_type("stats");
    assert_eq!(stats.last().unwrap()["concealed_frames"], 5 * 320);
    // Media time is intact, and the speech is still the speech.
    let wav = recorded(&transcript);
    assert_eq!(wav.samples.len(), packets.len() * 320);
    let reference = read_wav_i16(&fixture("speech-opusenc-ref16k.wav")).samples;
    let (correlation, _) = aligned_correlation(&wav.samples, &reference, 480);
    assert!(correlation > 0.9, "correlation {correlation}");
}

#[tokio::test]
async fn corrupted_ogg_page_is_skipped_and_the_session_survives() {
    let server = Server::start();
    let mut bytes = std::fs::read(fixture("speech-opusenc.opus")).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 8] {
        *b ^= 0x5A;
    }
    let transcript = stream_container(
        &server,
        "encoding=ogg_opus&sample_rate=16000",
        &bytes,
        &[800],
    )
    .await;
    assert_eq!(transcript.close_code(), 1000, "{:#?}", transcript.messages);
    assert!(
        transcript.one("closed")["damaged_packets"]
            .as_u64()
            .unwrap()
            >= 1
    );
    let warning = transcript.one("error");
    assert_eq!(warning["code"], "audio_damaged");
    assert_eq!(warning["fatal"], false);
    assert!(
        recorded(&transcript).samples.len() > 16000,
        "audio after the damage kept"
    );
}

#[tokio::test]
async fn wrong_or_broken_containers_close_with_their_codes() {
    let server = Server::start();
    let webm = std::fs::read(fixture("speech-ffmpeg.webm")).unwrap();
    let ogg = std::fs::read(fixture("speech-opusenc.opus")).unwrap();
    for (query, bytes, code, close) in [
        (
            "encoding=ogg_opus",
            webm.clone(),
            "unsupported_container",
            1003,
        ),
        (
            "encoding=webm_opus",
            ogg.clone(),
            "unsupported_container",
            1003,
        ),
        (
            "encoding=ogg_opus",
            b"this is not audio at all".to_vec(),
            "malformed_container",
            1007,
        ),
        (
            "encoding=webm_opus",
            vec![0x42; 64],
            "malformed_container",
            1007,
        ),
    ] {
        let mut client = Client::connect(&server, query).await;
        client.send_binary(bytes).await;
        client.finish().await.assert_error(code, close);
    }
    for (query, code, close) in [
        ("encoding=ogg_opus&channels=2", "invalid_message", 1002),
        (
            "encoding=webm_opus&framing=seq",
            "unsupported_framing",
            1003,
        ),
        (
            "encoding=opus&sample_rate=44100",
            "unsupported_sample_rate",
            1003,
        ),
    ] {
        Client::connect(&server, query)
            .await
            .finish()
            .await
            .assert_error(code, close);
    }
    // A start message works for Opus too.
    let mut client = Client::connect(&server, "").await;
    client
        .send_json(json!({"type": "start", "encoding": "opus", "channels": 1}))
        .await;
    assert_eq!(
        client.expect("started").await["format"]["sample_rate"],
        48000
    );
    client.stop().await;
    assert_server_still_serves(&server).await;
}

/// Length of the Ogg page at the start of `bytes`: header, lacing, body.
fn ogg_page_len(bytes: &[u8]) -> usize {
    let segments = usize::from(bytes[26]);
    27 + segments
        + bytes[27..27 + segments]
            .iter()
            .map(|&l| usize::from(l))
            .sum::<usize>()
}

#[tokio::test]
async fn hostile_containers_close_with_limit_exceeded() {
    let server = Server::start();
    // WebM: the fixture's header (unknown-size Segment, Opus on track 1),
    // then an unknown-size Cluster and a SimpleBlock on track 1 declaring
    // 2,000,000 bytes: over the 1 MiB the demuxer would buffer.
    let webm = std::fs::read(fixture("speech-ffmpeg.webm")).unwrap();
    let cluster = webm
        .windows(4)
        .position(|w| w == [0x1F, 0x43, 0xB6, 0x75])
        .unwrap();
    let mut big_block = webm[..cluster].to_vec();
    big_block.extend([
        0x1F, 0x43, 0xB6, 0x75, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    ]);
    big_block.extend([0xA3, 0x10, 0x1E, 0x84, 0x80, 0x81, 0, 0, 0x80, 0xFC]);
    // Ogg: the fixture's two header pages, then "OggS\0\0" over and over:
    // every 6 bytes a fake page claiming about 6 KiB that fails its CRC, so
    // resynchronising would rescan the input a thousand times over.
    let ogg = std::fs::read(fixture("speech-opusenc.opus")).unwrap();
    let head = ogg_page_len(&ogg);
    let headers = head + ogg_page_len(&ogg[head..]);
    let mut fake_pages = ogg[..headers].to_vec();
    while fake_pages.len() < 60_000 {
        fake_pages.extend_from_slice(b"OggS\0\0");
    }
    for (query, bytes, bound) in [
        ("encoding=webm_opus", big_block, "limit of 1048576 bytes"),
        ("encoding=ogg_opus", fake_pages, "rescanning"),
    ] {
        let mut client = Client::connect(&server, query).await;
        client.send_binary(bytes).await;
        let transcript = client.finish().await;
        transcript.assert_error("limit_exceeded", 1008);
        let message = transcript.one("error")["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains(bound), "{query}: {message}");
    }
    assert_server_still_serves(&server).await;
}

/// libopus on its own: `packets` decoded one after the other at `rate_hz`,
/// mono, converted to 16-bit as the recorder converts
/// (`(s * 32768).round().clamp(..)`).
fn libopus_decode_i16(packets: &[Vec<u8>], rate_hz: u32) -> Vec<i16> {
    let mut decoder = opus::Decoder::new(rate_hz, opus::Channels::Mono).unwrap();
    let mut buffer = vec![0f32; rate_hz as usize * 120 / 1000];
    let mut samples = Vec::new();
    for packet in packets {
        let frames = decoder.decode_float(packet, &mut buffer, false).unwrap();
        samples.extend(
            buffer[..frames]
                .iter()
                .map(|s| (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16),
        );
    }
    samples
}

/// Sends 20 ms Opus packets declared at 48 kHz, `seq` timestamps at 48 kHz;
/// packets in `lost` are never sent.
async fn stream_packets_48k(server: &Server, packets: &[Vec<u8>], lost: &[usize]) -> Transcript {
    let mut client = Client::connect(server, "encoding=opus&sample_rate=48000&framing=seq").await;
    assert_eq!(
        client.expect("started").await["format"]["sample_rate"],
        48000
    );
    for (i, packet) in packets.iter().enumerate() {
        if !lost.contains(&i) {
            client
                .send_binary(seq_message(i as u32, i as u64 * 960, packet))
                .await;
        }
    }
    client.stop().await
}

/// Recorded at 16 kHz, a 48 kHz Opus stream is decoded by libopus straight
/// at 16 kHz: the recording is, sample for sample, what libopus gives at
/// 16 kHz (after 48 kHz decoding and resampling it could not be), while
/// everything counted in the stream's frames stays at 48 kHz.
#[tokio::test]
async fn opus_at_48k_recorded_at_16k_is_decoded_at_16k() {
    let server = Server::start_with(&["--recorder-sample-rate", "16000"], &[]);
    let packets = ogg_packets_independently(&fixture("speech-opusenc.opus"));
    let transcript = stream_packets_48k(&server, &packets, &[]).await;
    assert_eq!(transcript.close_code(), 1000, "{:#?}", transcript.messages);
    let wav = recorded(&transcript);
    assert_eq!((wav.spec.sample_rate, wav.spec.channels), (16000, 1));
    let direct = libopus_decode_i16(&packets, 16_000);
    assert_eq!(direct.len(), packets.len() * 320);
    assert!(wav.samples == direct, "not libopus's own 16 kHz decode");
    let recording = transcript.one("recording");
    assert_eq!(recording["sample_rate"], 16000);
    assert_eq!(recording["sample_frames"], packets.len() * 320);
    let duration = recording["duration_seconds"].as_f64().unwrap();
    assert!(
        (duration - packets.len() as f64 * 0.02).abs() < 1e-9,
        "{duration}"
    );
    // The session's own media time is in the stream's 48 kHz frames.
    let closed = transcript.one("closed");
    assert_eq!(closed["sample_frames"], packets.len() * 960);
    let media = closed["duration_seconds"].as_f64().unwrap();
    assert!(
        (media - packets.len() as f64 * 0.02).abs() < 1e-9,
        "{media}"
    );
    let stats = transcript.of_type("stats");
    let media = stats.last().unwrap()["media_seconds"].as_f64().unwrap();
    assert!(
        (media - packets.len() as f64 * 0.02).abs() < 1e-9,
        "{media}"
    );

    // Three packets lost: the gap is counted in 48 kHz frames, concealed at
    // 16 kHz, and the recording keeps its length.
    let transcript = stream_packets_48k(&server, &packets, &[60, 61, 62]).await;
    assert_eq!(transcript.close_code(), 1000, "{:#?}", transcript.messages);
    let closed = transcript.one("closed");
    assert_eq!(closed["gap_frames"], 3 * 960);
    assert_eq!(closed["concealed_frames"], 3 * 960);
    let stats = transcript.of_type("stats");
    assert_eq!(stats.last().unwrap()["packets_lost"], 3);
    assert_eq!(stats.last().unwrap()["concealed_frames"], 3 * 960);
    let wav = recorded(&transcript);
    assert_eq!(wav.samples.len(), packets.len() * 320);
    // Before the gap, still libopus's 16 kHz decode exactly.
    assert_eq!(wav.samples[..60 * 320], direct[..60 * 320]);
    let (correlation, _) = aligned_correlation(&wav.samples, &direct, 480);
    assert!(correlation > 0.9, "correlation {correlation}");
}

/// With the recorder keeping the stream's own 48 kHz, Opus is still decoded
/// at 48 kHz, and the recording is libopus's 48 kHz decode.
#[tokio::test]
async fn opus_at_48k_recorded_at_48k_is_decoded_at_48k() {
    let server = Server::start();
    let packets = ogg_packets_independently(&fixture("speech-opusenc.opus"));
    let transcript = stream_packets_48k(&server, &packets, &[]).await;
    assert_eq!(transcript.close_code(), 1000, "{:#?}", transcript.messages);
    let wav = recorded(&transcript);
    assert_eq!(wav.spec.sample_rate, 48000);
    assert_eq!(transcript.one("recording")["sample_rate"], 48000);
    let direct = libopus_decode_i16(&packets, 48_000);
    assert_eq!(direct.len(), packets.len() * 960);
    assert!(wav.samples == direct, "not libopus's own 48 kHz decode");
}
