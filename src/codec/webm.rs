//! Placeholder until the real demuxer lands (in progress in this change).
use super::container::{DemuxError, DemuxEvent, Demuxer};
#[derive(Default)]
pub struct WebmDemuxer;
impl WebmDemuxer {
    pub fn new() -> Self {
        Self
    }
}
impl Demuxer for WebmDemuxer {
    fn push(&mut self, _: &[u8], _: &mut Vec<DemuxEvent>) -> Result<(), DemuxError> {
        Err(DemuxError::Unsupported("not yet".into()))
    }
    fn buffered_bytes(&self) -> usize {
        0
    }
}
