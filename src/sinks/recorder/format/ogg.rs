//! An Ogg page writer (RFC 3533) for one logical stream: packets in, whole
//! pages out, with lacing, continuation and CRCs. Pure: the bytes of each
//! completed page are appended to a buffer the caller writes to the file.
//!
//! Pages are never rewritten once handed out, which is what makes an Ogg
//! recording crash-safe without any header patching: a killed process
//! leaves whole pages followed at most by part of one, which decoders (and
//! [`super::super::recover`]) skip.

use crate::codec::ogg::page_crc;

/// Lacing values a page can hold.
const MAX_SEGMENTS: usize = 255;
/// The fixed part of a page header.
const HEADER_LEN: usize = 27;
/// Granule position of a page on which no packet ends (RFC 3533 §6).
const NO_PACKET_ENDS: u64 = u64::MAX;

const FLAG_CONTINUED: u8 = 0x01;
const FLAG_BOS: u8 = 0x02;
const FLAG_EOS: u8 = 0x04;

/// One logical Ogg stream being written.
#[derive(Debug)]
pub struct OggStream {
    serial: u32,
    sequence: u32,
    /// Lacing values of the page being filled.
    segments: Vec<u8>,
    body: Vec<u8>,
    /// Granule of the last packet completed on the page being filled.
    granule: Option<u64>,
    /// The page being filled starts with the rest of a packet.
    continued: bool,
    /// No page has been written yet: the next one is the first (BOS).
    first: bool,
}

impl OggStream {
    pub fn new(serial: u32) -> Self {
        Self {
            serial,
            sequence: 0,
            segments: Vec::with_capacity(MAX_SEGMENTS),
            body: Vec::new(),
            granule: None,
            continued: false,
            first: true,
        }
    }

    /// Whether packets are waiting for a page.
    pub fn has_pending(&self) -> bool {
        !self.segments.is_empty()
    }

    /// Adds one packet that ends at `granule`. Pages that fill up are
    /// appended to `out`; the rest waits for more packets or [`Self::flush`].
    pub fn add_packet(&mut self, packet: &[u8], granule: u64, out: &mut Vec<u8>) {
        let mut rest = packet;
        loop {
            // A packet of n bytes takes n / 255 lacing values of 255 and one
            // final value below 255 (0 when n is a multiple of 255).
            let needed = rest.len() / 255 + 1;
            let room = MAX_SEGMENTS - self.segments.len();
            if needed <= room {
                self.segments
                    .extend(std::iter::repeat_n(255u8, rest.len() / 255));
                self.segments.push((rest.len() % 255) as u8);
                self.body.extend_from_slice(rest);
                self.granule = Some(granule);
                return;
            }
            let split = room > 0;
            if split {
                // As much as fits; the rest continues on the next page.
                let (now, later) = rest.split_at(room * 255);
                self.segments.extend(std::iter::repeat_n(255u8, room));
                self.body.extend_from_slice(now);
                rest = later;
            }
            self.emit(false, out);
            // A page that ended in the middle of a packet: the next starts
            // with the rest of it.
            self.continued = split;
        }
    }

    /// Ends the page being filled (if any), appending it to `out`; with
    /// `eos`, marks it the stream's last (an empty page if nothing waits).
    pub fn flush(&mut self, eos: bool, out: &mut Vec<u8>) {
        if self.segments.is_empty() && !eos {
            return;
        }
        self.emit(eos, out);
        self.continued = false;
    }

    /// A page holding exactly `packet`, at granule 0: the Opus header pages
    /// (RFC 7845 §3 wants each header on a page of its own).
    pub fn header_page(&mut self, packet: &[u8], out: &mut Vec<u8>) {
        self.flush(false, out);
        self.add_packet(packet, 0, out);
        self.flush(false, out);
    }

    fn emit(&mut self, eos: bool, out: &mut Vec<u8>) {
        let mut flags = 0;
        if self.continued {
            flags |= FLAG_CONTINUED;
        }
        if self.first {
            flags |= FLAG_BOS;
        }
        if eos {
            flags |= FLAG_EOS;
        }
        let granule = self.granule.take().unwrap_or(NO_PACKET_ENDS);
        let start = out.len();
        out.extend_from_slice(b"OggS");
        out.push(0); // version
        out.push(flags);
        out.extend_from_slice(&granule.to_le_bytes());
        out.extend_from_slice(&self.serial.to_le_bytes());
        out.extend_from_slice(&self.sequence.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // CRC, below
        out.push(self.segments.len() as u8);
        out.extend_from_slice(&self.segments);
        out.extend_from_slice(&self.body);
        let crc = page_crc(&out[start..]);
        out[start + 22..start + 26].copy_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(
            out.len() - start,
            HEADER_LEN + self.segments.len() + self.body.len()
        );
        self.sequence = self.sequence.wrapping_add(1);
        self.segments.clear();
        self.body.clear();
        self.first = false;
    }
}

/// The length of the run of whole, valid pages (CRCs checked) at the start
/// of `bytes`: crash recovery keeps a file up to the end of its last whole
/// page.
pub fn whole_pages_len(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Some(len) = page_len(&bytes[at..]) {
        at += len;
    }
    at
}

/// The granule position of the last page in `bytes` on which a packet ends
/// (`bytes` being whole pages), if any.
pub fn last_granule(bytes: &[u8]) -> Option<u64> {
    let mut at = 0;
    let mut last = None;
    while let Some(len) = page_len(&bytes[at..]) {
        let granule = u64::from_le_bytes(bytes[at + 6..at + 14].try_into().ok()?);
        if granule != NO_PACKET_ENDS {
            last = Some(granule);
        }
        at += len;
    }
    last
}

/// The length of the valid page at the start of `bytes`, if there is one.
fn page_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < HEADER_LEN || &bytes[..4] != b"OggS" {
        return None;
    }
    let segments = usize::from(bytes[26]);
    let table = bytes.get(HEADER_LEN..HEADER_LEN + segments)?;
    let body: usize = table.iter().map(|&l| usize::from(l)).sum();
    let len = HEADER_LEN + segments + body;
    let page = bytes.get(..len)?;
    let stored = u32::from_le_bytes([page[22], page[23], page[24], page[25]]);
    (page_crc(page) == stored).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::container::{DemuxEvent, Demuxer};
    use crate::codec::ogg::OggDemuxer;

    fn opus_head() -> Vec<u8> {
        let mut head = b"OpusHead".to_vec();
        head.extend_from_slice(&[1, 1, 0x38, 0x01, 0x80, 0x3e, 0, 0, 0, 0, 0]);
        head
    }

    /// Pages as (flags, granule, sequence, lacing values).
    fn pages(bytes: &[u8]) -> Vec<(u8, u64, u32, Vec<u8>)> {
        let mut at = 0;
        let mut pages = Vec::new();
        while at < bytes.len() {
            let len = page_len(&bytes[at..]).expect("a valid page, CRC included");
            let p = &bytes[at..at + len];
            let granule = u64::from_le_bytes(p[6..14].try_into().unwrap());
            let sequence = u32::from_le_bytes(p[18..22].try_into().unwrap());
            let n = usize::from(p[26]);
            pages.push((p[5], granule, sequence, p[27..27 + n].to_vec()));
            at += len;
        }
        pages
    }

    #[test]
    fn pages_have_crcs_granules_and_lacing_a_demuxer_reads_back() {
        let mut ogg = OggStream::new(0x1234);
        let mut out = Vec::new();
        ogg.header_page(&opus_head(), &mut out);
        ogg.header_page(b"OpusTags\x07\0\0\0cochlea\0\0\0\0", &mut out);
        // 254, 255, 510 and 600 bytes: lacing ends in 254; 255,0; 255,255,0; 255,255,90.
        let packets: Vec<Vec<u8>> = [254usize, 255, 510, 600]
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![0xF8 | (i as u8 & 3); n])
            .collect();
        for (i, p) in packets.iter().enumerate() {
            ogg.add_packet(p, 312 + 960 * (i as u64 + 1), &mut out);
        }
        ogg.flush(true, &mut out);
        let pages = pages(&out);
        assert_eq!(pages.len(), 3);
        assert_eq!((pages[0].0, pages[0].1, pages[0].2), (FLAG_BOS, 0, 0));
        assert_eq!((pages[1].0, pages[1].1, pages[1].2), (0, 0, 1));
        let (flags, granule, sequence, lacing) = &pages[2];
        assert_eq!((*flags, *granule, *sequence), (FLAG_EOS, 312 + 4 * 960, 2));
        assert_eq!(lacing, &[254, 255, 0, 255, 255, 0, 255, 255, 90]);

        // The project's demuxer (which checks every CRC) gets the packets back.
        let mut demuxer = OggDemuxer::new();
        let mut events = Vec::new();
        demuxer.push(&out, &mut events).unwrap();
        let got: Vec<Vec<u8>> = events
            .into_iter()
            .filter_map(|e| match e {
                DemuxEvent::Packet { data, .. } => Some(data),
                _ => None,
            })
            .collect();
        assert_eq!(got, packets);
    }

    #[test]
    fn a_packet_longer_than_a_page_continues_on_the_next() {
        let mut ogg = OggStream::new(7);
        let mut out = Vec::new();
        ogg.header_page(&opus_head(), &mut out);
        // 255 * 255 + 10 bytes: a full page of 255 lacing values, then the
        // rest on a continued page, where the packet ends.
        let big = vec![0x41u8; 255 * 255 + 10];
        ogg.add_packet(&big, 960, &mut out);
        ogg.flush(false, &mut out);
        let pages = pages(&out);
        assert_eq!(pages.len(), 3);
        assert_eq!(pages[1].0, 0);
        assert_eq!(pages[1].1, NO_PACKET_ENDS, "no packet ends on it");
        assert_eq!(pages[1].3.len(), 255);
        assert_eq!(pages[2].0, FLAG_CONTINUED);
        assert_eq!((pages[2].1, pages[2].3.clone()), (960, vec![10]));
        assert_eq!(whole_pages_len(&out), out.len());
    }

    #[test]
    fn whole_pages_len_stops_before_a_torn_page() {
        let mut ogg = OggStream::new(7);
        let mut out = Vec::new();
        ogg.header_page(&opus_head(), &mut out);
        let first = out.len();
        ogg.add_packet(&[0xFC, 1, 2, 3], 960, &mut out);
        ogg.flush(false, &mut out);
        assert_eq!(whole_pages_len(&out), out.len());
        assert_eq!(whole_pages_len(&out[..out.len() - 1]), first);
        let mut damaged = out.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert_eq!(whole_pages_len(&damaged), first, "a failed CRC ends it");
    }
}
