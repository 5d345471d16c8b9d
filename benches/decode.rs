//! Per-20 ms-frame cost of the decode stage, against libopus called directly.
//!
//! Run: `cargo bench --bench decode`. The packets are the opusenc fixture
//! (speech, 32 kb/s, 20 ms), decoded at 48 kHz mono.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

use cochlea::codec::container::{DemuxEvent, Demuxer};
use cochlea::codec::ogg::OggDemuxer;
use cochlea::codec::opus::OpusDecoder;

/// The fixture's Opus packets, through cochlea's own Ogg demuxer.
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

fn opus_decode(c: &mut Criterion) {
    let packets = packets();
    let mut group = c.benchmark_group("opus_decode_48k_mono_per_20ms_frame");
    group.bench_function("libopus_direct", |b| {
        let mut decoder = opus::Decoder::new(48_000, opus::Channels::Mono).expect("decoder");
        let mut out = vec![0f32; 5760];
        let mut i = 0;
        b.iter(|| {
            let n = decoder
                .decode_float(&packets[i % packets.len()], &mut out, false)
                .expect("decode");
            i += 1;
            n
        })
    });
    group.bench_function("cochlea_opus_decoder", |b| {
        let mut decoder = OpusDecoder::new(48_000, 1).expect("decoder");
        let mut i = 0;
        b.iter_batched_ref(
            || Vec::with_capacity(960),
            |out| {
                let n = decoder.decode(&packets[i % packets.len()], out);
                i += 1;
                n
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, opus_decode);
criterion_main!(benches);
