//! Where a task's file is, and reading it as a stream of lines (never whole into memory).
//!
//! `file_url` is a `file://` URL (`file:///data/x.csv`), a plain path (absolute, or relative to
//! the service's working directory), or an `http://` URL. Failures are sorted by whether
//! trying again can help: a missing or forbidden file, an HTTP 4xx, a scheme Weir cannot read
//! are [`SourceError::Permanent`]; a timeout, a refused connection, an HTTP 5xx or 429 are
//! [`SourceError::Transient`].

use super::parse::Format;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

/// Where the file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    Path(PathBuf),
    Http(String),
}

impl Location {
    /// Parses a task's `file_url`; `Err` says why it can never be read.
    pub(crate) fn parse(url: &str) -> Result<Location, String> {
        let url = url.trim();
        if url.is_empty() {
            return Err("file_url is empty".into());
        }
        if let Some(rest) = url.strip_prefix("file://") {
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            return if path.starts_with('/') {
                Ok(Location::Path(PathBuf::from(path)))
            } else {
                Err(format!("{url:?} is not a file:///absolute/path URL"))
            };
        }
        if url.starts_with("http://") {
            return Ok(Location::Http(url.to_owned()));
        }
        match url.split_once("://") {
            Some((scheme, _)) => Err(format!(
                "scheme {scheme}:// is not supported (use file://, a path or http://)"
            )),
            None => Ok(Location::Path(PathBuf::from(url))),
        }
    }
}

/// Why a file cannot be read (now, or ever).
#[derive(Debug, thiserror::Error)]
pub(super) enum SourceError {
    #[error("{0}")]
    Permanent(String),
    #[error("{0}")]
    Transient(String),
}

/// An open file: its lines, its size if known, and its format.
pub(super) struct Source {
    reader: Box<dyn AsyncBufRead + Send + Unpin>,
    pub(super) size: Option<u64>,
    pub(super) format: Format,
    timeout: Duration,
}

impl Source {
    /// Opens the file at `location`; `timeout` bounds connecting and each read.
    pub(super) async fn open(
        location: &Location,
        client: &reqwest::Client,
        timeout: Duration,
    ) -> Result<Source, SourceError> {
        match location {
            Location::Path(path) => {
                let display = path.display().to_string();
                let format = Format::detect(&display, None).ok_or_else(|| unsupported(&display))?;
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| io_error(&display, e))?;
                let metadata = file.metadata().await.map_err(|e| io_error(&display, e))?;
                if metadata.is_dir() {
                    return Err(SourceError::Permanent(format!("{display} is a directory")));
                }
                Ok(Source {
                    reader: Box::new(BufReader::with_capacity(64 * 1024, file)),
                    size: Some(metadata.len()),
                    format,
                    timeout,
                })
            }
            Location::Http(url) => {
                let response = tokio::time::timeout(timeout, client.get(url).send())
                    .await
                    .map_err(|_| {
                        SourceError::Transient(format!("GET {url}: no answer within {timeout:?}"))
                    })?
                    .map_err(|e| http_error(url, &e))?;
                let status = response.status();
                if status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT
                {
                    return Err(SourceError::Transient(format!("GET {url}: {status}")));
                }
                if !status.is_success() {
                    return Err(SourceError::Permanent(format!("GET {url}: {status}")));
                }
                let content_type = response
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let path = url.split(['?', '#']).next().unwrap_or(url);
                let format = Format::detect(path, content_type.as_deref()).ok_or_else(|| {
                    SourceError::Permanent(format!(
                        "{url}: unsupported format (content type {})",
                        content_type.as_deref().unwrap_or("none")
                    ))
                })?;
                let size = response.content_length();
                let url = url.clone();
                let stream =
                    futures_util::TryStreamExt::map_err(response.bytes_stream(), move |e| {
                        std::io::Error::other(format!("reading {url}: {e}"))
                    });
                Ok(Source {
                    reader: Box::new(tokio_util::io::StreamReader::new(stream)),
                    size,
                    format,
                    timeout,
                })
            }
        }
    }

    /// Reads the next line (with its end of line) into `line`, replacing its contents; the
    /// bytes read, 0 at the end.
    pub(super) async fn next_line(&mut self, line: &mut Vec<u8>) -> Result<usize, SourceError> {
        line.clear();
        match tokio::time::timeout(self.timeout, self.reader.read_until(b'\n', line)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(SourceError::Permanent(format!("unreadable: {e}")))
            }
            Ok(Err(e)) => Err(SourceError::Transient(format!("read failed: {e}"))),
            Err(_) => Err(SourceError::Transient(format!(
                "no data for {:?} while reading",
                self.timeout
            ))),
        }
    }
}

fn unsupported(path: &str) -> SourceError {
    SourceError::Permanent(format!(
        "{path}: unsupported format (expected .csv, .jsonl or .ndjson)"
    ))
}

fn io_error(path: &str, e: std::io::Error) -> SourceError {
    use std::io::ErrorKind::{Interrupted, TimedOut, WouldBlock};
    match e.kind() {
        TimedOut | Interrupted | WouldBlock => SourceError::Transient(format!("{path}: {e}")),
        _ => SourceError::Permanent(format!("cannot read {path}: {e}")),
    }
}

fn http_error(url: &str, e: &reqwest::Error) -> SourceError {
    // Connecting, timing out and broken bodies may pass; a malformed request will not.
    if e.is_connect() || e.is_timeout() || e.is_body() || e.is_request() {
        SourceError::Transient(format!("GET {url}: {e}"))
    } else {
        SourceError::Permanent(format!("GET {url}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_urls_paths_and_http_and_refuses_other_schemes() {
        assert_eq!(
            Location::parse("file:///data/a.csv"),
            Ok(Location::Path("/data/a.csv".into()))
        );
        assert_eq!(
            Location::parse("file://localhost/data/a.csv"),
            Ok(Location::Path("/data/a.csv".into()))
        );
        assert_eq!(Location::parse("a.csv"), Ok(Location::Path("a.csv".into())));
        assert_eq!(
            Location::parse("http://files:8000/a.csv"),
            Ok(Location::Http("http://files:8000/a.csv".into()))
        );
        assert!(Location::parse("https://x/a.csv")
            .unwrap_err()
            .contains("https"));
        assert!(Location::parse("file://relative/a.csv").is_err());
        assert!(Location::parse(" ").is_err());
    }

    #[tokio::test]
    async fn a_missing_or_unsupported_local_file_is_permanent() {
        let client = reqwest::Client::new();
        let timeout = Duration::from_secs(1);
        let missing = Location::Path("/nonexistent/weir/a.csv".into());
        assert!(matches!(
            Source::open(&missing, &client, timeout).await,
            Err(SourceError::Permanent(_))
        ));
        let xml = Location::Path("/etc/hostname.xml".into());
        match Source::open(&xml, &client, timeout).await {
            Err(SourceError::Permanent(reason)) => assert!(reason.contains("unsupported")),
            other => panic!("{:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_transient_after_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and holds the connection without a word.
        let server = tokio::spawn(async move {
            let (_socket, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
        });
        let location = Location::Http(format!("http://{addr}/a.csv"));
        let client = reqwest::Client::new();
        let started = std::time::Instant::now();
        let result = Source::open(&location, &client, Duration::from_millis(200)).await;
        match result {
            Err(SourceError::Transient(reason)) => {
                assert!(reason.contains("no answer"), "{reason}")
            }
            other => panic!("{:?}", other.err()),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        server.abort();
    }

    #[tokio::test]
    async fn a_refused_connection_is_transient() {
        // Bind then drop: nothing listens on the port afterwards.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = reqwest::Client::new();
        let location = Location::Http(format!("http://127.0.0.1:{port}/a.csv"));
        assert!(matches!(
            Source::open(&location, &client, Duration::from_secs(2)).await,
            Err(SourceError::Transient(_))
        ));
    }
}
