//! `/audiofork` (FreeSWITCH mod_audio_fork): `mix_type` and
//! `sampling_rate` in the query, an optional metadata text message (JSON or
//! not), then binary L16 audio and further text.
//! Input and common checks: `common/dialect.rs`.
//!
//! Checked: a started stream is `pcm_s16le`, mono or stereo, at 8 or 16 kHz,
//! raw.
#![no_main]
use libfuzzer_sys::fuzz_target;

use cochlea::protocol::{Encoding, Framing};
use cochlea::server::dialect::DialectKind;

#[path = "common/dialect.rs"]
mod dialect;

fuzz_target!(|data: &[u8]| {
    let run = dialect::drive(DialectKind::AudioFork, data);
    if let Some(format) = run.format {
        assert_eq!(
            (format.encoding, format.framing),
            (Encoding::PcmS16le, Framing::Raw)
        );
        assert!(matches!(format.sample_rate, 8000 | 16000), "{format:?}");
    }
});
