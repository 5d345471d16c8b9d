//! CPU cost of one `framing=seq` Opus message whose timestamp jumps 10 s
//! (issue 15 item 5): the work the server does to fill the gap before the
//! sinks, 48 kHz mono.
//!
//! - `whole_gap_concealed`: the gap concealed end to end by libopus (PLC,
//!   then FEC from the next packet), as every gap was before concealment was
//!   bounded: `OpusDecoder::conceal` for 10 s, then the packet decoded;
//! - `pipeline_push`: `Pipeline::push` of the message as it is now (at most
//!   `MAX_PLC_MS` of PLC, silence, one packet's worth of FEC, the packet).
//!
//! A plain timed loop rather than criterion: one figure per case is enough
//! to compare, and it runs in about a second. Times are medians of 7 runs of
//! 10 messages each.
//!
//! Run: `cargo bench --bench gap_fill`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use cochlea::codec::container::{DemuxEvent, Demuxer};
use cochlea::codec::ogg::OggDemuxer;
use cochlea::codec::opus::OpusDecoder;
use cochlea::pipeline::Pipeline;
use cochlea::protocol::{Encoding, Framing, SeqHeader, StreamFormat};

const RATE: u32 = 48_000;
/// 10 s at 48 kHz: the largest gap the default `max_gap_ms` allows.
const GAP_FRAMES: u64 = 480_000;
const PACKET_FRAMES: u64 = 960;
const MESSAGES: usize = 10;
const RUNS: usize = 7;

/// The fixture's Opus packets (speech, 20 ms each).
fn packets() -> Vec<Vec<u8>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/speech-opusenc.opus"
    );
    let bytes = std::fs::read(path).expect("fixture");
    let mut events = Vec::new();
    OggDemuxer::new().push(&bytes, &mut events).expect("demux");
    events
        .into_iter()
        .filter_map(|e| match e {
            DemuxEvent::Packet { data, .. } => Some(data),
            _ => None,
        })
        .collect()
}

/// Median over `RUNS` of the time per message of `run` (which handles
/// `MESSAGES` messages).
fn median_per_message(mut run: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed() / MESSAGES as u32
        })
        .collect();
    times.sort();
    times[RUNS / 2]
}

fn main() {
    let packets = packets();
    let packet = |i: usize| &packets[20 + i % 40];

    let before = median_per_message(|| {
        let mut decoder = OpusDecoder::new(RATE, 1).expect("decoder");
        let mut out = Vec::new();
        decoder.decode(packet(0), &mut out).expect("decode");
        for i in 1..=MESSAGES {
            let mut concealed = Vec::new();
            decoder.conceal(GAP_FRAMES as usize, Some(packet(i)), &mut concealed);
            let mut decoded = Vec::new();
            let _ = decoder.decode(packet(i), &mut decoded);
            black_box((concealed, decoded));
        }
    });

    let format = StreamFormat {
        encoding: Encoding::Opus,
        sample_rate: RATE,
        channels: 1,
        framing: Framing::Seq,
    };
    let message = |seq: usize| {
        let timestamp = seq as u64 * (PACKET_FRAMES + GAP_FRAMES);
        let header = SeqHeader {
            seq: seq as u32,
            timestamp,
        };
        let mut m = header.encode().to_vec();
        m.extend_from_slice(packet(seq));
        m
    };
    let messages: Vec<Vec<u8>> = (0..=MESSAGES).map(message).collect();
    let after = median_per_message(|| {
        let mut pipeline = Pipeline::new(format, 10_000).expect("pipeline");
        let mut out = Vec::new();
        let now = Instant::now();
        pipeline.push(&messages[0], now, &mut out).expect("push");
        for m in &messages[1..] {
            out.clear();
            pipeline.push(m, now, &mut out).expect("push");
            black_box(&out);
        }
    });

    println!("one Opus message with a 10 s timestamp jump, 48 kHz mono, per message:");
    println!("  whole_gap_concealed  {before:>10.2?}");
    println!("  pipeline_push        {after:>10.2?}");
}
