//! EBML (RFC 8794) as the WebM demuxer reads it: the IDs of the Matroska
//! elements it handles, which element ends an unknown-size one, and the
//! readers of VINTs, integers, floats and strings.

use super::malformed;
use crate::codec::container::DemuxError;

/// Longest ID and size VINT we accept (EBMLMaxIDLength / EBMLMaxSizeLength).
pub(super) const MAX_ID_LEN: usize = 4;
pub(super) const MAX_SIZE_LEN: usize = 8;

// Element IDs, with their VINT marker bits as they appear in the stream.
pub(super) const EBML: u32 = 0x1A45_DFA3;
pub(super) const DOC_TYPE: u32 = 0x4282;
pub(super) const SEGMENT: u32 = 0x1853_8067;
pub(super) const SEEK_HEAD: u32 = 0x114D_9B74;
pub(super) const INFO: u32 = 0x1549_A966;
pub(super) const TRACKS: u32 = 0x1654_AE6B;
pub(super) const TRACK_ENTRY: u32 = 0xAE;
pub(super) const TRACK_NUMBER: u32 = 0xD7;
pub(super) const TRACK_TYPE: u32 = 0x83;
pub(super) const CODEC_ID: u32 = 0x86;
pub(super) const CODEC_PRIVATE: u32 = 0x63A2;
pub(super) const CODEC_DELAY: u32 = 0x56AA;
pub(super) const AUDIO: u32 = 0xE1;
pub(super) const CHANNELS: u32 = 0x9F;
pub(super) const SAMPLING_FREQUENCY: u32 = 0xB5;
pub(super) const CLUSTER: u32 = 0x1F43_B675;
pub(super) const SIMPLE_BLOCK: u32 = 0xA3;
pub(super) const BLOCK_GROUP: u32 = 0xA0;
pub(super) const BLOCK: u32 = 0xA1;
pub(super) const CUES: u32 = 0x1C53_BB6B;
pub(super) const CHAPTERS: u32 = 0x1043_A770;
pub(super) const TAGS: u32 = 0x1254_C367;
pub(super) const ATTACHMENTS: u32 = 0x1941_A469;

/// Segment children: any of these ends an unknown-size Cluster.
pub(super) const SEGMENT_CHILDREN: [u32; 8] = [
    SEEK_HEAD,
    INFO,
    TRACKS,
    CLUSTER,
    CUES,
    CHAPTERS,
    TAGS,
    ATTACHMENTS,
];

/// Matroska TrackType for audio.
pub(super) const TRACK_TYPE_AUDIO: u64 = 2;

pub(super) const EBML_MAGIC: [u8; 4] = [0x1A, 0x45, 0xDF, 0xA3];

/// Whether element `id` ends an unknown-size `master` (RFC 8794 §6.2): it is
/// a sibling or an ancestor-level element. Unknown IDs count as children.
pub(super) fn ends_unknown_size(master: u32, id: u32) -> bool {
    match master {
        SEGMENT => matches!(id, EBML | SEGMENT),
        CLUSTER => matches!(id, EBML | SEGMENT) || SEGMENT_CHILDREN.contains(&id),
        _ => false,
    }
}

/// Length of a VINT from its first byte (leading zeros + 1), None if > 8.
pub(super) fn vint_len(first: u8) -> Option<usize> {
    let len = first.leading_zeros() as usize + 1;
    (len <= MAX_SIZE_LEN).then_some(len)
}

/// Reads a VINT, marker removed: (value, length). None if truncated/invalid.
pub(super) fn read_vint(data: &[u8]) -> Option<(u64, usize)> {
    let len = vint_len(*data.first()?)?;
    let bytes = data.get(..len)?;
    let first = u64::from(bytes[0]) & (0xFF >> len);
    let value = bytes[1..].iter().fold(first, |v, &b| v << 8 | u64::from(b));
    Some((value, len))
}

/// A big-endian unsigned integer of 0-8 bytes (the length is checked earlier).
pub(super) fn read_uint(data: &[u8]) -> u64 {
    data.iter().fold(0u64, |v, &b| v << 8 | u64::from(b))
}

pub(super) fn read_float(data: &[u8]) -> Result<f64, DemuxError> {
    match data.len() {
        0 => Ok(0.0),
        4 => Ok(f64::from(f32::from_bits(read_uint(data) as u32))),
        8 => Ok(f64::from_bits(read_uint(data))),
        n => Err(malformed(format!("float element of {n} bytes"))),
    }
}

pub(super) fn trim_nul(data: &[u8]) -> &[u8] {
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    &data[..end]
}
