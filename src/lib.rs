//! cochlea: real-time audio ingestion over WebSocket.
//!
//! Audio flows one way, events flow back the other:
//!
//! ```text
//!  server (IO)              session core (pure, time passed in)                 sinks
//!  socket ──► dialect ──► protocol ──► codec ──► jitter ──► resample ──► recorder, transcriber
//!    ▲                                                                       │
//!    └──── dialect render ◄── started, acks, stats, errors, sink events ◄────┘
//! ```
//!
//! - [`server`] owns sockets, timers and tasks. One task per connection
//!   ([`server::session`]) drives a [`session::SessionCore`] and is the only
//!   writer to its socket.
//! - [`session`] is the session's logic as a state machine: inputs with the
//!   time they happened in, outputs for the driver to carry out, no IO.
//! - [`protocol`], [`codec`] and [`pipeline`] are pure: bytes in, values out,
//!   no clocks and no IO, so every case is a fast unit test.
//! - [`sinks`] take decoded audio in media order, in place; their slow work
//!   (files, HTTP) runs on threads and tasks of their own, and they report
//!   through the session's event channel ([`sinks::registry`]).
//! - Every error is mapped to an error code and an RFC 6455 close code in one
//!   place: [`server::close`].
//!
//! Invariants: recording time equals media time (gaps become silence); an
//! `ack` means the audio is in the recording; file names come from
//! server-made ids only; no client input can panic the server.

pub mod client;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod healthcheck;
pub mod loadgen;
pub mod pipeline;
pub mod protocol;
pub mod recordings;
pub mod rlimit;
pub mod server;
pub mod session;
pub mod sinks;
pub mod storage;
pub mod telemetry;
