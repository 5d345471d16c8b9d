//! Opus packets → `f32` samples via libopus, with loss concealment.
//!
//! Concealment always asks libopus for exactly the missing duration, in
//! multiples of 2.5 ms as libopus requires: asking for more on an oversized
//! buffer would invent audio (up to 120 ms per call).

use super::{CodecBuildError, CodecError};
use crate::protocol::OPUS_SAMPLE_RATES;

/// The longest Opus packet: 120 ms.
const MAX_PACKET_MS: usize = 120;

/// The longest stretch of one gap that packet-loss concealment fills; the
/// rest of a longer gap is silence (see [`OpusDecoder::gap_split`]).
///
/// Concealment bridges a few lost packets by extrapolating the audio before
/// them; there is nothing to extrapolate for long. On speech libopus fades to
/// about -70 dBFS within 100 ms (on the speech fixture, the RMS of successive
/// 40 ms of concealment after speech at -14 dBFS was -16, -29, -62, -70, -74
/// dBFS); on a CELT-coded tone it settles into a steady noise about 20 dB
/// under the tone, a made-up sound. Past this bound silence is the honest
/// fill, and it costs nothing: concealment costs CPU in proportion to its
/// length, and without the bound one 50-byte message with a 10 s timestamp
/// jump made the server conceal 10 s.
pub const MAX_PLC_MS: usize = 200;

/// The rate to decode an Opus stream declared at `stream_rate_hz` at, when
/// its sinks want `sink_rates_hz` (`None`: the stream's own rate).
///
/// libopus decodes straight at any of [`OPUS_SAMPLE_RATES`], and doing so is
/// cheaper than decoding at 48 kHz and resampling down afterwards (a 20 ms
/// packet: 28 µs at 16 kHz against 38 µs at 48 kHz plus 5 µs of resampling).
/// The result is the lowest such rate that every sink can be served from
/// without resampling up, i.e. no lower than any sink's rate. It also divides
/// `stream_rate_hz`, so each decoded frame stands for a whole number of the
/// stream's frames (the unit of `framing=seq` timestamps) and the media
/// timeline stays exact. With no sink at all nothing is listened to, so the
/// lowest rate does.
pub fn decode_rate_for(stream_rate_hz: u32, sink_rates_hz: &[Option<u32>]) -> u32 {
    let mut needed_hz = 0;
    for rate in sink_rates_hz {
        match rate {
            Some(rate) => needed_hz = needed_hz.max(*rate),
            None => return stream_rate_hz,
        }
    }
    OPUS_SAMPLE_RATES
        .into_iter()
        .find(|&rate| {
            rate >= needed_hz && rate <= stream_rate_hz && stream_rate_hz.is_multiple_of(rate)
        })
        .unwrap_or(stream_rate_hz)
}

pub struct OpusDecoder {
    decoder: opus::Decoder,
    sample_rate: u32,
    channels: usize,
    /// Reused decode buffer, big enough for a 120 ms packet.
    scratch: Vec<f32>,
    /// Duration of the last good packet: the best guess for a lost one.
    last_packet_frames: usize,
}

impl OpusDecoder {
    pub fn new(sample_rate: u32, channels: u16) -> Result<Self, CodecBuildError> {
        let layout = match channels {
            1 => opus::Channels::Mono,
            2 => opus::Channels::Stereo,
            channels => return Err(CodecBuildError::UnsupportedChannels { channels }),
        };
        if !OPUS_SAMPLE_RATES.contains(&sample_rate) {
            return Err(CodecBuildError::UnsupportedSampleRate {
                sample_rate_hz: sample_rate,
            });
        }
        let decoder =
            opus::Decoder::new(sample_rate, layout).map_err(|e| CodecBuildError::Libopus {
                action: "create the decoder",
                detail: e.to_string(),
            })?;
        let max_frames = sample_rate as usize * MAX_PACKET_MS / 1000;
        Ok(Self {
            decoder,
            sample_rate,
            channels: usize::from(channels),
            scratch: vec![0.0; max_frames * usize::from(channels)],
            last_packet_frames: sample_rate as usize / 50,
        })
    }

    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Applies a header's output gain (Q7.8 dB), as RFC 7845 asks.
    pub fn set_gain_q8(&mut self, gain_q8: i16) -> Result<(), CodecBuildError> {
        self.decoder
            .set_gain(i32::from(gain_q8))
            .map_err(|e| CodecBuildError::Libopus {
                action: "set the output gain",
                detail: e.to_string(),
            })
    }

    /// Sample frames `packet` holds at this decoder's rate, from its TOC.
    pub fn packet_frames(&self, packet: &[u8]) -> Result<usize, CodecError> {
        if packet.is_empty() {
            return Err(CodecError::DamagedPacket("empty Opus packet".into()));
        }
        opus::packet::get_nb_samples(packet, self.sample_rate)
            .map_err(|e| CodecError::DamagedPacket(format!("unreadable Opus packet: {e}")))
    }

    /// Frames `packet` will take in media time: its TOC's duration, or for
    /// a packet too damaged to say, the last good packet's.
    pub fn nominal_frames(&self, packet: &[u8]) -> usize {
        self.packet_frames(packet)
            .unwrap_or(self.last_packet_frames)
    }

    /// Decodes one packet, appending its samples to `out`. A damaged packet
    /// is concealed for its nominal duration (or the last packet's) and
    /// reported as `DamagedPacket` with the frames still appended, so media
    /// time keeps running.
    pub fn decode(
        &mut self,
        packet: &[u8],
        out: &mut Vec<f32>,
    ) -> Result<usize, (usize, CodecError)> {
        let frames = match self.packet_frames(packet) {
            Ok(frames) => frames,
            Err(e) => {
                let concealed = self.conceal(self.last_packet_frames, None, out);
                return Err((concealed, e));
            }
        };
        match self.decoder.decode_float(packet, &mut self.scratch, false) {
            Ok(decoded) => {
                self.last_packet_frames = decoded;
                out.extend_from_slice(&self.scratch[..decoded * self.channels]);
                Ok(decoded)
            }
            Err(e) => {
                let concealed = self.conceal(frames.min(self.max_frames()), None, out);
                Err((
                    concealed,
                    CodecError::DamagedPacket(format!("Opus packet rejected by the decoder: {e}")),
                ))
            }
        }
    }

    fn max_frames(&self) -> usize {
        self.scratch.len() / self.channels
    }

    /// The end of a gap that in-band FEC from the packet after it can fill:
    /// one packet's worth, as long as the last good packet (libopus conceals
    /// in multiples of 2.5 ms).
    fn fec_frames(&self) -> usize {
        let step = self.sample_rate as usize / 400;
        self.last_packet_frames.clamp(step, self.max_frames())
    }

    /// How to fill a gap of `frames`, so that the work does not grow with
    /// its length: `(concealed, silent)`. The first `concealed` frames are
    /// for [`Self::conceal`] without a next packet, the `silent` ones after
    /// them are silence, and the rest, the gap's last packet's worth, for
    /// [`Self::conceal`] with the next packet (FEC). `silent` is 0 for a gap
    /// no longer than [`MAX_PLC_MS`] plus that last stretch: then the whole
    /// gap goes to one [`Self::conceal`] call with the next packet.
    pub fn gap_split(&self, frames: usize) -> (usize, usize) {
        let plc_frames = self.sample_rate as usize * MAX_PLC_MS / 1000;
        let fec_frames = self.fec_frames();
        if frames <= plc_frames + fec_frames {
            return (frames, 0);
        }
        (plc_frames, frames - plc_frames - fec_frames)
    }

    /// Fills `frames` of missing audio: packet-loss concealment, and for the
    /// final stretch in-band FEC from `next_packet` when it carries some.
    /// Appends exactly `frames` sample frames to `out`.
    pub fn conceal(
        &mut self,
        frames: usize,
        next_packet: Option<&[u8]>,
        out: &mut Vec<f32>,
    ) -> usize {
        // libopus conceals in multiples of 2.5 ms.
        let step = self.sample_rate as usize / 400;
        let chunk_max = self.fec_frames();
        let fec_frames = match next_packet {
            Some(p) if !p.is_empty() => (frames / step * step).min(chunk_max),
            _ => 0,
        };
        let mut left = frames - fec_frames;
        while left >= step {
            let n = (left / step * step).min(chunk_max);
            let n = self.run(&[], n, false, out);
            if n == 0 {
                break;
            }
            left -= n;
        }
        if let Some(next) = next_packet.filter(|_| fec_frames > 0) {
            let n = self.run(next, fec_frames, true, out);
            left += fec_frames - n;
        }
        // A remainder under 2.5 ms (or a decoder refusal) becomes silence.
        out.extend(std::iter::repeat_n(0.0, left * self.channels));
        frames
    }

    /// One PLC or FEC call for exactly `frames`; returns frames produced.
    fn run(&mut self, input: &[u8], frames: usize, fec: bool, out: &mut Vec<f32>) -> usize {
        let slice = &mut self.scratch[..frames * self.channels];
        match self.decoder.decode_float(input, slice, fec) {
            Ok(n) => {
                let n = n.min(frames);
                out.extend_from_slice(&self.scratch[..n * self.channels]);
                n
            }
            Err(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded_tone(frames_per_packet: usize, packets: usize) -> Vec<Vec<u8>> {
        let mut enc =
            opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio).unwrap();
        (0..packets)
            .map(|p| {
                let pcm: Vec<f32> = (0..frames_per_packet)
                    .map(|i| {
                        let t = (p * frames_per_packet + i) as f32 / 48_000.0;
                        (t * 440.0 * std::f32::consts::TAU).sin() * 0.3
                    })
                    .collect();
                enc.encode_vec_float(&pcm, 4000).unwrap()
            })
            .collect()
    }

    #[test]
    fn decode_rate_is_the_lowest_that_serves_every_sink() {
        // Every sink at 16 kHz (recorder resampled, transcriber): 16 kHz.
        assert_eq!(
            decode_rate_for(48_000, &[Some(16_000), Some(16_000)]),
            16_000
        );
        // A sink keeping the stream's rate keeps the decode at it.
        assert_eq!(decode_rate_for(48_000, &[Some(16_000), None]), 48_000);
        // Not an Opus rate: the next one up, then resampled down.
        assert_eq!(decode_rate_for(48_000, &[Some(22_050)]), 24_000);
        assert_eq!(decode_rate_for(48_000, &[Some(8_000)]), 8_000);
        // Never above the stream's rate (a sink wanting more is upsampled
        // from it, as before).
        assert_eq!(decode_rate_for(16_000, &[Some(44_100)]), 16_000);
        // Only rates dividing the stream's: 16 kHz does not divide 24 kHz.
        assert_eq!(decode_rate_for(24_000, &[Some(16_000)]), 24_000);
        assert_eq!(decode_rate_for(24_000, &[Some(12_000)]), 12_000);
        assert_eq!(decode_rate_for(48_000, &[]), 8_000);
    }

    #[test]
    fn decodes_and_conceals_exact_durations() {
        let packets = encoded_tone(960, 10);
        let mut d = OpusDecoder::new(48_000, 1).unwrap();
        let mut out = Vec::new();
        assert_eq!(d.decode(&packets[0], &mut out), Ok(960));
        // 50 ms lost, then FEC/PLC from the next packet: exactly 2400 frames.
        assert_eq!(d.conceal(2400, Some(&packets[3]), &mut out), 2400);
        assert_eq!(out.len(), 960 + 2400);
        // A sub-2.5 ms remainder is padded, never over-produced.
        assert_eq!(d.conceal(1000, None, &mut out), 1000);
        assert_eq!(out.len(), 960 + 2400 + 1000);
        assert!(out.iter().all(|s| s.is_finite()));
    }

    #[test]
    fn a_decoder_that_cannot_be_built_says_why() {
        assert_eq!(
            OpusDecoder::new(48_000, 3).err(),
            Some(CodecBuildError::UnsupportedChannels { channels: 3 })
        );
        assert_eq!(
            OpusDecoder::new(44_100, 1).err(),
            Some(CodecBuildError::UnsupportedSampleRate {
                sample_rate_hz: 44_100
            })
        );
        // Every Opus rate and both layouts build, and any Q7.8 gain applies.
        for rate in OPUS_SAMPLE_RATES {
            for channels in [1, 2] {
                let mut d = OpusDecoder::new(rate, channels).unwrap();
                assert_eq!(d.set_gain_q8(i16::MIN), Ok(()));
                assert_eq!(d.set_gain_q8(i16::MAX), Ok(()));
            }
        }
    }

    #[test]
    fn a_gap_is_concealed_for_at_most_max_plc_ms_plus_one_packet() {
        let packets = encoded_tone(960, 2);
        let mut d = OpusDecoder::new(48_000, 1).unwrap();
        d.decode(&packets[0], &mut Vec::new()).unwrap();
        // 200 ms of PLC and a 20 ms packet's FEC: concealed whole.
        assert_eq!(d.gap_split(9_600 + 960), (10_560, 0));
        assert_eq!(d.gap_split(100), (100, 0));
        // Longer: 200 ms of PLC, silence, the last 20 ms for FEC.
        assert_eq!(d.gap_split(9_600 + 960 + 1), (9_600, 1));
        assert_eq!(d.gap_split(480_000), (9_600, 480_000 - 9_600 - 960));
        // The FEC stretch follows the last packet's duration (here 10 ms).
        let short = encoded_tone(480, 1);
        d.decode(&short[0], &mut Vec::new()).unwrap();
        assert_eq!(d.gap_split(480_000), (9_600, 480_000 - 9_600 - 480));
    }

    /// Why concealment may stop at MAX_PLC_MS: on speech, libopus has faded
    /// to near silence well before, so silence after it changes nothing.
    #[test]
    fn concealment_of_speech_has_faded_out_before_max_plc_ms() {
        use crate::codec::container::{DemuxEvent, Demuxer};
        use crate::codec::ogg::OggDemuxer;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/speech-opusenc.opus"
        );
        let mut events = Vec::new();
        OggDemuxer::new()
            .push(&std::fs::read(path).unwrap(), &mut events)
            .unwrap();
        let packets: Vec<Vec<u8>> = events
            .into_iter()
            .filter_map(|e| match e {
                DemuxEvent::Packet { data, .. } => Some(data),
                _ => None,
            })
            .collect();
        let rms = |s: &[f32]| (s.iter().map(|x| x * x).sum::<f32>() / s.len() as f32).sqrt();
        // Lost in the middle of three different stretches of speech.
        for lost_at in [20, 40, 60] {
            let mut d = OpusDecoder::new(48_000, 1).unwrap();
            let mut decoded = Vec::new();
            for packet in &packets[..lost_at] {
                d.decode(packet, &mut decoded).unwrap();
            }
            let before = rms(&decoded[decoded.len() - 960..]);
            let mut concealed = Vec::new();
            d.conceal(48 * MAX_PLC_MS, None, &mut concealed);
            // The last 40 ms before the bound: 40 dB down at least.
            let end = rms(&concealed[concealed.len() - 1_920..]);
            assert!(before > 0.1, "speech before packet {lost_at}: {before}");
            assert!(
                end < before / 100.0,
                "concealment still at {end} (speech {before}) after {MAX_PLC_MS} ms"
            );
        }
    }

    #[test]
    fn damaged_packets_are_concealed_and_reported() {
        let packets = encoded_tone(960, 3);
        let mut d = OpusDecoder::new(16_000, 1).unwrap();
        let mut out = Vec::new();
        assert_eq!(d.decode(&packets[0], &mut out), Ok(320));
        // Code 3 TOC without its frame-count byte: invalid.
        let (concealed, error) = d.decode(&[0xFF], &mut out).unwrap_err();
        assert_eq!(concealed, 320);
        assert!(matches!(error, CodecError::DamagedPacket(_)));
        let (concealed, _) = d.decode(&[], &mut out).unwrap_err();
        assert_eq!(concealed, 320);
        assert_eq!(d.decode(&packets[1], &mut out), Ok(320));
        assert_eq!(out.len(), 4 * 320);
    }
}
