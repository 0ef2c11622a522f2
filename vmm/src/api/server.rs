//! The API server: tiny_http on a Unix socket, on a thread of its own. It routes each request to an
//! [`Action`], checks its body, hands it to the VMM's main loop and writes back the answer.
//!
//! Routes (Cloud Hypervisor and Firecracker style; see the README):
//!
//! | method and path     | action                                   |
//! | ------------------- | ---------------------------------------- |
//! | `GET /vm`           | state, vCPUs, memory, layer, exits...    |
//! | `PUT /vm/pause`     | pause (409 if paused)                    |
//! | `PUT /vm/resume`    | resume (409 if running)                  |
//! | `PUT /vm/shutdown`  | flush every disk, then nvmm exits 0      |
//! | `PUT /vm/snapshot`  | save the paused VM to a directory        |
//!
//! `PUT /vm/snapshot` takes `{"destination": "/absolute/dir"}`. The other `PUT`s take no body or
//! a JSON object with no fields. Bodies are at most [`MAX_BODY`] bytes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tiny_http::{Header, Method, Request, Response, Server};

use super::{Action, ApiError, Call, Reply, Status};
use crate::mailbox::Mailbox;

/// The largest request body accepted.
pub const MAX_BODY: usize = 4096;
/// How long a call may wait for the VMM (a pause waits for every vCPU and device, 5 s each at most).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API socket {0} already exists: remove it, or choose another path")]
    Exists(PathBuf),
    #[error("cannot create API socket {path}: {msg}")]
    Bind { path: PathBuf, msg: String },
    #[error("cannot start the API server thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Why a request was refused before it reached the VMM.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum Refused {
    #[error("no such route: {0}")]
    NotFound(String),
    #[error("{method} is not allowed on {path}")]
    Method { method: String, path: String },
    #[error("request body over {MAX_BODY} bytes")]
    TooLarge,
    #[error("cannot read the request body: {0}")]
    Read(String),
    #[error("malformed JSON body: {0}")]
    Json(String),
}

impl Refused {
    fn status(&self) -> Status {
        match self {
            Refused::NotFound(_) => Status::NotFound,
            Refused::Method { .. } => Status::MethodNotAllowed,
            Refused::TooLarge | Refused::Read(_) | Refused::Json(_) => Status::BadRequest,
        }
    }
}

/// The socket, bound; serving starts with [`ApiServer::start`]. The socket file is removed when
/// this is dropped, however nvmm ends.
pub struct ApiServer {
    path: PathBuf,
    server: Option<Arc<Server>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path`, which must not exist (a stale socket is the user's to remove: we cannot tell
    /// it from another nvmm's live one).
    pub fn bind(path: &Path) -> Result<Self, Error> {
        if path.symlink_metadata().is_ok() {
            return Err(Error::Exists(path.to_path_buf()));
        }
        let server = Server::http_unix(path).map_err(|e| Error::Bind { path: path.to_path_buf(), msg: e.to_string() })?;
        Ok(Self { path: path.to_path_buf(), server: Some(Arc::new(server)), thread: None })
    }

    /// Serves requests on a thread named `nvmm-api`, handing each to the VMM through `vmm`.
    pub fn start(&mut self, vmm: Mailbox<Call>) -> Result<(), Error> {
        let Some(server) = self.server.clone() else {
            return Ok(());
        };
        let thread = std::thread::Builder::new()
            .name("nvmm-api".into())
            .spawn(move || {
                for request in server.incoming_requests() {
                    serve(request, &vmm);
                }
            })
            .map_err(Error::Spawn)?;
        self.thread = Some(thread);
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            // Requests already queued are answered first (with 503 once the VMM is gone), so a
            // shutdown's answer is written before nvmm exits.
            server.unblock();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            // tiny_http's own drop connects to the socket to wake its accept thread, then removes
            // the file.
            drop(server);
        }
        // In case it did not (a thread that would not end still holds the server).
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                log::warn!("cannot remove API socket {}: {e}", self.path.display())
            }
            _ => {}
        }
    }
}

/// Which route a request names; its body then makes it an [`Action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Info,
    Pause,
    Resume,
    Shutdown,
    Snapshot,
}

/// The body of `PUT /vm/snapshot`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    destination: PathBuf,
}

/// Answers one request.
fn serve(mut request: Request, vmm: &Mailbox<Call>) {
    let action = route(request.method(), request.url()).and_then(|r| read_body(&mut request).and_then(|body| action(r, &body)));
    let reply = match action {
        Ok(action) => call(vmm, action),
        Err(refused) => Err(ApiError::new(refused.status(), &refused)),
    };
    let (status, body) = match reply {
        Ok(value) => (200, value),
        Err(e) => (e.status as u16, e.body()),
    };
    // A Content-Length whatever the size (tiny_http would chunk from 32 KiB): `nvmm ctl` relies on
    // it. Only a client that asks for chunks with a TE header gets them.
    let mut response = Response::from_string(body.to_string()).with_status_code(status).with_chunked_threshold(usize::MAX);
    // Both strings are valid header bytes, so this cannot fail; without it the body is the same.
    if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]) {
        response.add_header(h);
    }
    if let Err(e) = request.respond(response) {
        log::debug!("API: cannot answer a client: {e}");
    }
}

/// Which route a method and path ask for.
fn route(method: &Method, url: &str) -> Result<Route, Refused> {
    let path = url.split('?').next().unwrap_or(url);
    let (action, allowed) = match path.trim_end_matches('/') {
        "/vm" => (Route::Info, Method::Get),
        "/vm/pause" => (Route::Pause, Method::Put),
        "/vm/resume" => (Route::Resume, Method::Put),
        "/vm/shutdown" => (Route::Shutdown, Method::Put),
        "/vm/snapshot" => (Route::Snapshot, Method::Put),
        _ => return Err(Refused::NotFound(path.to_string())),
    };
    if *method != allowed {
        return Err(Refused::Method { method: method.to_string(), path: path.to_string() });
    }
    Ok(action)
}

/// The body, at most `MAX_BODY` bytes.
fn read_body(request: &mut Request) -> Result<Vec<u8>, Refused> {
    if request.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(Refused::TooLarge);
    }
    let mut body = Vec::new();
    // One byte more than allowed tells a body that is too long without reading all of it.
    request.as_reader().take(MAX_BODY as u64 + 1).read_to_end(&mut body).map_err(|e| Refused::Read(e.to_string()))?;
    Ok(body)
}

/// The action a route and its body ask for.
fn action(route: Route, body: &[u8]) -> Result<Action, Refused> {
    match route {
        Route::Info => parse_body(body).map(|()| Action::Info),
        Route::Pause => parse_body(body).map(|()| Action::Pause),
        Route::Resume => parse_body(body).map(|()| Action::Resume),
        Route::Shutdown => parse_body(body).map(|()| Action::Shutdown),
        Route::Snapshot => parse_snapshot_body(body),
    }
}

/// `{"destination": "/absolute/dir"}`: absolute, because the server's working directory is not
/// the client's (`nvmm ctl` makes a relative one absolute before it asks).
fn parse_snapshot_body(body: &[u8]) -> Result<Action, Refused> {
    if body.len() > MAX_BODY {
        return Err(Refused::TooLarge);
    }
    let b: SnapshotBody = serde_json::from_slice(body).map_err(|e| Refused::Json(format!("{e} (expected {{\"destination\": \"/absolute/dir\"}})")))?;
    if !b.destination.is_absolute() {
        return Err(Refused::Json(format!("destination {} is not an absolute path", b.destination.display())));
    }
    Ok(Action::Snapshot { destination: b.destination })
}

fn parse_body(body: &[u8]) -> Result<(), Refused> {
    if body.len() > MAX_BODY {
        return Err(Refused::TooLarge);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    // No route takes options yet, so the only valid body is an empty object.
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(fields)) => match fields.keys().next() {
            None => Ok(()),
            Some(field) => Err(Refused::Json(format!("unknown field '{field}'"))),
        },
        Ok(_) => Err(Refused::Json("expected an object".into())),
        Err(e) => Err(Refused::Json(e.to_string())),
    }
}

/// Hands `action` to the VMM and waits for its answer.
fn call(vmm: &Mailbox<Call>, action: Action) -> Reply {
    let gone = || ApiError::new(Status::Unavailable, "the VM has stopped");
    let (reply, answer) = mpsc::channel();
    vmm.send(Call { action, reply }).map_err(|_| gone())?;
    match answer.recv_timeout(REPLY_TIMEOUT) {
        Ok(reply) => reply,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(ApiError::new(Status::Internal, format!("the VMM did not answer within {REPLY_TIMEOUT:?}"))),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(&Method::Get, "/vm"), Ok(Route::Info));
        assert_eq!(route(&Method::Get, "/vm/?x=1"), Ok(Route::Info));
        assert_eq!(route(&Method::Put, "/vm/pause"), Ok(Route::Pause));
        assert_eq!(route(&Method::Put, "/vm/resume"), Ok(Route::Resume));
        assert_eq!(route(&Method::Put, "/vm/shutdown"), Ok(Route::Shutdown));
        assert_eq!(route(&Method::Put, "/vm/snapshot"), Ok(Route::Snapshot));
        assert_eq!(route(&Method::Get, "/vm/snapshot").unwrap_err().status(), Status::MethodNotAllowed);
        assert_eq!(route(&Method::Get, "/vm/pause").unwrap_err().status(), Status::MethodNotAllowed);
        assert_eq!(route(&Method::Put, "/vm").unwrap_err().status(), Status::MethodNotAllowed);
        assert_eq!(route(&Method::Get, "/nope").unwrap_err().status(), Status::NotFound);
    }

    #[test]
    fn bodies() {
        assert_eq!(parse_body(b""), Ok(()));
        assert_eq!(parse_body(b" \n"), Ok(()));
        assert_eq!(parse_body(b"{}"), Ok(()));
        for bad in [&b"{"[..], b"{\"state\": 1}", b"[]", b"null x"] {
            let e = parse_body(bad).unwrap_err();
            assert_eq!(e.status(), Status::BadRequest, "{e}");
        }
        assert_eq!(parse_body(&vec![b' '; MAX_BODY + 1]), Err(Refused::TooLarge));
    }

    #[test]
    fn snapshot_bodies() {
        assert_eq!(action(Route::Snapshot, br#"{"destination": "/tmp/s"}"#), Ok(Action::Snapshot { destination: "/tmp/s".into() }));
        for bad in [&b""[..], b"{}", br#"{"destination": "rel/dir"}"#, br#"{"destination": "/a", "x": 1}"#, br#"{"destination": 3}"#] {
            let e = action(Route::Snapshot, bad).unwrap_err();
            assert_eq!(e.status(), Status::BadRequest, "{e}");
        }
        assert_eq!(action(Route::Pause, b"{}"), Ok(Action::Pause));
    }

    #[test]
    fn an_existing_path_is_refused_and_left_alone() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/nvmm-api-test").unwrap();
        let path = dir.as_path().join("sock");
        std::fs::write(&path, b"keep").unwrap();
        assert!(matches!(ApiServer::bind(&path), Err(Error::Exists(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        let missing = dir.as_path().join("no/such/dir/sock");
        assert!(matches!(ApiServer::bind(&missing), Err(Error::Bind { .. })));
    }

    #[test]
    fn a_call_to_a_stopped_vmm_is_unavailable() {
        let (tx, rx) = crate::mailbox::mailbox::<Call>().unwrap();
        drop(rx);
        assert_eq!(call(&tx, Action::Info).unwrap_err().status, Status::Unavailable);
    }
}
