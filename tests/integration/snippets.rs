//! The copyable sample clients in samples/clients/ against the real server:
//! the Python one (`websockets`) and the Node one (`ws`), each recording the
//! speech sample exactly. (The browser snippet runs in tests/integration/
//! browser.rs.) scripts/setup.sh installs what they need.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn speech() -> PathBuf {
    Path::new(ROOT).join("samples/audio/speaker-16k.wav")
}

/// Runs a sample client on the speech sample; checks its exit status, its
/// last line and the recording.
fn check_client(server: &Server, program: &str, script: &str) {
    let output = Command::new(program)
        .arg(Path::new(ROOT).join("samples/clients").join(script))
        .arg(speech())
        .args(["--url", &server.url(""), "--fast"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/setup.sh installs it): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed (dependencies come from scripts/setup.sh)\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.trim_end().ends_with("closed with code 1000"),
        "{stdout}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("recording: "))
        .expect("a recording line");
    let path = line
        .strip_prefix("recording: ")
        .and_then(|rest| rest.split(" (").next())
        .unwrap();
    let recorded = read_wav_i16(Path::new(path));
    let source = read_wav_i16(&speech());
    assert!(
        recorded.samples == source.samples,
        "{script}: samples differ"
    );
}

/// Debian's python3, for which scripts/setup.sh installs `websockets` with
/// apt (a python3 earlier in PATH, such as pyenv's, would not see it).
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

#[tokio::test]
async fn python_sample_client_records_exactly() {
    let server = Server::start();
    check_client(&server, python(), "stream_wav.py");
}

#[tokio::test]
async fn node_sample_client_records_exactly() {
    let server = Server::start();
    check_client(&server, "node", "stream_wav.mjs");
}
