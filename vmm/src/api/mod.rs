//! The control API: `--api-socket PATH` serves HTTP/1.1 with JSON bodies on a Unix socket, on a
//! thread of its own (`server.rs`), and `nvmm ctl` is its client (`client.rs`). The server only
//! parses and routes: each call goes to the VMM's main loop as a [`Call`], which the VMM answers
//! on the call's own channel. Nothing here knows KVM.

pub mod client;
pub mod server;

use std::sync::mpsc::Sender;

/// What a client can ask the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `GET /vm`
    Info,
    /// `PUT /vm/pause`
    Pause,
    /// `PUT /vm/resume`
    Resume,
    /// `PUT /vm/shutdown`
    Shutdown,
    /// `PUT /vm/snapshot` with `{"destination": DIR}`
    Snapshot { destination: std::path::PathBuf },
}

/// A call on its way to the VMM, with where its answer goes.
pub struct Call {
    pub action: Action,
    pub reply: Sender<Reply>,
}

/// The VMM's answer: the JSON to send back, or an error with its HTTP status.
pub type Reply = Result<serde_json::Value, ApiError>;

/// The HTTP statuses the API answers errors with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    BadRequest = 400,
    NotFound = 404,
    MethodNotAllowed = 405,
    Conflict = 409,
    Internal = 500,
    Unavailable = 503,
}

/// An error answer: sent as `{"error": message}` with `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: Status,
    pub message: String,
}

impl ApiError {
    pub fn new(status: Status, message: impl std::fmt::Display) -> Self {
        // One line, whatever the source error looked like.
        let message = message.to_string().lines().collect::<Vec<_>>().join(" ");
        Self { status, message }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_one_line_json() {
        let e = ApiError::new(Status::Conflict, "first\nsecond");
        assert_eq!(e.status as u16, 409);
        assert_eq!(e.body().to_string(), r#"{"error":"first second"}"#);
    }
}
