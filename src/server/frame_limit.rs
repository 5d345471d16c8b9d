//! The WebSocket upgrade of every route, with `max_message_bytes` enforced
//! when a frame's header arrives rather than after its payload.
//!
//! Why this exists: actix-http's frame parser (3.20) compares a frame's
//! announced length with `max_frame_size` only once the whole payload is
//! buffered (so that it can skip the frame and fail once, not on every later
//! read), and actix-ws's `MessageStream` copies every byte the socket
//! delivers into one growing buffer before it parses. A header announcing
//! 2^40 bytes therefore made the server buffer all that followed (1 GiB in
//! 0.75 s, issue 15), and the connection ended only at the idle timeout.
//! Fragmented messages had the same hole one level up: each frame was within
//! the limit, and the session saw the sum only after buffering the frame
//! that crossed it.
//!
//! [`FrameLimit`] sits between the request payload and `MessageStream`. It
//! reads each frame header as it passes (at most 14 bytes held back) and
//! keeps the running length of a fragmented message. A frame, or a message,
//! announced over the limit is not forwarded: the stream instead hands the
//! parser a header whose 64-bit length has its most significant bit set,
//! which actix-http refuses on sight with `ProtocolError::Overflow` (RFC
//! 6455 §5.2 forbids that bit; actix-web 4.18 requires actix-http 3.19, the
//! first to check it). The session gets the same error as for any oversized
//! frame and answers `message_too_big`, close 1009; nothing more is read from
//! the socket, so TCP back-pressure stops the client.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::web::{self, Bytes};
use actix_web::{FromRequest, HttpRequest, HttpResponse};
use futures_util::Stream;

/// Upgrades `req` to a WebSocket whose incoming frames and messages are held
/// to `max_message_bytes` from their headers on (see the module docs).
pub async fn upgrade(
    req: &HttpRequest,
    body: web::Payload,
    protocols: &[&str],
    max_message_bytes: usize,
) -> Result<(HttpResponse, actix_ws::Session, actix_ws::MessageStream), actix_web::Error> {
    let limited = FrameLimit::new(body.into_inner(), max_message_bytes);
    let mut payload: Payload = Payload::Stream {
        payload: Box::pin(limited),
    };
    // actix-ws takes a `web::Payload`, which only the extractor can build.
    let body = web::Payload::from_request(req, &mut payload).await?;
    let (response, session, messages) = actix_ws::handle_with_protocols(req, body, protocols)?;
    // Kept as a second line of defence: the parser's own check.
    Ok((
        response,
        session,
        messages.max_frame_size(max_message_bytes),
    ))
}

/// The longest frame header: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEADER_BYTES: usize = 14;

/// A masked binary frame announcing `u64::MAX` bytes: actix-http's parser
/// fails with `ProtocolError::Overflow` as soon as it reads the length, and
/// consumes nothing, so every later read fails the same way.
const REFUSAL_HEADER: [u8; MAX_HEADER_BYTES] = [
    0x82, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0,
];

const FIN_BIT: u8 = 0x80;
const OPCODE_MASK: u8 = 0x0F;
const MASK_BIT: u8 = 0x80;
const LENGTH_MASK: u8 = 0x7F;
const OPCODE_CONTINUATION: u8 = 0x0;
const OPCODE_TEXT: u8 = 0x1;
const OPCODE_BINARY: u8 = 0x2;

enum Mode {
    Forwarding,
    /// A frame was refused; the bytes before it are queued. The stream is
    /// pending once, so the parser decodes and delivers those frames (a
    /// client's audio before the bad frame is still recorded) before it
    /// meets the refusal.
    Refusing {
        paused: bool,
    },
    /// The refusal header is out; the stream has ended.
    Refused,
}

/// The request payload of a WebSocket, passed through frame by frame, cut
/// off at the header of the first frame or message over the limit.
pub struct FrameLimit {
    inner: Payload,
    max_message_bytes: u64,
    mode: Mode,
    /// Bytes ready for the parser, in order.
    queued: VecDeque<Bytes>,
    /// The header being read; its first bytes may have come in an earlier
    /// chunk, and none of it is forwarded before it is whole and accepted.
    header: [u8; MAX_HEADER_BYTES],
    header_len: usize,
    /// Payload bytes of the current frame still to pass through.
    payload_left: u64,
    /// Payload bytes announced so far by the frames of the open fragmented
    /// message (0 when none is open).
    message_bytes: u64,
}

/// What a complete frame header says.
struct FrameHeader {
    fin: bool,
    opcode: u8,
    payload_bytes: u64,
}

/// How long the header starting with `known` is (at least 2 bytes).
fn header_len(known: &[u8]) -> usize {
    let Some(&second) = known.get(1) else {
        return 2;
    };
    let length_bytes = match second & LENGTH_MASK {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask_bytes = if second & MASK_BIT != 0 { 4 } else { 0 };
    2 + length_bytes + mask_bytes
}

/// Reads a header that [`header_len`] says is complete.
fn parse_header(header: &[u8]) -> FrameHeader {
    let mut length = [0u8; 8];
    let payload_bytes = match header[1] & LENGTH_MASK {
        126 => {
            length[6..].copy_from_slice(&header[2..4]);
            u64::from_be_bytes(length)
        }
        127 => {
            length.copy_from_slice(&header[2..10]);
            u64::from_be_bytes(length)
        }
        short => u64::from(short),
    };
    FrameHeader {
        fin: header[0] & FIN_BIT != 0,
        opcode: header[0] & OPCODE_MASK,
        payload_bytes,
    }
}

impl FrameLimit {
    pub fn new(inner: Payload, max_message_bytes: usize) -> Self {
        Self {
            inner,
            max_message_bytes: u64::try_from(max_message_bytes).unwrap_or(u64::MAX),
            mode: Mode::Forwarding,
            queued: VecDeque::with_capacity(2),
            header: [0; MAX_HEADER_BYTES],
            header_len: 0,
            payload_left: 0,
            message_bytes: 0,
        }
    }

    /// Whether a frame may pass; keeps the fragmented message's running
    /// length. Control frames and reserved opcodes pass when within the
    /// limit: the parser holds control frames to 125 bytes and refuses
    /// reserved opcodes itself.
    fn accepts(&mut self, frame: &FrameHeader) -> bool {
        if frame.payload_bytes > self.max_message_bytes {
            tracing::info!(
                announced_bytes = frame.payload_bytes,
                max_message_bytes = self.max_message_bytes,
                "frame refused at its header"
            );
            return false;
        }
        match frame.opcode {
            OPCODE_TEXT | OPCODE_BINARY => self.message_bytes = frame.payload_bytes,
            OPCODE_CONTINUATION => {
                self.message_bytes = self.message_bytes.saturating_add(frame.payload_bytes);
            }
            _ => return true,
        }
        if self.message_bytes > self.max_message_bytes {
            tracing::info!(
                announced_bytes = self.message_bytes,
                max_message_bytes = self.max_message_bytes,
                "fragmented message refused at a frame header"
            );
            return false;
        }
        if frame.fin {
            self.message_bytes = 0;
        }
        true
    }

    fn queue(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.queued.push_back(bytes);
        }
    }

    /// Passes `chunk` through up to the first refused header, holding back
    /// a header that the chunk ends inside.
    fn scan(&mut self, chunk: Bytes) {
        let mut at = 0;
        while at < chunk.len() {
            if self.payload_left > 0 {
                let available = chunk.len() - at;
                let take = usize::try_from(self.payload_left)
                    .map_or(available, |left| left.min(available));
                at += take;
                // `take` <= `payload_left`, so this cannot underflow.
                self.payload_left -= take as u64;
                continue;
            }
            let header_start = at;
            let carried = self.header_len;
            let mut needed = header_len(&self.header[..self.header_len]);
            while self.header_len < needed && at < chunk.len() {
                let take = (needed - self.header_len).min(chunk.len() - at);
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&chunk[at..at + take]);
                self.header_len += take;
                at += take;
                needed = header_len(&self.header[..self.header_len]);
            }
            if self.header_len < needed {
                // The chunk ends inside this header: forward what precedes
                // it and keep the header until the rest comes.
                self.queue(chunk.slice(..header_start));
                return;
            }
            let frame = parse_header(&self.header[..needed]);
            self.header_len = 0;
            if !self.accepts(&frame) {
                self.queue(chunk.slice(..header_start));
                self.mode = Mode::Refusing { paused: false };
                return;
            }
            if carried > 0 {
                // The header began in an earlier chunk and ends at the
                // start of this one: its held bytes go out just before it.
                self.queue(Bytes::copy_from_slice(&self.header[..carried]));
            }
            self.payload_left = frame.payload_bytes;
        }
        self.queue(chunk);
    }
}

impl Stream for FrameLimit {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(bytes) = this.queued.pop_front() {
                return Poll::Ready(Some(Ok(bytes)));
            }
            match this.mode {
                Mode::Forwarding => {}
                Mode::Refusing { paused: false } => {
                    this.mode = Mode::Refusing { paused: true };
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Mode::Refusing { paused: true } => {
                    this.mode = Mode::Refused;
                    return Poll::Ready(Some(Ok(Bytes::from_static(&REFUSAL_HEADER))));
                }
                Mode::Refused => return Poll::Ready(None),
            }
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => this.scan(chunk),
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use actix_web::http::header;
    use actix_ws::{Item, Message, MessageStream, ProtocolError};
    use tokio::sync::mpsc;

    use super::*;

    /// The request payload as a test feeds it, counting the bytes the
    /// WebSocket side has pulled.
    struct Fed {
        chunks: mpsc::UnboundedReceiver<Bytes>,
        pulled_bytes: Arc<AtomicUsize>,
    }

    impl Stream for Fed {
        type Item = Result<Bytes, PayloadError>;

        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let this = self.get_mut();
            this.chunks.poll_recv(cx).map(|chunk| {
                chunk.map(|bytes| {
                    this.pulled_bytes.fetch_add(bytes.len(), Ordering::SeqCst);
                    Ok(bytes)
                })
            })
        }
    }

    struct Socket {
        feed: mpsc::UnboundedSender<Bytes>,
        pulled_bytes: Arc<AtomicUsize>,
        messages: MessageStream,
        // Held so that the message stream does not see a closed connection.
        _ws: actix_ws::Session,
        _response: HttpResponse,
    }

    async fn socket(max_message_bytes: usize) -> Socket {
        let req = actix_web::test::TestRequest::get()
            .insert_header((header::UPGRADE, "websocket"))
            .insert_header((header::CONNECTION, "Upgrade"))
            .insert_header((header::SEC_WEBSOCKET_VERSION, "13"))
            .insert_header((header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ=="))
            .to_http_request();
        let (feed, chunks) = mpsc::unbounded_channel();
        let pulled_bytes = Arc::new(AtomicUsize::new(0));
        let mut payload: Payload = Payload::Stream {
            payload: Box::pin(Fed {
                chunks,
                pulled_bytes: pulled_bytes.clone(),
            }),
        };
        let body = web::Payload::from_request(&req, &mut payload)
            .await
            .unwrap();
        let (response, ws, messages) = upgrade(&req, body, &[], max_message_bytes).await.unwrap();
        Socket {
            feed,
            pulled_bytes,
            messages,
            _ws: ws,
            _response: response,
        }
    }

    impl Socket {
        fn send(&self, bytes: Vec<u8>) {
            self.feed.send(Bytes::from(bytes)).unwrap();
        }

        async fn recv(&mut self) -> Result<Message, ProtocolError> {
            tokio::time::timeout(Duration::from_secs(5), self.messages.recv())
                .await
                .expect("the message stream is stuck")
                .expect("the message stream ended")
        }
    }

    /// A client frame header, masked with a zero mask (so the payload is
    /// sent as is), announcing `payload_bytes`.
    fn header(fin: bool, opcode: u8, payload_bytes: u64) -> Vec<u8> {
        let first = if fin { FIN_BIT | opcode } else { opcode };
        let mut out = vec![first];
        if payload_bytes < 126 {
            out.push(MASK_BIT | payload_bytes as u8);
        } else if let Ok(short) = u16::try_from(payload_bytes) {
            out.push(MASK_BIT | 126);
            out.extend_from_slice(&short.to_be_bytes());
        } else {
            out.push(MASK_BIT | 127);
            out.extend_from_slice(&payload_bytes.to_be_bytes());
        }
        out.extend_from_slice(&[0; 4]);
        out
    }

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = header(fin, opcode, payload.len() as u64);
        out.extend_from_slice(payload);
        out
    }

    fn assert_overflow(result: Result<Message, ProtocolError>) {
        assert!(
            matches!(result, Err(ProtocolError::Overflow)),
            "expected Overflow, got {result:?}"
        );
    }

    #[tokio::test]
    async fn a_header_announcing_2_pow_40_bytes_is_refused_before_any_payload() {
        let mut socket = socket(64 * 1024).await;
        socket.send(header(true, OPCODE_BINARY, 1 << 40));
        assert_overflow(socket.recv().await);
        // The client goes on sending; none of it is read any more.
        for _ in 0..16 {
            socket.send(vec![0; 1 << 20]);
        }
        assert_overflow(socket.recv().await);
        assert_eq!(socket.pulled_bytes.load(Ordering::SeqCst), 14);
    }

    #[tokio::test]
    async fn a_frame_one_byte_over_the_limit_is_refused_at_its_header() {
        let mut socket = socket(1024).await;
        socket.send(header(true, OPCODE_BINARY, 1025));
        assert_overflow(socket.recv().await);
    }

    #[tokio::test]
    async fn frames_before_the_refused_one_are_delivered_first() {
        let mut socket = socket(1024).await;
        let mut bytes = frame(true, OPCODE_BINARY, &[7; 100]);
        bytes.extend(header(true, OPCODE_BINARY, 1 << 40));
        socket.send(bytes);
        assert_eq!(
            socket.recv().await.unwrap(),
            Message::Binary(Bytes::from(vec![7; 100]))
        );
        assert_overflow(socket.recv().await);
    }

    #[tokio::test]
    async fn a_fragmented_message_is_refused_at_the_frame_that_crosses_the_limit() {
        let mut socket = socket(1024).await;
        let up_to_crossing_header = [
            frame(false, OPCODE_BINARY, &[1; 600]),
            frame(false, OPCODE_CONTINUATION, &[2; 400]),
            header(false, OPCODE_CONTINUATION, 100),
        ];
        let header_bytes: usize = up_to_crossing_header.iter().map(Vec::len).sum();
        for bytes in up_to_crossing_header {
            socket.send(bytes);
        }
        socket.send(vec![3; 100]);
        assert_eq!(
            socket.recv().await.unwrap(),
            Message::Continuation(Item::FirstBinary(Bytes::from(vec![1; 600])))
        );
        assert_eq!(
            socket.recv().await.unwrap(),
            Message::Continuation(Item::Continue(Bytes::from(vec![2; 400])))
        );
        assert_overflow(socket.recv().await);
        assert_eq!(
            socket.pulled_bytes.load(Ordering::SeqCst),
            header_bytes,
            "the crossing frame's payload must not be read"
        );
    }

    /// Every header length form, control frames inside a fragmented message,
    /// and a message of exactly the limit, cut into chunks of every size
    /// from 1 byte: all delivered exactly.
    #[tokio::test]
    async fn frames_within_the_limit_pass_intact_however_the_bytes_are_cut() {
        const LIMIT: usize = 70_000;
        let wire: Vec<u8> = [
            frame(true, OPCODE_BINARY, &[]),
            frame(true, OPCODE_BINARY, &[1; 125]),
            frame(true, OPCODE_BINARY, &[2; 126]),
            frame(true, OPCODE_BINARY, &[3; LIMIT]),
            frame(true, OPCODE_TEXT, b"{\"type\":\"keepalive\"}"),
            frame(false, OPCODE_BINARY, &[4; 40_000]),
            frame(true, 0x9, b"ping"),
            frame(true, OPCODE_CONTINUATION, &[5; LIMIT - 40_000]),
        ]
        .concat();
        let expected = vec![
            Message::Binary(Bytes::new()),
            Message::Binary(Bytes::from(vec![1; 125])),
            Message::Binary(Bytes::from(vec![2; 126])),
            Message::Binary(Bytes::from(vec![3; LIMIT])),
            Message::Text("{\"type\":\"keepalive\"}".into()),
            Message::Continuation(Item::FirstBinary(Bytes::from(vec![4; 40_000]))),
            Message::Ping(Bytes::from_static(b"ping")),
            Message::Continuation(Item::Last(Bytes::from(vec![5; LIMIT - 40_000]))),
        ];
        for chunk_bytes in [1, 2, 3, 5, 13, 127, 4096, wire.len()] {
            let mut socket = socket(LIMIT).await;
            for chunk in wire.chunks(chunk_bytes) {
                socket.send(chunk.to_vec());
            }
            for want in &expected {
                let got = socket.recv().await.unwrap();
                assert_eq!(&got, want, "chunks of {chunk_bytes} bytes");
            }
        }
    }

    #[test]
    fn header_lengths() {
        assert_eq!(header_len(&[]), 2);
        assert_eq!(header_len(&[0x82]), 2);
        assert_eq!(header_len(&[0x82, 0x80 | 5]), 6);
        assert_eq!(header_len(&[0x82, 0x80 | 126]), 8);
        assert_eq!(header_len(&[0x82, 0x80 | 127]), 14);
        assert_eq!(header_len(&[0x82, 127]), 10);
        let parsed = parse_header(&header(false, OPCODE_CONTINUATION, 1 << 40));
        assert!(!parsed.fin);
        assert_eq!(parsed.opcode, OPCODE_CONTINUATION);
        assert_eq!(parsed.payload_bytes, 1 << 40);
    }
}
