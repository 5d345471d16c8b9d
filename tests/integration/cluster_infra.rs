//! The cluster tests' infrastructure (cluster_support) checked on its own:
//! nats-server with JetStream, paused, resumed, restarted on its store and
//! killed; haproxy in front of two cochlea nodes, for HTTP and WebSocket
//! sessions, with one node killed under it.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_support::*;
use crate::harness::*;

/// What a client sees of a server that is up: a greeting, within `timeout`.
fn greets(nats: &NatsServer, timeout: Duration) -> bool {
    nats_info(nats.addr(), timeout).is_ok()
}

#[test]
fn nats_server_starts_with_jetstream_pauses_resumes_and_restarts_on_its_store() {
    let started = Instant::now();
    let mut nats = NatsServer::start();
    let start_time = started.elapsed();
    assert_eq!(
        nats.url(),
        format!("nats://127.0.0.1:{}", nats.addr().port())
    );

    let mut probe = NatsProbe::connect(nats.addr(), Duration::from_secs(2)).expect("connect");
    assert_eq!(probe.info["jetstream"], true, "{}", probe.info);
    // Per-key TTLs in KV (which session leases rely on) came in 2.11.
    let version = probe.info["version"].as_str().expect("version").to_owned();
    let minor: u32 = version
        .strip_prefix("2.")
        .and_then(|rest| rest.split('.').next()?.parse().ok())
        .unwrap_or_else(|| panic!("version {version}"));
    assert!(minor >= 11, "nats-server {version} has no per-key TTL");

    // JetStream works and writes to the store directory.
    let created = probe
        .jetstream(
            "STREAM.CREATE.SMOKE",
            &json!({"name": "SMOKE", "subjects": ["smoke.>"], "storage": "file"}),
        )
        .expect("stream create");
    assert!(created.get("error").is_none(), "{created}");
    let ack: Value =
        serde_json::from_slice(&probe.request("smoke.first", b"one").expect("publish")).unwrap();
    assert_eq!(ack["stream"], "SMOKE", "{ack}");
    assert_eq!(ack["seq"], 1, "{ack}");
    assert!(nats.store_dir().join("jetstream").is_dir());

    // Paused: the kernel completes the TCP handshake (the listen backlog),
    // but nobody greets; that is what a hung server looks like to a client.
    nats.pause();
    let during = nats_info(nats.addr(), Duration::from_millis(500)).expect_err("greeted");
    assert!(
        matches!(during.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "a paused server times out, not refuses: {during:?}"
    );
    nats.resume();
    assert!(greets(&nats, Duration::from_secs(2)), "greets after resume");
    // The connection made before the pause carried on.
    let ack: Value =
        serde_json::from_slice(&probe.request("smoke.second", b"two").expect("publish")).unwrap();
    assert_eq!(ack["seq"], 2, "{ack}");
    drop(probe);

    // A clean restart: same URL, same store, the stream and its messages.
    let url = nats.url();
    let restarted = Instant::now();
    nats.restart();
    let restart_time = restarted.elapsed();
    assert_eq!(nats.url(), url);
    let mut probe = NatsProbe::connect(nats.addr(), Duration::from_secs(2)).expect("connect");
    let info = probe
        .jetstream("STREAM.INFO.SMOKE", &Value::Null)
        .expect("stream info");
    assert_eq!(info["state"]["messages"], 2, "{info}");
    drop(probe);

    // Killed: refused; restarted after a crash, still the same stream.
    nats.kill();
    assert!(!nats.is_running());
    let refused = nats_info(nats.addr(), Duration::from_millis(500)).expect_err("greeted");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused:?}");
    nats.restart();
    let mut probe = NatsProbe::connect(nats.addr(), Duration::from_secs(2)).expect("connect");
    let info = probe
        .jetstream("STREAM.INFO.SMOKE", &Value::Null)
        .expect("stream info");
    assert_eq!(info["state"]["messages"], 2, "{info}");

    // Nothing is left running once it is dropped.
    let pid = nats.pid().expect("pid");
    drop(nats);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "nats-server {pid} still runs"
    );
    eprintln!("nats-server {version}: start {start_time:?}, clean restart {restart_time:?}");
}

/// `samples` of audio that is not silence (a sawtooth; `seed` shifts it).
fn audio(samples: usize, seed: i32) -> Vec<i16> {
    (0..samples as i32)
        .map(|i| ((i * 37 + seed) % 2000 - 1000) as i16)
        .collect()
}

/// The index of the node whose recordings directory holds `path`.
fn node_of(path: &Path, nodes: &[&Server]) -> usize {
    nodes
        .iter()
        .position(|node| path.starts_with(node.recordings_dir()))
        .unwrap_or_else(|| panic!("{} is in no node's recordings", path.display()))
}

/// Streams `samples` through an open session, stops, and checks the
/// recording holds them exactly; the recording's path.
async fn finish_session(mut client: Client, samples: &[i16]) -> std::path::PathBuf {
    client.send_chunks(&s16_bytes(samples), 640).await;
    let transcript = client.stop().await;
    assert_eq!(transcript.close_code(), 1000, "{:#?}", transcript.messages);
    let path = std::path::PathBuf::from(
        transcript.one("recording")["path"]
            .as_str()
            .expect("recording path"),
    );
    assert_eq!(read_wav_i16(&path).samples, samples, "recording exact");
    path
}

const STREAM: &str = "/v1/stream?encoding=pcm_s16le&sample_rate=16000";

#[tokio::test]
async fn haproxy_balances_two_nodes_for_http_and_websockets_and_routes_around_a_killed_one() {
    let mut node0 = Server::start();
    let node1 = Server::start();
    let haproxy = Haproxy::start(&[node0.addr, node1.addr]);
    assert!(haproxy.addr().ip().is_loopback());
    let up_time = Instant::now();
    haproxy.wait_all_up(Duration::from_secs(10));
    let up_time = up_time.elapsed();

    // HTTP: /readyz and /healthz come from the nodes, both of them
    // (leastconn goes round-robin among equally loaded servers).
    let mut answered = HashSet::new();
    for _ in 0..10 {
        let response = http_get(haproxy.addr(), "/readyz").expect("readyz through haproxy");
        assert_eq!(response.status, 200, "{}", response.text());
        let body: Value = serde_json::from_slice(&response.body).expect("JSON");
        assert_eq!(body["ready"], true);
        answered.insert(response.header(BACKEND_HEADER).expect("backend").to_owned());
    }
    let both: HashSet<String> = [0, 1].map(Haproxy::server_name).into();
    assert_eq!(answered, both);
    let health = http_get(haproxy.addr(), "/healthz").expect("healthz");
    assert_eq!(health.status, 200);
    let health: Value = serde_json::from_slice(&health.body).expect("JSON");
    assert_eq!(health["status"], "ok", "{health}");

    // WebSocket sessions end to end. With one session held open on a
    // node, leastconn sends the next one to the other node.
    let mut first = Client::connect_url(&haproxy.ws_url(STREAM)).await;
    first.expect("started").await;
    let mut second = Client::connect_url(&haproxy.ws_url(STREAM)).await;
    second.expect("started").await;
    let (samples0, samples1) = (audio(16_000, 0), audio(16_000, 500));
    let path0 = finish_session(first, &samples0).await;
    let path1 = finish_session(second, &samples1).await;
    let nodes = [&node0, &node1];
    let mut placed = [node_of(&path0, &nodes), node_of(&path1, &nodes)];
    placed.sort();
    assert_eq!(placed, [0, 1], "one session on each node");

    // node0 dies. Requests still succeed: those haproxy sends to node0
    // before its health check notices are refused and redispatched.
    node0.signal("KILL");
    assert!(!node0.wait_exit(WAIT).success());
    let killed = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut count = 0;
    let mut down_after = None;
    while killed.elapsed() < Duration::from_secs(3) {
        let sent = Instant::now();
        let response = http_get(haproxy.addr(), "/healthz")
            .unwrap_or_else(|| panic!("request {count} failed\n{}", haproxy.log()));
        assert_eq!(response.status, 200, "request {count}: {}", response.text());
        assert_eq!(
            response.header(BACKEND_HEADER),
            Some(Haproxy::server_name(1).as_str())
        );
        slowest = slowest.max(sent.elapsed());
        count += 1;
        if down_after.is_none() && haproxy.backend_status()[0] == "DOWN" {
            down_after = Some(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(slowest < Duration::from_secs(5), "slowest {slowest:?}");
    haproxy.wait_status(0, "DOWN", Duration::from_secs(10));
    // Some of them did go to node0 first: haproxy's log marks a request it
    // redispatched with '+' before its retry count ("1/1/0/0/+1").
    let log = haproxy.log();
    let redispatched = log
        .lines()
        .filter(|line| line.contains("\"GET /healthz"))
        .filter(|line| {
            line.split_whitespace().any(|field| {
                let counters: Vec<&str> = field.split('/').collect();
                counters.len() == 5 && counters[4].starts_with('+')
            })
        })
        .count();
    assert!(redispatched > 0, "no request was redispatched:\n{log}");
    let down_after = down_after.unwrap_or_else(|| killed.elapsed());
    assert_eq!(haproxy.backend_status()[1], "UP");

    // A new session lands on the survivor and records exactly.
    let mut client = Client::connect_url(&haproxy.ws_url(STREAM)).await;
    client.expect("started").await;
    let samples = audio(8_000, 900);
    let path = finish_session(client, &samples).await;
    assert!(path.starts_with(node1.recordings_dir()));
    eprintln!(
        "haproxy: both UP after {up_time:?}; {count} requests after the kill \
         ({redispatched} redispatched), slowest {slowest:?}; node0 DOWN after {down_after:?}"
    );
}
