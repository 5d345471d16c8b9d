//! The session core: one stream's whole logic as a plain state machine.
//!
//! ```text
//!  driver (server::session)            SessionCore (this module: no IO, no clock)
//!  ────────────────────────            ──────────────────────────────────────────
//!  socket text/binary ──► Input ──► dialect ──► start / audio / flush / stop
//!  timer fired         ──►                       │
//!  sink events         ──►                       ▼
//!                                     pipeline (decode, jitter) ──► converters ──► sinks
//!  socket ◄── Output::Text ◄── dialect render ◄── acks, stats, errors, sink results
//!  Output::FinishSinks / Park / Close ──► the driver does the IO
//! ```
//!
//! The driver feeds [`Input`]s with the time they happened
//! ([`SessionCore::handle_input`]), drains [`Output`]s
//! ([`SessionCore::poll_output`]) and sleeps until
//! [`SessionCore::next_deadline`]. The core decides everything else: format
//! negotiation, which sink gets which audio in which format, acks and stats,
//! limits and idleness, flush and stop, parking for resume, and which error
//! ends the session with which close code. Because time is an argument, every
//! one of those is a fast unit test with a hand-advanced clock (`tests.rs`).
//!
//! Sinks are called in place, in media order: a sink whose work is slow or
//! blocking (files, HTTP) hands it to a thread or task of its own, so that a
//! block costs the session no task hop.

mod core;
#[cfg(test)]
mod tests;

pub use self::core::{EndReason, Input, Output, SessionCore, SessionLimits};
