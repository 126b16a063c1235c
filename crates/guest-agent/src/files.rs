//! `guest-file-open/read/write/close`: files in the guest through handles.
//!
//! The handle is a number the client passes back; the open modes are
//! fopen's (`r`, `w`, `a`, each with an optional `+` and `b`), as qemu-ga
//! takes them. Data travels base64 encoded. A read returns at most `count`
//! bytes and `eof` once the end of the file was reached, like fread.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::protocol::{CommandError, decode_base64, encode_base64, os_error};

/// The largest read qemu-ga allows (QGA_READ_COUNT_MAX).
pub const MAX_READ: u64 = 48 << 20;
const DEFAULT_READ: u64 = 4096;
/// Handles start here so that they do not look like small fds.
const FIRST_HANDLE: i64 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOpenArgs {
    pub path: String,
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReadArgs {
    pub handle: i64,
    #[serde(default)]
    pub count: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWriteArgs {
    pub handle: i64,
    #[serde(rename = "buf-b64")]
    pub buf_b64: String,
    #[serde(default)]
    pub count: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCloseArgs {
    pub handle: i64,
}

#[derive(Debug, Default)]
pub struct Files {
    open: HashMap<i64, File>,
    last: i64,
}

/// The OpenOptions of an fopen mode string.
fn open_options(mode: &str) -> Option<OpenOptions> {
    let plain: String = mode.chars().filter(|&c| c != 'b').collect();
    let mut o = OpenOptions::new();
    match plain.as_str() {
        "r" => o.read(true),
        "r+" => o.read(true).write(true),
        "w" => o.write(true).create(true).truncate(true),
        "w+" => o.read(true).write(true).create(true).truncate(true),
        "a" => o.append(true).create(true),
        "a+" => o.read(true).append(true).create(true),
        _ => return None,
    };
    // At most one 'b', and not first.
    (mode.matches('b').count() <= 1 && !mode.starts_with('b')).then_some(o)
}

impl Files {
    pub fn open(&mut self, args: FileOpenArgs) -> Result<Value, CommandError> {
        let mode = args.mode.as_deref().unwrap_or("r");
        let options =
            open_options(mode).ok_or_else(|| CommandError::generic(format!("invalid file open mode '{mode}'")))?;
        let file = options.open(&args.path).map_err(|e| {
            CommandError::generic(format!("failed to open file '{}' (mode: '{mode}'): {}", args.path, os_error(&e)))
        })?;
        self.last = self.last.max(FIRST_HANDLE - 1) + 1;
        self.open.insert(self.last, file);
        Ok(json!(self.last))
    }

    pub fn read(&mut self, args: FileReadArgs) -> Result<Value, CommandError> {
        let count = args.count.unwrap_or(DEFAULT_READ);
        if count > MAX_READ {
            return Err(CommandError::generic(format!("parameter 'count' is {count}, more than {MAX_READ}")));
        }
        let file = self.file(args.handle)?;
        let mut buf = Vec::new();
        // Fill up to count, like fread: a short read of a pipe or device is
        // not yet the end.
        let got = file
            .take(count)
            .read_to_end(&mut buf)
            .map_err(|e| CommandError::generic(format!("reading handle {}: {}", args.handle, os_error(&e))))?;
        let eof = (got as u64) < count;
        Ok(json!({ "count": got, "buf-b64": encode_base64(&buf), "eof": eof }))
    }

    pub fn write(&mut self, args: FileWriteArgs) -> Result<Value, CommandError> {
        let data = decode_base64("buf-b64", &args.buf_b64)?;
        let count = match args.count {
            None => data.len(),
            Some(c) if c <= data.len() as u64 => c as usize,
            Some(c) => {
                return Err(CommandError::generic(format!(
                    "parameter 'count' is {c}, more than the {} bytes in 'buf-b64'",
                    data.len()
                )));
            }
        };
        let file = self.file(args.handle)?;
        file.write_all(&data[..count])
            .and_then(|()| file.flush())
            .map_err(|e| CommandError::generic(format!("writing handle {}: {}", args.handle, os_error(&e))))?;
        Ok(json!({ "count": count, "eof": false }))
    }

    pub fn close(&mut self, args: FileCloseArgs) -> Result<Value, CommandError> {
        self.open.remove(&args.handle).ok_or_else(|| not_found(args.handle))?;
        Ok(json!({}))
    }

    fn file(&mut self, handle: i64) -> Result<&mut File, CommandError> {
        self.open.get_mut(&handle).ok_or_else(|| not_found(handle))
    }
}

fn not_found(handle: i64) -> CommandError {
    CommandError::generic(format!("handle '{handle}' has not been found"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::protocol::Agent;

    fn call(agent: &mut Agent, request: Value) -> Value {
        agent.handle(request.to_string().as_bytes()).body
    }

    #[test]
    fn write_then_read_back_through_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        let path = path.to_str().unwrap();
        let mut agent = Agent::new();
        let w = call(&mut agent, json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}}));
        let handle = w["return"].as_i64().unwrap();
        let wrote = call(
            &mut agent,
            json!({"execute": "guest-file-write", "arguments": {"handle": handle, "buf-b64": encode_base64(b"hello world")}}),
        );
        assert_eq!(wrote["return"], json!({"count": 11, "eof": false}));
        assert_eq!(
            call(&mut agent, json!({"execute": "guest-file-close", "arguments": {"handle": handle}})),
            json!({"return": {}})
        );
        assert_eq!(std::fs::read(path).unwrap(), b"hello world");

        let r = call(&mut agent, json!({"execute": "guest-file-open", "arguments": {"path": path}}));
        let handle = r["return"].as_i64().unwrap();
        let first =
            call(&mut agent, json!({"execute": "guest-file-read", "arguments": {"handle": handle, "count": 5}}));
        assert_eq!(first["return"]["count"], 5);
        assert_eq!(first["return"]["eof"], false);
        assert_eq!(decode_base64("t", first["return"]["buf-b64"].as_str().unwrap()).unwrap(), b"hello");
        let rest = call(&mut agent, json!({"execute": "guest-file-read", "arguments": {"handle": handle}}));
        assert_eq!(rest["return"]["count"], 6);
        assert_eq!(rest["return"]["eof"], true);
        call(&mut agent, json!({"execute": "guest-file-close", "arguments": {"handle": handle}}));
        let closed = call(&mut agent, json!({"execute": "guest-file-read", "arguments": {"handle": handle}}));
        assert_eq!(closed["error"]["desc"], format!("handle '{handle}' has not been found"));
    }

    #[test]
    fn open_failures_and_bad_modes_are_reported() {
        let mut agent = Agent::new();
        let missing = call(&mut agent, json!({"execute": "guest-file-open", "arguments": {"path": "/no/such/file"}}));
        assert_eq!(
            missing["error"]["desc"],
            "failed to open file '/no/such/file' (mode: 'r'): No such file or directory"
        );
        let bad = call(&mut agent, json!({"execute": "guest-file-open", "arguments": {"path": "/tmp", "mode": "x"}}));
        assert_eq!(bad["error"]["desc"], "invalid file open mode 'x'");
        assert!(open_options("rb+").is_some() && open_options("r+b").is_some() && open_options("bb").is_none());
    }
}
