//! Matroska block lacing: several frames in one block (Matroska §10.3).

use super::ebml::read_vint;
use super::malformed;
use crate::codec::container::DemuxError;

// Block flags: the lacing bits and their values.
pub(super) const LACING_MASK: u8 = 0x06;
pub(super) const LACING_NONE: u8 = 0x00;
pub(super) const LACING_XIPH: u8 = 0x02;
pub(super) const LACING_FIXED: u8 = 0x04;
pub(super) const LACING_EBML: u8 = 0x06;

/// Splits a block's payload into frames per its lacing (Matroska §10.3).
pub(super) fn delace(lacing: u8, payload: &[u8]) -> Result<Vec<&[u8]>, DemuxError> {
    if lacing == LACING_NONE {
        return Ok(vec![payload]);
    }
    let bad = |what: &str| malformed(format!("bad block lacing: {what}"));
    let (&count, mut rest) = payload.split_first().ok_or_else(|| bad("no frame count"))?;
    let frames = usize::from(count) + 1;
    // Sizes of all frames but the last, which takes what remains.
    let mut sizes: Vec<u64> = Vec::with_capacity(frames);
    match lacing {
        LACING_XIPH => {
            for _ in 1..frames {
                let mut size = 0u64;
                loop {
                    let (&b, r) = rest
                        .split_first()
                        .ok_or_else(|| bad("truncated Xiph sizes"))?;
                    rest = r;
                    size += u64::from(b);
                    if b != 255 {
                        break;
                    }
                }
                sizes.push(size);
            }
        }
        LACING_EBML => {
            if frames > 1 {
                let (first, len) = read_vint(rest).ok_or_else(|| bad("truncated EBML sizes"))?;
                rest = &rest[len..];
                sizes.push(first);
                let mut prev = i128::from(first);
                // Later sizes are signed differences from the previous one.
                for _ in 2..frames {
                    let (raw, len) = read_vint(rest).ok_or_else(|| bad("truncated EBML sizes"))?;
                    rest = &rest[len..];
                    let bias = (1i128 << (7 * len - 1)) - 1;
                    prev += i128::from(raw) - bias;
                    let size = u64::try_from(prev).map_err(|_| bad("negative frame size"))?;
                    sizes.push(size);
                }
            }
        }
        LACING_FIXED => {
            if rest.len() % frames != 0 {
                return Err(bad("data does not split into equal frames"));
            }
            let size = (rest.len() / frames) as u64;
            sizes.resize(frames - 1, size);
        }
        // Callers mask the flags to two bits; this only avoids a panic path.
        _ => return Err(bad("unknown lacing")),
    }
    sizes
        .iter()
        .try_fold(0u64, |acc, &s| acc.checked_add(s))
        .filter(|&total| total <= rest.len() as u64)
        .ok_or_else(|| bad("frame sizes exceed the block"))?;
    let mut out = Vec::with_capacity(frames);
    for size in sizes {
        // The sizes sum to at most rest.len(), so each split is in range.
        let (frame, r) = rest.split_at(size as usize);
        out.push(frame);
        rest = r;
    }
    out.push(rest);
    Ok(out)
}
