//! Loss-free resume, acks and stats: a client that loses its connection
//! reconnects with its token, resends from `resume_from_seq`, and the
//! session goes on as one recording.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::MaybeTlsStream;

use crate::harness::*;

/// A `framing=seq` client that keeps what it sent, as PROTOCOL.md's resume
/// algorithm asks, and can drop its connection the hard way.
struct ResumingClient<'a> {
    server: &'a Server,
    client: Option<Client>,
    session_id: String,
    token: String,
    /// Every message sent, by seq (the test keeps them all; a real client
    /// may forget what has been acknowledged).
    sent: Vec<Vec<u8>>,
    /// Every server message, across connections.
    seen: Vec<Value>,
    resumes: usize,
}

impl<'a> ResumingClient<'a> {
    async fn start(server: &'a Server, query: &str) -> ResumingClient<'a> {
        let mut client = Client::connect(server, query).await;
        let started = client.expect("started").await;
        ResumingClient {
            server,
            session_id: started["session_id"].as_str().unwrap().to_owned(),
            token: started["resume_token"]
                .as_str()
                .expect("seq sessions get a resume token")
                .to_owned(),
            client: Some(client),
            sent: Vec::new(),
            // The client's own log already holds `started`.
            seen: Vec::new(),
            resumes: 0,
        }
    }

    async fn send(&mut self, message: Vec<u8>) {
        self.sent.push(message.clone());
        self.client.as_mut().unwrap().send_binary(message).await;
    }

    /// Drops the TCP connection with a reset, as a dying network does: what
    /// was in flight may be lost.
    fn drop_connection(&mut self) {
        let client = self.client.take().unwrap();
        if let MaybeTlsStream::Plain(tcp) = client.ws.get_ref() {
            tcp.set_zero_linger().unwrap();
        }
        self.seen.extend(client.received);
    }

    /// Reconnects and resends everything from where the server says.
    async fn resume(&mut self) -> u32 {
        let query = format!("resume={}&resume_token={}", self.session_id, self.token);
        let mut client = Client::connect(self.server, &query).await;
        let started = client.expect("started").await;
        assert_eq!(started["session_id"], self.session_id.as_str());
        let from = started["resume_from_seq"]
            .as_u64()
            .expect("resume_from_seq") as u32;
        assert!(
            from as usize <= self.sent.len(),
            "server claims more than was sent"
        );
        for message in &self.sent[from as usize..] {
            client.send_binary(message.clone()).await;
        }
        self.client = Some(client);
        self.resumes += 1;
        from
    }

    async fn stop(mut self) -> Transcript {
        let transcript = self.client.take().unwrap().stop().await;
        self.seen.extend(transcript.messages);
        Transcript {
            messages: self.seen,
            close: transcript.close,
        }
    }
}

/// 60 s of distinct audio: the speech fixture repeated with a different
/// gain each time, so a duplicated or missing frame cannot hide.
fn sixty_seconds() -> Vec<i16> {
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    (0..60 * 16000)
        .map(|i| {
            let round = (i / speech.len()) as i32;
            (i32::from(speech[i % speech.len()]) * (8 + round % 5) / 12) as i16
        })
        .collect()
}

/// These tests send a minute of audio as fast as the socket takes it: a
/// replay, not a live call, so the real-time limit is off (PROTOCOL.md §9's
/// resume, not pacing, is what they test).
fn replay_server() -> Server {
    Server::start_with(&["--max-realtime-factor", "0"], &[])
}

#[tokio::test]
async fn sixty_seconds_with_three_disconnects_is_sample_exact() {
    let server = replay_server();
    let samples = sixty_seconds();
    let frames: Vec<&[i16]> = samples.chunks(320).collect();
    let mut client =
        ResumingClient::start(&server, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    let disconnect_at = [700, 1500, 2400];
    let mut resumed_from = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        if disconnect_at.contains(&i) {
            client.drop_connection();
            resumed_from.push(client.resume().await);
        }
        client
            .send(seq_message(i as u32, i as u64 * 320, &s16_bytes(frame)))
            .await;
    }
    let transcript = client.stop().await;
    eprintln!("resumed from seq {resumed_from:?} (disconnects after seq {disconnect_at:?})");
    assert_eq!(
        transcript.close_code(),
        1000,
        "{:#?}",
        transcript.of_type("error")
    );
    assert_eq!(transcript.of_type("started").len(), 4);
    let closed = transcript.one("closed");
    assert_eq!(closed["gap_frames"], 0, "nothing was missing");
    let recording = transcript.one("recording");
    let wav = read_wav_i16(Path::new(recording["path"].as_str().unwrap()));
    assert_eq!(
        wav.samples.len(),
        samples.len(),
        "no audio missing or duplicated"
    );
    assert!(wav.samples == samples, "recording differs from the source");
    let stats = transcript.of_type("stats");
    assert_eq!(stats.last().unwrap()["resumes"], 3);
    // Duplicates are the resent messages the server already had.
    assert_eq!(
        closed["duplicate_messages"].as_u64().unwrap(),
        stats.last().unwrap()["packets_duplicated"]
            .as_u64()
            .unwrap()
    );
}

#[tokio::test]
async fn opus_resume_keeps_exact_duration_and_the_same_audio() {
    let server = replay_server();
    let packets: Vec<Vec<u8>> = ogg_packets_independently(&fixture("speech-opusenc.opus"));
    // 24 rounds of the 2.5 s fixture: 60 s of packets.
    let stream: Vec<&Vec<u8>> = (0..24).flat_map(|_| packets.iter()).collect();
    let query = "encoding=opus&sample_rate=16000&framing=seq";

    // Once straight through, once with three disconnects.
    let mut reference = ResumingClient::start(&server, query).await;
    for (i, p) in stream.iter().enumerate() {
        reference
            .send(seq_message(i as u32, i as u64 * 320, p))
            .await;
    }
    let reference = reference.stop().await;
    let mut client = ResumingClient::start(&server, query).await;
    for (i, p) in stream.iter().enumerate() {
        if [500, 1400, 2500].contains(&i) {
            client.drop_connection();
            client.resume().await;
        }
        client.send(seq_message(i as u32, i as u64 * 320, p)).await;
    }
    let resumed = client.stop().await;
    assert_eq!(resumed.close_code(), 1000);

    let a = read_wav_i16(Path::new(
        reference.one("recording")["path"].as_str().unwrap(),
    ))
    .samples;
    let b = read_wav_i16(Path::new(
        resumed.one("recording")["path"].as_str().unwrap(),
    ))
    .samples;
    assert_eq!(b.len(), stream.len() * 320, "exact duration");
    assert_eq!(a.len(), b.len());
    let (dot, na, nb) = a
        .iter()
        .zip(&b)
        .fold((0f64, 0f64, 0f64), |(d, x, y), (&p, &q)| {
            let (p, q) = (f64::from(p), f64::from(q));
            (d + p * q, x + p * p, y + q * q)
        });
    let correlation = dot / (na.sqrt() * nb.sqrt());
    eprintln!("opus resume: correlation with the uninterrupted run {correlation:.6}");
    assert!(correlation >= 0.99, "correlation {correlation}");
}

/// A live client (20 ms every 20 ms) loses its connection for 1.5 s, goes on
/// capturing meanwhile, then resumes and sends its backlog at once. That
/// catch-up is not "too fast", under the default limit and even with a burst
/// (0.5 s) smaller than the backlog: the allowance counts from the first
/// audio, so the time lost to the drop is room to catch up.
#[tokio::test]
async fn a_live_client_catching_up_after_a_dropped_connection_is_not_too_fast() {
    let server = Server::start_with(&["--realtime-burst-ms", "500"], &[]);
    let samples: Vec<i16> = (0..3 * 16000)
        .map(|i| ((i * 3) % 4000 - 2000) as i16)
        .collect();
    let frames: Vec<&[i16]> = samples.chunks(320).collect();
    let message = |i: usize| seq_message(i as u32, i as u64 * 320, &s16_bytes(frames[i]));
    let mut client =
        ResumingClient::start(&server, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for i in 0..50 {
        tick.tick().await;
        client.send(message(i)).await;
    }
    client.drop_connection();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.resume().await;
    // 1.5 s captured while disconnected, at once.
    for i in 50..125 {
        client.send(message(i)).await;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for i in 125..frames.len() {
        tick.tick().await;
        client.send(message(i)).await;
    }
    let transcript = client.stop().await;
    let errors = transcript.of_type("error");
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(transcript.close_code(), 1000);
    let wav = read_wav_i16(Path::new(
        transcript.one("recording")["path"].as_str().unwrap(),
    ));
    assert!(wav.samples == samples, "recording differs from the source");
}

#[tokio::test]
async fn wrong_token_is_refused_with_1008_and_the_session_survives() {
    let server = Server::start();
    let samples: Vec<i16> = (0..16000).map(|i| ((i * 7) % 3000 - 1500) as i16).collect();
    let frames: Vec<&[i16]> = samples.chunks(320).collect();
    let mut client =
        ResumingClient::start(&server, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    for (i, frame) in frames.iter().enumerate().take(25) {
        client
            .send(seq_message(i as u32, i as u64 * 320, &s16_bytes(frame)))
            .await;
    }
    client.drop_connection();
    let forged = format!(
        "resume={}&resume_token={}",
        client.session_id,
        "0".repeat(32)
    );
    Client::connect(&server, &forged)
        .await
        .finish()
        .await
        .assert_refused("resume_rejected", 1008);
    let unknown = format!(
        "resume=01a1fe86-11f8-744a-b1a9-f94618f3e383&resume_token={}",
        client.token
    );
    Client::connect(&server, &unknown)
        .await
        .finish()
        .await
        .assert_refused("resume_rejected", 1008);
    // The real client still gets its session back, whole.
    client.resume().await;
    for (i, frame) in frames.iter().enumerate().skip(25) {
        client
            .send(seq_message(i as u32, i as u64 * 320, &s16_bytes(frame)))
            .await;
    }
    let transcript = client.stop().await;
    let wav = read_wav_i16(Path::new(
        transcript.one("recording")["path"].as_str().unwrap(),
    ));
    assert!(wav.samples == samples);
}

/// A refusal must not tell a caller whether a session id is live: a wrong
/// token for a parked session and any token for an unknown id get the same
/// error, word for word, apart from the id the caller sent.
#[tokio::test]
async fn a_wrong_token_and_an_unknown_session_are_refused_alike() {
    let server = Server::start();
    let samples: Vec<i16> = (0..3200).map(|i| ((i * 13) % 2000 - 1000) as i16).collect();
    let mut client =
        ResumingClient::start(&server, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    for (i, frame) in samples.chunks(320).enumerate() {
        client
            .send(seq_message(i as u32, i as u64 * 320, &s16_bytes(frame)))
            .await;
    }
    client.drop_connection();
    let live = client.session_id.clone();
    let unknown = "01a1fe86-11f8-744a-b1a9-f94618f3e383";
    let guess = "0".repeat(32);
    let mut refusals = Vec::new();
    for id in [live.as_str(), unknown] {
        let transcript = Client::connect(&server, &format!("resume={id}&resume_token={guess}"))
            .await
            .finish()
            .await;
        transcript.assert_refused("resume_rejected", 1008);
        let error = transcript
            .one("error")
            .to_string()
            .replace(id, "<session id>");
        refusals.push((error, transcript.close.clone()));
    }
    assert_eq!(refusals[0], refusals[1]);
    // The log still tells the operator which it was.
    assert!(server.log().contains("wrong_token"), "{}", server.log());
    // And the real client gets its session back, whole.
    client.resume().await;
    let transcript = client.stop().await;
    let wav = read_wav_i16(Path::new(
        transcript.one("recording")["path"].as_str().unwrap(),
    ));
    assert!(wav.samples == samples);
}

#[tokio::test]
async fn an_expired_window_finishes_the_session_as_if_stopped() {
    let server = Server::start_with(&["--resume-window-ms", "300"], &[]);
    let samples: Vec<i16> = (0..8000).map(|i| ((i * 11) % 2000 - 1000) as i16).collect();
    let mut client =
        ResumingClient::start(&server, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    for (i, frame) in samples.chunks(320).enumerate() {
        client
            .send(seq_message(i as u32, i as u64 * 320, &s16_bytes(frame)))
            .await;
    }
    // Leave with a clean close, so every frame is known to have arrived.
    let mut ws = client.client.take().unwrap();
    ws.send_json(json!({"type": "keepalive"})).await;
    ws.ws.close(None).await.unwrap();
    let id = client.session_id.clone();
    let sidecar = server.recordings_dir().join(format!("{id}.json"));
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let complete = std::fs::read_to_string(&sidecar)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|v| v["complete"] == true);
        if complete {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wav = read_wav_i16(&server.recordings_dir().join(format!("{id}.wav")));
    assert!(wav.samples == samples);
    // And it can no longer be resumed.
    let late = format!("resume={id}&resume_token={}", client.token);
    Client::connect(&server, &late)
        .await
        .finish()
        .await
        .assert_refused("resume_rejected", 1008);
}

#[tokio::test]
async fn acks_cover_everything_and_stats_count_drops_exactly() {
    let server = Server::start_with(&["--stats-interval-ms", "200"], &[]);
    let samples: Vec<i16> = (0..3 * 16000)
        .map(|i| ((i * 5) % 4000 - 2000) as i16)
        .collect();
    let frames: Vec<&[i16]> = samples.chunks(320).collect();
    // 2 % client-side drops, at seeded random places.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut dropped = Vec::new();
    let mut client =
        Client::connect(&server, "encoding=pcm_s16le&sample_rate=16000&framing=seq").await;
    client.expect("started").await;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for (i, frame) in frames.iter().enumerate() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Keep the last frame, so the stream's media duration is known.
        if seed % 100 < 2 && i + 1 < frames.len() {
            dropped.push(i);
            continue;
        }
        tick.tick().await;
        client
            .send_binary(seq_message(i as u32, i as u64 * 320, &s16_bytes(frame)))
            .await;
    }
    let transcript = client.stop().await;
    assert!(!dropped.is_empty());
    let acks: Vec<u64> = transcript
        .of_type("ack")
        .iter()
        .map(|a| a["seq"].as_u64().unwrap())
        .collect();
    assert!(acks.len() >= 2, "acks while streaming: {acks:?}");
    assert!(
        acks.windows(2).all(|w| w[0] < w[1]),
        "acks increase: {acks:?}"
    );
    assert_eq!(
        *acks.last().unwrap(),
        frames.len() as u64 - 1,
        "the last ack covers everything"
    );

    let stats = transcript.of_type("stats");
    assert!(stats.len() >= 2, "periodic stats and the final one");
    let last = stats.last().unwrap();
    assert_eq!(last["packets_lost"], dropped.len() as u64);
    assert_eq!(last["concealed_frames"], dropped.len() as u64 * 320);
    assert_eq!(
        last["packets_received"],
        (frames.len() - dropped.len()) as u64
    );
    let (_, metrics) = server.get("/metrics");
    let lost_metric = format!("cochlea_jitter_lost_packets_total {}", dropped.len());
    assert!(metrics.contains(&lost_metric), "missing {lost_metric:?}");
    let wav = read_wav_i16(Path::new(
        transcript.one("recording")["path"].as_str().unwrap(),
    ));
    assert_eq!(
        wav.samples.len(),
        samples.len(),
        "duration equals media duration to the sample"
    );
    let mut expected = samples.clone();
    for &i in &dropped {
        expected[i * 320..(i + 1) * 320].fill(0);
    }
    assert!(wav.samples == expected);
}

/// Issue 14 part 6: a client that resumes with its old URL plus `resume=`
/// and `resume_token=` (the session's own format parameters repeated) is
/// taken back; a parameter that differs from the session's is refused with
/// a message naming it, and the session is not disturbed.
#[tokio::test]
async fn a_resume_may_repeat_the_session_s_parameters_but_not_change_them() {
    let server = Server::start();
    let query = "encoding=pcm_s16le&sample_rate=16000&framing=seq";
    let samples: Vec<i16> = (0..16000).map(|i| ((i * 5) % 2000 - 1000) as i16).collect();
    let frames: Vec<&[i16]> = samples.chunks(320).collect();
    let mut client = ResumingClient::start(&server, query).await;
    for (i, frame) in frames.iter().enumerate().take(25) {
        client
            .send(seq_message(i as u32, i as u64 * 320, &s16_bytes(frame)))
            .await;
    }
    client.drop_connection();
    let resume = format!("resume={}&resume_token={}", client.session_id, client.token);
    // Another rate than the session's: refused, naming the parameter.
    let changed = format!("encoding=pcm_s16le&sample_rate=8000&framing=seq&{resume}");
    let refused = Client::connect(&server, &changed).await.finish().await;
    refused.assert_refused("resume_rejected", 1008);
    let message = refused.one("error")["message"].as_str().unwrap().to_owned();
    assert!(message.contains("sample_rate"), "{message}");
    // The old URL plus the resume parameters: taken back, one recording.
    let mut again = Client::connect(&server, &format!("{query}&{resume}")).await;
    let started = again.expect("started").await;
    assert_eq!(started["session_id"], client.session_id.as_str());
    let from = started["resume_from_seq"].as_u64().unwrap() as usize;
    for (i, frame) in frames.iter().enumerate().skip(from) {
        again
            .send_binary(seq_message(i as u32, i as u64 * 320, &s16_bytes(frame)))
            .await;
    }
    let transcript = again.stop().await;
    let wav = read_wav_i16(Path::new(
        transcript.one("recording")["path"].as_str().unwrap(),
    ));
    assert!(wav.samples == samples);
}
