//! `/twilio` (Twilio Media Streams): JSON text messages, base64 μ-law in
//! `media`, one or two tracks laid on one timeline by the interleaver.
//! Input and common checks: `common/dialect.rs`.
//!
//! Checked: every audio message is a `framing=seq` message (12-byte header)
//! of whole stereo/mono μ-law frames, at most 1 s long; seq numbers count up
//! from 0 by one; no media time is handed on twice (each message starts at
//! or after the end of the one before).
#![no_main]
use libfuzzer_sys::fuzz_target;

use cochlea::protocol::{Encoding, Framing, SeqHeader, SEQ_HEADER_BYTES};
use cochlea::server::dialect::DialectKind;

#[path = "common/dialect.rs"]
mod dialect;

fuzz_target!(|data: &[u8]| {
    let run = dialect::drive(DialectKind::Twilio, data);
    let Some(format) = run.format else {
        assert!(run.audio.is_empty(), "audio without a resolved start");
        return;
    };
    assert_eq!(
        (format.encoding, format.sample_rate, format.framing),
        (Encoding::Mulaw, 8000, Framing::Seq)
    );
    let channels = usize::from(format.channels);
    let mut end = 0u64;
    for (i, message) in run.audio.iter().enumerate() {
        let (header, payload) =
            SeqHeader::parse(message).expect("twilio audio without a seq header");
        assert_eq!(message.len() - payload.len(), SEQ_HEADER_BYTES);
        assert_eq!(u64::from(header.seq), i as u64, "seq numbers skip");
        assert!(!payload.is_empty() && payload.len() % channels == 0);
        let frames = (payload.len() / channels) as u64;
        assert!(frames <= 8000, "a message of {frames} frames");
        assert!(
            header.timestamp >= end,
            "media time {} handed on twice (up to {end})",
            header.timestamp
        );
        end = header
            .timestamp
            .checked_add(frames)
            .expect("media time past the end of u64");
    }
});
