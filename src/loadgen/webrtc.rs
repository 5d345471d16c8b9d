//! One load-generator stream over WebRTC: the plan's Opus packets pushed
//! with the str0m WHIP client ([`crate::client::whip`]). "Acked" is what
//! the server's `closed` says it received, so `frames_lost` counts packets
//! the network or the server dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::stream::{Counters, Outcome, Plan};
use crate::client::whip::{push_with, WhipOptions, WhipStep};

pub async fn run(
    index: usize,
    plan: Arc<Plan>,
    counters: Arc<Counters>,
    start_at: Instant,
    channels: u16,
    sinks: Option<String>,
) -> Outcome {
    tokio::time::sleep_until(start_at).await;
    let len = plan.payloads.len() as u64;
    // Each stream starts at its own place in the loop, as on the WebSocket.
    let start = (index as u64).wrapping_mul(7_919) % len;
    let packets: Vec<Vec<u8>> = (0..plan.messages_per_stream)
        .map(|k| plan.payloads[((start + k) % len) as usize].clone())
        .collect();
    let mut url = format!("http://{}/v1/whip", plan.addr);
    if let Some(sinks) = sinks {
        url.push_str("?sinks=");
        url.push_str(&sinks);
    }
    let options = WhipOptions {
        url,
        token: None,
        channels,
        via: None,
        close_wait: plan.close_timeout,
    };
    let mut opened = false;
    let mut due: Option<std::time::Instant> = None;
    let mut progress = |step: WhipStep| match step {
        WhipStep::Connected => {
            opened = true;
            counters.open.fetch_add(1, Ordering::Relaxed);
            counters.started.fetch_add(1, Ordering::Relaxed);
        }
        WhipStep::Sent => {
            let now = std::time::Instant::now();
            let at = *due.get_or_insert(now);
            counters
                .lateness
                .record_us(now.saturating_duration_since(at).as_micros() as u64);
            due = Some(at + Duration::from_millis(20));
            counters.sent.fetch_add(1, Ordering::Relaxed);
        }
    };
    let result = push_with(&options, &packets, &mut progress).await;
    if opened {
        counters.open.fetch_sub(1, Ordering::Relaxed);
    }
    match result {
        Ok(outcome) => {
            let closed = outcome.events.iter().find(|e| e["type"] == "closed");
            let received = closed.and_then(|c| c["audio_messages"].as_u64());
            counters
                .acked
                .fetch_add(received.unwrap_or(0), Ordering::Relaxed);
            let warnings = outcome
                .events
                .iter()
                .filter(|e| e["type"] == "error" && e["fatal"] != true)
                .filter_map(|e| e["code"].as_str().map(str::to_owned))
                .collect();
            let failure = match closed {
                None => Some("whip:no_closed".to_owned()),
                Some(c) if c["reason"] != "stop" => Some(format!(
                    "whip:closed_{}",
                    c["reason"].as_str().unwrap_or("?")
                )),
                Some(_) => None,
            };
            if failure.is_some() {
                counters.failures.fetch_add(1, Ordering::Relaxed);
            }
            Outcome {
                sent: outcome.packets_sent,
                acked: received.unwrap_or(0),
                server_audio_messages: received,
                failure,
                warnings,
            }
        }
        Err(error) => {
            counters.failures.fetch_add(1, Ordering::Relaxed);
            let kind = match error {
                crate::client::whip::WhipError::Refused { status, .. } => {
                    format!("whip:refused_{status}")
                }
                crate::client::whip::WhipError::Timeout(_) => "whip:connect_timeout".into(),
                other => format!("whip:{other}"),
            };
            Outcome {
                failure: Some(kind),
                ..Outcome::default()
            }
        }
    }
}
