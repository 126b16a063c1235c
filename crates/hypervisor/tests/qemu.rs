//! The QEMU backend against real QEMU, booting the test image under TCG
//! (or whatever `Accel::Auto` finds, in the one test that asks).
//!
//! Nothing is skipped: a missing image is built with
//! `scripts/build-image.sh` (cached in `$DROVE_IMAGE_DIR`, else
//! `~/.cache/drove/image`); missing QEMU fails with a pointer to
//! `scripts/install-deps.sh`. Every test owns a temporary state directory and
//! a [`Reaper`] that SIGKILLs any QEMU mentioning that directory when the
//! test ends, passing or panicking: guests are daemonized and would
//! otherwise outlive the test binary.
//!
//! Timeouts are generous and only bound waits for things that must happen;
//! no test asserts that something is fast.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use drove_hypervisor::conformance::Options;
use drove_hypervisor::qemu::{Accel, QemuConfig, QemuHypervisor, ResolvedAccel};
use drove_hypervisor::{GuestConfig, GuestStatus, HostResources, HvError, Hypervisor, RuntimeState, StopMode};
use drove_model::{ByteSize, DiskSpec, GuestId, GuestSpec, HypervisorKind, NicSpec, Priority, VlanTag};
use tokio::io::AsyncWriteExt;

/// Waits for anything the guest itself must do (boot, power off).
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// What graceful stops in these tests allow the guest OS.
const GRACEFUL: StopMode = StopMode::Graceful { timeout: Duration::from_secs(90) };

// --- harness -------------------------------------------------------------------

/// The test image, built once per test binary if needed.
fn image_dir() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let qemu = std::process::Command::new("qemu-system-x86_64").arg("--version").output();
        assert!(
            qemu.as_ref().is_ok_and(|o| o.status.success()),
            "qemu-system-x86_64 is not installed ({qemu:?}); run scripts/install-deps.sh as root"
        );
        let dir = std::env::var_os("DROVE_IMAGE_DIR")
            .map(PathBuf::from)
            .or_else(QemuConfig::default_image_dir)
            .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("drove-image"));
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let script = repo.join("scripts/build-image.sh");
        // Cheap when the image is current: the script checks its own hash.
        let out = std::process::Command::new("bash").arg(&script).arg(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "{} {} failed ({}):\n{}\n{}",
            script.display(),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// SIGKILLs, on drop, every live process whose command line mentions
/// `marker`: the QEMUs of one test.
struct Reaper {
    marker: PathBuf,
}

impl Reaper {
    fn pids(&self) -> Vec<u32> {
        let needle = self.marker.as_os_str().as_encoded_bytes().to_vec();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            if cmdline.windows(needle.len()).any(|w| w == needle) && alive(pid) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.pids() {
            eprintln!("reaper: killing leftover QEMU {pid}");
            sigkill(pid);
        }
    }
}

fn sigkill(pid: u32) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
}

/// Alive and not a zombie (QEMUs are daemonized: not our children).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    match stat.rfind(')') {
        Some(i) => !stat[i + 1..].trim_start().starts_with(['Z', 'X']),
        None => false,
    }
}

/// A state directory, its reaper, and hypervisors over it. Field order
/// matters: the reaper runs before the directory is removed.
struct Lab {
    _reaper: Reaper,
    tmp: tempfile::TempDir,
}

impl Lab {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        Self { _reaper: Reaper { marker: tmp.path().to_owned() }, tmp }
    }

    fn state_dir(&self) -> &Path {
        self.tmp.path()
    }

    fn config(&self, accel: Accel) -> QemuConfig {
        let mut c = QemuConfig::new(self.state_dir(), image_dir()).unwrap();
        c.accel = accel;
        c
    }

    fn hv(&self) -> QemuHypervisor {
        QemuHypervisor::new(self.config(Accel::Tcg)).unwrap()
    }
}

fn guest(name: &str, disks: &[u64]) -> GuestConfig {
    GuestConfig {
        id: GuestId::new_v4(),
        generation: 1,
        spec: GuestSpec {
            name: name.to_owned(),
            vcpus: 1,
            memory: ByteSize::mib(256),
            disks: disks.iter().map(|&mib| DiskSpec { size: ByteSize::mib(mib) }).collect(),
            nics: Vec::new(),
            priority: Priority::default(),
            load_profile: None,
        },
    }
}

fn serial_log(hv: &QemuHypervisor, id: GuestId) -> String {
    String::from_utf8_lossy(&std::fs::read(hv.serial_log_path(id)).unwrap_or_default()).into_owned()
}

/// Waits until the serial log holds `needle` at least `count` times.
async fn wait_for_serial(hv: &QemuHypervisor, id: GuestId, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let log = serial_log(hv, id);
        if log.matches(needle).count() >= count {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "guest {id} did not print {needle:?} {count} time(s) within {GUEST_TIMEOUT:?}; serial log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status(hv: &impl Hypervisor, id: GuestId) -> GuestStatus {
    hv.status(id).await.unwrap()
}

/// A connection to the guest's serial console. QEMU only takes from the
/// socket what the emulated UART has room for, so the connection must stay
/// open until the guest has read everything typed.
struct Console(tokio::net::UnixStream);

impl Console {
    async fn open(hv: &QemuHypervisor, id: GuestId) -> Self {
        Self(tokio::net::UnixStream::connect(hv.console_socket_path(id)).await.unwrap())
    }

    async fn type_line(&mut self, line: &str) {
        self.0.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        self.0.flush().await.unwrap();
    }
}

fn assert_no_qemu_for(lab: &Lab, id: GuestId) {
    let marker = lab.state_dir().join("guests").join(id.to_string());
    let left = Reaper { marker }.pids();
    assert!(left.is_empty(), "QEMU processes of guest {id} remain: {left:?}");
}

// --- behaviour -------------------------------------------------------------------

#[tokio::test]
async fn guest_boots_to_ready_sees_its_disk_and_powers_off_on_acpi() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("boot-1", &[64]);
    hv.create(&g).await.unwrap();
    assert_eq!(status(&hv, g.id).await.state, RuntimeState::Stopped);
    assert!(hv.guest_dir(g.id).join("disk0.qcow2").is_file());

    let t0 = Instant::now();
    hv.start(g.id).await.unwrap();
    let started = t0.elapsed();
    let s = status(&hv, g.id).await;
    assert_eq!((s.state, s.generation), (RuntimeState::Running, 1));
    let first_pid = s.pid.expect("a running guest has a QEMU pid");

    let log = wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    eprintln!("boot: start() returned after {started:?}, DROVE-READY after {:?} (TCG)", t0.elapsed());
    assert!(log.contains("drove: disk vda 64M"), "the guest does not see its disk:\n{log}");

    // Graceful: the guest's own acpid powers it off; no forcing needed.
    hv.stop(g.id, GRACEFUL).await.unwrap();
    let log = serial_log(&hv, g.id);
    assert!(log.contains("power button pressed"), "not an ACPI shutdown:\n{log}");
    let s = status(&hv, g.id).await;
    assert_eq!((s.state, s.pid), (RuntimeState::Stopped, None));
    assert_no_qemu_for(&lab, g.id);

    // And it boots again, as a new incarnation, keeping its disk.
    hv.start(g.id).await.unwrap();
    let s = status(&hv, g.id).await;
    assert_eq!(s.state, RuntimeState::Running);
    assert_ne!(s.pid, Some(first_pid));
    let log = wait_for_serial(&hv, g.id, "DROVE-READY", 2).await;
    assert_eq!(log.matches("--- drove: starting guest").count(), 2, "{log}");

    hv.destroy(g.id).await.unwrap();
    assert!(!hv.guest_dir(g.id).exists());
    assert!(matches!(hv.status(g.id).await, Err(HvError::NotFound { .. })));
    assert_no_qemu_for(&lab, g.id);
}

#[tokio::test]
async fn pause_and_resume_follow_qemu_run_state() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("pause-1", &[]);
    hv.create(&g).await.unwrap();
    hv.start(g.id).await.unwrap();
    wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    let pid = status(&hv, g.id).await.pid;

    hv.pause(g.id).await.unwrap();
    let s = status(&hv, g.id).await;
    assert_eq!((s.state, s.pid), (RuntimeState::Paused, pid));
    let events: Vec<String> = hv.take_events(g.id).await.into_iter().map(|e| e.event).collect();
    assert!(events.contains(&"STOP".to_owned()), "{events:?}");

    // Paused means the guest does not run: what is typed now is answered
    // only after resume. (The shell prints 42 for $((6*7)); the echo of the
    // typed line shows the expression itself.)
    let mut console = Console::open(&hv, g.id).await;
    console.type_line("echo $((6*7))-answered").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!serial_log(&hv, g.id).contains("42-answered"));

    hv.resume(g.id).await.unwrap();
    let s = status(&hv, g.id).await;
    assert_eq!((s.state, s.pid), (RuntimeState::Running, pid));
    let events: Vec<String> = hv.take_events(g.id).await.into_iter().map(|e| e.event).collect();
    assert!(events.contains(&"RESUME".to_owned()), "{events:?}");
    wait_for_serial(&hv, g.id, "42-answered", 1).await;
    drop(console);

    // A graceful stop of a paused guest lets it run to see the button.
    hv.pause(g.id).await.unwrap();
    hv.stop(g.id, GRACEFUL).await.unwrap();
    assert_eq!(status(&hv, g.id).await.state, RuntimeState::Stopped);
    assert!(serial_log(&hv, g.id).contains("power button pressed"));
    hv.destroy(g.id).await.unwrap();
}

#[tokio::test]
async fn killed_qemu_is_reported_crashed_and_can_be_started_again() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("crash-1", &[16]);
    hv.create(&g).await.unwrap();
    hv.start(g.id).await.unwrap();
    let pid = status(&hv, g.id).await.pid.unwrap();

    sigkill(pid);
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while alive(pid) {
        assert!(Instant::now() < deadline, "QEMU {pid} survived SIGKILL");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = status(&hv, g.id).await;
    assert_eq!((s.state, s.pid), (RuntimeState::Crashed, None));
    let listed = hv.list().await.unwrap();
    assert_eq!(listed.iter().find(|s| s.id == g.id).map(|s| s.state), Some(RuntimeState::Crashed));
    // Pause and resume make no sense without a process.
    assert!(matches!(hv.pause(g.id).await, Err(HvError::InvalidState { state: RuntimeState::Crashed, .. })));

    // The dead QEMU's disk lock is gone with it: the guest boots again.
    hv.start(g.id).await.unwrap();
    assert_eq!(status(&hv, g.id).await.state, RuntimeState::Running);
    wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;

    // A crashed guest that is stopped becomes Stopped.
    let pid = status(&hv, g.id).await.pid.unwrap();
    sigkill(pid);
    while alive(pid) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hv.stop(g.id, GRACEFUL).await.unwrap();
    assert_eq!(status(&hv, g.id).await.state, RuntimeState::Stopped);
    hv.destroy(g.id).await.unwrap();
    assert_no_qemu_for(&lab, g.id);
}

#[tokio::test]
async fn a_new_instance_readopts_running_guests() {
    let lab = Lab::new();
    let running = guest("adopt-1", &[16]);
    let stopped = guest("adopt-2", &[]);
    let pid = {
        let hv = lab.hv();
        hv.create(&running).await.unwrap();
        hv.create(&stopped).await.unwrap();
        hv.start(running.id).await.unwrap();
        wait_for_serial(&hv, running.id, "DROVE-READY", 1).await;
        status(&hv, running.id).await.pid.unwrap()
        // The agent goes away here; its QEMU does not.
    };
    assert!(alive(pid));

    let hv = lab.hv();
    let s = status(&hv, running.id).await;
    assert_eq!((s.state, s.pid), (RuntimeState::Running, Some(pid)));
    let mut listed: Vec<(GuestId, RuntimeState)> =
        hv.list().await.unwrap().into_iter().map(|s| (s.id, s.state)).collect();
    listed.sort_by_key(|(id, _)| *id);
    let mut expected = vec![(running.id, RuntimeState::Running), (stopped.id, RuntimeState::Stopped)];
    expected.sort_by_key(|(id, _)| *id);
    assert_eq!(listed, expected);

    // Fully in control: pause, resume, and a graceful stop.
    hv.pause(running.id).await.unwrap();
    assert_eq!(status(&hv, running.id).await.state, RuntimeState::Paused);
    hv.resume(running.id).await.unwrap();
    hv.stop(running.id, GRACEFUL).await.unwrap();
    assert_eq!(status(&hv, running.id).await.state, RuntimeState::Stopped);
    assert!(!alive(pid));
    for g in [&running, &stopped] {
        hv.destroy(g.id).await.unwrap();
    }
    assert!(hv.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_guest_that_powers_itself_off_is_stopped_not_crashed() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("self-off-1", &[]);
    hv.create(&g).await.unwrap();
    hv.start(g.id).await.unwrap();
    wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    let pid = status(&hv, g.id).await.pid.unwrap();

    let mut console = Console::open(&hv, g.id).await;
    console.type_line("poweroff -f").await;
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let s = status(&hv, g.id).await;
        if s.state == RuntimeState::Stopped {
            assert_eq!(s.pid, None);
            break;
        }
        assert_eq!(s.state, RuntimeState::Running, "while powering off");
        assert!(Instant::now() < deadline, "the guest did not power off:\n{}", serial_log(&hv, g.id));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Observing the powered-off guest released its QEMU.
    assert!(!alive(pid));
    hv.destroy(g.id).await.unwrap();
}

#[tokio::test]
async fn destroy_of_a_running_guest_leaves_no_process_and_no_files() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("destroy-1", &[16, 16]);
    hv.create(&g).await.unwrap();
    hv.start(g.id).await.unwrap();
    let pid = status(&hv, g.id).await.pid.unwrap();
    hv.destroy(g.id).await.unwrap();
    assert!(!alive(pid));
    assert!(!hv.guest_dir(g.id).exists());
    assert_no_qemu_for(&lab, g.id);
    hv.destroy(g.id).await.unwrap();
}

#[tokio::test]
async fn a_start_without_image_fails_clearly_and_leaves_the_guest_stopped() {
    let lab = Lab::new();
    let empty = tempfile::tempdir().unwrap();
    let mut config = lab.config(Accel::Tcg);
    config.image_dir = empty.path().to_owned();
    let hv = QemuHypervisor::new(config).unwrap();
    let g = guest("no-image-1", &[]);
    hv.create(&g).await.unwrap();
    let err = hv.start(g.id).await.unwrap_err();
    let chain = error_chain(&err);
    eprintln!("start failed as expected: {chain}");
    assert!(chain.contains("vmlinux") && chain.contains("build-image.sh"), "{chain}");
    assert_eq!(status(&hv, g.id).await.state, RuntimeState::Stopped);
}

#[tokio::test]
async fn auto_accel_resolves_to_something_that_boots() {
    let lab = Lab::new();
    let hv = QemuHypervisor::new(lab.config(Accel::Auto)).unwrap();
    let t0 = Instant::now();
    let accel = hv.accel().await;
    eprintln!("Accel::Auto resolved to {accel:?} in {:?}", t0.elapsed());
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        assert_eq!(accel, ResolvedAccel::Tcg);
    } else {
        assert!(lab.state_dir().join("accel-probe.json").is_file(), "the probe is not cached");
    }
    let g = guest("accel-1", &[]);
    hv.create(&g).await.unwrap();
    hv.start(g.id).await.unwrap();
    let log = wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    assert!(log.contains(&format!("({accel:?})")), "{log}");
    hv.destroy(g.id).await.unwrap();
}

#[tokio::test]
async fn a_guest_ignoring_the_power_button_is_forced_off_and_list_answers_meanwhile() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("deaf-1", &[]);
    hv.create(&g).await.unwrap();
    hv.start(g.id).await.unwrap();
    wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    let mut console = Console::open(&hv, g.id).await;
    console.type_line("killall acpid; echo acpid-$((6*7))-gone").await;
    wait_for_serial(&hv, g.id, "acpid-42-gone", 1).await;
    drop(console);
    let pid = status(&hv, g.id).await.pid;

    let stopping = tokio::spawn({
        let hv = hv.clone();
        async move {
            hv.stop(g.id, StopMode::Graceful { timeout: Duration::from_secs(20) }).await.unwrap();
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The stop holds the guest; list and status answer from what was last
    // seen instead of waiting for it.
    let listed = hv.list().await.unwrap();
    let s = status(&hv, g.id).await;
    assert!(!stopping.is_finished(), "the stop did not wait for the guest");
    assert_eq!(listed.iter().find(|s| s.id == g.id).map(|s| s.state), Some(RuntimeState::Running));
    assert_eq!((s.state, s.pid), (RuntimeState::Running, pid));

    stopping.await.unwrap();
    let s = status(&hv, g.id).await;
    assert_eq!((s.state, s.pid), (RuntimeState::Stopped, None));
    assert!(!serial_log(&hv, g.id).contains("power button pressed"));
    hv.destroy(g.id).await.unwrap();
}

#[tokio::test]
async fn a_panicking_guest_is_crashed_and_starts_again() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("panic-1", &[]);
    hv.create(&g).await.unwrap();
    hv.start(g.id).await.unwrap();
    wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    let pid = status(&hv, g.id).await.pid.unwrap();

    let mut console = Console::open(&hv, g.id).await;
    console.type_line("echo c > /proc/sysrq-trigger").await;
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let s = loop {
        let s = status(&hv, g.id).await;
        if s.state != RuntimeState::Running {
            break s;
        }
        assert!(Instant::now() < deadline, "no panic reported:\n{}", serial_log(&hv, g.id));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(console);
    // QEMU keeps the panicked guest for inspection: Crashed, with its pid.
    assert_eq!((s.state, s.pid), (RuntimeState::Crashed, Some(pid)));
    let events: Vec<String> = hv.take_events(g.id).await.into_iter().map(|e| e.event).collect();
    assert!(events.contains(&"GUEST_PANICKED".to_owned()), "{events:?}");

    hv.start(g.id).await.unwrap();
    let s = status(&hv, g.id).await;
    assert_eq!(s.state, RuntimeState::Running);
    assert_ne!(s.pid, Some(pid));
    assert!(!alive(pid));
    wait_for_serial(&hv, g.id, "DROVE-READY", 2).await;
    hv.destroy(g.id).await.unwrap();
    assert_no_qemu_for(&lab, g.id);
}

#[tokio::test]
async fn a_failed_launch_reports_qemu_stderr_and_leaves_the_guest_stopped() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("no-disk-1", &[16]);
    hv.create(&g).await.unwrap();
    std::fs::remove_file(hv.guest_dir(g.id).join("disk0.qcow2")).unwrap();
    let err = hv.start(g.id).await.unwrap_err();
    let chain = error_chain(&err);
    eprintln!("start failed as expected: {chain}");
    assert!(chain.contains("start of guest") && chain.contains("disk0.qcow2"), "{chain}");
    assert_eq!(status(&hv, g.id).await.state, RuntimeState::Stopped);
    assert_no_qemu_for(&lab, g.id);
}

/// A host tap, deleted on drop.
struct Tap(String);

impl Tap {
    fn create(name: &str) -> Self {
        let out =
            std::process::Command::new("ip").args(["tuntap", "add", "dev", name, "mode", "tap"]).output().unwrap();
        assert!(
            out.status.success(),
            "cannot create tap {name} (needs root and /dev/net/tun): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(name.to_owned())
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

#[tokio::test]
async fn nics_with_a_tap_are_attached_and_configured_from_the_kernel_command_line() {
    let lab = Lab::new();
    let mut config = lab.config(Accel::Tcg);
    config.extra_kernel_args =
        vec!["drove.ip=eth0:10.250.0.2/24".to_owned(), "drove.ip=mac-52-54-00-12-34-56:10.250.1.2/24".to_owned()];
    let hv = QemuHypervisor::new(config).unwrap();
    let mut g = guest("nic-1", &[]);
    let vlan = VlanTag::new(10).unwrap();
    g.spec.nics = vec![
        NicSpec { vlan, mac: "52:54:00:12:34:56".to_owned() },
        // No tap for this one: left out.
        NicSpec { vlan, mac: "52:54:00:12:34:57".to_owned() },
    ];
    // The tap's name says which guest and NIC it serves; the network layer
    // creates it before start. No address on the host side: no traffic.
    let _tap = Tap::create(&QemuHypervisor::tap_name(g.id, 0));
    hv.create(&g).await.unwrap();
    hv.start(g.id).await.unwrap();
    let log = wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    assert!(log.contains("drove: nic eth0 52:54:00:12:34:56"), "{log}");
    assert!(!log.contains("52:54:00:12:34:57"), "{log}");
    assert!(log.contains("drove: ip eth0 10.250.0.2/24"), "{log}");
    assert!(log.contains("drove: ip eth0 10.250.1.2/24"), "{log}");
    hv.destroy(g.id).await.unwrap();
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

// --- the conformance suite -------------------------------------------------------

/// A QEMU backend that takes its lab along, so that each conformance test's
/// QEMUs are reaped and its state removed when the test ends.
#[derive(Debug)]
struct LabHypervisor {
    hv: QemuHypervisor,
    _lab: LabGuard,
}

struct LabGuard(Lab);

impl std::fmt::Debug for LabGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lab({})", self.0.state_dir().display())
    }
}

fn lab_hypervisor() -> LabHypervisor {
    let lab = Lab::new();
    LabHypervisor { hv: lab.hv(), _lab: LabGuard(lab) }
}

#[async_trait::async_trait]
impl Hypervisor for LabHypervisor {
    fn kind(&self) -> HypervisorKind {
        self.hv.kind()
    }
    async fn resources(&self) -> Result<HostResources, HvError> {
        self.hv.resources().await
    }
    async fn create(&self, config: &GuestConfig) -> Result<(), HvError> {
        self.hv.create(config).await
    }
    async fn start(&self, id: GuestId) -> Result<(), HvError> {
        self.hv.start(id).await
    }
    async fn stop(&self, id: GuestId, mode: StopMode) -> Result<(), HvError> {
        self.hv.stop(id, mode).await
    }
    async fn pause(&self, id: GuestId) -> Result<(), HvError> {
        self.hv.pause(id).await
    }
    async fn resume(&self, id: GuestId) -> Result<(), HvError> {
        self.hv.resume(id).await
    }
    async fn destroy(&self, id: GuestId) -> Result<(), HvError> {
        self.hv.destroy(id).await
    }
    async fn status(&self, id: GuestId) -> Result<GuestStatus, HvError> {
        self.hv.status(id).await
    }
    async fn list(&self) -> Result<Vec<GuestStatus>, HvError> {
        self.hv.list().await
    }
}

fn conformance_guest(n: u32) -> GuestConfig {
    guest(&format!("conformance-{n}"), &[16])
}

/// Under TCG a guest needs seconds to boot far enough to act on the power
/// button, more with both cores busy.
fn conformance_options() -> Options {
    Options { op_timeout: Duration::from_secs(240), graceful_timeout: Duration::from_secs(90) }
}

drove_hypervisor::conformance_tests!(
    conformance_qemu,
    hypervisor = lab_hypervisor(),
    template = conformance_guest,
    options = conformance_options(),
);
