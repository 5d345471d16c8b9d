//! A speech-to-text backend stand-in: a real HTTP/1.1 server on 127.0.0.1
//! port 0 that answers each request as a test script says (delay, status,
//! body) and keeps what it received, so tests can check the audio sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What the stub received in one request.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The bytes of a multipart field (the first one with that name).
    pub fn multipart_field(&self, name: &str) -> Option<Vec<u8>> {
        let content_type = self.header("content-type")?;
        let boundary = content_type.split("boundary=").nth(1)?.trim_matches('"');
        let delimiter = format!("--{boundary}");
        let body = &self.body;
        let mut parts = Vec::new();
        let mut at = find(body, delimiter.as_bytes(), 0)?;
        while let Some(next) = find(body, delimiter.as_bytes(), at + delimiter.len()) {
            parts.push(&body[at + delimiter.len()..next]);
            at = next;
        }
        for part in parts {
            let header_end = find(part, b"\r\n\r\n", 0)?;
            let headers = String::from_utf8_lossy(&part[..header_end]);
            if headers.contains(&format!("name=\"{name}\"")) {
                // The part ends with the CRLF before the next delimiter.
                let data = &part[header_end + 4..part.len().saturating_sub(2)];
                return Some(data.to_vec());
            }
        }
        None
    }

    /// The `response_format` an `openai` request asked for.
    pub fn response_format(&self) -> String {
        self.multipart_field("response_format")
            .map(|f| String::from_utf8_lossy(&f).into_owned())
            .unwrap_or_default()
    }

    /// Seconds of audio in the request's WAV file.
    pub fn audio_seconds(&self) -> f64 {
        self.wav_samples().len() as f64 / 16_000.0
    }

    /// The WAV file of the request, whatever the backend kind.
    pub fn wav_samples(&self) -> Vec<i16> {
        let bytes = self
            .multipart_field("file")
            .unwrap_or_else(|| self.body.clone());
        let mut reader = hound::WavReader::new(std::io::Cursor::new(bytes)).expect("a WAV body");
        let spec = reader.spec();
        assert_eq!((spec.sample_rate, spec.channels), (16_000, 1));
        reader
            .samples::<i16>()
            .map(|s| s.expect("sample"))
            .collect()
    }
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// How to answer request number `n` (from 0).
pub struct Reply {
    pub delay: Duration,
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn text(text: &str) -> Reply {
        Reply {
            delay: Duration::ZERO,
            status: 200,
            body: serde_json::json!({ "text": text }).to_string(),
        }
    }
    /// An OpenAI `verbose_json` reply: `text`, and its words spread evenly
    /// over `seconds` of audio (the last one running a little past the end,
    /// as engines' rounding does), with top-level `words`.
    pub fn verbose(text: &str, seconds: f64) -> Reply {
        let words: Vec<&str> = text.split_whitespace().collect();
        let step = seconds / words.len().max(1) as f64;
        let timed: Vec<serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                serde_json::json!({
                    "word": format!(" {w}"),
                    "start": i as f64 * step,
                    "end": (i + 1) as f64 * step + 0.05,
                    "probability": 0.9,
                })
            })
            .collect();
        Reply {
            delay: Duration::ZERO,
            status: 200,
            body: serde_json::json!({
                "task": "transcribe",
                "language": "english",
                "duration": seconds,
                "text": text,
                "segments": [{"id": 0, "start": 0.0, "end": seconds, "text": text}],
                "words": timed,
            })
            .to_string(),
        }
    }
    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
    pub fn status(status: u16, body: &str) -> Reply {
        Reply {
            delay: Duration::ZERO,
            status,
            body: body.to_owned(),
        }
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

type Script = dyn Fn(usize, &Received) -> Reply + Send + Sync;

pub struct Stub {
    pub url: String,
    pub received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stub {
    pub async fn start(script: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static) -> Stub {
        Self::start_with(None, script).await
    }

    /// The same over HTTPS with this certificate chain and key (DER).
    pub async fn start_tls(
        cert: rustls::pki_types::CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        script: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Stub {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::start_with(Some(acceptor), script).await
    }

    async fn start_with(
        tls: Option<tokio_rustls::TlsAcceptor>,
        script: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
        let addr = listener.local_addr().expect("stub address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let counter = Arc::new(Mutex::new(0usize));
        let kept = received.clone();
        let tls_used = tls.is_some();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let script = script.clone();
                let kept = kept.clone();
                let counter = counter.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let stream: Box<dyn Stream> = match tls {
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(stream) => Box::new(stream),
                            Err(_) => return,
                        },
                        None => Box::new(stream),
                    };
                    let (read, mut write) = tokio::io::split(stream);
                    let mut reader = BufReader::new(read);
                    // Keep-alive: several requests per connection.
                    while let Some(request) = read_request(&mut reader).await {
                        let n = {
                            let mut c = counter.lock().unwrap();
                            *c += 1;
                            *c - 1
                        };
                        kept.lock().unwrap().push(request.clone());
                        let reply = script(n, &request);
                        tokio::time::sleep(reply.delay).await;
                        let response = format!(
                            "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                            reply.status,
                            reply.body.len(),
                            reply.body
                        );
                        if write.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let scheme = if tls_used { "https" } else { "http" };
        Stub {
            url: format!("{scheme}://localhost:{}", addr.port()),
            received,
            task,
        }
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Option<Received> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let path = line.split_whitespace().nth(1)?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).await.ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (k, v) = header.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(length) = get("content-length") {
        let length: usize = length.parse().ok()?;
        body.resize(length, 0);
        reader.read_exact(&mut body).await.ok()?;
    } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).await.ok()?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).await.ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    Some(Received {
        path,
        headers,
        body,
    })
}
