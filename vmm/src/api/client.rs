//! `nvmm ctl SOCKET info|pause|resume|shutdown|snapshot DIR`: one HTTP/1.1 request on the API
//! socket, the response parsed with httparse. The JSON answer goes to stdout; an error answer
//! becomes one line.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A whole pause waits for every vCPU and device; the server gives up on the VMM after 60 s.
const TIMEOUT: Duration = Duration::from_secs(90);
/// Larger than any answer the server writes.
const MAX_RESPONSE: usize = 1 << 20;

/// What `nvmm ctl` can ask.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// GET /vm: state, vCPUs, memory, layer, nested, uptime, exits per vCPU.
    Info,
    /// PUT /vm/pause
    Pause,
    /// PUT /vm/resume
    Resume,
    /// PUT /vm/shutdown: flush every disk, then nvmm exits 0.
    Shutdown,
    /// PUT /vm/snapshot: save the paused VM into DIR (created if missing); it stays paused.
    Snapshot {
        /// Where to write the snapshot; a relative path is taken from the current directory.
        dir: PathBuf,
    },
}

impl Command {
    fn request_line(&self) -> (&'static str, &'static str) {
        match self {
            Command::Info => ("GET", "/vm"),
            Command::Pause => ("PUT", "/vm/pause"),
            Command::Resume => ("PUT", "/vm/resume"),
            Command::Shutdown => ("PUT", "/vm/shutdown"),
            Command::Snapshot { .. } => ("PUT", "/vm/snapshot"),
        }
    }

    /// The JSON body: only a snapshot has one, with its directory made absolute here, since the
    /// server does not share our working directory.
    fn body(&self) -> Result<String, Error> {
        match self {
            Command::Snapshot { dir } => {
                let dir = std::path::absolute(dir).map_err(|err| Error::Io { path: dir.clone(), err })?;
                Ok(serde_json::json!({ "destination": dir }).to_string())
            }
            _ => Ok(String::new()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to API socket {path}: {err}")]
    Connect { path: PathBuf, err: std::io::Error },
    #[error("API socket {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("malformed HTTP response: {0}")]
    Parse(String),
    #[error("the response is over {MAX_RESPONSE} bytes")]
    TooLarge,
    #[error("{status}: {message}")]
    Server { status: u16, message: String },
}

/// Sends `command` to the server at `socket` and returns its JSON answer.
pub fn call(socket: &Path, command: &Command) -> Result<String, Error> {
    let body = command.body()?;
    let io = |err| Error::Io { path: socket.to_path_buf(), err };
    let mut stream = UnixStream::connect(socket).map_err(|err| Error::Connect { path: socket.to_path_buf(), err })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    let (method, path) = command.request_line();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(response) = parse_response(&buf)? {
            return response;
        }
        let n = stream.read(&mut chunk).map_err(io)?;
        if n == 0 {
            return Err(Error::Parse("the server closed the connection before a whole response".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(Error::TooLarge);
        }
    }
}

/// `None` while more bytes are needed; then the body, or the server's error as one line.
fn parse_response(buf: &[u8]) -> Result<Option<Result<String, Error>>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf).map_err(|e| Error::Parse(e.to_string()))? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.unwrap_or(0);
    let mut length = None;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).map_err(|e| Error::Parse(e.to_string()))?;
            length = Some(text.trim().parse::<usize>().map_err(|e| Error::Parse(format!("Content-Length: {e}")))?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Error::Parse("chunked responses are not expected from nvmm".into()));
        }
    }
    let length = length.ok_or_else(|| Error::Parse("no Content-Length".into()))?;
    let Some(body) = buf.get(head_len..head_len + length) else {
        return Ok(None);
    };
    let body = String::from_utf8_lossy(body).into_owned();
    if (200..300).contains(&status) {
        return Ok(Some(Ok(body)));
    }
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or(body);
    Ok(Some(Err(Error::Server { status, message: message.lines().collect::<Vec<_>>().join(" ") })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_names_an_absolute_directory() {
        let body = Command::Snapshot { dir: "snaps/one".into() }.body().unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let dest = v["destination"].as_str().unwrap();
        assert!(dest.starts_with('/') && dest.ends_with("snaps/one"), "{dest}");
        assert_eq!(Command::Pause.body().unwrap(), "");
    }

    #[test]
    fn a_response_is_parsed_only_once_whole() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 18\r\n\r\n{\"state\":\"paused\"}";
        assert!(parse_response(&full[..10]).unwrap().is_none());
        assert!(parse_response(&full[..full.len() - 1]).unwrap().is_none());
        assert_eq!(parse_response(full).unwrap().unwrap().unwrap(), r#"{"state":"paused"}"#);
    }

    #[test]
    fn an_error_answer_becomes_one_line() {
        let r = b"HTTP/1.1 409 Conflict\r\nContent-Length: 36\r\n\r\n{\"error\":\"the VM is already paused\"}";
        let e = parse_response(r).unwrap().unwrap().unwrap_err();
        assert_eq!(e.to_string(), "409: the VM is already paused");
    }

    #[test]
    fn garbage_and_missing_sockets_are_errors() {
        assert!(matches!(parse_response(b"SMTP ready\r\n\r\n"), Err(Error::Parse(_))));
        assert!(matches!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n"), Err(Error::Parse(_))));
        assert!(matches!(call(Path::new("/nonexistent/nvmm.sock"), &Command::Info), Err(Error::Connect { .. })));
    }
}
