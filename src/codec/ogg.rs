//! A streaming, sans-IO Ogg demuxer (RFC 3533) for one Opus stream (RFC 7845).
//!
//! [`OggDemuxer::push`] takes bytes cut at any boundary. It holds back at most
//! one incomplete page (the page buffer never exceeds [`MAX_PAGE_LEN`]) plus
//! the one packet being reassembled across pages (capped at
//! [`MAX_PACKET_LEN`]). Each input byte is copied into the page buffer once;
//! only a page that fails its CRC is scanned again (for the next capture
//! pattern), and that rescanning is capped in proportion to the input (see
//! [`RESYNC_RATIO`]), so the work is linear however the input is split.
//!
//! Damage does not end the stream: a page failing its CRC, or garbage between
//! pages, becomes one [`DemuxEvent::Damaged`] per skipped run, emitted when
//! the next good page is found (so damage at the very end of the input, with
//! no good page after it, is never reported); lost pages are noticed by their
//! sequence numbers.
//! Structural nonsense that cannot be resynchronised (a page version other
//! than 0, undefined header flags, a broken first page) is an error.

use super::container::{DemuxError, DemuxEvent, Demuxer, OpusHead};
use super::limit::LimitError;

/// Every page starts with this capture pattern.
const CAPTURE: &[u8; 4] = b"OggS";
/// The fixed part of a page header, up to and including the segment count.
const HEADER_LEN: usize = 27;
/// The largest possible page: header, 255 lacing values, 255 segments of 255 bytes.
pub const MAX_PAGE_LEN: usize = HEADER_LEN + 255 + 255 * 255;
/// Opus packets are a few KiB at most; a larger one is a bug or an attack.
pub const MAX_PACKET_LEN: usize = 1 << 20;
/// Resynchronising rescans each rejected page, and crafted input can start a
/// fake page claiming up to 64 KiB every few bytes (uncapped, 2 MB of it took
/// 7 s of CPU). Work on rejected bytes is therefore capped at this multiple
/// of the input, plus [`RESYNC_SLACK`], which honest damage (each bad page
/// scanned about once) never comes near; past it the stream is over a limit
/// ([`LimitError::OggResyncWork`]).
const RESYNC_RATIO: u64 = 4;
const RESYNC_SLACK: u64 = 16 * MAX_PAGE_LEN as u64;

const FLAG_CONTINUED: u8 = 0x01;
const FLAG_BOS: u8 = 0x02;
const FLAG_EOS: u8 = 0x04;

const CHAINED: &str = "multiplexed or chained Ogg streams are not supported";

/// What the front of the input is being treated as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing decided yet: the stream must open with a capture pattern.
    Start,
    /// `page` holds the beginning of a page, or bytes to examine as one.
    Page,
    /// Sync was lost: input is scanned for a capture pattern, and `page`
    /// holds the part of it matched so far.
    Hunt,
}

/// Which Opus packet comes next (RFC 7845 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Head,
    Tags,
    Audio,
}

/// The state of packet reassembly (lacing values of 255 continue a packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Assembly {
    /// Between packets.
    Idle,
    /// `packet` holds the start of an unfinished packet.
    Building,
    /// Discarding the rest of a packet whose beginning was lost to damage.
    Skipping,
}

/// A run of skipped input, reported when sync is regained.
#[derive(Debug)]
struct Loss {
    bytes: usize,
    reason: String,
}

/// The one logical stream we follow.
#[derive(Debug, Clone, Copy)]
struct Stream {
    serial: u32,
    next_seq: u32,
    ended: bool,
}

/// The fixed header fields of a page.
struct PageHeader {
    version: u8,
    flags: u8,
    granule: i64,
    serial: u32,
    seq: u32,
    crc: u32,
    segments: u8,
}

impl PageHeader {
    fn parse(h: &[u8; HEADER_LEN]) -> PageHeader {
        // Constant indices into a fixed-size array: checked at compile time.
        PageHeader {
            version: h[4],
            flags: h[5],
            granule: i64::from_le_bytes([h[6], h[7], h[8], h[9], h[10], h[11], h[12], h[13]]),
            serial: u32::from_le_bytes([h[14], h[15], h[16], h[17]]),
            seq: u32::from_le_bytes([h[18], h[19], h[20], h[21]]),
            crc: u32::from_le_bytes([h[22], h[23], h[24], h[25]]),
            segments: h[26],
        }
    }
}

/// Demuxes an Ogg/Opus byte stream into [`DemuxEvent`]s.
#[derive(Debug)]
pub struct OggDemuxer {
    phase: Phase,
    /// The incomplete page (while hunting: the partial capture pattern).
    page: Vec<u8>,
    /// `page` is examined again once it holds this many bytes.
    wanted: usize,
    packet: Vec<u8>,
    assembly: Assembly,
    stream: Option<Stream>,
    expect: Expect,
    /// Damage struck before OpusTags arrived, so the tags may be lost and
    /// the next packet may already be audio.
    tags_may_be_lost: bool,
    loss: Option<Loss>,
    /// Input bytes pushed so far, and bytes of rejected pages examined: see
    /// [`RESYNC_RATIO`].
    consumed: u64,
    resync_work: u64,
    /// Errors are final: later pushes repeat the error.
    failed: Option<DemuxError>,
}

impl Default for OggDemuxer {
    fn default() -> Self {
        Self::new()
    }
}

impl OggDemuxer {
    pub fn new() -> Self {
        OggDemuxer {
            phase: Phase::Start,
            page: Vec::new(),
            wanted: CAPTURE.len(),
            packet: Vec::new(),
            assembly: Assembly::Idle,
            stream: None,
            expect: Expect::Head,
            tags_may_be_lost: false,
            loss: None,
            consumed: 0,
            resync_work: 0,
            failed: None,
        }
    }

    fn run(&mut self, mut input: &[u8], out: &mut Vec<DemuxEvent>) -> Result<(), DemuxError> {
        self.consumed = self.consumed.saturating_add(input.len() as u64);
        loop {
            match self.phase {
                Phase::Start => {
                    fill(&mut self.page, &mut input, CAPTURE.len());
                    if self.page.len() < CAPTURE.len() {
                        return Ok(());
                    }
                    if !self.page.starts_with(CAPTURE) {
                        return Err(not_ogg(&self.page));
                    }
                    self.phase = Phase::Page;
                    self.wanted = HEADER_LEN;
                }
                Phase::Hunt => {
                    if !self.hunt(&mut input) {
                        return Ok(());
                    }
                }
                Phase::Page => {
                    if self.page.len() < self.wanted {
                        fill(&mut self.page, &mut input, self.wanted);
                        if self.page.len() < self.wanted {
                            return Ok(());
                        }
                    }
                    // Either raises `wanted` past what is held, or consumes
                    // bytes from `page`, or changes phase: the loop progresses.
                    self.examine(out)?;
                }
            }
        }
    }

    /// Scans `input` for a capture pattern, continuing a partial match held in
    /// `page`. Returns whether one was found (then `page` is "OggS").
    fn hunt(&mut self, input: &mut &[u8]) -> bool {
        let mut skipped = 0usize;
        let mut found = false;
        let mut used = 0;
        for &byte in input.iter() {
            used += 1;
            if CAPTURE.get(self.page.len()) == Some(&byte) {
                self.page.push(byte);
                if self.page.len() == CAPTURE.len() {
                    found = true;
                    break;
                }
            } else {
                // "OggS" has no repeated letters, so a failed partial match
                // can only restart at this byte.
                skipped = skipped.saturating_add(self.page.len());
                self.page.clear();
                if byte == CAPTURE[0] {
                    self.page.push(byte);
                } else {
                    skipped = skipped.saturating_add(1);
                }
            }
        }
        *input = input.get(used..).unwrap_or_default();
        self.add_loss(skipped, "garbage between pages");
        if found {
            self.phase = Phase::Page;
            self.wanted = HEADER_LEN;
        }
        found
    }

    /// Looks at what `page` holds and takes the next step with it.
    fn examine(&mut self, out: &mut Vec<DemuxEvent>) -> Result<(), DemuxError> {
        let len = self.page.len();
        if len >= CAPTURE.len() && !self.page.starts_with(CAPTURE) {
            return self.lose_sync(1, "garbage between pages");
        }
        let Some(fixed) = self.page.first_chunk::<HEADER_LEN>() else {
            self.want(HEADER_LEN);
            return Ok(());
        };
        let header = PageHeader::parse(fixed);
        if header.version != 0 || header.flags & !(FLAG_CONTINUED | FLAG_BOS | FLAG_EOS) != 0 {
            if self.loss.is_some() {
                // Found while resynchronising: a stray "OggS" in the garbage.
                return self.lose_sync(CAPTURE.len(), "garbage between pages");
            }
            return Err(DemuxError::Malformed(if header.version != 0 {
                format!("Ogg page version {} is not supported", header.version)
            } else {
                format!("undefined Ogg header type flags 0x{:02x}", header.flags)
            }));
        }
        let body_start = HEADER_LEN + usize::from(header.segments);
        let Some(lacing) = self.page.get(HEADER_LEN..body_start) else {
            self.want(body_start);
            return Ok(());
        };
        let total = body_start + lacing.iter().map(|&l| usize::from(l)).sum::<usize>();
        let Some(page) = self.page.get(..total) else {
            self.want(total);
            return Ok(());
        };
        if page_crc(page) != header.crc {
            if self.stream.is_none() {
                // Without a trustworthy OpusHead there is nothing to decode.
                return Err(DemuxError::Malformed(
                    "the first Ogg page failed its CRC check".into(),
                ));
            }
            return self.lose_sync(CAPTURE.len(), "page failed its CRC check");
        }
        // Take the buffer out to read the page while updating the rest of self.
        let page = std::mem::take(&mut self.page);
        let result = self.on_page(&header, &page, out);
        self.page = page;
        result?;
        // Bytes past the page (only after a resync) are the next page's start.
        self.page.drain(..total);
        self.wanted = 0;
        Ok(())
    }

    /// Waits for `page` to hold `len` bytes; reserves once so that byte-sized
    /// pushes do not reallocate, without over-allocating past the page.
    fn want(&mut self, len: usize) {
        self.page.reserve_exact(len.saturating_sub(self.page.len()));
        self.wanted = len;
    }

    /// Gives up on what `page` holds and resynchronises on the next capture
    /// pattern at or after `from`; the bytes passed over join the current loss.
    fn lose_sync(&mut self, from: usize, reason: &str) -> Result<(), DemuxError> {
        self.resync_work = self.resync_work.saturating_add(self.page.len() as u64);
        let budget = RESYNC_SLACK.saturating_add(self.consumed.saturating_mul(RESYNC_RATIO));
        if self.resync_work > budget {
            return Err(LimitError::OggResyncWork {
                work_bytes: self.resync_work,
                budget_bytes: budget,
            }
            .into());
        }
        let rest = self.page.get(from..).unwrap_or_default();
        let skip = match rest.windows(CAPTURE.len()).position(|w| w == CAPTURE) {
            Some(at) => {
                self.phase = Phase::Page;
                from + at
            }
            None => {
                // Keep a trailing "O", "Og" or "Ogg": the next input may finish it.
                let keep = (1..CAPTURE.len())
                    .rev()
                    .find(|&n| rest.ends_with(&CAPTURE[..n]))
                    .unwrap_or(0);
                self.phase = Phase::Hunt;
                self.page.len().saturating_sub(keep)
            }
        };
        self.page.drain(..skip);
        self.wanted = 0;
        self.add_loss(skip, reason);
        self.mark_damage();
        Ok(())
    }

    fn add_loss(&mut self, bytes: usize, reason: &str) {
        if bytes == 0 {
            return;
        }
        let loss = self.loss.get_or_insert_with(|| Loss {
            bytes: 0,
            reason: reason.to_owned(),
        });
        loss.bytes = loss.bytes.saturating_add(bytes);
    }

    /// Input went missing: the packet under reassembly is broken, and so is
    /// the continuation of it that the next page may start with.
    fn mark_damage(&mut self) {
        self.packet.clear();
        self.assembly = Assembly::Skipping;
        if self.expect == Expect::Tags {
            self.tags_may_be_lost = true;
        }
    }

    /// Handles a page that passed its CRC check.
    fn on_page(
        &mut self,
        header: &PageHeader,
        page: &[u8],
        out: &mut Vec<DemuxEvent>,
    ) -> Result<(), DemuxError> {
        let mut damaged = false;
        if let Some(loss) = self.loss.take() {
            out.push(DemuxEvent::Damaged {
                bytes_skipped: loss.bytes,
                reason: loss.reason,
            });
            damaged = true;
        }
        match &mut self.stream {
            None => {
                if header.flags & FLAG_BOS == 0 {
                    return Err(DemuxError::Malformed(
                        "the first Ogg page does not begin a logical stream (no BOS flag)".into(),
                    ));
                }
                self.stream = Some(Stream {
                    serial: header.serial,
                    next_seq: header.seq.wrapping_add(1),
                    ended: false,
                });
            }
            Some(stream) => {
                if header.serial != stream.serial || header.flags & FLAG_BOS != 0 {
                    return Err(DemuxError::Unsupported(CHAINED.into()));
                }
                if stream.ended {
                    return Err(DemuxError::Malformed(
                        "an Ogg page follows the end-of-stream page".into(),
                    ));
                }
                let expected = stream.next_seq;
                stream.next_seq = header.seq.wrapping_add(1);
                if header.seq != expected {
                    if !damaged {
                        out.push(DemuxEvent::Damaged {
                            bytes_skipped: 0,
                            reason: format!(
                                "page sequence gap: expected page {expected}, got {}",
                                header.seq
                            ),
                        });
                        damaged = true;
                    }
                    self.mark_damage();
                }
            }
        }

        let body_start = HEADER_LEN + usize::from(header.segments);
        let lacing = page.get(HEADER_LEN..body_start).unwrap_or_default();
        let mut body = page.get(body_start..).unwrap_or_default();
        let continued = header.flags & FLAG_CONTINUED != 0;
        match (self.assembly, continued) {
            (Assembly::Building, false) => {
                // The muxer abandoned a packet; without damage that is worth saying.
                if !damaged {
                    out.push(DemuxEvent::Damaged {
                        bytes_skipped: self.packet.len(),
                        reason: "a packet was not continued on the next page".into(),
                    });
                }
                self.packet.clear();
                self.assembly = Assembly::Idle;
            }
            (Assembly::Idle, true) => {
                if !damaged {
                    let fragment = lacing
                        .iter()
                        .position(|&l| l < 255)
                        .map_or(lacing, |end| &lacing[..=end]);
                    out.push(DemuxEvent::Damaged {
                        bytes_skipped: fragment.iter().map(|&l| usize::from(l)).sum(),
                        reason: "a page continues a packet that never began".into(),
                    });
                }
                self.assembly = Assembly::Skipping;
            }
            (Assembly::Skipping, false) => self.assembly = Assembly::Idle,
            _ => {}
        }

        let mut last_packet = None;
        for &lace in lacing {
            let Some((segment, rest)) = body.split_at_checked(usize::from(lace)) else {
                // Unreachable: the page length was computed from these values.
                return Err(DemuxError::Malformed(
                    "Ogg page shorter than its lacing".into(),
                ));
            };
            body = rest;
            let ends_packet = lace < 255;
            if self.assembly == Assembly::Skipping {
                if ends_packet {
                    self.assembly = Assembly::Idle;
                }
                continue;
            }
            if self.packet.len().saturating_add(segment.len()) > MAX_PACKET_LEN {
                return Err(LimitError::OggPacket {
                    max_bytes: MAX_PACKET_LEN,
                }
                .into());
            }
            self.packet.extend_from_slice(segment);
            self.assembly = Assembly::Building;
            if ends_packet {
                self.assembly = Assembly::Idle;
                let packet = std::mem::take(&mut self.packet);
                if self.on_packet(packet, out)? {
                    last_packet = out.len().checked_sub(1);
                }
            }
        }

        if header.flags & FLAG_EOS != 0 {
            if let Some(stream) = &mut self.stream {
                stream.ended = true;
            }
            // The final granule lets the decoder trim the last packet (RFC 7845 §4.5).
            if let Some(DemuxEvent::Packet { end_granule, .. }) =
                last_packet.and_then(|i| out.get_mut(i))
            {
                *end_granule = u64::try_from(header.granule).ok();
            }
            if self.assembly == Assembly::Building {
                out.push(DemuxEvent::Damaged {
                    bytes_skipped: self.packet.len(),
                    reason: "the stream ended inside a packet".into(),
                });
                self.packet.clear();
                self.assembly = Assembly::Idle;
            }
        }
        Ok(())
    }

    /// Handles one complete packet; returns whether it became a `Packet` event.
    fn on_packet(
        &mut self,
        packet: Vec<u8>,
        out: &mut Vec<DemuxEvent>,
    ) -> Result<bool, DemuxError> {
        match self.expect {
            Expect::Head => {
                if !packet.starts_with(b"OpusHead") {
                    return Err(DemuxError::Unsupported(format!(
                        "the Ogg stream carries {}, not Opus",
                        codec_name(&packet)
                    )));
                }
                out.push(DemuxEvent::Head(OpusHead::parse(&packet)?));
                self.expect = Expect::Tags;
                return Ok(false);
            }
            Expect::Tags => {
                if packet.starts_with(b"OpusTags") {
                    self.expect = Expect::Audio;
                    return Ok(false);
                }
                if !self.tags_may_be_lost {
                    return Err(DemuxError::Malformed(
                        "the second Ogg packet is not OpusTags".into(),
                    ));
                }
                // The tags were lost to damage: this is already audio.
                self.expect = Expect::Audio;
            }
            Expect::Audio => {}
        }
        out.push(DemuxEvent::Packet {
            data: packet,
            end_granule: None,
        });
        Ok(true)
    }
}

impl Demuxer for OggDemuxer {
    fn push(&mut self, bytes: &[u8], out: &mut Vec<DemuxEvent>) -> Result<(), DemuxError> {
        if let Some(error) = &self.failed {
            return Err(duplicate(error));
        }
        let result = self.run(bytes, out);
        if let Err(error) = &result {
            self.failed = Some(duplicate(error));
            // Nothing more will be parsed: free the buffers.
            self.page = Vec::new();
            self.packet = Vec::new();
        }
        debug_assert!(self.page.len() <= MAX_PAGE_LEN);
        result
    }

    fn buffered_bytes(&self) -> usize {
        self.page.len() + self.packet.len()
    }
}

/// Moves bytes from the front of `input` into `buf` until it holds `len`.
fn fill(buf: &mut Vec<u8>, input: &mut &[u8], len: usize) {
    let n = len.saturating_sub(buf.len()).min(input.len());
    let (head, rest) = input.split_at(n);
    buf.extend_from_slice(head);
    *input = rest;
}

fn duplicate(error: &DemuxError) -> DemuxError {
    match error {
        DemuxError::Unsupported(m) => DemuxError::Unsupported(m.clone()),
        DemuxError::Malformed(m) => DemuxError::Malformed(m.clone()),
        DemuxError::Limit(l) => DemuxError::Limit(l.clone()),
    }
}

/// The error for a stream that does not open with "OggS", naming the
/// container when the first bytes give it away.
fn not_ogg(start: &[u8]) -> DemuxError {
    let hint = if start.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) {
        "this looks like WebM; use encoding=webm_opus"
    } else if start.starts_with(b"RIFF") {
        "this looks like a WAV (RIFF) file, not Ogg/Opus; send its samples as raw PCM"
    } else if start.starts_with(b"ID3") {
        "this looks like MP3 (it starts with an ID3 tag), not Ogg/Opus"
    } else if start.starts_with(b"fLaC") {
        "this looks like FLAC, not Ogg/Opus"
    } else {
        return DemuxError::Malformed(format!(
            "not an Ogg stream: it starts with \"{}\", not \"OggS\"",
            start.escape_ascii()
        ));
    };
    DemuxError::Unsupported(hint.into())
}

/// Names the codec of a logical stream from its first packet.
fn codec_name(packet: &[u8]) -> String {
    const KNOWN: [(&[u8], &str); 7] = [
        (b"\x01vorbis", "Vorbis"),
        (b"Speex", "Speex"),
        (b"\x7fFLAC", "FLAC"),
        (b"fLaC", "FLAC"),
        (b"\x80theora", "Theora video"),
        (b"CELT", "CELT"),
        (b"OpusTags", "OpusTags without OpusHead"),
    ];
    match KNOWN.iter().find(|(magic, _)| packet.starts_with(magic)) {
        Some((_, name)) => (*name).into(),
        None => format!(
            "an unknown codec (first packet starts with \"{}\")",
            packet[..packet.len().min(8)].escape_ascii()
        ),
    }
}

/// CRC-32 with polynomial 0x04c11db7, no reflection, initial value and final
/// XOR 0: the checksum of RFC 3533 §6. Table built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut r = (i as u32) << 24;
        let mut bit = 0;
        while bit < 8 {
            r = if r & 0x8000_0000 != 0 {
                (r << 1) ^ 0x04c1_1db7
            } else {
                r << 1
            };
            bit += 1;
        }
        table[i] = r;
        i += 1;
    }
    table
};

pub(crate) fn crc32(crc: u32, bytes: &[u8]) -> u32 {
    bytes.iter().fold(crc, |crc, &b| {
        (crc << 8) ^ CRC_TABLE[usize::from((crc >> 24) as u8 ^ b)]
    })
}

/// The CRC of a whole page, computed with its CRC field (bytes 22..26) as zeros.
pub(crate) fn page_crc(page: &[u8]) -> u32 {
    let crc = crc32(0, page.get(..22).unwrap_or_default());
    let crc = crc32(crc, &[0; 4]);
    crc32(crc, page.get(26..).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Absolute, so the tests work wherever the crate is built from.
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    /// (file, channels). For all three files `opusinfo` and
    /// `ffprobe -v error -show_packets -select_streams a FILE | grep -c '^\[PACKET'`
    /// both report 126 audio packets of 20 ms (2.5 s + 312 samples pre-skip),
    /// on pages holding 50 + 50 + 26 packets, the EOS page at granule 120312.
    const OPUS_FILES: [(&str, u8); 3] = [
        ("speech-opusenc.opus", 1),
        ("speech-ffmpeg.ogg", 1),
        ("call-stereo.opus", 2),
    ];
    const PACKETS: usize = 126;
    const FINAL_GRANULE: u64 = 120_312;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{FIXTURES}{name}");
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// A tiny LCG (Knuth's MMIX constants): deterministic, no rand crate.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) as u32
        }

        fn below(&mut self, n: usize) -> usize {
            self.next() as usize % n.max(1)
        }
    }

    struct Run {
        events: Vec<DemuxEvent>,
        result: Result<(), DemuxError>,
        max_buffered: usize,
        buffered: usize,
    }

    /// Feeds `data` in chunks whose sizes `next_len` picks; stops at an error.
    fn demux(data: &[u8], mut next_len: impl FnMut() -> usize) -> Run {
        let mut demuxer = OggDemuxer::new();
        let mut run = Run {
            events: Vec::new(),
            result: Ok(()),
            max_buffered: 0,
            buffered: 0,
        };
        let mut rest = data;
        while !rest.is_empty() && run.result.is_ok() {
            let (chunk, tail) = rest.split_at(next_len().clamp(1, rest.len()));
            rest = tail;
            run.result = demuxer.push(chunk, &mut run.events);
            run.max_buffered = run.max_buffered.max(demuxer.buffered_bytes());
        }
        run.buffered = demuxer.buffered_bytes();
        run
    }

    fn whole(data: &[u8]) -> Run {
        demux(data, || usize::MAX)
    }

    fn bytewise(data: &[u8]) -> Run {
        demux(data, || 1)
    }

    fn random_chunks(data: &[u8], seed: u64) -> Run {
        let mut lcg = Lcg(seed);
        demux(data, move || 1 + lcg.below(3000))
    }

    fn packets(events: &[DemuxEvent]) -> Vec<(&[u8], Option<u64>)> {
        events
            .iter()
            .filter_map(|e| match e {
                DemuxEvent::Packet { data, end_granule } => Some((&data[..], *end_granule)),
                _ => None,
            })
            .collect()
    }

    fn damaged(events: &[DemuxEvent]) -> Vec<(usize, &str)> {
        events
            .iter()
            .filter_map(|e| match e {
                DemuxEvent::Damaged {
                    bytes_skipped,
                    reason,
                } => Some((*bytes_skipped, &reason[..])),
                _ => None,
            })
            .collect()
    }

    /// Pages of a well-formed file, parsed independently of the demuxer:
    /// (offset, length, granule, packets ending on the page).
    fn pages(data: &[u8]) -> Vec<(usize, usize, i64, usize)> {
        let mut pages = Vec::new();
        let mut at = 0;
        while at < data.len() {
            assert_eq!(&data[at..at + 4], CAPTURE);
            let granule = i64::from_le_bytes(data[at + 6..at + 14].try_into().unwrap());
            let lacing = &data[at + 27..at + 27 + usize::from(data[at + 26])];
            let len = 27 + lacing.len() + lacing.iter().map(|&l| usize::from(l)).sum::<usize>();
            let ending = lacing.iter().filter(|&&l| l < 255).count();
            pages.push((at, len, granule, ending));
            at += len;
        }
        pages
    }

    /// The number of 48 kHz samples in an Opus packet, from its TOC byte
    /// (RFC 6716 §3.1).
    fn toc_samples(packet: &[u8]) -> Option<u32> {
        let toc = *packet.first()?;
        let config = usize::from(toc >> 3);
        let frame = match config {
            0..=11 => [480, 960, 1920, 2880][config % 4], // SILK: 10/20/40/60 ms
            12..=15 => [480, 960][config % 2],            // hybrid: 10/20 ms
            _ => [120, 240, 480, 960][config % 4],        // CELT: 2.5/5/10/20 ms
        };
        let frames = match toc & 3 {
            0 => 1,
            1 | 2 => 2,
            _ => u32::from(*packet.get(1)? & 0x3f),
        };
        Some(frame * frames)
    }

    fn opus_head(channels: u8) -> Vec<u8> {
        let mut head = b"OpusHead".to_vec();
        head.extend_from_slice(&[1, channels, 0x38, 0x01, 0x80, 0xBB, 0, 0, 0, 0, 0]);
        head
    }

    /// Builds one page with a correct CRC.
    fn page(flags: u8, granule: i64, serial: u32, seq: u32, lacing: &[u8], body: &[u8]) -> Vec<u8> {
        let mut p = CAPTURE.to_vec();
        p.extend_from_slice(&[0, flags]);
        p.extend_from_slice(&granule.to_le_bytes());
        p.extend_from_slice(&serial.to_le_bytes());
        p.extend_from_slice(&seq.to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        p.push(u8::try_from(lacing.len()).unwrap());
        p.extend_from_slice(lacing);
        p.extend_from_slice(body);
        let crc = page_crc(&p);
        p[22..26].copy_from_slice(&crc.to_le_bytes());
        p
    }

    /// Lays `packets` out on pages of at most `max_segments` lacing values,
    /// splitting packets across pages; first page BOS, last page EOS.
    fn paginate(serial: u32, packets: &[Vec<u8>], max_segments: usize) -> Vec<u8> {
        // (segment, ends its packet, starts its packet)
        let mut segments: Vec<(&[u8], bool, bool)> = Vec::new();
        for packet in packets {
            let mut chunks: Vec<&[u8]> = packet.chunks(255).collect();
            if packet.len() % 255 == 0 {
                chunks.push(&[]); // a packet of a multiple of 255 ends with a 0 lacing
            }
            let last = chunks.len() - 1;
            for (i, chunk) in chunks.into_iter().enumerate() {
                segments.push((chunk, i == last, i == 0));
            }
        }
        let pages: Vec<_> = segments.chunks(max_segments).collect();
        let mut out = Vec::new();
        let mut ended = 0;
        for (seq, segs) in pages.iter().enumerate() {
            let mut flags = 0;
            if seq == 0 {
                flags |= FLAG_BOS;
            }
            if seq == pages.len() - 1 {
                flags |= FLAG_EOS;
            }
            if !segs[0].2 {
                flags |= FLAG_CONTINUED;
            }
            let ends = segs.iter().filter(|s| s.1).count();
            ended += ends;
            let granule = if ends == 0 { -1 } else { ended as i64 * 960 };
            let lacing: Vec<u8> = segs.iter().map(|s| s.0.len() as u8).collect();
            let body: Vec<u8> = segs.iter().flat_map(|s| s.0.iter().copied()).collect();
            out.extend(page(flags, granule, serial, seq as u32, &lacing, &body));
        }
        out
    }

    #[test]
    fn crc_matches_the_reference_check_value() {
        // CRC-32 with poly 0x04c11db7, init 0, no reflection, no final XOR.
        assert_eq!(crc32(0, b"123456789"), 0x89A1_897F);
    }

    #[test]
    fn fixtures_demux_identically_however_they_are_split() {
        for (name, channels) in OPUS_FILES {
            let data = fixture(name);
            let reference = whole(&data);
            assert_eq!(reference.result, Ok(()), "{name}");
            assert_eq!(reference.buffered, 0, "{name}");
            for seed in 1..=4 {
                let run = random_chunks(&data, seed);
                assert_eq!(run.result, Ok(()), "{name}");
                assert_eq!(run.events, reference.events, "{name}, seed {seed}");
            }
            assert_eq!(bytewise(&data).events, reference.events, "{name}");

            let events = &reference.events;
            let DemuxEvent::Head(head) = events[0] else {
                panic!("{name}: first event is {:?}", events[0]);
            };
            assert_eq!((head.channels, head.pre_skip), (channels, 312), "{name}");
            let packets = packets(events);
            assert_eq!(packets.len(), PACKETS, "{name}");
            assert_eq!(events.len(), PACKETS + 1, "{name}: nothing else is emitted");

            let last_page_granule = pages(&data).last().unwrap().2;
            assert_eq!(last_page_granule, FINAL_GRANULE as i64, "{name}");
            let (last, rest) = packets.split_last().unwrap();
            assert_eq!(last.1, Some(FINAL_GRANULE), "{name}");
            assert!(rest.iter().all(|p| p.1.is_none()), "{name}");
        }
    }

    #[test]
    fn every_packet_lasts_20_ms() {
        for (name, _) in OPUS_FILES {
            let run = whole(&fixture(name));
            for (i, (packet, _)) in packets(&run.events).iter().enumerate() {
                assert_eq!(toc_samples(packet), Some(960), "{name}: packet {i}");
            }
        }
    }

    #[test]
    fn a_corrupted_page_is_skipped_once_and_the_stream_goes_on() {
        for (name, _) in OPUS_FILES {
            let data = fixture(name);
            let pages = pages(&data);
            let (at, len, _, on_page) = pages[2];
            let last_lacing = at + 27 + usize::from(data[at + 26]) - 1;
            // A body byte; the segment count (the page then ends inside the
            // next one, found again inside the buffer); the last lacing value
            // (the page then ends on "Og", the start of the next capture).
            for (offset, delta) in [(at + len / 2, 0x10), (at + 26, 1), (last_lacing, 2)] {
                let mut bad = data.clone();
                bad[offset] = bad[offset].wrapping_add(delta);
                for run in [whole(&bad), bytewise(&bad), random_chunks(&bad, 7)] {
                    assert_eq!(run.result, Ok(()), "{name}");
                    let damage = damaged(&run.events);
                    assert_eq!(damage.len(), 1, "{name}: {damage:?}");
                    assert_eq!(damage[0], (len, "page failed its CRC check"), "{name}");
                    // Pages hold 50 packets here, so one lost page is 40% of
                    // the audio ("> 80% delivered" cannot hold); instead check
                    // that exactly the damaged page's packets are missing.
                    let packets = packets(&run.events);
                    assert_eq!(packets.len(), PACKETS - on_page, "{name}");
                    assert_eq!(packets.last().unwrap().1, Some(FINAL_GRANULE), "{name}");
                }
            }
        }
    }

    #[test]
    fn a_truncated_stream_just_yields_fewer_packets() {
        for (name, _) in OPUS_FILES {
            let data = fixture(name);
            let full = whole(&data);
            let cut = &data[..data.len() * 6 / 10];
            for run in [whole(cut), bytewise(cut)] {
                assert_eq!(run.result, Ok(()), "{name}");
                let n = packets(&run.events).len();
                assert!(n > 0 && n < PACKETS, "{name}: {n} packets");
                assert_eq!(run.events[..], full.events[..run.events.len()], "{name}");
                // Only the unfinished page is held.
                let last_page_end = pages(&data)
                    .iter()
                    .map(|p| p.0 + p.1)
                    .filter(|&end| end <= cut.len())
                    .max()
                    .unwrap();
                assert_eq!(run.buffered, cut.len() - last_page_end, "{name}");
                assert!(run.buffered <= MAX_PAGE_LEN, "{name}");
            }
        }
    }

    #[test]
    fn other_containers_and_codecs_are_refused_helpfully() {
        let webm = bytewise(&fixture("speech-ffmpeg.webm"));
        match webm.result {
            Err(DemuxError::Unsupported(m)) => assert!(m.contains("webm_opus"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(webm.events.is_empty());

        let mut lcg = Lcg(42);
        let noise: Vec<u8> = (0..4096).map(|_| lcg.next() as u8).collect();
        assert!(matches!(
            whole(&noise).result,
            Err(DemuxError::Malformed(_))
        ));
        assert!(matches!(
            bytewise(&noise).result,
            Err(DemuxError::Malformed(_))
        ));

        for magic in [&b"RIFF"[..], b"ID3\x04", b"fLaC"] {
            let mut data = magic.to_vec();
            data.extend_from_slice(&[0; 64]);
            assert!(matches!(
                whole(&data).result,
                Err(DemuxError::Unsupported(_))
            ));
        }

        let mut vorbis = b"\x01vorbis".to_vec();
        vorbis.extend_from_slice(&[0; 23]);
        for (packet, codec) in [(vorbis, "Vorbis"), (b"Speex   1.2".to_vec(), "Speex")] {
            let bos = page(FLAG_BOS, 0, 7, 0, &[packet.len() as u8], &packet);
            for run in [whole(&bos), bytewise(&bos)] {
                match run.result {
                    Err(DemuxError::Unsupported(m)) => assert!(m.contains(codec), "{m}"),
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn buffering_stays_within_one_page_and_one_packet() {
        for (name, _) in OPUS_FILES {
            let data = fixture(name);
            let run = bytewise(&data);
            let largest = packets(&run.events)
                .iter()
                .map(|p| p.0.len())
                .max()
                .unwrap();
            assert!(run.max_buffered <= MAX_PAGE_LEN + largest, "{name}");
            // In fact no more than the largest page of the file.
            let largest_page = pages(&data).iter().map(|p| p.1).max().unwrap();
            assert!(run.max_buffered < largest_page, "{name}");
        }
    }

    #[test]
    fn mutated_inputs_never_panic() {
        let files: Vec<Vec<u8>> = OPUS_FILES.iter().map(|(n, _)| fixture(n)).collect();
        let mut lcg = Lcg(2024);
        for i in 0..2000 {
            let mut data = files[i % files.len()].clone();
            for _ in 0..1 + lcg.below(8) {
                let at = lcg.below(data.len());
                match lcg.below(3) {
                    0 => data[at] ^= 1 + lcg.below(255) as u8,
                    1 => data.insert(at, lcg.next() as u8),
                    _ => {
                        data.remove(at);
                    }
                }
            }
            let seed = u64::from(lcg.next());
            let run = random_chunks(&data, seed);
            assert!(run.max_buffered <= MAX_PAGE_LEN + MAX_PACKET_LEN);
        }
    }

    #[test]
    fn packets_spanning_pages_are_reassembled() {
        let mut lcg = Lcg(5);
        let mut sent = vec![opus_head(2), {
            let mut tags = b"OpusTags".to_vec();
            tags.resize(700, b'x'); // spans pages when pages are small
            tags
        }];
        for len in [0, 1, 254, 255, 256, 510, 1000, 3000, 60, 255 * 3] {
            sent.push((0..len).map(|_| lcg.next() as u8).collect());
        }
        for max_segments in [1, 2, 3, 7, 255] {
            let data = paginate(99, &sent, max_segments);
            for run in [whole(&data), bytewise(&data), random_chunks(&data, 3)] {
                assert_eq!(run.result, Ok(()));
                assert!(matches!(run.events[0], DemuxEvent::Head(h) if h.channels == 2));
                let got = packets(&run.events);
                let want: Vec<&[u8]> = sent[2..].iter().map(|p| &p[..]).collect();
                assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), want);
                let last_granule = got.last().unwrap().1;
                assert_eq!(last_granule, Some(sent.len() as u64 * 960));
                assert!(damaged(&run.events).is_empty());
            }
        }
    }

    #[test]
    fn garbage_between_pages_is_one_damaged_event() {
        let data = fixture("speech-opusenc.opus");
        let pages = pages(&data);
        let boundary = pages[3].0;
        // Includes a false start "Ogg" and a stray "OggS" with a bad version.
        let junk = b"xxOggxOggS\x07yyyyyyyyyyyyyyyyyyyyyyyyyyyyyy zz";
        let mut bad = data[..boundary].to_vec();
        bad.extend_from_slice(junk);
        bad.extend_from_slice(&data[boundary..]);
        for run in [whole(&bad), bytewise(&bad), random_chunks(&bad, 11)] {
            assert_eq!(run.result, Ok(()));
            assert_eq!(
                damaged(&run.events),
                [(junk.len(), "garbage between pages")]
            );
            // No page was lost and none continues a packet: nothing is missing.
            assert_eq!(packets(&run.events).len(), PACKETS);
        }
    }

    #[test]
    fn crafted_fake_pages_cannot_make_resync_quadratic() {
        // After valid headers, "OggS\0\0" repeated: every 6 bytes a fake page
        // claiming ~6 KiB, each failing its CRC after a rescan of its bytes.
        let data = fixture("speech-opusenc.opus");
        let mut evil = data[..pages(&data)[2].0].to_vec();
        while evil.len() < 300_000 {
            evil.extend_from_slice(b"OggS\0\0");
        }
        for run in [whole(&evil), bytewise(&evil)] {
            let Err(DemuxError::Limit(LimitError::OggResyncWork {
                work_bytes,
                budget_bytes,
            })) = run.result
            else {
                panic!("expected the resync work limit, got {:?}", run.result);
            };
            assert!(work_bytes > budget_bytes);
            // The budget is the slack plus a multiple of the input, and
            // the input is all there was.
            assert!(budget_bytes <= RESYNC_SLACK + RESYNC_RATIO * evil.len() as u64);
        }
    }

    #[test]
    fn lost_pages_are_a_sequence_gap_and_drop_split_packets() {
        let mut lcg = Lcg(9);
        let mut sent = vec![opus_head(1), b"OpusTags".to_vec()];
        for _ in 0..10 {
            sent.push((0..400).map(|_| lcg.next() as u8).collect());
        }
        // 400-byte packets take two segments (255 + 145); with three per page
        // the pages are [head tags 0a] [0b 1a 1b] [2a 2b 3a] [3b 4a 4b]
        // [5a 5b 6a] [6b 7a 7b] ...
        let data = paginate(1, &sent, 3);
        let starts: Vec<usize> = pages(&data).iter().map(|p| p.0).collect();
        // (lost pages, audio packets lost with them). Losing pages 3 and 4
        // leaves 3a unfinished and 6b orphaned: they must not be glued.
        for (lost, gone) in [(2..3, 2..=3), (3..5, 3..=6), (3..6, 3..=7)] {
            let mut cut = data[..starts[lost.start]].to_vec();
            cut.extend_from_slice(&data[starts[lost.end]..]);
            for run in [whole(&cut), bytewise(&cut), random_chunks(&cut, 5)] {
                assert_eq!(run.result, Ok(()));
                let damage = damaged(&run.events);
                assert_eq!(damage.len(), 1, "{damage:?}");
                assert!(damage[0].1.starts_with("page sequence gap"), "{damage:?}");
                let got: Vec<&[u8]> = packets(&run.events).iter().map(|p| p.0).collect();
                let want: Vec<&[u8]> = sent[2..]
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !gone.contains(i))
                    .map(|(_, p)| &p[..])
                    .collect();
                assert_eq!(got, want, "lost pages {lost:?}");
            }
        }
    }

    #[test]
    fn a_second_logical_stream_is_unsupported() {
        let data = fixture("speech-ffmpeg.ogg");
        let pages = pages(&data);
        let other = page(FLAG_BOS, 0, 12345, 0, &[19], &opus_head(1));
        let mut muxed = data[..pages[2].0].to_vec();
        muxed.extend_from_slice(&other);
        muxed.extend_from_slice(&data[pages[2].0..]);
        assert_eq!(
            whole(&muxed).result,
            Err(DemuxError::Unsupported(CHAINED.into()))
        );
        // Chained: a new stream after the first one ended.
        let mut chained = data.clone();
        chained.extend_from_slice(&other);
        assert_eq!(
            bytewise(&chained).result,
            Err(DemuxError::Unsupported(CHAINED.into()))
        );
    }

    #[test]
    fn bad_version_flags_and_headers_are_malformed() {
        let data = fixture("speech-opusenc.opus");
        let second = pages(&data)[1].0;
        for (offset, value) in [(4, 1), (5, 0x0A), (second + 4, 3), (second + 5, 0x80)] {
            let mut bad = data.clone();
            bad[offset] = value;
            assert!(
                matches!(whole(&bad).result, Err(DemuxError::Malformed(_))),
                "byte {offset} = {value}"
            );
        }
        // A damaged first page cannot be resynchronised: no OpusHead.
        let mut bad = data.clone();
        bad[30] ^= 1;
        assert!(matches!(whole(&bad).result, Err(DemuxError::Malformed(_))));
        // The first page must begin the stream.
        let first = page(0, 0, 1, 0, &[19], &opus_head(1));
        assert!(matches!(
            whole(&first).result,
            Err(DemuxError::Malformed(_))
        ));
        // The second packet must be OpusTags.
        let mut no_tags = page(FLAG_BOS, 0, 1, 0, &[19], &opus_head(1));
        no_tags.extend(page(0, 960, 1, 1, &[3], &[0xF8, 1, 2]));
        assert!(matches!(
            whole(&no_tags).result,
            Err(DemuxError::Malformed(_))
        ));
    }

    #[test]
    fn an_oversized_packet_is_over_the_limit_and_errors_are_final() {
        let mut data = page(FLAG_BOS, 0, 1, 0, &[19], &opus_head(1));
        data.extend(page(0, 0, 1, 1, &[8], b"OpusTags"));
        let full = vec![255u8; 255];
        let body = vec![0u8; 255 * 255];
        for seq in 2..20 {
            let flags = if seq == 2 { 0 } else { FLAG_CONTINUED };
            data.extend(page(flags, -1, 1, seq, &full, &body));
        }
        let mut demuxer = OggDemuxer::new();
        let mut events = Vec::new();
        let result = demuxer.push(&data, &mut events);
        let over = || {
            Err(DemuxError::Limit(LimitError::OggPacket {
                max_bytes: MAX_PACKET_LEN,
            }))
        };
        assert_eq!(result, over());
        assert_eq!(demuxer.buffered_bytes(), 0);
        assert_eq!(demuxer.push(&data[..10], &mut events), over());
        // A packet of exactly the cap is a packet like any other: 16 full
        // pages, then a page whose lacing ends it.
        let mut data = page(FLAG_BOS, 0, 1, 0, &[19], &opus_head(1));
        data.extend(page(0, 0, 1, 1, &[8], b"OpusTags"));
        let whole_pages = MAX_PACKET_LEN / body.len();
        for seq in 0..whole_pages {
            let flags = if seq == 0 { 0 } else { FLAG_CONTINUED };
            data.extend(page(flags, -1, 1, seq as u32 + 2, &full, &body));
        }
        let tail = MAX_PACKET_LEN - whole_pages * body.len();
        let mut lacing = vec![255u8; tail / 255];
        lacing.push((tail % 255) as u8);
        data.extend(page(
            FLAG_CONTINUED,
            960,
            1,
            whole_pages as u32 + 2,
            &lacing,
            &vec![0u8; tail],
        ));
        let mut demuxer = OggDemuxer::new();
        let mut events = Vec::new();
        assert_eq!(demuxer.push(&data, &mut events), Ok(()));
        assert_eq!(
            packets(&events)
                .iter()
                .map(|p| p.0.len())
                .collect::<Vec<_>>(),
            [MAX_PACKET_LEN]
        );
    }
}
