//! Limits against hostile streams, as Symphonia's `LimitError`: bounds on
//! what a stream may make a demuxer hold in memory or spend in work.
//!
//! A stream over one is neither malformed (nothing was misread: an Ogg
//! packet may be any size, a WebM element almost any) nor unsupported; it
//! asks for more than the server will give one client. Its own kind lets
//! the client and the operator tell the three apart: error code
//! `limit_exceeded`, close 1008 (`server::close`), and
//! `cochlea_limit_hits_total{limit}` by [`LimitError::name`].

/// One bound a stream went over, with the numbers that say by how much.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    /// An Ogg packet reassembled across pages grew past the cap.
    #[error("an Ogg packet is larger than the limit of {max_bytes} bytes")]
    OggPacket { max_bytes: usize },
    /// Resynchronising on damaged Ogg input rescanned more bytes than the
    /// input can justify: the mark of crafted fake pages.
    #[error("damaged Ogg input took {work_bytes} bytes of rescanning to resynchronise, over the limit of {budget_bytes} for this much input")]
    OggResyncWork { work_bytes: u64, budget_bytes: u64 },
    /// A WebM element whose body would be buffered (a header field, or a
    /// block on the Opus track) is larger than the cap.
    #[error(
        "WebM element 0x{id:X} of {size_bytes} bytes is larger than the limit of {max_bytes} bytes"
    )]
    WebmElement {
        id: u32,
        size_bytes: u64,
        max_bytes: u64,
    },
}

impl LimitError {
    /// The limit's name: the `limit` label of `cochlea_limit_hits_total`.
    pub fn name(&self) -> &'static str {
        match self {
            LimitError::OggPacket { .. } => "ogg_packet_bytes",
            LimitError::OggResyncWork { .. } => "ogg_resync_work",
            LimitError::WebmElement { .. } => "webm_element_bytes",
        }
    }
}
