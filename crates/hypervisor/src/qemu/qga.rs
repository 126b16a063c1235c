//! The QEMU guest agent (QGA) protocol, host side: a client, and the
//! backend's `exec` and `guest_interfaces` built on it.
//!
//! # The channel
//!
//! Every guest gets a virtio-serial port named [`PORT_NAME`], the name
//! qemu-guest-agent (and our own `drove-guest-agent` in the test image)
//! looks for. Its host end is the unix socket `qga.sock` in the guest's
//! directory, where QEMU accepts one client at a time. The protocol is JSON
//! like QMP's, without greeting or events: a request `{"execute": ...,
//! "arguments": ...}`, a reply `{"return": ...}` or `{"error": ...}` per line.
//! Nothing here depends on which agent answers.
//!
//! # Getting in step: guest-sync-delimited
//!
//! Unlike QMP, the stream carries no sign of where the replies to *our*
//! requests begin: a client before us may have left a reply unread, or half
//! a request in the agent's parser. So every connection starts with the
//! handshake the protocol defines:
//!
//! 1. Send a `0xFF` byte (the agent resets its parser) and
//!    `guest-sync-delimited` with a random id.
//! 2. The agent answers with `0xFF` and `{"return": id}`. Everything before
//!    (stale replies, an error about the `0xFF`) is skipped.
//!
//! The guest kernel drops what the host sends while no agent has the port
//! open, so a sync sent while the agent is still starting is lost, not
//! delayed: the client repeats it every [`SYNC_RESEND`] until one is
//! answered or the time is up, which then fails as
//! [`QgaError::NoSync`] -- a guest without an agent gives a clear error,
//! never a hang. Any of the syncs sent may be answered; when more than one
//! was sent, a last sync after the first answer proves that the others'
//! replies are past.
//!
//! After the handshake, requests and replies pair up in order. A failed
//! exchange (timeout, I/O) leaves that unknown again, so the connection is
//! dropped and the next call connects and syncs anew. An error *reply*
//! (`{"error": ...}`) keeps the stream in step.
//!
//! # exec
//!
//! `guest-exec` starts the command and returns its pid in the guest;
//! `guest-exec-status` is polled (every few milliseconds at first, backing
//! off) until it says `exited`, with the exit code and the base64 output.
//! Each poll is its own exchange, so a long command does not keep others
//! (another exec, `guest_interfaces`) from the agent meanwhile.
//! `ExecRequest::timeout` bounds the whole call, handshake included; a
//! command still running then keeps running (the protocol cannot stop it)
//! and the call fails with [`QgaError::ExecTimeout`].
//!
//! # One connection per guest
//!
//! QEMU serves one client per socket, so the backend keeps one connection per
//! guest (tagged with the QEMU pid it belongs to, like the QMP connection)
//! and lends it to one exchange at a time. It lives apart from the guest's
//! lifecycle lock, so a long exec does not hold up a stop or a pause.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::error::QemuError;
use super::{QemuHypervisor, backend};
use crate::{ExecRequest, ExecResult, GuestInterface, HvError, RuntimeState};

/// The virtio-serial port name guest agents look for.
pub const PORT_NAME: &str = "org.qemu.guest_agent.0";
/// How often the handshake repeats its sync while the agent is silent.
pub const SYNC_RESEND: Duration = Duration::from_secs(1);
/// The longest reply accepted: two 16 MiB outputs in base64, and room.
pub const MAX_REPLY: usize = 64 << 20;
/// What `guest_interfaces` allows the agent to answer in, handshake
/// included. Generous: a guest under TCG on a busy host is slow.
const INTERFACES_TIMEOUT: Duration = Duration::from_secs(10);
/// A readiness probe's patience: a booting guest's agent is not there yet.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// The first and the longest wait between two `guest-exec-status` polls.
const EXEC_POLL_FIRST: Duration = Duration::from_millis(5);
const EXEC_POLL_MAX: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("connecting to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no answer to guest-sync-delimited within {after:?}: is a guest agent running in the guest \
         (and no other client connected to its socket)?"
    )]
    NoSync { after: Duration },
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
    #[error("the guest agent's socket closed before the reply to {command}")]
    Closed { command: String },
    #[error("no reply to {command} within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("{command} waited {after:?} for other calls to the same guest agent to finish")]
    Busy { command: String, after: Duration },
    #[error("the reply to {command} is longer than {limit} bytes")]
    TooLong { command: String, limit: usize },
    #[error("undecodable reply to {command}: {text:?}")]
    Decode {
        command: String,
        text: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("unexpected reply to {command}: {reason}")]
    Reply { command: String, reason: String },
    #[error("the guest process {pid} had not exited after {after:?}; it may still be running in the guest")]
    ExecTimeout { pid: i64, after: Duration },
}

/// One connection to a guest agent, in step after the handshake.
#[derive(Debug)]
pub struct QgaClient {
    path: PathBuf,
    stream: UnixStream,
    /// Bytes read but not yet handed out as a message.
    pending: Vec<u8>,
    /// How far `pending` is known to hold no delimiter.
    scanned: usize,
}

impl QgaClient {
    /// Connects to the agent socket at `path` and syncs (see the module
    /// docs); `timeout` bounds the handshake.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QgaError> {
        let stream =
            UnixStream::connect(path).await.map_err(|source| QgaError::Connect { path: path.to_owned(), source })?;
        let mut client = Self { path: path.to_owned(), stream, pending: Vec::new(), scanned: 0 };
        client.sync(timeout).await?;
        Ok(client)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `command` and returns its `return` value; `timeout` bounds the
    /// exchange. After an error other than [`QgaError::Command`] the
    /// connection is out of step: drop it.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        tokio::time::timeout(timeout, self.exchange(command, arguments))
            .await
            .map_err(|_| QgaError::Timeout { command: command.to_owned(), after: timeout })?
    }

    async fn exchange(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QgaError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        self.send(&line, command).await?;
        loop {
            let message = self.next_message(command).await?;
            let mut reply: Value = serde_json::from_slice(&message).map_err(|source| QgaError::Decode {
                command: command.to_owned(),
                text: String::from_utf8_lossy(&message).chars().take(200).collect(),
                source,
            })?;
            if let Some(value) = reply.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = reply.get("error") {
                let field = |k: &str| error.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QgaError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            // The protocol has no events; whatever this is, it answers
            // nothing of ours.
            tracing::debug!(socket = %self.path.display(), %reply, "skipping an unexpected guest agent message");
        }
    }

    async fn sync(&mut self, timeout: Duration) -> Result<(), QgaError> {
        let deadline = Instant::now() + timeout;
        let no_sync = || QgaError::NoSync { after: timeout };
        let mut sent = Vec::new();
        loop {
            let id = random_id();
            sent.push(id);
            self.send_sync(id).await?;
            let resend = (Instant::now() + SYNC_RESEND).min(deadline);
            match tokio::time::timeout_at(resend, self.await_sync(&sent)).await {
                Ok(result) => break result?,
                Err(_) if Instant::now() >= deadline => return Err(no_sync()),
                Err(_) => {}
            }
        }
        if sent.len() > 1 {
            let id = random_id();
            self.send_sync(id).await?;
            tokio::time::timeout_at(deadline, self.await_sync(&[id])).await.map_err(|_| no_sync())??;
        }
        tracing::debug!(socket = %self.path.display(), attempts = sent.len(), "guest agent in sync");
        Ok(())
    }

    async fn send_sync(&mut self, id: u64) -> Result<(), QgaError> {
        // The leading 0xFF makes the agent drop whatever half request an
        // earlier client left in its parser.
        let mut bytes = vec![0xFF];
        bytes.extend(json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } }).to_string().into_bytes());
        bytes.push(b'\n');
        self.send(&bytes, "guest-sync-delimited").await
    }

    /// Reads until a reply returning one of `ids`, skipping everything else.
    async fn await_sync(&mut self, ids: &[u64]) -> Result<(), QgaError> {
        loop {
            let message = self.next_message("guest-sync-delimited").await?;
            let returned = serde_json::from_slice::<Value>(&message).ok().and_then(|v| v.get("return")?.as_u64());
            if returned.is_some_and(|r| ids.contains(&r)) {
                return Ok(());
            }
            tracing::debug!(
                socket = %self.path.display(),
                message = %String::from_utf8_lossy(&message),
                "skipping a stale guest agent message"
            );
        }
    }

    async fn send(&mut self, bytes: &[u8], command: &str) -> Result<(), QgaError> {
        let send = |source| QgaError::Send { command: command.to_owned(), source };
        self.stream.write_all(bytes).await.map_err(send)?;
        self.stream.flush().await.map_err(send)
    }

    /// The next non-blank message, cut at a newline or a `0xFF` delimiter.
    /// Cancel-safe: what was read stays in `pending`.
    async fn next_message(&mut self, command: &str) -> Result<Vec<u8>, QgaError> {
        loop {
            if let Some(offset) = self.pending[self.scanned..].iter().position(|&b| b == b'\n' || b == 0xFF) {
                let end = self.scanned + offset;
                let mut message: Vec<u8> = self.pending.drain(..=end).collect();
                self.scanned = 0;
                message.pop();
                if message.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(message);
            }
            self.scanned = self.pending.len();
            if self.pending.len() > MAX_REPLY {
                return Err(QgaError::TooLong { command: command.to_owned(), limit: MAX_REPLY });
            }
            self.pending.reserve(64 * 1024);
            let n = self
                .stream
                .read_buf(&mut self.pending)
                .await
                .map_err(|source| QgaError::Receive { command: command.to_owned(), source })?;
            if n == 0 {
                return Err(QgaError::Closed { command: command.to_owned() });
            }
        }
    }
}

/// A sync id nobody else would pick: random, and below 2^53 so that any
/// JSON parser (qemu-ga's is int64) keeps it exact.
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS once per process and stepped for
    // each instance: enough to tell our sync from a stale one.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() & ((1 << 53) - 1)
}

// --- requests and replies, as pure functions -------------------------------------

/// The `guest-exec` arguments for a request. `capture-output` is the boolean
/// form, which every qemu-ga version takes (the string modes came in 8.0).
pub fn exec_arguments(req: &ExecRequest) -> Value {
    let mut args = json!({ "path": req.path, "arg": req.args, "capture-output": true });
    if let Some(input) = &req.input {
        args["input-data"] = json!(base64::engine::general_purpose::STANDARD.encode(input));
    }
    args
}

/// The guest pid in a `guest-exec` reply.
pub fn exec_pid(reply: &Value) -> Result<i64, QgaError> {
    reply.get("pid").and_then(Value::as_i64).ok_or_else(|| QgaError::Reply {
        command: "guest-exec".to_owned(),
        reason: format!("no integer pid in {reply}"),
    })
}

/// A `guest-exec-status` reply: `None` while the process runs.
pub fn exec_status(reply: &Value) -> Result<Option<ExecResult>, QgaError> {
    let bad = |reason: String| QgaError::Reply { command: "guest-exec-status".to_owned(), reason };
    let exited = reply.get("exited").and_then(Value::as_bool).ok_or_else(|| bad(format!("no 'exited' in {reply}")))?;
    if !exited {
        return Ok(None);
    }
    let int = |key: &str| reply.get(key).and_then(Value::as_i64).and_then(|v| i32::try_from(v).ok());
    let exit_code = match (int("exitcode"), int("signal")) {
        (Some(code), _) => code,
        // A shell's way to report a death by signal.
        (None, Some(signal)) => 128 + signal,
        (None, None) => return Err(bad(format!("exited without exitcode or signal: {reply}"))),
    };
    let data = |stream: &str| -> Result<Vec<u8>, QgaError> {
        if reply.get(format!("{stream}-truncated")).and_then(Value::as_bool) == Some(true) {
            tracing::warn!(stream, "the guest agent truncated the command's output");
        }
        match reply.get(format!("{stream}-data")) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| bad(format!("{stream}-data is not base64: {e}"))),
            Some(other) => Err(bad(format!("{stream}-data is not a string: {other}"))),
        }
    };
    Ok(Some(ExecResult { exit_code, stdout: data("out")?, stderr: data("err")? }))
}

/// A `guest-network-get-interfaces` reply.
pub fn interfaces(reply: &Value) -> Result<Vec<GuestInterface>, QgaError> {
    let bad = |reason: String| QgaError::Reply { command: "guest-network-get-interfaces".to_owned(), reason };
    let list = reply.as_array().ok_or_else(|| bad(format!("not a list: {reply}")))?;
    let mut out = Vec::with_capacity(list.len());
    for iface in list {
        let name = iface
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("an interface without a name: {iface}")))?;
        let mac = iface.get("hardware-address").and_then(Value::as_str).map(str::to_ascii_lowercase);
        let mut addresses = Vec::new();
        for ip in iface.get("ip-addresses").and_then(Value::as_array).into_iter().flatten() {
            let (Some(address), Some(prefix)) =
                (ip.get("ip-address").and_then(Value::as_str), ip.get("prefix").and_then(Value::as_u64))
            else {
                return Err(bad(format!("an address of {name} without ip-address or prefix: {ip}")));
            };
            addresses.push(format!("{address}/{prefix}"));
        }
        out.push(GuestInterface { name: name.to_owned(), mac, addresses });
    }
    Ok(out)
}

// --- the backend's use of the agent ----------------------------------------------

impl QemuHypervisor {
    /// [`Hypervisor::exec`](crate::Hypervisor::exec) for QEMU guests.
    pub(super) async fn agent_exec(&self, id: drove_model::GuestId, req: &ExecRequest) -> Result<ExecResult, HvError> {
        let deadline = Instant::now() + req.timeout;
        let budget = Budget { deadline, allowed: req.timeout };
        let pid = self.running_pid(id, "exec").await?;
        let fail = |source| {
            let socket = self.dir(id).qga_path();
            backend("exec", id)(QemuError::Qga { socket, what: format!("running {:?}", req.path), source })
        };
        let started = self.agent_call(id, pid, "guest-exec", Some(exec_arguments(req)), budget).await.map_err(fail)?;
        let guest_pid = exec_pid(&started).map_err(fail)?;
        let exec_timeout = || fail(QgaError::ExecTimeout { pid: guest_pid, after: req.timeout });
        let mut poll = EXEC_POLL_FIRST;
        loop {
            let args = json!({ "pid": guest_pid });
            let status = match self.agent_call(id, pid, "guest-exec-status", Some(args), budget).await {
                Ok(status) => status,
                // The command's time ran out while we asked about it.
                Err(QgaError::Timeout { .. }) if Instant::now() >= deadline => return Err(exec_timeout()),
                Err(e) => return Err(fail(e)),
            };
            if let Some(result) = exec_status(&status).map_err(fail)? {
                return Ok(result);
            }
            if Instant::now() + poll >= deadline {
                return Err(exec_timeout());
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(EXEC_POLL_MAX);
        }
    }

    /// [`Hypervisor::guest_interfaces`](crate::Hypervisor::guest_interfaces)
    /// for QEMU guests.
    pub(super) async fn agent_interfaces(&self, id: drove_model::GuestId) -> Result<Vec<GuestInterface>, HvError> {
        let budget = Budget { deadline: Instant::now() + INTERFACES_TIMEOUT, allowed: INTERFACES_TIMEOUT };
        let pid = self.running_pid(id, "guest_interfaces").await?;
        let fail = |source| {
            let socket = self.dir(id).qga_path();
            backend("guest_interfaces", id)(QemuError::Qga {
                socket,
                what: "listing network interfaces".to_owned(),
                source,
            })
        };
        let reply = self.agent_call(id, pid, "guest-network-get-interfaces", None, budget).await.map_err(fail)?;
        interfaces(&reply).map_err(fail)
    }

    /// [`Hypervisor::guest_ready`](crate::Hypervisor::guest_ready) for QEMU
    /// guests: the guest agent answers a ping.
    pub(super) async fn agent_ping(&self, id: drove_model::GuestId) -> Result<bool, HvError> {
        let budget = Budget { deadline: Instant::now() + PING_TIMEOUT, allowed: PING_TIMEOUT };
        let pid = match self.running_pid(id, "guest_ready").await {
            Ok(pid) => pid,
            Err(HvError::InvalidState { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        Ok(self.agent_call(id, pid, "guest-ping", None, budget).await.is_ok())
    }

    /// The QEMU pid of a Running guest; any other state is InvalidState,
    /// since only a running guest's agent can answer.
    async fn running_pid(&self, id: drove_model::GuestId, op: &'static str) -> Result<u32, HvError> {
        let status = crate::Hypervisor::status(self, id).await?;
        match (status.state, status.pid) {
            (RuntimeState::Running, Some(pid)) => Ok(pid),
            (state, _) => Err(HvError::InvalidState { id, op, state }),
        }
    }

    /// One exchange with the agent of the guest's QEMU `pid`, over the
    /// guest's kept connection (made anew for a new QEMU or after a failure),
    /// within the caller's budget. Timeouts are reported with the time the
    /// caller allowed in all, not with the remainder left for this exchange:
    /// that is the number the caller knows.
    ///
    /// Cancel-safe: the connection is taken out of its slot while in use and
    /// put back only when the exchange completed, so a dropped call takes a
    /// connection that may still receive its reply with it.
    async fn agent_call(
        &self,
        id: drove_model::GuestId,
        pid: u32,
        command: &str,
        arguments: Option<Value>,
        budget: Budget,
    ) -> Result<Value, QgaError> {
        let bound = || budget.deadline.saturating_duration_since(Instant::now());
        let restate = |e| match e {
            QgaError::Timeout { command, .. } => QgaError::Timeout { command, after: budget.allowed },
            QgaError::NoSync { .. } => QgaError::NoSync { after: budget.allowed },
            e => e,
        };
        let guest = self.guest(id);
        // Another call's exchange holds the connection for at most its own
        // budget.
        let mut slot = tokio::time::timeout(bound(), guest.qga.lock())
            .await
            .map_err(|_| QgaError::Busy { command: command.to_owned(), after: budget.allowed })?;
        let mut client = match slot.take() {
            Some((p, client)) if p == pid => client,
            _ => QgaClient::connect(&self.dir(id).qga_path(), bound()).await.map_err(restate)?,
        };
        let result = client.execute(command, arguments, bound()).await;
        if matches!(result, Ok(_) | Err(QgaError::Command { .. })) {
            *slot = Some((pid, client));
        }
        result.map_err(restate)
    }
}

/// A caller's deadline and the time it allowed in all.
#[derive(Debug, Clone, Copy)]
struct Budget {
    deadline: Instant,
    allowed: Duration,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    use super::*;

    #[test]
    fn exec_arguments_carry_path_args_and_base64_input() {
        let mut req = ExecRequest::new("/bin/sh", ["-c", "cat"]);
        assert_eq!(exec_arguments(&req), json!({"path": "/bin/sh", "arg": ["-c", "cat"], "capture-output": true}));
        req.input = Some(b"hi\n".to_vec());
        assert_eq!(exec_arguments(&req)["input-data"], "aGkK");
    }

    #[test]
    fn exec_status_replies_decode_to_results() {
        assert_eq!(exec_status(&json!({"exited": false})).unwrap(), None);
        let done = exec_status(&json!({"exited": true, "exitcode": 3, "out-data": "aGkK", "err-data": "ZXJyCg=="}));
        assert_eq!(
            done.unwrap(),
            Some(ExecResult { exit_code: 3, stdout: b"hi\n".to_vec(), stderr: b"err\n".to_vec() })
        );
        // Missing output is empty; a signal is 128 + its number.
        let killed = exec_status(&json!({"exited": true, "signal": 9})).unwrap().unwrap();
        assert_eq!((killed.exit_code, killed.stdout.len()), (137, 0));
        let err = exec_status(&json!({"exited": true})).unwrap_err();
        assert!(err.to_string().contains("without exitcode"), "{err}");
        assert!(exec_status(&json!({"exited": true, "exitcode": 0, "out-data": "%%"})).is_err());
        assert!(exec_pid(&json!({"pid": 42})).unwrap() == 42 && exec_pid(&json!({})).is_err());
    }

    #[test]
    fn interface_replies_decode_with_prefixes_and_optional_macs() {
        let reply = json!([
            {"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
                {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}],
             "statistics": {"rx-bytes": 0}},
            {"name": "eth0", "hardware-address": "52:54:00:AB:CD:EF", "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": "10.0.0.5", "prefix": 24}]},
            {"name": "tun0"},
        ]);
        let got = interfaces(&reply).unwrap();
        assert_eq!(
            got,
            vec![
                GuestInterface {
                    name: "lo".into(),
                    mac: Some("00:00:00:00:00:00".into()),
                    addresses: vec!["127.0.0.1/8".into(), "::1/128".into()],
                },
                GuestInterface {
                    name: "eth0".into(),
                    mac: Some("52:54:00:ab:cd:ef".into()),
                    addresses: vec!["10.0.0.5/24".into()],
                },
                GuestInterface { name: "tun0".into(), mac: None, addresses: vec![] },
            ]
        );
        assert!(interfaces(&json!({"name": "x"})).is_err());
    }

    /// A scripted agent: ignores `ignore_syncs` syncs (as if it had not
    /// opened its port yet), answers the next after sending `stale` first,
    /// then answers each further request with the next scripted line.
    async fn fake_agent(listener: UnixListener, ignore_syncs: usize, stale: &'static str, script: Vec<&'static str>) {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut read = tokio::io::BufReader::new(read);
        let mut ignored = 0;
        let mut script = script.into_iter();
        let mut stale = Some(stale);
        loop {
            let mut line = Vec::new();
            if read.read_until(b'\n', &mut line).await.unwrap() == 0 {
                return;
            }
            // The reset byte arrives in front of a sync.
            let request: Value = serde_json::from_slice(line.strip_prefix(&[0xFF]).unwrap_or(&line)).unwrap();
            if request["execute"] == "guest-sync-delimited" {
                if ignored < ignore_syncs {
                    ignored += 1;
                    continue;
                }
                if let Some(stale) = stale.take() {
                    write.write_all(stale.as_bytes()).await.unwrap();
                }
                let mut reply = vec![0xFF];
                reply.extend(format!("{{\"return\": {}}}\n", request["arguments"]["id"]).into_bytes());
                write.write_all(&reply).await.unwrap();
                continue;
            }
            let Some(answer) = script.next() else { return };
            write.write_all(format!("{answer}\n").as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn the_handshake_repeats_until_answered_and_skips_stale_replies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let agent = tokio::spawn(fake_agent(
            listener,
            1,
            "{\"return\": {\"pid\": 1}}\n{\"return\": 7}\n",
            vec![r#"{"return": {}}"#, r#"{"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}}"#],
        ));
        let mut client = QgaClient::connect(&path, Duration::from_secs(30)).await.unwrap();
        assert_eq!(client.execute("guest-ping", None, Duration::from_secs(5)).await.unwrap(), json!({}));
        let err = client.execute("guest-exec-status", Some(json!({"pid": 9})), Duration::from_secs(5)).await;
        assert_eq!(err.unwrap_err().to_string(), "guest-exec-status failed: GenericError: Invalid parameter 'pid'");
        // The script is done: the agent hangs up.
        let err = client.execute("guest-ping", None, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, QgaError::Closed { .. }), "{err:?}");
        agent.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_agent_fails_the_handshake_with_a_clear_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        // QEMU accepts the connection whether or not an agent runs.
        let listener = UnixListener::bind(&path).unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
        let t0 = std::time::Instant::now();
        let err = QgaClient::connect(&path, Duration::from_millis(2500)).await.unwrap_err();
        assert!(matches!(err, QgaError::NoSync { .. }), "{err:?}");
        assert!(err.to_string().contains("is a guest agent running"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        drop(accept);
        let missing = QgaClient::connect(&dir.path().join("nope.sock"), Duration::from_secs(1)).await.unwrap_err();
        assert!(missing.to_string().contains("nope.sock"), "{missing}");
    }
}
