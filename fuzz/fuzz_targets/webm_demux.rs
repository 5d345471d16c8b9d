//! The WebM demuxer and the Opus decoder behind it, on arbitrary bytes cut at
//! arbitrary points (the first byte picks the slice size).
#![no_main]
use libfuzzer_sys::fuzz_target;

use cochlea::pipeline::Pipeline;
use cochlea::protocol::{Encoding, Framing, StreamFormat};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let format = StreamFormat {
        encoding: Encoding::WebmOpus,
        sample_rate: 16_000,
        channels: 1,
        framing: Framing::Raw,
    };
    let mut pipeline = Pipeline::new(format, 10_000).expect("pipeline");
    let mut out = Vec::new();
    for slice in bytes.chunks(usize::from(cut) + 1) {
        if pipeline
            .push(slice, std::time::Instant::now(), &mut out)
            .is_err()
        {
            break;
        }
        out.clear();
    }
});
