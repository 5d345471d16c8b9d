//! Which object names are a session's files. Pure.
//!
//! Every name the recordings API accepts from a client is checked here
//! before any key is built: only names of the forms the server itself makes
//! pass, so no request can reach another object.

/// True for a session id exactly as the server makes them: a UUID,
/// lowercase and hyphenated (36 characters).
pub fn is_session_id(text: &str) -> bool {
    text.len() == 36
        && uuid::Uuid::parse_str(text).is_ok_and(|id| id.hyphenated().to_string() == text)
}

/// The suffix of a session's kept transcripts (written by the transcriber).
pub use crate::sinks::transcriber::persist::TRANSCRIPT_SUFFIX;

/// An audio file's container, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioKind {
    Wav,
    Flac,
    /// Ogg/Opus (`.opus`).
    Opus,
}

impl AudioKind {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Wav => "audio/wav",
            Self::Flac => "audio/flac",
            Self::Opus => "audio/ogg",
        }
    }
}

/// What a file of a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `<stem>.json`.
    Sidecar,
    /// `<stem>.wav`, `.flac` or `.opus`.
    Audio(AudioKind),
    /// `<session_id>.transcript.jsonl`.
    Transcript,
}

/// A file name split into its session id, stem and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionFile<'a> {
    pub session_id: &'a str,
    /// The name without its extension (`<id>`, `<id>.ch0`, `<id>.<sink>`).
    pub stem: &'a str,
    pub kind: FileKind,
}

/// Longest part between the id and the extension: a sink instance name
/// (at most 64 characters) or `ch<N>`.
const MAX_PART_CHARS: usize = 64;

/// Splits a server-made file name: `<id>[.<sink>][.ch<N>].<ext>` with ext
/// `json`, `wav`, `flac` or `opus`, or `<id>.transcript.jsonl`. `None` for
/// anything else (temporary files, other names, traversal attempts).
pub fn classify(name: &str) -> Option<SessionFile<'_>> {
    let session_id = name.get(..36)?;
    if !is_session_id(session_id) {
        return None;
    }
    let rest = &name[36..];
    if rest == TRANSCRIPT_SUFFIX {
        return Some(SessionFile {
            session_id,
            stem: session_id,
            kind: FileKind::Transcript,
        });
    }
    let (stem, extension) = name.rsplit_once('.')?;
    let kind = match extension {
        "json" => FileKind::Sidecar,
        "wav" => FileKind::Audio(AudioKind::Wav),
        "flac" => FileKind::Audio(AudioKind::Flac),
        "opus" => FileKind::Audio(AudioKind::Opus),
        _ => return None,
    };
    let middle = stem.get(36..)?;
    if !middle.is_empty() {
        let parts: Vec<&str> = middle.strip_prefix('.')?.split('.').collect();
        let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if parts.len() > 2
            || parts
                .iter()
                .any(|p| p.is_empty() || p.len() > MAX_PART_CHARS || !p.chars().all(allowed))
        {
            return None;
        }
    }
    Some(SessionFile {
        session_id,
        stem,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "01a1fe8b-654d-72fd-99f9-7c0fa87dd94a";

    #[test]
    fn server_made_names_are_classified() {
        let cases = [
            (
                format!("{ID}.wav"),
                ID.to_owned(),
                FileKind::Audio(AudioKind::Wav),
            ),
            (format!("{ID}.json"), ID.to_owned(), FileKind::Sidecar),
            (
                format!("{ID}.ch1.flac"),
                format!("{ID}.ch1"),
                FileKind::Audio(AudioKind::Flac),
            ),
            (
                format!("{ID}.archive.ch0.opus"),
                format!("{ID}.archive.ch0"),
                FileKind::Audio(AudioKind::Opus),
            ),
            (
                format!("{ID}.asr_16k.json"),
                format!("{ID}.asr_16k"),
                FileKind::Sidecar,
            ),
            (
                format!("{ID}.transcript.jsonl"),
                ID.to_owned(),
                FileKind::Transcript,
            ),
        ];
        for (name, stem, kind) in cases {
            let file = classify(&name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(file.session_id, ID);
            assert_eq!(file.stem, stem);
            assert_eq!(file.kind, kind, "{name}");
        }
    }

    #[test]
    fn other_names_are_refused() {
        for bad in [
            format!("{ID}.json.tmp"),
            format!("{ID}.mp3"),
            ID.to_string(),
            format!("{ID}."),
            format!("{ID}..wav"),
            format!("{ID}.a.b.c.wav"),
            format!("{ID}.x/y.wav"),
            format!("{ID}.../wav"),
            format!("../{ID}.wav"),
            format!("{}.wav", ID.to_uppercase()),
            format!("{}.wav", ID.replace('-', "")),
            format!("{ID}x.wav"),
            format!("{ID}.transcript.jsonl.tmp"),
            format!("{ID}.{}.wav", "a".repeat(65)),
            "..%2F..%2Fetc%2Fpasswd.wav".into(),
            "/etc/passwd".into(),
            String::new(),
            "é".repeat(40),
        ] {
            assert_eq!(classify(&bad), None, "{bad}");
        }
        assert!(is_session_id(ID));
        assert!(!is_session_id(&ID.to_uppercase()));
    }

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(AudioKind::Wav.content_type(), "audio/wav");
        assert_eq!(AudioKind::Flac.content_type(), "audio/flac");
        assert_eq!(AudioKind::Opus.content_type(), "audio/ogg");
    }
}
