//! cochlea: real-time audio ingestion over WebSocket.
//!
//! Audio flows one way, events flow back the other:
//!
//! ```text
//! socket ──► protocol ──► codec ──► pipeline ──► sinks (one task each) ──┐
//! (server)   (parse)      (decode)  (order, gaps)   recorder (WAV)        │
//!    ▲                                                                    │
//!    └──────────── session events: started, flushed, recording, closed ◄─┘
//! ```
//!
//! - [`server`] owns sockets, timers and tasks. One task per connection
//!   ([`server::session`]) is the only writer to its socket.
//! - [`protocol`], [`codec`] and [`pipeline`] are pure: bytes in, values out,
//!   no clocks and no IO, so every case is a fast unit test.
//! - [`sinks`] consume decoded audio in media order, each in its own task
//!   behind a bounded queue, and report through the session's event channel.
//! - Every error is mapped to an error code and an RFC 6455 close code in one
//!   place: [`server::close`].
//!
//! Invariants: recording time equals media time (gaps become silence); file
//! names come from server-made ids only; no client input can panic the server.

pub mod client;
pub mod codec;
pub mod config;
pub mod healthcheck;
pub mod loadgen;
pub mod pipeline;
pub mod protocol;
pub mod rlimit;
pub mod server;
pub mod session;
pub mod sinks;
pub mod telemetry;
