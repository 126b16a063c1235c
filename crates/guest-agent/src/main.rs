//! drove's guest agent: a small, static program in the test image that lets
//! the host look inside the guest.
//!
//! # The idea
//!
//! It speaks a subset of the QEMU guest agent (QGA) protocol, so the host
//! side has one client for our test image and for users' images running the
//! stock `qemu-guest-agent`. QEMU gives each guest a virtio-serial port named
//! `org.qemu.guest_agent.0` whose host end is a unix socket; in the guest the
//! port is a character device `/dev/vportNpM`, found through
//! `/sys/class/virtio-ports/*/name`. The agent reads JSON requests from it
//! and writes one reply per request.
//!
//! Supported: `guest-sync`, `guest-sync-delimited`, `guest-ping`,
//! `guest-info`, `guest-exec`, `guest-exec-status`,
//! `guest-network-get-interfaces`, `guest-file-open/read/write/close`.
//!
//! # The port's behaviour, which shapes the main loop
//!
//! * While no host client is connected to the socket, `read` on the port
//!   returns 0 at once (and `poll` says POLLHUP), so there is nothing to
//!   block on: the agent sleeps [`IDLE_POLL`] and tries again, and forgets
//!   any half-read request, since the next client is a new one.
//! * Bytes the host sends before the port is opened are dropped by the
//!   guest kernel; clients therefore repeat `guest-sync-delimited` until it
//!   is answered.
//! * A reply written while no client is connected waits until one connects;
//!   that client skips it while it looks for its sync reply.
//!
//! One thread serves the port; each `guest-exec` process gets threads of its
//! own for its pipes, so a long command never blocks the protocol.
//!
//! Built statically (`scripts/build-image.sh`) because the initramfs has no
//! libc.

mod exec;
mod files;
mod framing;
mod net;
mod protocol;

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use framing::Splitter;
use protocol::Agent;

/// The port name QEMU and libvirt give the guest agent channel.
pub const PORT_NAME: &str = "org.qemu.guest_agent.0";
/// How long to wait between reads while no host client is connected.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How often to look for the port while it has not appeared; slower after
/// [`PORT_PATIENCE`], for guests that will never have one.
const PORT_POLL: Duration = Duration::from_millis(50);
const PORT_POLL_SLOW: Duration = Duration::from_secs(2);
const PORT_PATIENCE: Duration = Duration::from_secs(30);

const USAGE: &str = "\
usage: drove-guest-agent [--port DEVICE]
       drove-guest-agent tick [EVERY_MS]

Serves the QEMU guest agent protocol (a subset) on the virtio-serial port
named org.qemu.guest_agent.0, found through /sys/class/virtio-ports, or on
DEVICE.

`tick` writes `drove-tick N` (N = 0, 1, 2, ...) to standard output every
EVERY_MS milliseconds (default 1), for ever: the monotonic sequence a host
reads on the guest's serial console to measure how long the guest was
silent (a live migration's pause, a snapshot's).";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("tick") {
        args.next();
        let every = match args.next().map(|a| a.parse::<u64>()) {
            None => 1,
            Some(Ok(ms)) if ms > 0 => ms,
            Some(_) => return usage_error("tick: EVERY_MS must be a whole number of milliseconds above 0"),
        };
        return tick(&mut io::stdout().lock(), Duration::from_millis(every), u64::MAX);
    }
    let mut fixed_port = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" | "-p" => match args.next() {
                Some(p) => fixed_port = Some(PathBuf::from(p)),
                None => return usage_error("--port needs a device path"),
            },
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--version" | "-V" => {
                println!("{}", protocol::VERSION);
                return ExitCode::SUCCESS;
            }
            other => return usage_error(&format!("unknown argument {other:?}")),
        }
    }
    let mut agent = Agent::new();
    loop {
        let port = match &fixed_port {
            Some(p) => p.clone(),
            None => wait_for_port(Path::new("/sys/class/virtio-ports")),
        };
        match serve_port(&mut agent, &port) {
            Ok(()) => {}
            Err(e) => {
                log(&format!("guest agent: {}: {e}; reopening", port.display()));
                std::thread::sleep(PORT_POLL_SLOW);
            }
        }
    }
}

/// Writes `count` numbered lines, one every `every`, each in one write (a
/// reader never sees half a line). Compiled and small on purpose: a shell
/// loop makes the guest run far more code per line, and under TCG all of it
/// is translated afresh after a live migration, which would show as pause.
fn tick(out: &mut impl Write, every: Duration, count: u64) -> ExitCode {
    let mut line = Vec::with_capacity(32);
    for n in 0..count {
        line.clear();
        let _ = writeln!(line, "drove-tick {n}");
        if out.write_all(&line).and_then(|()| out.flush()).is_err() {
            return ExitCode::FAILURE;
        }
        std::thread::sleep(every);
    }
    ExitCode::SUCCESS
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("drove-guest-agent: {message}\n{USAGE}");
    ExitCode::from(2)
}

/// One line on stderr, which the test image's init points at the console.
fn log(message: &str) {
    eprintln!("drove: {message}");
}

/// The device of the port named [`PORT_NAME`] under `sys_ports`, if any.
fn find_port(sys_ports: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_ports).ok()?;
    let mut found: Vec<String> = entries
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == PORT_NAME))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    found.sort();
    found.first().map(|dev| Path::new("/dev").join(dev))
}

/// Waits until the port exists: virtio_console adds ports asynchronously,
/// after the module is loaded.
fn wait_for_port(sys_ports: &Path) -> PathBuf {
    let start = Instant::now();
    let mut told = false;
    loop {
        if let Some(dev) = find_port(sys_ports).filter(|d| d.exists()) {
            return dev;
        }
        let waited = start.elapsed();
        if waited > PORT_PATIENCE && !told {
            log(&format!("guest agent: no virtio-serial port named {PORT_NAME} yet; still looking"));
            told = true;
        }
        std::thread::sleep(if waited > PORT_PATIENCE { PORT_POLL_SLOW } else { PORT_POLL });
    }
}

/// Serves the port until it fails (e.g. unplugged).
fn serve_port(agent: &mut Agent, port: &Path) -> io::Result<()> {
    let mut file = OpenOptions::new().read(true).write(true).open(port)?;
    log(&format!("guest agent listening on {}", port.display()));
    let mut splitter = Splitter::new();
    loop {
        // Ok(()) means no host client is connected right now.
        serve(agent, &mut splitter, &mut file)?;
        splitter.reset();
        std::thread::sleep(IDLE_POLL);
    }
}

/// Answers requests from `stream` until it reads end-of-file.
fn serve(agent: &mut Agent, splitter: &mut Splitter, stream: &mut (impl Read + Write)) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for frame in splitter.push(&buf[..n]) {
            let reply = agent.handle_frame(frame);
            stream.write_all(&reply.encode())?;
            stream.flush()?;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Cursor;

    use super::*;

    #[test]
    fn tick_writes_a_numbered_line_per_interval() {
        let mut out = Vec::new();
        let t0 = Instant::now();
        assert_eq!(tick(&mut out, Duration::from_millis(2), 5), ExitCode::SUCCESS);
        assert!(t0.elapsed() >= Duration::from_millis(10), "one interval after each line");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "drove-tick 0\ndrove-tick 1\ndrove-tick 2\ndrove-tick 3\ndrove-tick 4\n"
        );
    }

    /// Input from a cursor, output into a vector.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_client_session_gets_one_reply_per_request_after_a_reset() {
        // What a host client sends: a stale half request from someone
        // before it, the reset byte, the delimited sync, then commands.
        let input = b"{\"execute\":\"guest-pi\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":42}}\n\
{\"execute\":\"guest-ping\"}\n{\"execute\":\"nope\"}"
            .to_vec();
        let mut stream = Duplex { input: Cursor::new(input), output: Vec::new() };
        serve(&mut Agent::new(), &mut Splitter::new(), &mut stream).unwrap();
        let text = String::from_utf8_lossy(&stream.output).into_owned();
        assert!(stream.output.starts_with(b"\xff{\"return\":42}\n"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[1], "{\"return\":{}}");
        assert!(lines[2].contains("CommandNotFound"), "{text}");
    }

    #[test]
    fn the_port_is_found_by_its_name() {
        let sys = tempfile::tempdir().unwrap();
        for (dev, name) in [("vport0p0", "something.else"), ("vport1p1", PORT_NAME)] {
            std::fs::create_dir(sys.path().join(dev)).unwrap();
            std::fs::write(sys.path().join(dev).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(find_port(sys.path()), Some(PathBuf::from("/dev/vport1p1")));
        assert_eq!(find_port(&sys.path().join("missing")), None);
    }
}
