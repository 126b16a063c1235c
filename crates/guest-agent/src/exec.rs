//! `guest-exec` and `guest-exec-status`: start a process, report on it later.
//!
//! `guest-exec` returns at once with the process id; the client polls
//! `guest-exec-status` until it says `"exited": true`, and that reply
//! carries the exit code (or the signal) and the captured output, base64
//! encoded. The process is then forgotten, as in qemu-ga: a pid can be
//! collected once.
//!
//! Semantics follow qemu-ga so that a client written for either works with
//! both:
//! * `path` is looked up on `PATH` when it has no slash; `arg` follows it.
//! * `env`, when given, replaces the whole environment (`KEY=VALUE` items).
//! * `input-data` (base64) is written to stdin, which is then closed;
//!   without it stdin is `/dev/null`.
//! * Output is captured only when `capture-output` asks for it (`true`,
//!   `"separated"`, `"stdout"`, `"stderr"`); otherwise it goes nowhere. Each
//!   stream keeps at most [`MAX_OUTPUT`] bytes and says `*-truncated` when
//!   there was more.
//! * A process counts as exited once it exited *and* its output pipes are
//!   closed, so the output is complete when it is reported.
//!
//! One thread per captured stream drains it while the process runs: a
//! process writing more than a pipe holds would otherwise block forever.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::thread::{self, JoinHandle};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::protocol::{CommandError, decode_base64, encode_base64, os_error};

/// Output kept per stream, as in qemu-ga (GUEST_EXEC_MAX_OUTPUT).
pub const MAX_OUTPUT: usize = 16 << 20;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExecArgs {
    pub path: String,
    #[serde(default)]
    pub arg: Vec<String>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub input_data: Option<String>,
    #[serde(default)]
    pub capture_output: Option<CaptureArg>,
}

/// `capture-output` is a bool in older QEMUs and a mode name in newer ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum CaptureArg {
    Flag(bool),
    Mode(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecStatusArgs {
    pub pid: i64,
}

/// Which of stdout and stderr to capture.
fn capture_mode(arg: Option<&CaptureArg>) -> Result<(bool, bool), CommandError> {
    Ok(match arg {
        None | Some(CaptureArg::Flag(false)) => (false, false),
        Some(CaptureArg::Flag(true)) => (true, true),
        Some(CaptureArg::Mode(mode)) => match mode.as_str() {
            "none" => (false, false),
            "stdout" => (true, false),
            "stderr" => (false, true),
            "separated" => (true, true),
            other => {
                return Err(CommandError::generic(format!(
                    "capture-output mode '{other}' is not supported by this agent (none, stdout, stderr, separated)"
                )));
            }
        },
    })
}

/// What a drained stream held.
#[derive(Debug, Default)]
struct Captured {
    data: Vec<u8>,
    truncated: bool,
}

#[derive(Debug)]
struct Process {
    child: Child,
    stdout: Option<JoinHandle<Captured>>,
    stderr: Option<JoinHandle<Captured>>,
}

/// The processes started and not yet collected.
#[derive(Debug, Default)]
pub struct Processes {
    running: HashMap<u32, Process>,
}

impl Processes {
    /// `guest-exec`: starts the process and returns `{"pid": N}`.
    pub fn spawn(&mut self, args: ExecArgs) -> Result<Value, CommandError> {
        let (capture_out, capture_err) = capture_mode(args.capture_output.as_ref())?;
        let input = args.input_data.as_deref().map(|d| decode_base64("input-data", d)).transpose()?;
        let mut cmd = Command::new(&args.path);
        cmd.args(&args.arg);
        if let Some(env) = &args.env {
            cmd.env_clear();
            for item in env {
                match item.split_once('=') {
                    Some((key, value)) if !key.is_empty() => {
                        cmd.env(key, value);
                    }
                    _ => {
                        return Err(CommandError::generic(format!("env item {item:?} is not of the form KEY=VALUE")));
                    }
                }
            }
        }
        let piped_if = |yes: bool| if yes { Stdio::piped() } else { Stdio::null() };
        cmd.stdin(piped_if(input.is_some())).stdout(piped_if(capture_out)).stderr(piped_if(capture_err));
        // The wording of glib's spawn error, which qemu-ga reports.
        let mut child = cmd.spawn().map_err(|e| {
            CommandError::generic(format!("Failed to execute child process \"{}\" ({})", args.path, os_error(&e)))
        })?;
        let pid = child.id();
        match start_threads(&mut child, input) {
            Ok((stdout, stderr)) => {
                self.running.insert(pid, Process { child, stdout, stderr });
                Ok(json!({ "pid": pid }))
            }
            Err(e) => {
                // Without its threads the process could block on a full
                // pipe forever; nobody would learn of it. End it.
                let _ = child.kill();
                let _ = child.wait();
                Err(CommandError::generic(format!("starting the I/O threads of process {pid}: {e}")))
            }
        }
    }

    /// `guest-exec-status`: `{"exited": false}` while it runs, then the
    /// exit code and output, once.
    pub fn status(&mut self, pid: i64) -> Result<Value, CommandError> {
        let invalid = || CommandError::generic("Invalid parameter 'pid'");
        let pid = u32::try_from(pid).map_err(|_| invalid())?;
        let process = self.running.get_mut(&pid).ok_or_else(invalid)?;
        let exit = process
            .child
            .try_wait()
            .map_err(|e| CommandError::generic(format!("waiting for process {pid}: {}", os_error(&e))))?;
        let pipes_open =
            [&process.stdout, &process.stderr].iter().any(|h| h.as_ref().is_some_and(|h| !h.is_finished()));
        let Some(exit) = exit.filter(|_| !pipes_open) else {
            return Ok(json!({ "exited": false }));
        };
        let Some(process) = self.running.remove(&pid) else {
            return Err(invalid());
        };
        let mut reply = Map::new();
        reply.insert("exited".into(), true.into());
        match (exit.code(), exit.signal()) {
            (Some(code), _) => reply.insert("exitcode".into(), code.into()),
            (None, Some(signal)) => reply.insert("signal".into(), signal.into()),
            (None, None) => None,
        };
        for (name, handle) in [("out", process.stdout), ("err", process.stderr)] {
            // A panicked reader thread lost its data; report none.
            let captured = handle.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
            if !captured.data.is_empty() {
                reply.insert(format!("{name}-data"), encode_base64(&captured.data).into());
            }
            if captured.truncated {
                reply.insert(format!("{name}-truncated"), true.into());
            }
        }
        Ok(Value::Object(reply))
    }
}

type Readers = (Option<JoinHandle<Captured>>, Option<JoinHandle<Captured>>);

fn start_threads(child: &mut Child, input: Option<Vec<u8>>) -> io::Result<Readers> {
    if let (Some(mut stdin), Some(data)) = (child.stdin.take(), input) {
        // A process that exits without reading its input makes the write
        // fail (EPIPE); that is its business, not an error of ours.
        thread::Builder::new().name("exec-stdin".into()).spawn(move || {
            let _ = stdin.write_all(&data);
        })?;
    }
    let stdout = child.stdout.take().map(drain).transpose()?;
    let stderr = child.stderr.take().map(drain).transpose()?;
    Ok((stdout, stderr))
}

/// Reads a pipe to its end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> io::Result<JoinHandle<Captured>> {
    thread::Builder::new().name("exec-output".into()).spawn(move || {
        let mut captured = Captured::default();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    let room = MAX_OUTPUT - captured.data.len();
                    if n > room {
                        captured.truncated = true;
                    }
                    captured.data.extend_from_slice(&chunk[..n.min(room)]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        captured
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, Instant};

    use super::*;
    use crate::protocol::Agent;

    fn call(agent: &mut Agent, request: Value) -> Value {
        agent.handle(request.to_string().as_bytes()).body
    }

    /// Polls guest-exec-status like a client does.
    fn wait(agent: &mut Agent, pid: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = call(agent, json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}));
            if status["return"]["exited"] == true {
                return status["return"].clone();
            }
            assert!(status["return"]["exited"] == false, "{status}");
            assert!(Instant::now() < deadline, "process {pid} did not exit");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn decode(v: &Value) -> String {
        String::from_utf8(decode_base64("test", v.as_str().unwrap_or("")).unwrap()).unwrap()
    }

    #[test]
    fn exec_reports_exit_code_and_separate_output_once() {
        let mut agent = Agent::new();
        let started = call(
            &mut agent,
            json!({"execute": "guest-exec", "arguments": {
                "path": "sh", "arg": ["-c", "echo hi; echo err >&2; exit 3"], "capture-output": true}}),
        );
        let pid = started["return"]["pid"].clone();
        assert!(pid.is_u64(), "{started}");
        let done = wait(&mut agent, &pid);
        assert_eq!(done["exitcode"], 3);
        assert_eq!(decode(&done["out-data"]), "hi\n");
        assert_eq!(decode(&done["err-data"]), "err\n");
        // Collected: the pid is unknown now.
        let again = call(&mut agent, json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}));
        assert_eq!(again["error"]["desc"], "Invalid parameter 'pid'");
    }

    #[test]
    fn exec_feeds_input_replaces_env_and_reports_signals() {
        let mut agent = Agent::new();
        let input = encode_base64(b"line one\nline two\n");
        let cat = call(
            &mut agent,
            json!({"execute": "guest-exec", "arguments": {
                "path": "/bin/cat", "input-data": input, "capture-output": "separated"}}),
        );
        let done = wait(&mut agent, &cat["return"]["pid"]);
        assert_eq!((done["exitcode"].clone(), decode(&done["out-data"])), (json!(0), "line one\nline two\n".into()));
        assert!(done.get("err-data").is_none(), "empty output is left out: {done}");

        let env = call(
            &mut agent,
            json!({"execute": "guest-exec", "arguments": {
                "path": "/bin/sh", "arg": ["-c", "echo \"$ONLY:$HOME\""], "env": ["ONLY=this"], "capture-output": true}}),
        );
        let done = wait(&mut agent, &env["return"]["pid"]);
        assert_eq!(decode(&done["out-data"]), "this:\n");

        let killed = call(
            &mut agent,
            json!({"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", "kill -9 $$"]}}),
        );
        let done = wait(&mut agent, &killed["return"]["pid"]);
        assert_eq!(done["signal"], 9);
        assert!(done.get("exitcode").is_none(), "{done}");
    }

    #[test]
    fn exec_of_a_missing_program_fails_like_qemu_ga() {
        let mut agent = Agent::new();
        let reply = call(&mut agent, json!({"execute": "guest-exec", "arguments": {"path": "/no/such/program"}}));
        assert_eq!(reply["error"]["class"], "GenericError");
        assert_eq!(
            reply["error"]["desc"],
            "Failed to execute child process \"/no/such/program\" (No such file or directory)"
        );
        let merged = call(
            &mut agent,
            json!({"execute": "guest-exec", "arguments": {"path": "true", "capture-output": "merged"}}),
        );
        assert!(merged["error"]["desc"].as_str().unwrap().contains("'merged'"), "{merged}");
        let bad_env =
            call(&mut agent, json!({"execute": "guest-exec", "arguments": {"path": "true", "env": ["NOEQUALS"]}}));
        assert!(bad_env["error"]["desc"].as_str().unwrap().contains("NOEQUALS"), "{bad_env}");
    }

    #[test]
    fn output_beyond_the_limit_is_truncated_and_said_so() {
        let mut agent = Agent::new();
        let bytes = MAX_OUTPUT + 1000;
        let reply = call(
            &mut agent,
            json!({"execute": "guest-exec", "arguments": {
                "path": "sh", "arg": ["-c", format!("head -c {bytes} /dev/zero")], "capture-output": true}}),
        );
        let done = wait(&mut agent, &reply["return"]["pid"]);
        assert_eq!(done["out-truncated"], true);
        assert_eq!(decode_base64("t", done["out-data"].as_str().unwrap()).unwrap().len(), MAX_OUTPUT);
    }
}
