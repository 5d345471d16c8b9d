//! `/vonage` (Vonage Voice API WebSockets): a `websocket:connected` JSON
//! message whose `content-type` gives the L16 rate, then binary L16 audio.
//! Input and common checks: `common/dialect.rs`.
//!
//! Checked: a started stream is mono `pcm_s16le`, raw (at the content
//! type's rate: any in range, as proto/dialects/vonage.md says).
#![no_main]
use libfuzzer_sys::fuzz_target;

use cochlea::protocol::{Encoding, Framing};
use cochlea::server::dialect::DialectKind;

#[path = "common/dialect.rs"]
mod dialect;

fuzz_target!(|data: &[u8]| {
    let run = dialect::drive(DialectKind::Vonage, data);
    if let Some(format) = run.format {
        assert_eq!(
            (format.encoding, format.channels, format.framing),
            (Encoding::PcmS16le, 1, Framing::Raw)
        );
    }
});
