//! The `opus` packet path: seq headers, gap concealment (PLC/FEC) and the
//! decoder, on arbitrary messages. Input: [len u8][message]... repeated.
#![no_main]
use libfuzzer_sys::fuzz_target;

use cochlea::pipeline::Pipeline;
use cochlea::protocol::{Encoding, Framing, StreamFormat};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let format = StreamFormat {
        encoding: Encoding::Opus,
        sample_rate: [8_000, 16_000, 48_000][usize::from(mode % 3)],
        channels: 1 + u16::from(mode & 4 != 0),
        framing: if mode & 8 != 0 {
            Framing::Seq
        } else {
            Framing::Raw
        },
    };
    // A short gap limit keeps concealment work per input small.
    let mut pipeline = Pipeline::new(format, 200).expect("pipeline");
    let mut out = Vec::new();
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (message, tail) = tail.split_at(len);
        rest = tail;
        if pipeline
            .push(message, std::time::Instant::now(), &mut out)
            .is_err()
        {
            break;
        }
        out.clear();
    }
});
