//! Many sessions at once, each with its own audio, each recorded correctly.

use std::path::Path;

use crate::harness::*;

#[tokio::test]
async fn two_hundred_concurrent_sessions_each_get_their_own_recording() {
    const SESSIONS: usize = 200;
    let server = Server::start();
    let speech = read_wav_i16(&fixture("speech-16k.wav")).samples;
    // Two seconds each, a different slice of the speech and a different gain
    // per session, so a crossed wire between sessions cannot go unnoticed.
    let inputs: Vec<Vec<i16>> = (0..SESSIONS)
        .map(|i| {
            let offset = (i * 173) % (speech.len() - 32000);
            speech[offset..offset + 32000]
                .iter()
                .map(|&s| (i32::from(s) * (i as i32 % 7 + 1) / 8) as i16)
                .collect()
        })
        .collect();

    let mut tasks = Vec::new();
    for (i, samples) in inputs.iter().cloned().enumerate() {
        let url_query = "encoding=pcm_s16le&sample_rate=16000".to_owned();
        let server_ref = &server;
        let mut client = Client::connect(server_ref, &url_query).await;
        tasks.push(tokio::spawn(async move {
            client.expect("started").await;
            let bytes = s16_bytes(&samples);
            for chunk in bytes.chunks(640) {
                client.send_binary(chunk.to_vec()).await;
                // Interleave the sessions on the wire.
                tokio::task::yield_now().await;
            }
            (i, client.stop().await)
        }));
    }
    let mut ok = 0;
    for task in tasks {
        let (i, transcript) = task.await.expect("session task");
        assert_eq!(transcript.close_code(), 1000, "session {i}");
        let path = transcript.one("recording")["path"]
            .as_str()
            .unwrap()
            .to_owned();
        let wav = read_wav_i16(Path::new(&path));
        assert!(wav.samples == inputs[i], "session {i} recording is wrong");
        ok += 1;
    }
    assert_eq!(ok, SESSIONS);
    let files = std::fs::read_dir(server.recordings_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "wav"))
        })
        .count();
    assert_eq!(files, SESSIONS, "one WAV per session");
}
