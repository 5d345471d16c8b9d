//! Final transcripts kept beside the recordings, one JSON object per line in
//! `<session_id>.transcript.jsonl`, so that the recordings API
//! (`GET /v1/recordings/<id>`) can return them after the session.
//!
//! Each line is the `transcript` message the client got, as sent. Lines are
//! appended (never rewritten) on tokio's blocking pool, so a slow disk holds
//! up only the orderer task of its own session, never an async worker or the
//! audio path. A file that cannot be written costs the kept copy only: the
//! client still gets every transcript, and the failure is logged.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::protocol::ServerMessage;
use crate::storage::upload::Uploader;

/// The file name suffix of a session's kept transcripts.
pub const TRANSCRIPT_SUFFIX: &str = ".transcript.jsonl";

/// One session's transcript file.
pub struct TranscriptLog {
    path: PathBuf,
    /// With an object store: `dir` is the spool, and the file goes up when
    /// the session's transcription ends.
    uploader: Option<Arc<Uploader>>,
}

impl TranscriptLog {
    /// The log of session `session_id` (a server-made id) in `dir`.
    pub fn new(dir: &Path, session_id: &str, uploader: Option<Arc<Uploader>>) -> Self {
        Self {
            path: dir.join(format!("{session_id}{TRANSCRIPT_SUFFIX}")),
            uploader,
        }
    }

    /// No transcript will follow: with an object store, the file (if there
    /// is one) is uploaded beside the recordings and leaves the spool.
    pub async fn close(self) {
        let Some(uploader) = self.uploader else {
            return;
        };
        let path = self.path.clone();
        let exists = tokio::task::spawn_blocking(move || path.exists())
            .await
            .unwrap_or(false);
        if let (true, Some(name)) = (exists, self.path.file_name()) {
            uploader.upload_file(&name.to_string_lossy());
        }
    }

    /// Appends `messages`, one line each, in one write.
    pub async fn append(&self, messages: Vec<ServerMessage>) {
        let mut lines = Vec::new();
        for message in &messages {
            match serde_json::to_writer(&mut lines, message) {
                Ok(()) => lines.push(b'\n'),
                Err(error) => tracing::warn!(%error, "transcript not kept: cannot encode it"),
            }
        }
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
            file.write_all(&lines)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(path = %self.path.display(), %error, "transcript not kept")
            }
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "transcript not kept")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Transcript;

    fn transcript(id: u64, text: &str) -> ServerMessage {
        ServerMessage::Transcript(Transcript {
            utterance_id: id,
            channel: 1,
            start: 0.5,
            end: 1.25,
            text: text.into(),
            stable_text: None,
            is_final: true,
            words: None,
            backend: "default".into(),
            backend_ms: 7,
        })
    }

    #[tokio::test]
    async fn transcripts_are_appended_one_json_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let log = TranscriptLog::new(dir.path(), "s1", None);
        log.append(vec![transcript(0, "hello")]).await;
        log.append(vec![transcript(1, "one\ntwo"), transcript(2, "three")])
            .await;
        let text = std::fs::read_to_string(dir.path().join("s1.transcript.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["type"], "transcript");
        assert_eq!(lines[0]["text"], "hello");
        assert_eq!(lines[1]["text"], "one\ntwo");
        assert_eq!(lines[2]["utterance_id"], 2);
        assert_eq!(lines[2]["start"], 0.5);
        assert_eq!(lines[2]["channel"], 1);
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_written_costs_only_the_kept_copy() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: the open fails.
        std::fs::create_dir(dir.path().join("s2.transcript.jsonl")).unwrap();
        TranscriptLog::new(dir.path(), "s2", None)
            .append(vec![transcript(0, "lost")])
            .await;
        assert!(dir.path().join("s2.transcript.jsonl").is_dir());
    }
}
