//! `cochlea healthcheck`: a dependency-free HTTP GET of `/healthz`, so a slim
//! container image needs no curl for its HEALTHCHECK.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("only http:// URLs are supported: {0}")]
    Url(String),
    #[error("cannot reach {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("unhealthy: {0}")]
    Status(String),
}

/// Succeeds when `url` answers with HTTP 200 within `timeout`.
pub fn check(url: &str, timeout: Duration) -> Result<(), HealthcheckError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| HealthcheckError::Url(url.to_owned()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let connect_error = |e| HealthcheckError::Connect(authority.to_owned(), e);
    let addr = authority
        .to_socket_addrs()
        .map_err(connect_error)?
        .next()
        .ok_or_else(|| HealthcheckError::Url(url.to_owned()))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(connect_error)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(connect_error)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(connect_error)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(connect_error)?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).map_err(connect_error)?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    let status_line = status_line.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(HealthcheckError::Status(status_line.to_owned()))
    }
}
