//! Client text messages and connection query strings on arbitrary text. Must
//! never panic. The whole text goes to `parse_client_message` and, split on
//! '&' and '=' like a (percent-decoded) query string, to `parse_connect`.
//! When the text has a newline, the line before it is the query string and
//! the rest the message: a `start` message is then merged over the query's
//! request and resolved, as the server does.
#![no_main]
use libfuzzer_sys::fuzz_target;

use cochlea::protocol::{
    parse_client_message, parse_connect, ClientMessage, ConnectRequest, StartRequest, StreamFormat,
    MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE,
};

fn query_pairs(query: &str) -> Vec<(&str, &str)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .collect()
}

/// What `resolve` hands back must be a format the rest of the server takes.
fn check_resolved(request: &StartRequest) {
    if let Ok(format) = request.resolve() {
        check_format(&format);
    }
}

fn check_format(format: &StreamFormat) {
    assert!(
        (MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&format.sample_rate),
        "resolved sample_rate {} out of range",
        format.sample_rate
    );
    assert!(
        (1..=MAX_CHANNELS).contains(&format.channels),
        "resolved channels {} out of range",
        format.channels
    );
}

fn connect(query: &str) -> Option<StartRequest> {
    match parse_connect(query_pairs(query)) {
        Ok(ConnectRequest::New(request)) => {
            check_resolved(&request);
            Some(request)
        }
        Ok(ConnectRequest::Resume { .. }) | Err(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ClientMessage::Start(start)) = parse_client_message(text) {
        check_resolved(&start);
    }
    connect(text);
    if let Some((query, message)) = text.split_once('\n') {
        let from_query = connect(query);
        if let Ok(ClientMessage::Start(start)) = parse_client_message(message) {
            check_resolved(&from_query.unwrap_or_default().merged_with(start));
        }
    }
});
