//! The audio every stream sends, prepared once before the first connection:
//! one payload per message period, which the streams loop over.

use std::path::Path;

use super::{LoadEncoding, LoadgenError};
use crate::codec::linear_to_mulaw;
use crate::pipeline::resample::Resampler;

/// Opus packets are encoded at the codec's native rate; the server decodes
/// them at whatever `sample_rate` the stream asks for.
pub const OPUS_ENCODE_RATE: u32 = 48_000;

/// Seconds of the built-in signal when no input file is given.
const SYNTHETIC_SECONDS: u32 = 10;

/// Messages ready to send, minus their `seq` header.
pub struct Prepared {
    pub payloads: Vec<Vec<u8>>,
    /// Sample frames one message advances the `seq` timestamp by (at the
    /// stream's `sample_rate`).
    pub frames_per_message: u64,
    /// Seconds of audio one loop of `payloads` holds.
    pub loop_seconds: f64,
}

pub struct AudioSpec<'a> {
    pub input: Option<&'a Path>,
    pub encoding: LoadEncoding,
    pub sample_rate: u32,
    pub channels: u16,
    pub frame_ms: u32,
    pub opus_bitrate: i32,
}

pub fn prepare(spec: &AudioSpec) -> Result<Prepared, LoadgenError> {
    let (mono, rate) = match spec.input {
        Some(path) => read_mono(path)?,
        None => (synthetic(16_000), 16_000),
    };
    let frames_per_message = u64::from(spec.sample_rate) * u64::from(spec.frame_ms) / 1000;
    match spec.encoding {
        LoadEncoding::PcmS16le | LoadEncoding::Mulaw => {
            let audio = resample(&mono, rate, spec.sample_rate)?;
            let per_message = frames_per_message as usize;
            let channels = usize::from(spec.channels);
            let mut payloads = Vec::new();
            for chunk in whole_chunks(&audio, per_message) {
                let mut payload = Vec::with_capacity(chunk.len() * channels * 2);
                for &x in chunk {
                    let s = (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
                    for _ in 0..channels {
                        match spec.encoding {
                            LoadEncoding::Mulaw => payload.push(linear_to_mulaw(s)),
                            _ => payload.extend_from_slice(&s.to_le_bytes()),
                        }
                    }
                }
                payloads.push(payload);
            }
            let loop_seconds = payloads.len() as f64 * f64::from(spec.frame_ms) / 1000.0;
            Ok(Prepared {
                payloads,
                frames_per_message,
                loop_seconds,
            })
        }
        LoadEncoding::Opus => {
            let audio = resample(&mono, rate, OPUS_ENCODE_RATE)?;
            let channels = match spec.channels {
                2 => opus::Channels::Stereo,
                _ => opus::Channels::Mono,
            };
            let opus_error = |e: opus::Error| LoadgenError::Opus(e.to_string());
            let mut encoder =
                opus::Encoder::new(OPUS_ENCODE_RATE, channels, opus::Application::Voip)
                    .map_err(opus_error)?;
            encoder
                .set_bitrate(opus::Bitrate::Bits(spec.opus_bitrate))
                .map_err(opus_error)?;
            let per_packet = (OPUS_ENCODE_RATE * spec.frame_ms / 1000) as usize;
            let mut interleaved = Vec::with_capacity(per_packet * usize::from(spec.channels));
            let mut packet = vec![0u8; 4000];
            let mut payloads = Vec::new();
            for chunk in whole_chunks(&audio, per_packet) {
                interleaved.clear();
                for &x in chunk {
                    interleaved.extend(std::iter::repeat_n(x, usize::from(spec.channels)));
                }
                let n = encoder
                    .encode_float(&interleaved, &mut packet)
                    .map_err(opus_error)?;
                payloads.push(packet[..n].to_vec());
            }
            let loop_seconds = payloads.len() as f64 * f64::from(spec.frame_ms) / 1000.0;
            Ok(Prepared {
                payloads,
                frames_per_message,
                loop_seconds,
            })
        }
    }
}

/// Consecutive `n`-sample chunks; a trailing partial chunk is dropped (the
/// loop restarts there). `resample` makes the signal at least 200 ms long,
/// more than one message.
fn whole_chunks(audio: &[f32], n: usize) -> Vec<&[f32]> {
    audio.chunks_exact(n.max(1)).collect()
}

/// A WAV file, averaged to mono, and its rate.
fn read_mono(path: &Path) -> Result<(Vec<f32>, u32), LoadgenError> {
    let input_error = |source| LoadgenError::Input {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = hound::WavReader::open(path).map_err(input_error)?;
    let spec = reader.spec();
    let channels = usize::from(spec.channels.max(1));
    let samples: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(input_error)?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|s| s as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(input_error)?
        }
    };
    let mono: Vec<f32> = samples
        .chunks_exact(channels)
        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
        .collect();
    if mono.is_empty() {
        return Err(LoadgenError::InputFormat {
            path: path.to_path_buf(),
            reason: "holds no audio".into(),
        });
    }
    if !(crate::pipeline::resample::MIN_RATE..=crate::pipeline::resample::MAX_RATE)
        .contains(&spec.sample_rate)
    {
        return Err(LoadgenError::InputFormat {
            path: path.to_path_buf(),
            reason: format!("sample rate {} Hz is not 8000..=48000", spec.sample_rate),
        });
    }
    Ok((mono, spec.sample_rate))
}

fn resample(audio: &[f32], from: u32, to: u32) -> Result<Vec<f32>, LoadgenError> {
    let mut resampler =
        Resampler::new(from, to, 1).map_err(|e| LoadgenError::Resample(e.to_string()))?;
    let mut out = Vec::with_capacity(audio.len() * to as usize / from as usize + 1024);
    resampler.process(audio, &mut out);
    resampler.finish(&mut out);
    // At least one message's worth, whatever the input's length.
    let min_len = (to / 5) as usize;
    if out.len() < min_len {
        let once = out.clone();
        while out.len() < min_len {
            out.extend_from_slice(&once);
        }
    }
    Ok(out)
}

/// A speech-like test signal: a 140 Hz voice with harmonics, its loudness
/// moving at a syllable rate, over a little noise (deterministic).
fn synthetic(rate: u32) -> Vec<f32> {
    let mut noise_state: u32 = 0x1234_5678;
    (0..rate * SYNTHETIC_SECONDS)
        .map(|i| {
            let t = i as f32 / rate as f32;
            let tau = 2.0 * std::f32::consts::PI;
            let pitch = 140.0 + 20.0 * (tau * 0.5 * t).sin();
            let voice: f32 = (1..=8)
                .map(|h| (tau * pitch * h as f32 * t).sin() / h as f32)
                .sum();
            let envelope = 0.5 + 0.5 * (tau * 4.0 * t).sin();
            noise_state = noise_state
                .wrapping_mul(1_664_525)
                .wrapping_add(1_013_904_223);
            let noise = (noise_state >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            0.15 * voice * envelope + 0.01 * noise
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(encoding: LoadEncoding, sample_rate: u32) -> AudioSpec<'static> {
        AudioSpec {
            input: None,
            encoding,
            sample_rate,
            channels: 1,
            frame_ms: 20,
            opus_bitrate: 32_000,
        }
    }

    #[test]
    fn pcm_messages_are_whole_20ms_frames() {
        let p = prepare(&spec(LoadEncoding::PcmS16le, 16_000)).unwrap();
        assert_eq!(p.frames_per_message, 320);
        assert!(p.payloads.iter().all(|m| m.len() == 640));
        assert_eq!(p.payloads.len(), 500, "10 s of 20 ms messages");
        let mulaw = prepare(&spec(LoadEncoding::Mulaw, 8_000)).unwrap();
        assert!(mulaw.payloads.iter().all(|m| m.len() == 160));
    }

    #[test]
    fn opus_packets_decode_to_20ms_each() {
        let p = prepare(&spec(LoadEncoding::Opus, 48_000)).unwrap();
        assert_eq!(p.frames_per_message, 960);
        let mut decoder = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
        let mut out = vec![0f32; 5760];
        for packet in &p.payloads {
            assert_eq!(decoder.decode_float(packet, &mut out, false).unwrap(), 960);
        }
    }
}
