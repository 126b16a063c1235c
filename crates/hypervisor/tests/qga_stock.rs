//! Our guest-agent client against the stock qemu-guest-agent, the one
//! users' Debian images carry (installed by scripts/install-deps.sh).
//!
//! qemu-ga runs here on the host, listening on a unix socket instead of a
//! virtio-serial port: the protocol on the wire is the same. Each exchange
//! drove's backend makes (sync, ping, exec with output and input, its
//! status, network interfaces) goes through the same client and the same
//! reply parsers the backend uses, so a change that breaks compatibility
//! with the real agent fails here, not only in users' guests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use drove_hypervisor::ExecRequest;
use drove_hypervisor::qemu::qga::{self, QgaClient};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A qemu-ga process, killed when dropped.
struct StockAgent {
    child: Child,
}

impl StockAgent {
    fn start(dir: &Path) -> Self {
        let socket = dir.join("qga.sock");
        let child = Command::new("qemu-ga")
            .arg("--method=unix-listen")
            .arg(format!("--path={}", socket.display()))
            .arg(format!("--statedir={}", dir.display()))
            .arg(format!("--pidfile={}", dir.join("qga.pid").display()))
            .spawn()
            .expect("qemu-ga runs (scripts/install-deps.sh installs qemu-guest-agent)");
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            assert!(Instant::now() < deadline, "qemu-ga did not create {}", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        StockAgent { child }
    }
}

impl Drop for StockAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `guest-exec`, then `guest-exec-status` until it exits: what the backend's
/// exec does.
async fn exec(client: &mut QgaClient, req: &ExecRequest) -> drove_hypervisor::ExecResult {
    let started = client.execute("guest-exec", Some(qga::exec_arguments(req)), TIMEOUT).await.unwrap();
    let pid = qga::exec_pid(&started).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let status =
            client.execute("guest-exec-status", Some(serde_json::json!({ "pid": pid })), TIMEOUT).await.unwrap();
        if let Some(result) = qga::exec_status(&status).unwrap() {
            return result;
        }
        assert!(Instant::now() < deadline, "{:?} did not exit", req.path);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn our_client_speaks_with_the_stock_qemu_guest_agent() {
    let dir = tempfile::tempdir().unwrap();
    let _agent = StockAgent::start(dir.path());
    let socket = dir.path().join("qga.sock");
    let mut client = QgaClient::connect(&socket, TIMEOUT).await.expect("the sync handshake with qemu-ga");

    let pong = client.execute("guest-ping", None, TIMEOUT).await.unwrap();
    assert_eq!(pong, serde_json::json!({}), "guest-ping returns an empty object");

    // Output, exit code, and input fed to the command.
    let req = ExecRequest::new("sh", ["-c", "read line; echo \"got $line\"; echo oops >&2; exit 3"]);
    let req = ExecRequest { input: Some(b"hello\n".to_vec()), ..req };
    let r = exec(&mut client, &req).await;
    assert_eq!(r.exit_code, 3);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "got hello\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "oops\n");
    // A death by signal reads as a shell reports it.
    let r = exec(&mut client, &ExecRequest::new("sh", ["-c", "kill -TERM $$"])).await;
    assert_eq!(r.exit_code, 128 + 15);

    // An unknown program is the agent's error reply, and the stream stays
    // in step for the next request.
    let missing = client
        .execute("guest-exec", Some(qga::exec_arguments(&ExecRequest::new("/nonexistent/prog", ["x"]))), TIMEOUT)
        .await;
    assert!(missing.is_err(), "{missing:?}");
    client.execute("guest-ping", None, TIMEOUT).await.expect("in step after an error reply");

    let reply = client.execute("guest-network-get-interfaces", None, TIMEOUT).await.unwrap();
    let interfaces = qga::interfaces(&reply).unwrap();
    let lo = interfaces.iter().find(|i| i.name == "lo").expect("the loopback interface");
    assert!(lo.addresses.iter().any(|a| a == "127.0.0.1/8"), "{lo:?}");

    // A second client (the backend reconnects after a failure) syncs past
    // whatever the first left behind.
    drop(client);
    let mut again = QgaClient::connect(&socket, TIMEOUT).await.expect("a second sync");
    again.execute("guest-ping", None, TIMEOUT).await.unwrap();
}
