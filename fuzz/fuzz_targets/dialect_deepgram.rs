//! `/v1/listen` (Deepgram live streaming): the query (`encoding`,
//! `sample_rate`, `channels`, Deepgram's options), the JSON control messages
//! (`KeepAlive`, `Finalize`, `CloseStream`, `Configure`), and binary audio:
//! raw, or without `encoding` a WAV, Ogg or WebM stream recognized from its
//! first bytes (sniffing, WAV headers included).
//! Input and common checks: `common/dialect.rs`.
//!
//! Checked: raw PCM and G.711 (given in the query or read from a WAV
//! header) are handed on in whole sample frames only, never empty.
#![no_main]
use libfuzzer_sys::fuzz_target;

use cochlea::protocol::Framing;
use cochlea::server::dialect::DialectKind;

#[path = "common/dialect.rs"]
mod dialect;

fuzz_target!(|data: &[u8]| {
    let run = dialect::drive(DialectKind::Deepgram, data);
    let Some(format) = run.format else {
        return;
    };
    assert_eq!(format.framing, Framing::Raw);
    let Some(frame_bytes) = format.bytes_per_frame() else {
        return;
    };
    for message in &run.audio {
        assert!(
            !message.is_empty() && message.len() % frame_bytes == 0,
            "{} bytes of {:?} handed on: not whole {frame_bytes}-byte frames",
            message.len(),
            format.encoding
        );
    }
});
