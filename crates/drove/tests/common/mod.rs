//! Harness for process-level tests of the `drove` binary.
//!
//! A [`Lab`] is one data directory and one client config file in a fresh
//! temporary directory, so tests run in parallel without seeing each other.
//! Its `Drop` stops everything it started, also when the test panics:
//! `drove down`, then the daemons the test restarted itself, then — as a
//! last resort — any process whose command line still mentions the lab's
//! data directory. On a panic it first prints the tail of every daemon log.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use tempfile::TempDir;

pub const DROVE: &str = env!("CARGO_BIN_EXE_drove");

/// How long any one command may take. Generous: debug builds on two shared
/// cores, with other test binaries running alongside.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(180);

/// How long to wait for the lab to converge to an expected state.
pub const CONVERGE_DEADLINE: Duration = Duration::from_secs(180);

/// What a finished `drove` invocation left behind.
#[derive(Debug)]
pub struct Output {
    pub args: Vec<String>,
    /// `None` when it was killed by a signal (or by us, on timeout).
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panic unless it exited 0.
    pub fn ok(self) -> Output {
        assert!(self.success(), "`drove {}` failed: {self}", self.args.join(" "));
        self
    }

    /// stdout parsed as JSON into `T`.
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("`drove {}` did not print valid JSON ({e}): {self}", self.args.join(" ")))
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}{}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code,
            if self.timed_out { " (timed out, killed)" } else { "" },
            self.stdout,
            self.stderr
        )
    }
}

/// A `drove` command that sees only `config` as its client configuration
/// and nothing of the caller's environment that would change its output.
pub fn drove(config: &Path) -> Command {
    let mut c = Command::new(DROVE);
    c.env("DROVE_CONFIG", config)
        .env_remove("DROVE_TOKEN")
        .env_remove("DROVE_ENDPOINT")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    c
}

/// Run `cmd` to completion, capturing its output; kill it after `deadline`.
pub fn run(mut cmd: Command, deadline: Duration) -> Output {
    let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {DROVE}: {e}"));
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = child.stdout.take().map(|p| reader(Box::new(p)));
    let stderr = child.stderr.take().map(|p| reader(Box::new(p)));
    let started = Instant::now();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(_) => break None,
        }
        if started.elapsed() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let collect = |t: Option<std::thread::JoinHandle<String>>| t.and_then(|t| t.join().ok()).unwrap_or_default();
    Output { args, code: status.and_then(|s| s.code()), timed_out, stdout: collect(stdout), stderr: collect(stderr) }
}

/// Poll `check` until it returns `Some`, or panic saying `what` did not
/// happen within `deadline`. `check` gets to say why not yet via `Err`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) if started.elapsed() > deadline => {
                panic!("{what}: not so after {}s; last seen: {why}", deadline.as_secs())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Whether `pid` is a live process (a zombie is dead: it only waits to be
/// reaped, and PID 1 in a container may never do that).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The command line of `pid`, arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// Live processes whose command line mentions `needle`.
pub fn live_processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let me = std::process::id();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(|pid| Some((pid, cmdline(pid)?)))
        .filter(|(pid, cmd)| cmd.contains(needle) && alive(*pid))
        .collect()
}

pub fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// The last `n` lines of a file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One lab: a data directory, a client config, and every process started
/// for them.
#[derive(Debug)]
pub struct Lab {
    /// The lab's data directory (`--data-dir`).
    pub dir: PathBuf,
    /// The client config file (`DROVE_CONFIG`).
    pub config: PathBuf,
    /// Daemons the test started itself (restarts after a kill).
    daemons: Vec<Child>,
    /// Pids `drove up` recorded in lab.json.
    known: Vec<u32>,
    /// Removed last, after every process is gone.
    _tmp: TempDir,
}

impl Lab {
    pub fn new() -> Lab {
        let tmp = tempfile::Builder::new().prefix("drove-test-").tempdir().expect("temporary directory");
        // `drove up` canonicalizes its data dir; use the same spelling so the
        // command lines of its daemons mention `dir` verbatim.
        let root = tmp.path().canonicalize().expect("canonical temp dir");
        Lab {
            dir: root.join("lab"),
            config: root.join("client").join("config.json"),
            daemons: Vec::new(),
            known: Vec::new(),
            _tmp: tmp,
        }
    }

    pub fn dir_str(&self) -> String {
        self.dir.display().to_string()
    }

    /// A `drove` command with this lab's client config.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = drove(&self.config);
        c.args(args);
        c
    }

    /// Run `drove args...`; panics only if it hangs.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_cmd(self.cmd(args))
    }

    pub fn run_cmd(&self, cmd: Command) -> Output {
        let out = run(cmd, COMMAND_DEADLINE);
        assert!(!out.timed_out, "`drove {}` hung: {out}", out.args.join(" "));
        out
    }

    /// `drove up --backend sim --detach` with `extra` arguments; records the
    /// pids it started.
    pub fn up(&mut self, extra: &[&str]) -> Output {
        let dir = self.dir_str();
        let mut args = vec!["up", "--backend", "sim", "--data-dir", &dir, "--detach"];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        if self.dir.join("lab.json").exists() {
            let lab = self.lab_file();
            self.known.extend(lab.manager_pid);
            self.known.extend(lab.agents.iter().map(|(_, p)| *p));
        }
        out
    }

    pub fn down(&self) -> Output {
        self.run(&["down", "--data-dir", &self.dir_str()])
    }

    pub fn lab_file(&self) -> LabFile {
        let path = self.dir.join("lab.json");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{} is not what `drove up` writes: {e}", path.display()))
    }

    pub fn client_config(&self) -> ClientConfig {
        let bytes = std::fs::read(&self.config).unwrap_or_else(|e| panic!("{}: {e}", self.config.display()));
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{} is not a client config: {e}", self.config.display()))
    }

    /// Start `drove args...` as a daemon of this lab, logging to
    /// `logs/<log>`; it is killed when the lab is dropped. Returns its pid.
    pub fn spawn_daemon(&mut self, args: &[&str], log: &str) -> u32 {
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs).expect("logs directory");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(logs.join(log)).expect("daemon log");
        let child = drove(&self.config)
            .args(args)
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start drove {}: {e}", args.join(" ")));
        let pid = child.id();
        self.daemons.push(child);
        pid
    }

    /// Panic (with its log) if the daemon `pid` started by
    /// [`Lab::spawn_daemon`] has exited.
    pub fn assert_daemon_running(&mut self, pid: u32, log: &str) {
        let log = self.dir.join("logs").join(log);
        let exited = self.daemons.iter_mut().find(|c| c.id() == pid).and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            panic!("drove daemon {pid} exited ({status}); {} says:\n{}", log.display(), tail(&log, 30));
        }
    }

    /// Live processes that belong to this lab.
    pub fn live_processes(&self) -> Vec<(u32, String)> {
        live_processes_mentioning(&self.dir_str())
    }

    fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("logs")) else { return };
        for e in entries.flatten() {
            eprintln!("==== {} (last 40 lines) ====\n{}", e.path().display(), tail(&e.path(), 40));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let down = run(self.cmd(&["down", "--data-dir", &self.dir_str()]), Duration::from_secs(60));
        if !down.success() {
            eprintln!("warning: `drove down` while cleaning up failed: {down}");
        }
        for c in &mut self.daemons {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Last resort: whatever `down` missed. Check the command line before
        // killing a recorded pid, in case it was reused.
        let dir = self.dir_str();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut left: Vec<u32> = self.live_processes().into_iter().map(|(p, _)| p).collect();
            left.extend(
                self.known.iter().copied().filter(|&p| alive(p) && cmdline(p).is_some_and(|c| c.contains(&dir))),
            );
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("error: processes of lab {dir} survived SIGKILL: {left:?}");
                break;
            }
            for p in left {
                kill(p, "KILL");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What `drove up` records in `<data dir>/lab.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LabFile {
    pub endpoint: String,
    pub manager_pid: Option<u32>,
    pub agents: Vec<(String, u32)>,
}

/// The client config `drove up` writes.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ClientConfig {
    pub version: u32,
    pub endpoint: String,
    pub token: String,
}
