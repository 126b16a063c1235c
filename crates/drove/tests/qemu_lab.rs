//! The whole stack on real QEMU guests (TCG): `drove up` with the qemu
//! backend, guests created, stopped, started and deleted through the CLI,
//! an agent killed and restarted under a running guest, and `drove down`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A lab in a temp dir; `drove down` and a last-resort kill on drop, so no
/// QEMU or daemon outlives the test, whatever happens.
struct Lab {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Lab {
    fn start(hosts: u32) -> Lab {
        // Short path: guests' unix sockets live under it.
        let dir = tempfile::Builder::new().prefix("dq").tempdir_in("/tmp").unwrap();
        let config = dir.path().join("client.json");
        let lab = Lab { dir, config };
        let out = lab.drove(&[
            "up",
            "--backend",
            "qemu",
            "--hosts",
            &hosts.to_string(),
            "--detach",
            "--data-dir",
            lab.data(),
        ]);
        assert!(out.status.success(), "drove up failed: {}", String::from_utf8_lossy(&out.stderr));
        lab
    }

    fn data(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    fn drove(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_drove")).args(args).env("DROVE_CONFIG", &self.config).output().unwrap()
    }

    /// Run a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.drove(args);
        assert!(out.status.success(), "drove {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn guest_dir(&self, host: &str, id: &str) -> PathBuf {
        self.dir.path().join("hosts").join(host).join("guests").join(id)
    }

    fn lab_file(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir.path().join("lab.json")).unwrap()).unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.drove(&["down", "--data-dir", self.data()]);
        // Anything still holding our directory on its command line goes.
        let _ = Command::new("pkill").args(["-KILL", "-f", self.data()]).status();
    }
}

fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z')))
}

fn qemu_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("qemu.pid")).ok()?.trim().parse().ok()?;
    pid_alive(pid).then_some(pid)
}

fn ready_count(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default().matches("DROVE-READY").count()
}

fn qemus_of(dir: &str) -> Vec<u32> {
    let out = Command::new("pgrep").args(["-f", &format!("qemu-system.*{dir}")]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|p| pid_alive(*p))
        .collect()
}

/// Type `input` into `drove vm console`, read until `want` shows, leave with
/// Ctrl-]; returns what the console printed.
fn console_roundtrip(lab: &Lab, guest: &str, input: &str, want: &str) -> String {
    use std::io::{Read, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_drove"))
        .args(["vm", "console", guest])
        .env("DROVE_CONFIG", &lab.config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    // A first newline wakes the prompt; then the command.
    stdin.write_all(b"\n").unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    stdin.flush().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&seen).contains(want) && Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.extend(chunk);
        }
    }
    stdin.write_all(&[0x1d]).unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "drove vm console failed: {err}");
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn real_guests_live_through_the_whole_stack() {
    let lab = Lab::start(2);
    let hosts = lab.json(&["host", "list"]);
    assert_eq!(hosts.as_array().unwrap().len(), 2);
    assert!(hosts.as_array().unwrap().iter().all(|h| h["hypervisor"] == "qemu" && h["state"] == "up"));

    lab.ok(&["vm", "create", "web-1", "--memory", "128M", "--disk", "64M"]);
    let g = lab.json(&["vm", "show", "web-1"]);
    assert_eq!(g["state"], "running");
    let (host, id) = (g["host_name"].as_str().unwrap().to_owned(), g["id"].as_str().unwrap().to_owned());
    let gdir = lab.guest_dir(&host, &id);
    // The guest really boots: its init reports on the serial console.
    eventually("guest boot", Duration::from_secs(120), || (ready_count(&gdir) >= 1).then_some(()));
    let pid = qemu_pid(&gdir).expect("a live QEMU process for the guest");
    assert!(gdir.join("disk0.qcow2").exists());

    // Commands run inside it through the guest agent; exit codes and both
    // output streams come back, and the CLI exits with the command's code.
    let out = lab.drove(&["vm", "exec", "web-1", "--", "sh", "-c", "echo out-$((40+2)); echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out-42\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert!(lab.ok(&["vm", "exec", "web-1", "--", "cat", "/proc/cmdline"]).contains("drove.name=web-1"));
    let shown = lab.ok(&["vm", "show", "web-1"]);
    assert!(shown.contains("addresses:"), "{shown}");

    // Hardware hot-added through the API reaches the running guest.
    lab.ok(&["vm", "hotplug", "web-1", "--add-disk", "32M"]);
    // The guest takes the PCI hotplug event in its own time.
    let sectors = eventually("the guest sees the new disk", Duration::from_secs(60), || {
        let out = lab.drove(&["vm", "exec", "web-1", "--", "cat", "/sys/block/vdb/size"]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    assert_eq!(sectors, "65536");
    assert_eq!(lab.json(&["vm", "show", "web-1"])["spec"]["disks"].as_array().unwrap().len(), 2);
    let out = lab.drove(&["vm", "hotplug", "web-1", "--memory", "64M"]);
    assert!(!out.status.success(), "shrinking must be refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("only grow"), "{}", String::from_utf8_lossy(&out.stderr));

    // Its console history, through manager and agent.
    assert!(lab.ok(&["vm", "log", "web-1"]).contains("DROVE-READY"));
    // The interactive console reaches the guest's shell: a command typed in
    // is evaluated inside (the echo of the line itself does not contain 42).
    let answer = console_roundtrip(&lab, "web-1", "echo hello-$((6*7))\n", "hello-42");
    assert!(answer.contains("hello-42"), "{answer}");

    // QEMU dies under the guest: its agent restarts it (policy `always`),
    // the restart is counted and shown.
    Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    eventually("crash restart", Duration::from_secs(120), || (ready_count(&gdir) >= 2).then_some(()));
    let pid = qemu_pid(&gdir).expect("restarted QEMU");
    let shown = eventually("restart counted", Duration::from_secs(30), || {
        let g = lab.json(&["vm", "show", "web-1"]);
        (g["restarts"] == 1).then_some(g)
    });
    assert_eq!(shown["state"], "running");
    assert!(lab.ok(&["vm", "show", "web-1"]).contains("restarts:"));

    // An agent killed under a running guest: QEMU outlives it, the new agent
    // re-adopts it, nothing restarts, nothing is duplicated.
    let lab_file = lab.lab_file();
    let agent_pid =
        lab_file["agents"].as_array().unwrap().iter().find(|a| a[0] == host.as_str()).unwrap()[1].as_u64().unwrap();
    Command::new("kill").args(["-KILL", &agent_pid.to_string()]).status().unwrap();
    eventually("agent gone", Duration::from_secs(10), || (!pid_alive(agent_pid as u32)).then_some(()));
    assert_eq!(qemu_pid(&gdir), Some(pid), "QEMU must survive its agent");
    let token = lab.dir.path().join("manager/agent.token");
    let endpoint = lab_file["endpoint"].as_str().unwrap().to_owned();
    let log = std::fs::File::create(lab.dir.path().join("logs/restarted-agent.log")).unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_drove"))
        .args([
            "agent",
            "--name",
            &host,
            "--manager",
            &endpoint,
            "--token-file",
            token.to_str().unwrap(),
            "--backend",
            "qemu",
        ])
        .arg("--data-dir")
        .arg(lab.dir.path().join("hosts").join(&host))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    lab.ok(&["vm", "stop", "web-1"]);
    assert_eq!(lab.json(&["vm", "show", "web-1"])["state"], "stopped");
    eventually("QEMU exit after stop", Duration::from_secs(30), || (!pid_alive(pid)).then_some(()));
    assert_eq!(ready_count(&gdir), 2, "the guest was not restarted by the agent restart");

    lab.ok(&["vm", "start", "web-1"]);
    eventually("third boot", Duration::from_secs(120), || (ready_count(&gdir) >= 3).then_some(()));
    assert_eq!(qemus_of(lab.data()).len(), 1, "exactly one QEMU for one guest");

    lab.ok(&["vm", "delete", "web-1"]);
    assert!(!gdir.exists(), "the guest's disks and files are removed");
    assert!(qemus_of(lab.data()).is_empty());
    assert!(lab.json(&["vm", "list"]).as_array().unwrap().is_empty());

    // A user's qcow2 image: imported into the pool, booted through the BIOS
    // (no kernel handed to QEMU), reaching the same readiness line.
    let image_dir = std::env::var_os("DROVE_IMAGE_DIR").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
            .join("drove/image")
    });
    let disk = image_dir.join("disk.qcow2");
    lab.ok(&["image", "import", disk.to_str().unwrap(), "--name", "bootdisk"]);
    assert_eq!(lab.json(&["image", "list"]).as_array().unwrap().len(), 1);
    lab.ok(&["vm", "create", "img-1", "--image", "bootdisk", "--memory", "128M"]);
    eventually("BIOS boot of the imported image", Duration::from_secs(120), || {
        lab.ok(&["vm", "log", "img-1"]).contains("DROVE-READY").then_some(())
    });
    let img = lab.json(&["vm", "show", "img-1"]);
    let gdir = lab.guest_dir(img["host_name"].as_str().unwrap(), img["id"].as_str().unwrap());
    let pid = qemu_pid(&gdir).expect("QEMU of the image guest");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!cmdline.contains("-kernel"), "booted from its disk, not a kernel");
    let out = lab.drove(&["image", "delete", "bootdisk"]);
    assert!(!out.status.success(), "an image in use cannot be deleted");
    lab.ok(&["vm", "delete", "img-1"]);
    lab.ok(&["image", "delete", "bootdisk"]);

    // A guest left running is stopped by `drove down`.
    lab.ok(&["vm", "create", "web-2", "--memory", "128M"]);
    assert_eq!(qemus_of(lab.data()).len(), 1);
    let _ = agent.kill();
    let _ = agent.wait();
    lab.ok(&["down", "--data-dir", lab.data()]);
    eventually("no QEMU after down", Duration::from_secs(30), || qemus_of(lab.data()).is_empty().then_some(()));
}
