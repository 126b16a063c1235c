//! A minimal client for the QEMU Machine Protocol (QMP).
//!
//! QMP is line-delimited JSON over a unix socket: QEMU greets, the client
//! negotiates with `qmp_capabilities`, then sends `{"execute": ..., "id": n}`
//! and reads lines until the `{"return": ...}` or `{"error": ...}` carrying
//! the same id. Asynchronous events (`SHUTDOWN`, `STOP`, `RESUME`, ...) may
//! arrive between them at any time; they are kept (the most recent
//! [`EVENT_BACKLOG`]) for whoever wants to know what happened, and otherwise
//! skipped.
//!
//! QEMU serves one QMP client per socket at a time: a second connection
//! waits in the listen backlog without a greeting. [`QmpClient::connect`]
//! therefore bounds the wait for the greeting and says so when it times out.
//! The backend keeps one connection per guest for as long as it can.
//!
//! Every exchange is bounded by a timeout. A timed-out or failed exchange
//! may leave half a line in the buffer, so callers drop the client after any
//! error and connect anew.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// How many asynchronous events a client remembers.
pub const EVENT_BACKLOG: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no QMP greeting on {path} within {after:?} (is another client connected?)")]
    NoGreeting { path: PathBuf, after: Duration },
    #[error("unexpected QMP greeting {line:?}")]
    BadGreeting { line: String },
    #[error("sending {command}")]
    Send {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the reply to {command}")]
    Receive {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("QEMU closed the QMP connection before replying to {command}")]
    Closed { command: String },
    #[error("no reply to {command} within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("undecodable QMP message {line:?}")]
    Decode {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

/// An asynchronous QMP event, e.g. `SHUTDOWN` with `{"guest": true, ...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
    /// When QEMU emitted it: microseconds since the Unix epoch (host clock).
    pub timestamp_us: Option<u64>,
}

/// One negotiated QMP connection.
#[derive(Debug)]
pub struct QmpClient {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    timeout: Duration,
    events: VecDeque<QmpEvent>,
    /// When each kind of event was last seen (microseconds since the
    /// epoch), however many others came since.
    last_seen: std::collections::HashMap<String, u64>,
}

impl QmpClient {
    /// Connects to the QMP socket at `path`, reads the greeting and
    /// negotiates capabilities. `timeout` bounds the greeting and, later,
    /// every command.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream =
            UnixStream::connect(path).await.map_err(|source| QmpError::Connect { path: path.to_owned(), source })?;
        let (read, writer) = stream.into_split();
        let mut client = Self {
            path: path.to_owned(),
            reader: BufReader::new(read),
            writer,
            next_id: 1,
            timeout,
            events: VecDeque::new(),
            last_seen: std::collections::HashMap::new(),
        };
        let greeting = tokio::time::timeout(timeout, client.read_message("the greeting"))
            .await
            .map_err(|_| QmpError::NoGreeting { path: path.to_owned(), after: timeout })??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::BadGreeting { line: greeting.to_string() });
        }
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `command` with optional `arguments` and returns its `return`
    /// value. Events read meanwhile are recorded.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.exchange(command, arguments))
            .await
            .map_err(|_| QmpError::Timeout { command: command.to_owned(), after: timeout })?
    }

    /// The run state from `query-status`: `running`, `paused`, `shutdown`,
    /// `guest-panicked`, `inmigrate`, ...
    pub async fn query_status(&mut self) -> Result<String, QmpError> {
        let reply = self.execute("query-status", None).await?;
        Ok(reply.get("status").and_then(Value::as_str).unwrap_or_default().to_owned())
    }

    /// Events received so far (oldest first), removing them from the client.
    /// When event `name` was last seen on this connection (microseconds
    /// since the epoch, QEMU's clock).
    pub fn last_seen(&self, name: &str) -> Option<u64> {
        self.last_seen.get(name).copied()
    }

    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Hands QEMU the file descriptor `fd` under `name` (`getfd`), for a
    /// later command to use (`migrate` with `fd:NAME`). The descriptor
    /// travels with the command as SCM_RIGHTS; QEMU keeps its own copy.
    pub async fn send_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), QmpError> {
        let timeout = self.timeout;
        let command = "getfd";
        let exchange = async {
            let (id, line) = self.message(command, Some(json!({ "fdname": name })));
            let send = |source| QmpError::Send { command: command.to_owned(), source };
            self.writer.flush().await.map_err(send)?;
            let socket = self.writer.as_ref();
            let mut sent = 0;
            while sent < line.len() {
                socket.writable().await.map_err(send)?;
                // The descriptor goes with the first byte; what a short
                // write leaves follows without it.
                let result = socket.try_io(tokio::io::Interest::WRITABLE, || {
                    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
                    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
                    let mut control = SendAncillaryBuffer::new(&mut space);
                    let fds = [fd];
                    if sent == 0 && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                        return Err(io::Error::other("no room for the descriptor in the control message"));
                    }
                    let bytes = [io::IoSlice::new(&line.as_bytes()[sent..])];
                    sendmsg(socket, &bytes, &mut control, SendFlags::NOSIGNAL).map_err(io::Error::from)
                });
                match result {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(send(e)),
                }
            }
            self.reply(command, id).await.map(|_| ())
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| QmpError::Timeout { command: command.to_owned(), after: timeout })?
    }

    /// The next id and the line of a command.
    fn message(&mut self, command: &str, arguments: Option<Value>) -> (u64, String) {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        (id, line)
    }

    async fn exchange(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let (id, line) = self.message(command, arguments);
        let send = |source| QmpError::Send { command: command.to_owned(), source };
        self.writer.write_all(line.as_bytes()).await.map_err(send)?;
        self.writer.flush().await.map_err(send)?;
        self.reply(command, id).await
    }

    /// Reads until the reply to command `id`.
    async fn reply(&mut self, command: &str, id: u64) -> Result<Value, QmpError> {
        loop {
            let reply = self.read_message(command).await?;
            // A reply without our id is left over from an earlier exchange
            // that timed out; it answers nobody now.
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = reply.get("error") {
                let field = |k: &str| error.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
        }
    }

    /// Reads the next message that is not an event, recording events.
    async fn read_message(&mut self, waiting_for: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .await
                .map_err(|source| QmpError::Receive { command: waiting_for.to_owned(), source })?;
            if n == 0 {
                return Err(QmpError::Closed { command: waiting_for.to_owned() });
            }
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(&line)
                .map_err(|source| QmpError::Decode { line: line.trim_end().to_owned(), source })?;
            if let Some(event) = value.get("event").and_then(Value::as_str) {
                tracing::debug!(socket = %self.path.display(), event, "QMP event");
                if self.events.len() == EVENT_BACKLOG {
                    self.events.pop_front();
                }
                let ts = value.get("timestamp");
                let part = |k: &str| ts.and_then(|t| t.get(k)).and_then(Value::as_u64);
                let timestamp_us = part("seconds").map(|s| s * 1_000_000 + part("microseconds").unwrap_or(0));
                if let Some(at) = timestamp_us {
                    self.last_seen.insert(event.to_owned(), at);
                }
                self.events.push_back(QmpEvent {
                    event: event.to_owned(),
                    data: value.get("data").cloned().unwrap_or(Value::Null),
                    timestamp_us,
                });
                continue;
            }
            return Ok(value);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;

    /// A scripted QMP server: greets, then answers each request with the
    /// next scripted lines, with `{id}` replaced by the request's id.
    async fn fake_qemu(listener: UnixListener, script: Vec<Vec<&'static str>>) {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\n").await.unwrap();
        for answers in script {
            let Some(request) = lines.next_line().await.unwrap() else { return };
            let request: Value = serde_json::from_str(&request).unwrap();
            let id = request["id"].to_string();
            for answer in answers {
                let answer = answer.replace("{id}", &id);
                write.write_all(format!("{answer}\n").as_bytes()).await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn negotiates_skips_events_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_qemu(
            listener,
            vec![
                vec![r#"{"return": {}, "id": {id}}"#],
                vec![
                    r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                    r#"{"return": {"status": "paused", "running": false}, "id": 999}"#,
                    r#"{"return": {"status": "running", "running": true}, "id": {id}}"#,
                ],
                vec![r#"{"error": {"class": "CommandNotFound", "desc": "no such thing"}, "id": {id}}"#],
            ],
        ));
        let mut qmp = QmpClient::connect(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(qmp.query_status().await.unwrap(), "running");
        let events = qmp.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, "STOP");
        let err = qmp.execute("frobnicate", None).await.unwrap_err();
        assert_eq!(err.to_string(), "frobnicate failed: CommandNotFound: no such thing");
        // The server is gone: the request cannot go out, or gets no answer.
        let err = qmp.execute("query-status", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Closed { .. } | QmpError::Send { .. }), "{err:?}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_times_out_at_the_greeting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        // Listening but never accepting: what a second client sees while
        // another one holds QEMU's monitor.
        let _listener = UnixListener::bind(&path).unwrap();
        let err = QmpClient::connect(&path, Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, QmpError::NoGreeting { .. }), "{err:?}");
        assert!(err.to_string().contains("another client"), "{err}");
    }
}
