//! The `framing=seq` header on arbitrary bytes: parsing never panics, a
//! message of 12 bytes or more always parses, and re-encoding the header
//! gives back exactly the first 12 bytes (the rest is the audio payload).
#![no_main]
use libfuzzer_sys::fuzz_target;

use cochlea::protocol::{ProtocolError, SeqHeader, SEQ_HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    match SeqHeader::parse(data) {
        Ok((header, audio)) => {
            assert!(data.len() >= SEQ_HEADER_BYTES);
            assert_eq!(&header.encode()[..], &data[..SEQ_HEADER_BYTES]);
            assert_eq!(audio, &data[SEQ_HEADER_BYTES..]);
            let encoded = header.encode();
            let (again, rest) = SeqHeader::parse(&encoded).expect("encoded header parses");
            assert_eq!(again, header);
            assert!(rest.is_empty());
        }
        Err(e) => {
            assert!(data.len() < SEQ_HEADER_BYTES);
            assert_eq!(
                e,
                ProtocolError::SeqHeaderTruncated {
                    len_bytes: data.len()
                }
            );
        }
    }
});
