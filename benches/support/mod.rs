//! What the end-to-end benchmarks share: a real server on a loopback port,
//! and the speech fixture they stream.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `cochlea serve` on 127.0.0.1 port 0, recording into `dir`, with
/// `extra_args`; returns the process and the `host:port` it printed.
pub fn start_server(dir: &Path, extra_args: &[&str]) -> (Child, String) {
    let mut server = Command::new(env!("CARGO_BIN_EXE_cochlea"))
        .args(["serve", "--listen", "127.0.0.1:0", "--recordings-dir"])
        .arg(dir)
        .args(extra_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start server");
    let stdout = server.stdout.take().expect("stdout");
    let addr = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("cochlea listening on http://")
                .map(str::to_owned)
        })
        .expect("server address");
    (server, addr)
}

/// tests/fixtures/speech-16k.wav: 16 kHz mono 16-bit speech.
pub fn speech_16k() -> Vec<i16> {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/speech-16k.wav");
    hound::WavReader::open(fixture)
        .expect("fixture")
        .samples::<i16>()
        .collect::<Result<_, _>>()
        .expect("samples")
}
