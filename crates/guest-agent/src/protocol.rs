//! Requests and replies of the QEMU guest agent protocol, and the dispatch
//! of a request to the command that serves it.
//!
//! A request is `{"execute": NAME, "arguments": {...}}`, optionally with an
//! `"id"`, which the reply carries back (as QEMU's dispatcher does). A reply
//! is `{"return": VALUE}` or `{"error": {"class": ..., "desc": ...}}`, one
//! JSON object per line. `guest-sync-delimited` puts a `0xFF` byte before its
//! reply so a client can find where the replies to its own requests start.
//!
//! Error classes are QEMU's: `CommandNotFound` for an unknown command,
//! `GenericError` for everything else.
//!
//! [`Agent::handle`] is a function from a request's bytes to a reply; the
//! commands' side effects (processes, open files) live in the [`Agent`].

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::exec::{self, ExecStatusArgs};
use crate::files::{self, FileCloseArgs, FileOpenArgs, FileReadArgs, FileWriteArgs};
use crate::framing::{Frame, MAX_REQUEST};
use crate::net;

/// What this agent reports as its version in `guest-info`.
pub const VERSION: &str = concat!("drove-guest-agent ", env!("CARGO_PKG_VERSION"));

/// The commands this agent knows, in the order `guest-info` lists them.
pub const COMMANDS: &[&str] = &[
    "guest-sync",
    "guest-sync-delimited",
    "guest-ping",
    "guest-info",
    "guest-exec",
    "guest-exec-status",
    "guest-network-get-interfaces",
    "guest-file-open",
    "guest-file-read",
    "guest-file-write",
    "guest-file-close",
];

/// A failed command, as the protocol reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub class: &'static str,
    pub desc: String,
}

impl CommandError {
    pub fn generic(desc: impl Into<String>) -> Self {
        Self { class: "GenericError", desc: desc.into() }
    }
}

/// One reply to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Precede the JSON with the `0xFF` delimiter.
    pub delimited: bool,
    pub body: Value,
}

impl Reply {
    fn ok(value: Value) -> Self {
        Self { delimited: false, body: json!({ "return": value }) }
    }

    fn error(e: CommandError) -> Self {
        Self { delimited: false, body: json!({ "error": { "class": e.class, "desc": e.desc } }) }
    }

    /// The bytes on the wire: optional delimiter, compact JSON, newline.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.delimited {
            out.push(0xFF);
        }
        // Serialising a Value cannot fail: its map keys are strings.
        out.extend_from_slice(self.body.to_string().as_bytes());
        out.push(b'\n');
        out
    }
}

/// The agent's state: processes started by `guest-exec` and files opened
/// by `guest-file-open`, both keyed by the numbers handed to the client.
#[derive(Debug, Default)]
pub struct Agent {
    pub processes: exec::Processes,
    pub files: files::Files,
}

impl Agent {
    pub fn new() -> Self {
        Self::default()
    }

    /// The reply to one frame from the stream.
    pub fn handle_frame(&mut self, frame: Frame) -> Reply {
        match frame {
            Frame::Message(bytes) => self.handle(&bytes),
            Frame::Invalid(bytes) => Reply::error(CommandError::generic(format!(
                "JSON parse error, expected a request object, got {:?}",
                String::from_utf8_lossy(&bytes)
            ))),
            Frame::TooLarge => {
                Reply::error(CommandError::generic(format!("request longer than {MAX_REQUEST} bytes was dropped")))
            }
        }
    }

    /// The reply to one request.
    pub fn handle(&mut self, request: &[u8]) -> Reply {
        let request: Value = match serde_json::from_slice(request) {
            Ok(v) => v,
            Err(e) => return Reply::error(CommandError::generic(format!("JSON parse error, {e}"))),
        };
        let id = request.get("id").cloned();
        let mut reply = match self.dispatch(&request) {
            Ok((value, delimited)) => Reply { delimited, ..Reply::ok(value) },
            Err(e) => Reply::error(e),
        };
        if let (Some(id), Some(body)) = (id, reply.body.as_object_mut()) {
            body.insert("id".to_owned(), id);
        }
        reply
    }

    /// Runs the request's command; the flag says whether the reply is
    /// delimited.
    fn dispatch(&mut self, request: &Value) -> Result<(Value, bool), CommandError> {
        let Some(object) = request.as_object() else {
            return Err(CommandError::generic("QMP input must be a JSON object"));
        };
        let Some(command) = object.get("execute").and_then(Value::as_str) else {
            return Err(CommandError::generic("QMP input lacks member 'execute'"));
        };
        let arguments = object.get("arguments").cloned().unwrap_or_else(|| json!({}));
        let value = match command {
            "guest-sync" => return sync(&arguments).map(|v| (v, false)),
            "guest-sync-delimited" => return sync(&arguments).map(|v| (v, true)),
            "guest-ping" => json!({}),
            "guest-info" => info(),
            "guest-exec" => self.processes.spawn(args(command, arguments)?)?,
            "guest-exec-status" => self.processes.status(args::<ExecStatusArgs>(command, arguments)?.pid)?,
            "guest-network-get-interfaces" => net::interfaces()?,
            "guest-file-open" => self.files.open(args::<FileOpenArgs>(command, arguments)?)?,
            "guest-file-read" => self.files.read(args::<FileReadArgs>(command, arguments)?)?,
            "guest-file-write" => self.files.write(args::<FileWriteArgs>(command, arguments)?)?,
            "guest-file-close" => self.files.close(args::<FileCloseArgs>(command, arguments)?)?,
            other => {
                return Err(CommandError {
                    class: "CommandNotFound",
                    desc: format!("The command {other} has not been found"),
                });
            }
        };
        Ok((value, false))
    }
}

/// Decodes a command's arguments, naming the command in the error.
fn args<T: DeserializeOwned>(command: &str, arguments: Value) -> Result<T, CommandError> {
    serde_json::from_value(arguments)
        .map_err(|e| CommandError::generic(format!("invalid arguments for {command}: {e}")))
}

/// `guest-sync(-delimited)`: returns the client's id unchanged.
fn sync(arguments: &Value) -> Result<Value, CommandError> {
    match arguments.get("id") {
        Some(id) if id.is_i64() || id.is_u64() => Ok(id.clone()),
        Some(_) => Err(CommandError::generic("Invalid parameter type for 'id', expected: integer")),
        None => Err(CommandError::generic("Parameter 'id' is missing")),
    }
}

fn info() -> Value {
    let commands: Vec<Value> =
        COMMANDS.iter().map(|name| json!({ "name": name, "enabled": true, "success-response": true })).collect();
    json!({ "version": VERSION, "supported_commands": commands })
}

/// Shared by the commands: decodes base64 from a named argument.
pub fn decode_base64(param: &str, data: &str) -> Result<Vec<u8>, CommandError> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| CommandError::generic(format!("invalid base64 data in '{param}': {e}")))
}

/// The OS's wording of an error, without Rust's " (os error N)" suffix, as
/// qemu-ga words its messages.
pub fn os_error(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

pub fn encode_base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn call(agent: &mut Agent, request: Value) -> Value {
        agent.handle(request.to_string().as_bytes()).body
    }

    #[test]
    fn sync_returns_the_id_and_only_the_delimited_form_is_delimited() {
        let mut agent = Agent::new();
        let plain = agent.handle(br#"{"execute":"guest-sync","arguments":{"id":12345678901}}"#);
        assert_eq!(plain.body, json!({"return": 12345678901_u64}));
        assert_eq!(plain.encode(), b"{\"return\":12345678901}\n");
        let delimited = agent.handle(br#"{"execute":"guest-sync-delimited","arguments":{"id":5}}"#);
        assert_eq!(delimited.encode(), b"\xff{\"return\":5}\n");
        let missing = call(&mut agent, json!({"execute": "guest-sync"}));
        assert_eq!(missing["error"]["desc"], "Parameter 'id' is missing");
    }

    #[test]
    fn ping_info_and_the_request_id_is_echoed() {
        let mut agent = Agent::new();
        assert_eq!(call(&mut agent, json!({"execute": "guest-ping", "id": "abc"})), json!({"return": {}, "id": "abc"}));
        let info = call(&mut agent, json!({"execute": "guest-info"}));
        assert!(info["return"]["version"].as_str().unwrap().starts_with("drove-guest-agent "));
        let names: Vec<&str> = info["return"]["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, COMMANDS);
    }

    #[test]
    fn errors_use_qemus_classes() {
        let mut agent = Agent::new();
        let unknown = call(&mut agent, json!({"execute": "guest-shutdown"}));
        assert_eq!(
            unknown,
            json!({"error": {"class": "CommandNotFound", "desc": "The command guest-shutdown has not been found"}})
        );
        let broken = agent.handle(b"{\"execute\": ");
        assert_eq!(broken.body["error"]["class"], "GenericError");
        assert!(broken.body["error"]["desc"].as_str().unwrap().starts_with("JSON parse error"));
        let no_execute = call(&mut agent, json!({"arguments": {}}));
        assert_eq!(no_execute["error"]["desc"], "QMP input lacks member 'execute'");
        let bad_args = call(&mut agent, json!({"execute": "guest-exec", "arguments": {"arg": ["x"]}}));
        assert_eq!(bad_args["error"]["class"], "GenericError");
        assert!(bad_args["error"]["desc"].as_str().unwrap().contains("path"), "{bad_args}");
        let garbage = agent.handle_frame(Frame::Invalid(b"hello".to_vec()));
        assert!(garbage.body["error"]["desc"].as_str().unwrap().contains("hello"));
    }

    #[test]
    fn base64_round_trips_and_bad_data_names_the_parameter() {
        assert_eq!(decode_base64("buf-b64", &encode_base64(b"hi\n\xff")).unwrap(), b"hi\n\xff");
        let err = decode_base64("input-data", "!!").unwrap_err();
        assert!(err.desc.contains("'input-data'"), "{err:?}");
    }
}
