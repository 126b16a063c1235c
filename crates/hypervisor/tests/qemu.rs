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
use drove_hypervisor::qemu::{Accel, QemuConfig, QemuHypervisor, ResolvedAccel, cgroup, tc};
use drove_hypervisor::{
    ExecRequest, ExecResult, GuestConfig, GuestInterface, GuestStatus, HostResources, Hotplug, HvError, Hypervisor,
    RestoreOutcome, RuntimeState, SnapshotInfo, SnapshotKind, StopMode,
};
use drove_model::{ByteSize, DiskSpec, GuestId, GuestSpec, HypervisorKind, NicAddress, NicSpec, Priority, VlanTag};
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
        pids_mentioning(&self.marker)
    }
}

/// Live processes whose command line mentions `marker`.
fn pids_mentioning(marker: &Path) -> Vec<u32> {
    let needle = marker.as_os_str().as_encoded_bytes().to_vec();
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

impl Drop for Reaper {
    fn drop(&mut self) {
        let pids = self.pids();
        for &pid in &pids {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            eprintln!(
                "reaper: killing leftover process {pid}: {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            );
            sigkill(pid);
        }
        release_host_leftovers(&self.marker, &pids);
    }
}

fn sigkill(pid: u32) {
    signal(pid, rustix::process::Signal::KILL);
}

fn signal(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    let _ = rustix::process::kill_process(pid, signal);
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
            disks: disks.iter().map(|&mib| DiskSpec::qcow2(ByteSize::mib(mib))).collect(),
            nics: Vec::new(),
            priority: Priority::default(),
            load_profile: None,
            limits: Default::default(),
            image: None,
            clone_of: None,
            storage: Default::default(),
            anti_affinity: None,
            hot_added: None,
        },
    }
}

fn serial_log(hv: &QemuHypervisor, id: GuestId) -> String {
    String::from_utf8_lossy(&std::fs::read(hv.serial_log_path(id)).unwrap_or_default()).into_owned()
}

/// Waits until the serial log holds `needle` at least `count` times.
/// Creates and starts `g` and waits for its readiness line; its QEMU's pid.
async fn booted(hv: &QemuHypervisor, g: &GuestConfig) -> u32 {
    hv.create(g).await.unwrap();
    hv.start(g.id).await.unwrap();
    wait_for_serial(hv, g.id, "DROVE-READY", 1).await;
    status(hv, g.id).await.pid.expect("a running guest has a pid")
}

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
    let left = pids_mentioning(&marker);
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
    booted(&hv, &g).await;
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

/// A reset reboots the guest in the same QEMU: it boots again (its
/// readiness line a second time), what it kept in RAM is gone, and what it
/// wrote to its disk stays.
#[tokio::test]
async fn a_reset_reboots_the_guest_in_its_process() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("reset-1", &[16]);
    booted(&hv, &g).await;
    let pid = status(&hv, g.id).await.pid;
    write_marker(&hv, g.id, "written-before-reset").await;
    sh(&hv, g.id, "echo in-ram > /tmp/ram-marker").await;

    hv.reset(g.id).await.unwrap();
    let log = wait_for_serial(&hv, g.id, "DROVE-READY", 2).await;
    assert!(log.contains("--- drove: resetting guest"), "the log marks the reset");
    let s = status(&hv, g.id).await;
    assert_eq!((s.state, s.pid), (RuntimeState::Running, pid), "the same process runs on");
    assert_eq!(sh(&hv, g.id, "cat /tmp/ram-marker 2>/dev/null || echo gone").await, "gone");
    assert_eq!(sh(&hv, g.id, READ_MARKER).await, "written-before-reset");

    hv.stop(g.id, StopMode::Force).await.unwrap();
    let refused = hv.reset(g.id).await;
    assert!(matches!(refused, Err(HvError::InvalidState { state: RuntimeState::Stopped, .. })), "{refused:?}");
    hv.destroy(g.id).await.unwrap();
}

/// QEMU's own messages land in the guest's qemu.log, and the log of the
/// start before is kept: after a restart, why the last QEMU ended can
/// still be read.
#[tokio::test]
async fn qemu_logs_why_it_ended_and_the_restart_keeps_that_log() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("qlog-1", &[]);
    hv.create(&g).await.unwrap();
    hv.start(g.id).await.unwrap();
    let pid = status(&hv, g.id).await.pid.unwrap();
    signal(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while alive(pid) {
        assert!(Instant::now() < deadline, "QEMU {pid} survived SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&hv, g.id).await.state, RuntimeState::Crashed);
    let dir = hv.guest_dir(g.id);
    let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap();
    assert!(log.contains("terminating on signal 15"), "qemu.log: {log:?}");

    hv.start(g.id).await.unwrap();
    let previous = std::fs::read_to_string(dir.join("qemu.log.1")).unwrap();
    assert!(previous.contains("terminating on signal 15"), "qemu.log.1: {previous:?}");
    let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
    assert!(!log.contains("terminating"), "the new start's log is its own: {log:?}");
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
    let pid = booted(&hv, &g).await;

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
    assert_no_qemu_for(&lab, g.id);
    hv.destroy(g.id).await.unwrap();
    assert!(!hv.guest_dir(g.id).exists(), "nothing of it is left");
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
    booted(&hv, &g).await;
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
    let pid = booted(&hv, &g).await;

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
        NicSpec::new(vlan, "52:54:00:12:34:56"),
        // No tap for this one: left out.
        NicSpec::new(vlan, "52:54:00:12:34:57"),
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

// --- hotplug -------------------------------------------------------------------

/// Runs `script` with `sh -c` in the guest until its trimmed output is
/// `want` (hot-added hardware takes a moment to show up).
async fn wait_for_guest_output(hv: &QemuHypervisor, id: GuestId, script: &str, want: &str) {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let out = exec(hv, id, "sh", &["-c", script]).await;
        let text = out.as_ref().map(|r| String::from_utf8_lossy(&r.stdout).trim().to_owned()).unwrap_or_default();
        if text == want {
            return;
        }
        assert!(Instant::now() < deadline, "{script:?} in guest {id} gave {out:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The guest's MemTotal in KiB.
async fn guest_mem_total_kib(hv: &QemuHypervisor, id: GuestId) -> u64 {
    let out = exec(hv, id, "sh", &["-c", "grep MemTotal /proc/meminfo"]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{text:?}"))
}

/// Node names of QEMU's block graph.
async fn block_nodes(hv: &QemuHypervisor, id: GuestId) -> Vec<String> {
    let nodes = hv.qmp_execute(id, "query-named-block-nodes", None).await.unwrap();
    let mut names: Vec<String> =
        nodes.as_array().unwrap().iter().filter_map(|n| n["node-name"].as_str().map(str::to_owned)).collect();
    names.sort();
    names
}

fn dir_listing(hv: &QemuHypervisor, id: GuestId) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(hv.guest_dir(id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn record_spec(hv: &QemuHypervisor, id: GuestId) -> serde_json::Value {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hv.guest_dir(id).join("guest.json")).unwrap()).unwrap();
    record["config"]["spec"].clone()
}

/// A hypervisor that offers guests 2 cores and 4 GiB, whatever the host:
/// the hotplug room (maxcpus, maxmem) follows from it.
fn hotplug_hv(lab: &Lab) -> QemuHypervisor {
    let mut config = lab.config(Accel::Tcg);
    config.cores = 2;
    config.memory = ByteSize::gib(4);
    QemuHypervisor::new(config).unwrap()
}

#[tokio::test]
async fn hotplug_disk_vcpu_and_memory_are_seen_by_the_guest_and_kept_across_a_restart() {
    let lab = Lab::new();
    let hv = hotplug_hv(&lab);
    let g = guest("hotplug-1", &[16]);
    booted(&hv, &g).await;
    let mem_before = guest_mem_total_kib(&hv, g.id).await;

    // A 64 MiB disk: vdb of 131072 sectors.
    hv.hotplug(g.id, &Hotplug::AddDisk { size: ByteSize::mib(64) }).await.unwrap();
    wait_for_guest_output(&hv, g.id, "cat /sys/block/vdb/size", "131072").await;
    assert!(hv.guest_dir(g.id).join("disk1.qcow2").is_file());
    assert_eq!(block_nodes(&hv, g.id).await.iter().filter(|n| n.starts_with("disk")).count(), 2);

    // Disk 0 grown online from 16 MiB to 48 MiB: vda of 98304 sectors.
    hv.hotplug(g.id, &Hotplug::GrowDisk { index: 0, size: ByteSize::mib(48) }).await.unwrap();
    wait_for_guest_output(&hv, g.id, "cat /sys/block/vda/size", "98304").await;

    // A second vCPU: present at once, used once the guest onlines it (the
    // test image has no udev rule doing so).
    hv.hotplug(g.id, &Hotplug::SetVcpus { vcpus: 2 }).await.unwrap();
    wait_for_guest_output(
        &hv,
        g.id,
        "test -e /sys/devices/system/cpu/cpu1/online && echo 1 > /sys/devices/system/cpu/cpu1/online; nproc",
        "2",
    )
    .await;

    // 128 MiB more memory, onlined by the guest.
    hv.hotplug(g.id, &Hotplug::SetMemory { memory: ByteSize::mib(384) }).await.unwrap();
    let online = "for s in /sys/devices/system/memory/memory*/state; do \
                  grep -q offline $s && echo online > $s; done; grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2";
    wait_for_guest_output(&hv, g.id, online, &(mem_before + 128 * 1024).to_string()).await;

    // Refusals: shrinking, beyond the room started with, odd memory steps.
    for (change, says) in [
        (Hotplug::SetVcpus { vcpus: 1 }, "can only be added while running"),
        (Hotplug::SetMemory { memory: ByteSize::mib(256) }, "can only be added while running"),
        (Hotplug::SetVcpus { vcpus: 3 }, "room for 2 vCPUs"),
        (Hotplug::SetMemory { memory: ByteSize::mib(400) }, "steps of 128M"),
        (Hotplug::SetMemory { memory: ByteSize::gib(2) }, "room for 1G of memory"),
        (Hotplug::GrowDisk { index: 0, size: ByteSize::mib(32) }, "can only grow"),
        (Hotplug::GrowDisk { index: 7, size: ByteSize::gib(1) }, "has no disk 7"),
    ] {
        let err = hv.hotplug(g.id, &change).await.unwrap_err();
        assert!(matches!(err, HvError::Unsupported { op: "hotplug", .. }), "{change:?}: {err:?}");
        assert!(err.to_string().contains(says), "{change:?}: {err}");
    }
    let spec = record_spec(&hv, g.id);
    assert_eq!((spec["vcpus"].as_u64(), spec["disks"].as_array().unwrap().len()), (Some(2), 2), "{spec}");
    assert_eq!(spec["memory"].as_u64(), Some(384 << 20), "{spec}");
    assert_eq!(spec["disks"][0]["size"].as_u64(), Some(48 << 20), "{spec}");

    // The record keeps the new hardware: a restart boots with all of it.
    hv.stop(g.id, GRACEFUL).await.unwrap();
    hv.start(g.id).await.unwrap();
    wait_for_serial(&hv, g.id, "DROVE-READY", 2).await;
    wait_for_guest_output(&hv, g.id, "cat /sys/block/vdb/size", "131072").await;
    wait_for_guest_output(&hv, g.id, "cat /sys/block/vda/size", "98304").await;
    wait_for_guest_output(&hv, g.id, "nproc", "2").await;
    let mem_after = guest_mem_total_kib(&hv, g.id).await;
    assert!(mem_after > mem_before + 100 * 1024, "{mem_before} KiB before, {mem_after} KiB after the restart");
    hv.destroy(g.id).await.unwrap();
    assert_no_qemu_for(&lab, g.id);
}

#[tokio::test]
async fn hotplug_refusals_and_failures_leave_no_file_node_or_record_change() {
    let lab = Lab::new();
    let hv = hotplug_hv(&lab);
    let g = guest("hotplug-2", &[]);
    hv.create(&g).await.unwrap();

    // Stopped: nothing to plug into.
    let err = hv.hotplug(g.id, &Hotplug::AddDisk { size: ByteSize::mib(64) }).await.unwrap_err();
    assert!(matches!(err, HvError::InvalidState { op: "hotplug", state: RuntimeState::Stopped, .. }), "{err:?}");
    assert!(!hv.guest_dir(g.id).join("disk0.qcow2").exists());

    hv.start(g.id).await.unwrap();
    wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    let files = dir_listing(&hv, g.id);
    let nodes = block_nodes(&hv, g.id).await;
    let spec = record_spec(&hv, g.id);

    // A NIC without its tap.
    let err = hv
        .hotplug(g.id, &Hotplug::AddNic { nic: NicSpec::new(VlanTag::new(10).unwrap(), "52:54:00:00:99:01") })
        .await
        .unwrap_err();
    assert!(matches!(err, HvError::Unsupported { .. }), "{err:?}");
    let tap = QemuHypervisor::tap_name(g.id, 0);
    assert!(err.to_string().contains(&format!("no tap {tap} exists on this host")), "{err}");

    // A device_add that QEMU refuses (its id is taken) after the image and
    // its block node were made: both are taken back, and the record too.
    hv.qmp_execute(g.id, "device_add", Some(serde_json::json!({ "driver": "virtio-rng-pci", "id": "vdisk0" })))
        .await
        .unwrap();
    let err = hv.hotplug(g.id, &Hotplug::AddDisk { size: ByteSize::mib(64) }).await.unwrap_err();
    assert!(matches!(err, HvError::Backend { op: "hotplug", .. }), "{err:?}");
    assert!(error_chain(&err).contains("vdisk0"), "{}", error_chain(&err));

    assert_eq!(dir_listing(&hv, g.id), files);
    assert_eq!(block_nodes(&hv, g.id).await, nodes);
    assert_eq!(record_spec(&hv, g.id), spec);
    hv.destroy(g.id).await.unwrap();
    assert_no_qemu_for(&lab, g.id);
}

#[tokio::test]
async fn hotplug_nic_on_its_tap_is_seen_by_the_guest_with_its_mac() {
    let lab = Lab::new();
    let hv = hotplug_hv(&lab);
    let g = guest("hotplug-3", &[]);
    booted(&hv, &g).await;
    let _tap = Tap::create(&QemuHypervisor::tap_name(g.id, 0));
    hv.hotplug(g.id, &Hotplug::AddNic { nic: NicSpec::new(VlanTag::new(10).unwrap(), "52:54:00:00:99:02") })
        .await
        .unwrap();
    wait_for_guest_output(&hv, g.id, "cat /sys/class/net/eth0/address", "52:54:00:00:99:02").await;
    let spec = record_spec(&hv, g.id);
    assert_eq!(spec["nics"][0]["mac"], "52:54:00:00:99:02", "{spec}");
    let err = hv
        .hotplug(g.id, &Hotplug::AddNic { nic: NicSpec::new(VlanTag::new(10).unwrap(), "52:54:00:00:99:02") })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already has a NIC"), "{err}");
    hv.destroy(g.id).await.unwrap();
    assert_no_qemu_for(&lab, g.id);
}

#[tokio::test]
async fn hotplug_disk_of_a_guest_with_disk_limits_sits_behind_its_own_throttle_node() {
    let lab = Lab::new();
    let hv = hotplug_hv(&lab);
    let mut g = guest("hotplug-4", &[]);
    g.spec.limits.disk_bps = Some(4 << 20);
    booted(&hv, &g).await;
    hv.hotplug(g.id, &Hotplug::AddDisk { size: ByteSize::mib(32) }).await.unwrap();
    wait_for_guest_output(&hv, g.id, "cat /sys/block/vda/size", "65536").await;
    // (QEMU names the file node under the qcow2 node itself: `#block...`.)
    let ours: Vec<String> = block_nodes(&hv, g.id).await.into_iter().filter(|n| !n.starts_with('#')).collect();
    assert_eq!(ours, ["disk0", "throttled0"]);
    hv.destroy(g.id).await.unwrap();
    assert_no_qemu_for(&lab, g.id);
}

// --- the guest agent -------------------------------------------------------------

/// `path args...` through the guest agent.
async fn exec(hv: &QemuHypervisor, id: GuestId, path: &str, args: &[&str]) -> Result<ExecResult, HvError> {
    hv.exec(id, &ExecRequest::new(path, args.iter().copied())).await
}

#[tokio::test]
async fn exec_runs_commands_in_the_guest_with_exit_code_output_and_input() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("exec-1", &[]);
    hv.create(&g).await.unwrap();
    // Not running: nobody to ask.
    let err = exec(&hv, g.id, "true", &[]).await.unwrap_err();
    assert!(matches!(err, HvError::InvalidState { op: "exec", state: RuntimeState::Stopped, .. }), "{err:?}");
    hv.start(g.id).await.unwrap();
    // No wait for DROVE-READY: exec itself waits for the agent to come up,
    // as long as its timeout allows.
    let t0 = Instant::now();
    let mut sh = ExecRequest::new("/bin/sh", ["-c", "echo hi; echo err >&2; exit 3"]);
    sh.timeout = GUEST_TIMEOUT;
    let r = hv.exec(g.id, &sh).await.unwrap();
    eprintln!("first exec answered {:?} after start (TCG)", t0.elapsed());
    assert_eq!(
        (r.exit_code, String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr)),
        (3, "hi\n".into(), "err\n".into())
    );

    // Input goes to stdin; a larger one too (base64 both ways over
    // virtio-serial).
    let mut cat = ExecRequest::new("cat", [] as [&str; 0]);
    cat.input = Some(b"line one\nline two\n".to_vec());
    let r = hv.exec(g.id, &cat).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"line one\nline two\n"[..]));
    let mut wc = ExecRequest::new("wc", ["-c"]);
    wc.input = Some(vec![b'x'; 300_000]);
    let r = hv.exec(g.id, &wc).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "300000");

    // A program that does not exist: the agent's reason, naming it.
    let err = exec(&hv, g.id, "/no/such/program", &["x"]).await.unwrap_err();
    let chain = error_chain(&err);
    eprintln!("exec of a missing program failed as expected: {chain}");
    assert!(chain.contains("exec of guest") && chain.contains("/no/such/program"), "{chain}");
    assert!(chain.contains("No such file or directory"), "{chain}");

    // A command that outlives its timeout fails with a timeout, in time.
    let mut slow = ExecRequest::new("sleep", ["30"]);
    slow.timeout = Duration::from_secs(3);
    let t0 = Instant::now();
    let err = hv.exec(g.id, &slow).await.unwrap_err();
    let chain = error_chain(&err);
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert!(chain.contains("had not exited after 3s"), "{chain}");

    // None of that upset the agent.
    assert_eq!(exec(&hv, g.id, "true", &[]).await.unwrap().exit_code, 0);
    let serial = wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    assert!(serial.contains("drove: guest agent listening on /dev/vport"), "{serial}");

    hv.stop(g.id, StopMode::Force).await.unwrap();
    let err = exec(&hv, g.id, "true", &[]).await.unwrap_err();
    assert!(matches!(err, HvError::InvalidState { state: RuntimeState::Stopped, .. }), "{err:?}");
    hv.destroy(g.id).await.unwrap();
    assert_no_qemu_for(&lab, g.id);
}

#[tokio::test]
async fn guest_interfaces_show_loopback_and_the_nic_with_its_mac_and_address() {
    let lab = Lab::new();
    let mut config = lab.config(Accel::Tcg);
    config.extra_kernel_args = vec!["drove.ip=eth0:10.250.2.7/24".to_owned()];
    let hv = QemuHypervisor::new(config).unwrap();
    let mut g = guest("ifaces-1", &[]);
    g.spec.nics = vec![NicSpec::new(VlanTag::new(10).unwrap(), "52:54:00:ab:cd:01")];
    let _tap = Tap::create(&QemuHypervisor::tap_name(g.id, 0));
    hv.create(&g).await.unwrap();
    hv.start(g.id).await.unwrap();
    // READY comes after the address is configured.
    wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;

    let interfaces = hv.guest_interfaces(g.id).await.unwrap();
    eprintln!("guest interfaces: {interfaces:?}");
    let find = |name: &str| -> &GuestInterface {
        interfaces.iter().find(|i| i.name == name).unwrap_or_else(|| panic!("no {name} in {interfaces:?}"))
    };
    assert!(find("lo").addresses.contains(&"127.0.0.1/8".to_owned()), "{interfaces:?}");
    let eth0 = find("eth0");
    assert_eq!(eth0.mac.as_deref(), Some("52:54:00:ab:cd:01"));
    assert!(eth0.addresses.contains(&"10.250.2.7/24".to_owned()), "{interfaces:?}");
    hv.destroy(g.id).await.unwrap();
}

/// How long the agent stays away in the test below: more than its failing
/// calls take (4 s + 4 s + 10 s).
const AGENT_AWAY: Duration = Duration::from_secs(40);

#[tokio::test]
async fn a_guest_whose_agent_does_not_answer_gives_a_timeout_error_not_a_hang() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("no-agent-1", &[]);
    booted(&hv, &g).await;
    assert_eq!(exec(&hv, g.id, "true", &[]).await.unwrap().exit_code, 0);

    // The agent goes away, and comes back after AGENT_AWAY: a background
    // job, started through the agent itself, kills it a moment after this
    // exec returned. (Not through the console: its shell does not reliably
    // take long typed lines.)
    let away = format!(
        "(sleep 2; killall drove-guest-agent; echo agent-gone-$((6*7)); sleep {}; drove-guest-agent) \
         </dev/null >/dev/console 2>&1 &",
        AGENT_AWAY.as_secs()
    );
    assert_eq!(exec(&hv, g.id, "/bin/sh", &["-c", &away]).await.unwrap().exit_code, 0);
    wait_for_serial(&hv, g.id, "agent-gone-42", 1).await;
    let gone = Instant::now();

    let mut req = ExecRequest::new("true", [] as [&str; 0]);
    req.timeout = Duration::from_secs(4);
    // Twice: once on the connection kept from before (the request goes
    // unanswered), once on a new one (the handshake goes unanswered).
    for attempt in ["kept connection", "new connection"] {
        let t0 = Instant::now();
        let err = hv.exec(g.id, &req).await.unwrap_err();
        let took = t0.elapsed();
        let chain = error_chain(&err);
        eprintln!("{attempt}: exec failed after {took:?} as expected: {chain}");
        assert!(took < Duration::from_secs(15), "{attempt}: took {took:?}");
        assert!(chain.contains("through the guest agent at") && chain.contains("qga.sock"), "{chain}");
        assert!(chain.contains("within 4s"), "{chain}");
    }
    let err = hv.guest_interfaces(g.id).await.unwrap_err();
    assert!(error_chain(&err).contains("is a guest agent running in the guest"), "{}", error_chain(&err));
    assert!(gone.elapsed() < AGENT_AWAY, "the agent came back before the test was done without it");

    // An agent that comes back is found again, by a call that waits long
    // enough.
    let mut echo = ExecRequest::new("echo", ["again"]);
    echo.timeout = GUEST_TIMEOUT;
    let r = hv.exec(g.id, &echo).await.unwrap();
    assert_eq!(r.stdout, b"again\n");
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

// --- resource controls -----------------------------------------------------------

/// Removes what guests the test did not stop through the backend left on
/// the host (their cgroups and IFBs), once their QEMUs `pids` are gone. The
/// backend itself does this whenever it sees a guest without its QEMU; a
/// test that ends with a running guest never lets it look.
fn release_host_leftovers(state_dir: &Path, pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let Ok(entries) = std::fs::read_dir(state_dir.join("guests")) else { return };
    let hierarchy = cgroup::Hierarchy::detect().ok().flatten();
    for id in entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<GuestId>().ok()) {
        if let Some(h) = &hierarchy {
            let cg = h.guest(id);
            while matches!(cg.remove(), Ok(cgroup::Removal::Busy(_))) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for (_, ifb) in tc::guest_ifbs(id).unwrap_or_default() {
            let _ = std::process::Command::new("ip").args(["link", "del", "dev", &ifb]).output();
        }
    }
}

/// Tests of the limits of `ResourceLimits`, checked from outside the guest
/// (cgroup accounting, /proc, tc) and from inside (timed disk writes).
/// Run them alone with `cargo test -p drove-hypervisor --test qemu
/// resource_controls`.
mod resource_controls {
    use drove_hypervisor::qemu::host_resources;
    use drove_model::ResourceLimits;

    use super::*;

    fn limited(name: &str, disks: &[u64], limits: ResourceLimits) -> GuestConfig {
        let mut g = guest(name, disks);
        g.spec.limits = limits;
        g
    }

    fn cgroup_of(id: GuestId) -> cgroup::GuestCgroup {
        let hierarchy = cgroup::Hierarchy::detect().unwrap();
        hierarchy.expect("no cgroup hierarchy is mounted; these tests need cgroups (and root)").guest(id)
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())).trim().to_owned()
    }

    /// Asserts that nothing of guest `id` remains on the host: no QEMU, no
    /// cgroup directory, no IFB, no qdisc of ours on its `taps` (which the
    /// network layer owns and which therefore stay).
    async fn assert_no_host_leftovers(lab: &Lab, id: GuestId, taps: &[&Tap]) {
        assert_no_qemu_for(lab, id);
        let dirs: Vec<PathBuf> = cgroup_of(id).dirs().into_iter().filter(|d| d.exists()).collect();
        assert!(dirs.is_empty(), "cgroup directories of guest {id} remain: {dirs:?}");
        let ifbs = tc::guest_ifbs(id).unwrap();
        assert!(ifbs.is_empty(), "IFBs of guest {id} remain: {ifbs:?}");
        for tap in taps {
            assert!(tc::device_exists(&tap.0), "the tap {} went away", tap.0);
            let ours: Vec<tc::Qdisc> = tc::qdiscs(&tap.0)
                .await
                .unwrap()
                .into_iter()
                .filter(|q| q.handle == tc::ROOT_HANDLE || q.kind == "ingress")
                .collect();
            assert!(ours.is_empty(), "qdiscs of guest {id} remain on {}: {ours:?}", tap.0);
        }
    }

    /// The threads of process `pid` with their `Cpus_allowed_list`.
    fn thread_cpus(pid: u32) -> Vec<(String, String)> {
        let mut threads = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
            let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
            let field = |key: &str| {
                status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned()).unwrap_or_default()
            };
            threads.push((field("Name:"), field("Cpus_allowed_list:")));
        }
        threads
    }

    /// Rates from two `usage` readings `window` apart.
    async fn usage_rate(hv: &QemuHypervisor, id: GuestId, window: Duration) -> drove_model::LoadSample {
        let (a, t0) = (hv.usage(id).await.unwrap(), Instant::now());
        tokio::time::sleep(window).await;
        let (b, t1) = (hv.usage(id).await.unwrap(), Instant::now());
        b.rate_since(&a, t1 - t0).unwrap_or_else(|| panic!("no rate between readings of one process: {a:?}, {b:?}"))
    }

    /// What the agent reports, against a real guest: little for an idle
    /// guest, its disk reads, and about half a core for one spinning under
    /// a 50 % cap (the cgroup's count, which is what the cap holds).
    #[tokio::test]
    async fn usage_reports_little_for_an_idle_guest_its_disk_reads_and_half_a_core_for_one_spinning_under_a_half_core_cap()
     {
        let lab = Lab::new();
        let hv = lab.hv();
        let g = limited("usage-1", &[16], ResourceLimits { cpu_cap_percent: Some(50), ..Default::default() });
        hv.create(&g).await.unwrap();
        hv.start(g.id).await.unwrap();
        wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
        const WINDOW: Duration = Duration::from_secs(2);
        let deadline = Instant::now() + Duration::from_secs(60);

        // Idle: the first windows after boot may still hold its last steps.
        let mut seen = Vec::new();
        loop {
            let r = usage_rate(&hv, g.id, WINDOW).await;
            eprintln!("idle: {:.0} milli-cores, {:.0} MiB resident", r.cpu_millicores, r.memory_mib);
            assert!((16.0..512.0).contains(&r.memory_mib), "resident memory of a 256 MiB guest: {r:?}");
            seen.push(r.cpu_millicores);
            if r.cpu_millicores < 100.0 {
                break;
            }
            assert!(Instant::now() < deadline, "an idle guest never used under 100 milli-cores: {seen:?}");
        }

        // Disk: 8 MiB read from its disk inside the guest are counted.
        let before = hv.usage(g.id).await.unwrap();
        let dd = exec(&hv, g.id, "/bin/sh", &["-c", "dd if=/dev/vda of=/dev/null bs=1M count=8"]).await.unwrap();
        assert_eq!(dd.exit_code, 0, "{dd:?}");
        let after = hv.usage(g.id).await.unwrap();
        let read = after.disk_read_bytes - before.disk_read_bytes;
        assert!(read >= 7 << 20, "8 MiB read in the guest, {read} bytes counted: {before:?} then {after:?}");

        // Spinning under the cap: each window at most 600 milli-cores; at
        // least 400 in one (the host's other load may hold it below its cap
        // for a while, as in the cap tests above).
        let mut console = Console::open(&hv, g.id).await;
        console.type_line("while :; do :; done & echo spin-$((6*7))").await;
        wait_for_serial(&hv, g.id, "spin-42", 1).await;
        drop(console);
        let mut seen = Vec::new();
        loop {
            let r = usage_rate(&hv, g.id, WINDOW).await;
            eprintln!("spinning, capped at 50%: {:.0} milli-cores", r.cpu_millicores);
            seen.push(r.cpu_millicores);
            assert!(r.cpu_millicores <= 600.0, "over its 50% cap: {seen:?}");
            if r.cpu_millicores >= 400.0 {
                break;
            }
            assert!(Instant::now() < deadline, "in no window did it report 400 milli-cores or more: {seen:?}");
        }
        hv.destroy(g.id).await.unwrap();
        assert_no_host_leftovers(&lab, g.id, &[]).await;
    }

    #[tokio::test]
    async fn a_cpu_bound_guest_capped_at_half_a_core_uses_half_a_core() {
        let lab = Lab::new();
        let hv = lab.hv();
        let g = limited("cap-1", &[], ResourceLimits { cpu_cap_percent: Some(50), ..Default::default() });
        hv.create(&g).await.unwrap();
        hv.start(g.id).await.unwrap();
        let pid = status(&hv, g.id).await.pid.unwrap();
        let cg = cgroup_of(g.id);
        assert!(cg.pids().unwrap().contains(&pid), "QEMU {pid} is not in {:?}", cg.dirs());
        let cpu = cg.controller_dir("cpu").unwrap();
        if cpu.join("cpu.cfs_quota_us").exists() {
            assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "50000");
            assert_eq!(read(cpu.join("cpu.cfs_period_us")), "100000");
        } else {
            assert_eq!(read(cpu.join("cpu.max")), "50000 100000");
        }
        wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
        let mut console = Console::open(&hv, g.id).await;
        console.type_line("while :; do :; done & echo spin-$((6*7))").await;
        wait_for_serial(&hv, g.id, "spin-42", 1).await;
        drop(console);

        // The cap is an upper bound, checked in every window. Whether the
        // guest also gets its 50 % depends on the host's other load (the
        // tests boot guests in parallel on 2 cores), so the lower bound is
        // taken from the first window in which the cap was what held the
        // guest back (throttled periods) and it got at least 40 %. Under
        // steady contention that comes within a minute here; a host too
        // busy to give half a core for four minutes fails the test.
        const WINDOW: Duration = Duration::from_secs(5);
        let deadline = Instant::now() + Duration::from_secs(240);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut seen = Vec::new();
        loop {
            let (t0, s0) = (Instant::now(), cg.cpu_stat().unwrap());
            tokio::time::sleep(WINDOW).await;
            let (t1, s1) = (Instant::now(), cg.cpu_stat().unwrap());
            let share = (s1.usage - s0.usage).as_secs_f64() / (t1 - t0).as_secs_f64();
            let periods = s1.periods - s0.periods;
            let throttled = s1.throttled_periods - s0.throttled_periods;
            eprintln!(
                "cap 50%: used {:.1}% of a core over {:?}; throttled in {throttled} of {periods} periods",
                share * 100.0,
                t1 - t0
            );
            seen.push((share, throttled, periods));
            assert!(share <= 0.60, "the guest used {:.1}% of a core, over its 50% cap", share * 100.0);
            if throttled > 0 && share >= 0.40 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "in no {WINDOW:?} window did the throttled guest get 40% of a core or more (a host too busy, \
                 or a cap tighter than asked): (share, throttled, periods) = {seen:?}"
            );
        }
        hv.destroy(g.id).await.unwrap();
        assert_no_host_leftovers(&lab, g.id, &[]).await;
    }

    #[tokio::test]
    async fn a_pinned_guest_runs_every_qemu_thread_on_its_cores_and_gets_its_shares() {
        let lab = Lab::new();
        let hv = lab.hv();
        // The last core: on a 2-core host the pin then differs from the
        // unpinned set.
        let core = host_resources().unwrap().cores - 1;
        let mut g = limited(
            "pin-1",
            &[16],
            ResourceLimits { cpu_pin: vec![core], cpu_shares: Some(2048), ..Default::default() },
        );
        g.spec.vcpus = 2;
        hv.create(&g).await.unwrap();
        hv.start(g.id).await.unwrap();
        wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
        let pid = status(&hv, g.id).await.pid.unwrap();

        let threads = thread_cpus(pid);
        eprintln!("QEMU {pid} threads and their cores: {threads:?}");
        // The main thread, two vCPUs, and QEMU's helpers.
        assert!(threads.len() >= 3, "{threads:?}");
        let wrong: Vec<_> = threads.iter().filter(|(_, cpus)| *cpus != core.to_string()).collect();
        assert!(wrong.is_empty(), "threads not pinned to core {core}: {wrong:?} (all: {threads:?})");
        assert!(threads.iter().any(|(name, _)| name.starts_with("CPU 1/")), "{threads:?}");

        let cg = cgroup_of(g.id);
        assert_eq!(read(cg.controller_dir("cpuset").unwrap().join("cpuset.cpus")), core.to_string());
        let cpu = cg.controller_dir("cpu").unwrap();
        if cpu.join("cpu.shares").exists() {
            assert_eq!(read(cpu.join("cpu.shares")), "2048");
        } else {
            assert_eq!(read(cpu.join("cpu.weight")), "200");
        }
        hv.destroy(g.id).await.unwrap();
        assert_no_host_leftovers(&lab, g.id, &[]).await;
    }

    #[tokio::test]
    async fn disk_writes_in_the_guest_keep_to_the_bps_and_iops_limits() {
        const BPS: u64 = 2 * 1024 * 1024;
        const IOPS: u64 = 100;
        let lab = Lab::new();
        let hv = lab.hv();
        let g = limited(
            "disk-limit-1",
            &[64],
            ResourceLimits { disk_bps: Some(BPS), disk_iops: Some(IOPS), ..Default::default() },
        );
        hv.create(&g).await.unwrap();
        hv.start(g.id).await.unwrap();
        wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;

        // Timed in the guest, from its uptime, around direct (uncached)
        // writes to the raw disk: 12 MiB in 64 KiB writes is bound by the
        // byte rate (32 writes/s needed, 100 allowed), 600 writes of 4 KiB
        // by the operation rate (400 KiB/s needed, 2 MiB/s allowed). Each
        // takes about 6 s at the limit.
        let script = "t() { cut -d' ' -f1 /proc/uptime; }; \
            a=$(t); dd if=/dev/zero of=/dev/vda bs=65536 count=192 oflag=direct || exit 1; b=$(t); \
            dd if=/dev/zero of=/dev/vda bs=4096 count=600 seek=4096 oflag=direct || exit 1; c=$(t); \
            echo $a $b $c";
        let mut req = ExecRequest::new("/bin/sh", ["-c", script]);
        req.timeout = GUEST_TIMEOUT;
        let r = hv.exec(g.id, &req).await.unwrap();
        let out = String::from_utf8_lossy(&r.stdout);
        eprintln!("dd in the guest: {out}{}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(r.exit_code, 0, "{out} {}", String::from_utf8_lossy(&r.stderr));
        let t: Vec<f64> = out.split_whitespace().map(|v| v.parse().unwrap()).collect();
        let bps = (192.0 * 65536.0) / (t[1] - t[0]);
        let iops = 600.0 / (t[2] - t[1]);
        eprintln!(
            "disk limits: {:.0} B/s for a limit of {BPS} ({:+.1}%), {:.1} writes/s for a limit of {IOPS} ({:+.1}%)",
            bps,
            (bps / BPS as f64 - 1.0) * 100.0,
            iops,
            (iops / IOPS as f64 - 1.0) * 100.0
        );
        assert!((bps / BPS as f64 - 1.0).abs() <= 0.10, "{bps:.0} B/s is not within 10% of {BPS}");
        assert!((iops / IOPS as f64 - 1.0).abs() <= 0.10, "{iops:.1} writes/s is not within 10% of {IOPS}");
        hv.destroy(g.id).await.unwrap();
    }

    /// The configured rate in both directions, set up at each start and
    /// gone at each stop, while the tap (the network layer's) stays.
    #[tokio::test]
    async fn a_nic_rate_limit_shapes_both_directions_of_the_tap_while_the_guest_runs() {
        const RATE_BPS: u64 = 10_000_000;
        let lab = Lab::new();
        let hv = lab.hv();
        let mut g = limited("nic-limit-1", &[], ResourceLimits { nic_rate_bps: Some(RATE_BPS), ..Default::default() });
        g.spec.nics = vec![NicSpec::new(VlanTag::new(10).unwrap(), "52:54:00:12:35:01")];
        let tap = Tap::create(&QemuHypervisor::tap_name(g.id, 0));
        let ifb = tc::ifb_name(g.id, 0);
        hv.create(&g).await.unwrap();

        for round in ["first start", "second start"] {
            hv.start(g.id).await.unwrap();
            let on_tap = tc::qdiscs(&tap.0).await.unwrap();
            eprintln!("{round}: qdiscs on {}: {on_tap:?}", tap.0);
            // Towards the guest: the tap's egress.
            let root = on_tap.iter().find(|q| q.root).unwrap_or_else(|| panic!("no root qdisc: {on_tap:?}"));
            assert_eq!((root.kind.as_str(), root.handle.as_str()), ("tbf", tc::ROOT_HANDLE));
            assert_eq!(root.rate_bytes, Some(RATE_BPS / 8));
            // From the guest: the tap's ingress, redirected to the IFB.
            assert!(on_tap.iter().any(|q| q.kind == "ingress"), "{on_tap:?}");
            let filters = std::process::Command::new("tc")
                .args(["-j", "filter", "show", "dev", &tap.0, "ingress"])
                .output()
                .unwrap();
            let filters = String::from_utf8_lossy(&filters.stdout);
            assert!(filters.contains(&format!("\"to_dev\":\"{ifb}\"")), "{filters}");
            let on_ifb = tc::qdiscs(&ifb).await.unwrap();
            let shaper = on_ifb.iter().find(|q| q.root).unwrap_or_else(|| panic!("no root qdisc: {on_ifb:?}"));
            assert_eq!((shaper.kind.as_str(), shaper.rate_bytes), ("tbf", Some(RATE_BPS / 8)));

            hv.stop(g.id, StopMode::Force).await.unwrap();
            assert_no_host_leftovers(&lab, g.id, &[&tap]).await;
        }
        hv.destroy(g.id).await.unwrap();
        assert_no_host_leftovers(&lab, g.id, &[&tap]).await;
    }

    /// A /30 of the benchmarking range 198.18.0.0/15 (RFC 2544) for one
    /// test's tap, from its guest id, so that concurrent runs do not share
    /// a subnet: (host address, guest address).
    fn bench_pair(id: GuestId) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
        let b = id.as_uuid().as_bytes();
        let (third, fourth) = (b[0], (b[1] % 64) * 4);
        ([198, 18, third, fourth + 1].into(), [198, 18, third, fourth + 2].into())
    }

    /// Guest and host talk TCP over the tap (the host end gets an address
    /// from the benchmarking range; no traffic leaves the machine). Each
    /// direction is measured where the data arrives, from its first to its
    /// last byte.
    #[tokio::test]
    async fn a_nic_rate_limit_caps_tcp_throughput_both_ways() {
        use tokio::io::AsyncReadExt;

        const RATE_BPS: u64 = 8_000_000;
        const BYTES: usize = 4 * 1024 * 1024;
        let lab = Lab::new();
        let mut g = limited("nic-tput-1", &[], ResourceLimits { nic_rate_bps: Some(RATE_BPS), ..Default::default() });
        g.spec.nics = vec![NicSpec::new(VlanTag::new(10).unwrap(), "52:54:00:12:35:03")];
        let (host_ip, guest_ip) = bench_pair(g.id);
        let mut config = lab.config(Accel::Tcg);
        config.extra_kernel_args = vec![format!("drove.ip=eth0:{guest_ip}/30")];
        let hv = QemuHypervisor::new(config).unwrap();
        let tap = Tap::create(&QemuHypervisor::tap_name(g.id, 0));
        for args in
            [vec!["addr", "add", &format!("{host_ip}/30"), "dev", &tap.0], vec!["link", "set", "dev", &tap.0, "up"]]
        {
            let out = std::process::Command::new("ip").args(&args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        hv.create(&g).await.unwrap();
        hv.start(g.id).await.unwrap();
        wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
        let mbit = |bytes: usize, secs: f64| bytes as f64 * 8.0 / secs / 1e6;

        // From the guest: through the tap's ingress and the IFB's shaper.
        let listener = tokio::net::TcpListener::bind((host_ip, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let send = format!("dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc {host_ip} {port}", BYTES / 65536);
        let sender = tokio::spawn({
            let hv = hv.clone();
            let mut req = ExecRequest::new("/bin/sh", ["-c", send.as_str()]);
            req.timeout = GUEST_TIMEOUT;
            async move { hv.exec(g.id, &req).await }
        });
        let (mut stream, _) = tokio::time::timeout(GUEST_TIMEOUT, listener.accept()).await.unwrap().unwrap();
        let mut buf = vec![0u8; 65536];
        let first = stream.read(&mut buf).await.unwrap();
        let t0 = Instant::now();
        let mut got = first;
        while got < BYTES {
            let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "the guest closed after {got} of {BYTES} bytes");
            got += n;
        }
        let from_guest = mbit(got - first, t0.elapsed().as_secs_f64());
        drop(stream);
        let _ = sender.await.unwrap();

        // To the guest: through the tap's egress shaper; timed in the guest.
        let receive = "t() { cut -d' ' -f1 /proc/uptime; }; nc -l -p 5001 | \
                       { head -c 1 >/dev/null; a=$(t); n=$(wc -c); b=$(t); echo $a $b $n; }";
        let receiver = tokio::spawn({
            let hv = hv.clone();
            let mut req = ExecRequest::new("/bin/sh", ["-c", receive]);
            req.timeout = GUEST_TIMEOUT;
            async move { hv.exec(g.id, &req).await }
        });
        let deadline = Instant::now() + GUEST_TIMEOUT;
        let mut stream = loop {
            match tokio::net::TcpStream::connect((guest_ip, 5001)).await {
                Ok(s) => break s,
                Err(e) => assert!(Instant::now() < deadline, "cannot reach the guest's listener: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        stream.write_all(&vec![0u8; BYTES]).await.unwrap();
        stream.shutdown().await.unwrap();
        drop(stream);
        let r = receiver.await.unwrap().unwrap();
        let out = String::from_utf8_lossy(&r.stdout);
        let f: Vec<f64> = out.split_whitespace().map(|v| v.parse().unwrap()).collect();
        let to_guest = mbit(f[2] as usize, f[1] - f[0]);

        let limit = RATE_BPS as f64 / 1e6;
        eprintln!("NIC limit {limit} Mbit/s: from the guest {from_guest:.2} Mbit/s, to the guest {to_guest:.2} Mbit/s");
        // Shaped: never above the rate (tbf's bucket adds a few KiB); TCP
        // through a shaper gets close to it.
        for (direction, rate) in [("from the guest", from_guest), ("to the guest", to_guest)] {
            assert!(rate <= limit * 1.05, "{direction}: {rate:.2} Mbit/s exceeds the limit of {limit} Mbit/s");
            assert!(rate >= limit * 0.75, "{direction}: {rate:.2} Mbit/s is far below the limit of {limit} Mbit/s");
        }
        hv.destroy(g.id).await.unwrap();
        assert_no_host_leftovers(&lab, g.id, &[&tap]).await;
    }

    /// The guest's CPU use over `window`, as a share of one core, with the
    /// CFS periods in it and how many of them its quota cut short.
    async fn cpu_window(cg: &cgroup::GuestCgroup, window: Duration) -> (f64, u64, u64) {
        let (t0, s0) = (Instant::now(), cg.cpu_stat().unwrap());
        tokio::time::sleep(window).await;
        let (t1, s1) = (Instant::now(), cg.cpu_stat().unwrap());
        let share = (s1.usage - s0.usage).as_secs_f64() / (t1 - t0).as_secs_f64();
        (share, s1.periods - s0.periods, s1.throttled_periods - s0.throttled_periods)
    }

    /// The cap as the cgroup holds it: `cfs_quota_us` (v1) or `cpu.max`'s
    /// quota (v2); "-1" and "max" both mean none.
    fn quota(cg: &cgroup::GuestCgroup) -> String {
        let cpu = cg.controller_dir("cpu").unwrap();
        if cpu.join("cpu.cfs_quota_us").exists() {
            read(cpu.join("cpu.cfs_quota_us"))
        } else {
            read(cpu.join("cpu.max")).split_whitespace().next().unwrap_or_default().to_owned()
        }
    }

    /// A guest started without a cap gets one of 30 % live, measured from
    /// its cgroup's CPU time while it spins, and loses it again.
    #[tokio::test]
    async fn a_cpu_cap_set_on_a_running_guest_holds_it_to_the_cap_and_goes_when_cleared() {
        let lab = Lab::new();
        let hv = lab.hv();
        let g = limited("live-cap-1", &[], ResourceLimits::default());
        hv.create(&g).await.unwrap();
        hv.start(g.id).await.unwrap();
        let pid = status(&hv, g.id).await.pid.unwrap();
        let cg = cgroup_of(g.id);
        assert!(quota(&cg) == "-1" || quota(&cg) == "max", "a cap before any was set: {}", quota(&cg));
        wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
        let mut console = Console::open(&hv, g.id).await;
        console.type_line("while :; do :; done & echo spin-$((6*7))").await;
        wait_for_serial(&hv, g.id, "spin-42", 1).await;
        drop(console);

        let capped = ResourceLimits { cpu_cap_percent: Some(30), ..Default::default() };
        hv.set_limits(g.id, &capped).await.unwrap();
        assert_eq!(quota(&cg), "30000");
        assert_eq!(record_spec(&hv, g.id)["limits"]["cpu_cap_percent"], 30);
        assert_eq!(status(&hv, g.id).await.pid, Some(pid), "no restart");

        // As in the start-time cap test: the cap bounds every window; the
        // lower bound comes from the first window in which the cap was what
        // held the guest back (the host's other load may hold it more).
        const WINDOW: Duration = Duration::from_secs(3);
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut seen = Vec::new();
        loop {
            let (share, periods, throttled) = cpu_window(&cg, WINDOW).await;
            eprintln!(
                "live cap 30%: used {:.1}% of a core; throttled in {throttled} of {periods} periods",
                share * 100.0
            );
            seen.push((share, throttled, periods));
            assert!(share <= 0.40, "the guest used {:.1}% of a core, over its 30% cap (+10)", share * 100.0);
            if throttled > 0 && share >= 0.20 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "in no {WINDOW:?} window did the capped guest get 20% of a core or more: (share, throttled, \
                 periods) = {seen:?}"
            );
        }

        // Cleared: no quota, so no period is cut short, and the spinning
        // guest gets more than the old cap wherever the host lets it.
        hv.set_limits(g.id, &ResourceLimits::default()).await.unwrap();
        assert!(quota(&cg) == "-1" || quota(&cg) == "max", "the cap stayed: {}", quota(&cg));
        assert_eq!(record_spec(&hv, g.id)["limits"]["cpu_cap_percent"], serde_json::Value::Null);
        let mut seen = Vec::new();
        loop {
            let (share, periods, throttled) = cpu_window(&cg, WINDOW).await;
            eprintln!(
                "cap cleared: used {:.1}% of a core; throttled in {throttled} of {periods} periods",
                share * 100.0
            );
            seen.push((share, throttled));
            assert_eq!(throttled, 0, "a period was throttled after the cap was removed: {seen:?}");
            if share >= 0.45 {
                break;
            }
            assert!(Instant::now() < deadline, "the uncapped guest never got 45% of a core: {seen:?}");
        }
        hv.destroy(g.id).await.unwrap();
        assert_no_host_leftovers(&lab, g.id, &[]).await;
    }

    /// The throttle group's limits as QEMU holds them: (bps-total,
    /// iops-total), 0 for none.
    async fn throttle_of(hv: &QemuHypervisor, id: GuestId, disk: usize) -> (u64, u64) {
        let args = serde_json::json!({ "path": format!("/objects/throttle{disk}"), "property": "limits" });
        let limits = hv.qmp_execute(id, "qom-get", Some(args)).await.unwrap();
        let get = |key: &str| limits[key].as_u64().unwrap_or_else(|| panic!("no {key} in {limits}"));
        (get("bps-total"), get("iops-total"))
    }

    /// Bytes per second of direct 64 KiB writes of `mib` MiB to the guest's
    /// disk, timed in the guest.
    async fn write_rate(hv: &QemuHypervisor, id: GuestId, mib: u64) -> f64 {
        let script = format!(
            "t() {{ cut -d' ' -f1 /proc/uptime; }}; a=$(t); \
             dd if=/dev/zero of=/dev/vda bs=65536 count={} oflag=direct 2>/dev/null || exit 1; echo $a $(t)",
            mib * 16
        );
        let t: Vec<f64> = sh(hv, id, &script).await.split_whitespace().map(|v| v.parse().unwrap()).collect();
        (mib << 20) as f64 / (t[1] - t[0])
    }

    /// A guest started without disk limits gets them live, as QEMU's
    /// throttle group shows and the guest's writes feel, and loses them.
    #[tokio::test]
    async fn disk_limits_set_on_a_running_guest_throttle_its_writes_and_go_when_cleared() {
        const BPS: u64 = 2 << 20;
        let lab = Lab::new();
        let hv = lab.hv();
        let g = limited("live-disk-1", &[64], ResourceLimits::default());
        hv.create(&g).await.unwrap();
        hv.start(g.id).await.unwrap();
        wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
        assert_eq!(throttle_of(&hv, g.id, 0).await, (0, 0));
        let free = write_rate(&hv, g.id, 8).await;
        eprintln!("unthrottled: {:.2} MiB/s", free / f64::from(1 << 20));

        hv.set_limits(g.id, &ResourceLimits { disk_bps: Some(BPS), disk_iops: Some(1000), ..Default::default() })
            .await
            .unwrap();
        assert_eq!(throttle_of(&hv, g.id, 0).await, (BPS, 1000));
        // 8 MiB at 2 MiB/s: about 4 s, bound by the byte rate (32 writes/s
        // of the 1000 allowed).
        let bps = write_rate(&hv, g.id, 8).await;
        eprintln!("live disk limit {BPS} B/s: {bps:.0} B/s ({:+.1}%)", (bps / BPS as f64 - 1.0) * 100.0);
        assert!((bps / BPS as f64 - 1.0).abs() <= 0.10, "{bps:.0} B/s is not within 10% of {BPS}");

        // One limit removed, the other kept.
        hv.set_limits(g.id, &ResourceLimits { disk_iops: Some(1000), ..Default::default() }).await.unwrap();
        assert_eq!(throttle_of(&hv, g.id, 0).await, (0, 1000));
        let spec = record_spec(&hv, g.id);
        assert_eq!(
            (spec["limits"]["disk_bps"].clone(), spec["limits"]["disk_iops"].clone()),
            (serde_json::Value::Null, 1000.into())
        );
        let after = write_rate(&hv, g.id, 8).await;
        eprintln!("limit removed: {:.2} MiB/s", after / f64::from(1 << 20));
        assert!(after > BPS as f64 * 1.3 || after > free * 0.7, "{after:.0} B/s: still throttled (free: {free:.0})");
        hv.destroy(g.id).await.unwrap();
        assert_no_host_leftovers(&lab, g.id, &[]).await;
    }

    fn root_tbf(qdiscs: &[tc::Qdisc]) -> Option<(String, Option<u64>)> {
        qdiscs.iter().find(|q| q.root && q.handle == tc::ROOT_HANDLE).map(|q| (q.kind.clone(), q.rate_bytes))
    }

    fn ifindex(dev: &str) -> String {
        read(PathBuf::from(format!("/sys/class/net/{dev}/ifindex")))
    }

    /// A NIC rate set, changed (in place: the same IFB) and removed on a
    /// running guest, on its tap and its IFB.
    #[tokio::test]
    async fn a_nic_rate_set_on_a_running_guest_is_changed_in_place_and_removed() {
        let lab = Lab::new();
        let hv = lab.hv();
        let (g, tap) = with_nic(limited("live-nic-1", &[], ResourceLimits::default()));
        let ifb = tc::ifb_name(g.id, 0);
        hv.create(&g).await.unwrap();
        hv.start(g.id).await.unwrap();
        assert_eq!(root_tbf(&tc::qdiscs(&tap.0).await.unwrap()), None);

        hv.set_limits(g.id, &ResourceLimits { nic_rate_bps: Some(10_000_000), ..Default::default() }).await.unwrap();
        let want = Some(("tbf".to_owned(), Some(10_000_000 / 8)));
        assert_eq!(root_tbf(&tc::qdiscs(&tap.0).await.unwrap()), want);
        assert_eq!(root_tbf(&tc::qdiscs(&ifb).await.unwrap()), want);
        let ifb_index = ifindex(&ifb);

        hv.set_limits(g.id, &ResourceLimits { nic_rate_bps: Some(20_000_000), ..Default::default() }).await.unwrap();
        let on_tap = tc::qdiscs(&tap.0).await.unwrap();
        let want = Some(("tbf".to_owned(), Some(20_000_000 / 8)));
        assert_eq!(root_tbf(&on_tap), want, "{on_tap:?}");
        assert!(on_tap.iter().any(|q| q.kind == "ingress"), "{on_tap:?}");
        assert_eq!(root_tbf(&tc::qdiscs(&ifb).await.unwrap()), want);
        assert_eq!(ifindex(&ifb), ifb_index, "the IFB was made anew instead of changed");

        hv.set_limits(g.id, &ResourceLimits::default()).await.unwrap();
        assert!(tc::guest_ifbs(g.id).unwrap().is_empty());
        let left: Vec<tc::Qdisc> = tc::qdiscs(&tap.0)
            .await
            .unwrap()
            .into_iter()
            .filter(|q| q.handle == tc::ROOT_HANDLE || q.kind == "ingress")
            .collect();
        assert!(left.is_empty(), "{left:?}");
        hv.destroy(g.id).await.unwrap();
        assert_no_host_leftovers(&lab, g.id, &[&tap]).await;
    }

    /// The NIC part fails (the tap has a root qdisc that is not ours, so
    /// ours cannot be added) after the CPU and disk parts were changed:
    /// those go back, the record keeps the old limits, the error names
    /// the NIC.
    #[tokio::test]
    async fn a_limit_change_that_fails_on_one_part_puts_the_others_back() {
        let lab = Lab::new();
        let hv = lab.hv();
        let old = ResourceLimits { cpu_cap_percent: Some(80), disk_bps: Some(4 << 20), ..Default::default() };
        let (g, tap) = with_nic(limited("live-fail-1", &[16], old.clone()));
        hv.create(&g).await.unwrap();
        hv.start(g.id).await.unwrap();
        let pid = status(&hv, g.id).await.pid.unwrap();
        let cg = cgroup_of(g.id);
        let out = std::process::Command::new("tc")
            .args(["qdisc", "add", "dev", &tap.0, "root", "handle", "1:", "pfifo"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let spec = record_spec(&hv, g.id);

        let new = ResourceLimits {
            cpu_cap_percent: Some(30),
            disk_bps: Some(1 << 20),
            nic_rate_bps: Some(10_000_000),
            ..Default::default()
        };
        let err = hv.set_limits(g.id, &new).await.unwrap_err();
        let chain = error_chain(&err);
        eprintln!("set_limits failed as expected: {chain}");
        assert!(matches!(err, HvError::Backend { op: "set_limits", .. }), "{err:?}");
        assert!(chain.contains(&format!("the rate of NIC 0 on tap {}", tap.0)), "{chain}");
        assert_eq!(quota(&cg), "80000", "the CPU cap was not put back");
        assert_eq!(throttle_of(&hv, g.id, 0).await, (4 << 20, 0), "the disk limit was not put back");
        assert_eq!(record_spec(&hv, g.id), spec);
        assert!(tc::guest_ifbs(g.id).unwrap().is_empty(), "a half-made NIC limit remains");
        assert_eq!(
            status(&hv, g.id).await,
            GuestStatus { id: g.id, state: RuntimeState::Running, generation: 1, pid: Some(pid) }
        );
        hv.destroy(g.id).await.unwrap();
        assert_no_qemu_for(&lab, g.id);
    }

    fn all_limits() -> ResourceLimits {
        ResourceLimits {
            cpu_cap_percent: Some(80),
            cpu_shares: Some(512),
            cpu_pin: vec![0],
            disk_bps: Some(8 * 1024 * 1024),
            disk_iops: Some(500),
            nic_rate_bps: Some(20_000_000),
        }
    }

    fn with_nic(mut g: GuestConfig) -> (GuestConfig, Tap) {
        g.spec.nics = vec![NicSpec::new(VlanTag::new(10).unwrap(), "52:54:00:12:35:02")];
        let tap = Tap::create(&QemuHypervisor::tap_name(g.id, 0));
        (g, tap)
    }

    #[tokio::test]
    async fn limits_are_released_after_stop_readoption_and_destroy() {
        let lab = Lab::new();
        let (g, tap) = with_nic(limited("leftover-1", &[16], all_limits()));
        let hv = lab.hv();
        hv.create(&g).await.unwrap();
        hv.start(g.id).await.unwrap();
        let pid = status(&hv, g.id).await.pid.unwrap();
        let cg = cgroup_of(g.id);
        assert!(cg.dirs().iter().all(|d| d.is_dir()), "{:?}", cg.dirs());
        assert!(cg.pids().unwrap().contains(&pid));
        assert_eq!(tc::guest_ifbs(g.id).unwrap().len(), 1);

        hv.stop(g.id, StopMode::Force).await.unwrap();
        assert_no_host_leftovers(&lab, g.id, &[&tap]).await;

        // The cgroup lives with the QEMU, not with the agent: a new
        // backend instance finds it and releases it when it ends the guest.
        hv.start(g.id).await.unwrap();
        let pid = status(&hv, g.id).await.pid.unwrap();
        drop(hv);
        let hv = lab.hv();
        assert_eq!(status(&hv, g.id).await.pid, Some(pid));
        assert!(cg.pids().unwrap().contains(&pid));
        hv.destroy(g.id).await.unwrap();
        assert_no_host_leftovers(&lab, g.id, &[&tap]).await;

        // A QEMU that dies on its own leaves its cgroup until the guest is
        // next looked at.
        hv.create(&g).await.unwrap();
        hv.start(g.id).await.unwrap();
        let pid = status(&hv, g.id).await.pid.unwrap();
        sigkill(pid);
        while alive(pid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status(&hv, g.id).await.state, RuntimeState::Crashed);
        assert_no_host_leftovers(&lab, g.id, &[&tap]).await;
        hv.destroy(g.id).await.unwrap();
    }

    #[tokio::test]
    async fn failed_starts_leave_no_cgroup_qdisc_or_qemu() {
        let lab = Lab::new();
        let hv = lab.hv();
        // QEMU fails (its disk is gone) after the limits were set up.
        let (g, tap) = with_nic(limited("fail-qemu-1", &[16], all_limits()));
        hv.create(&g).await.unwrap();
        std::fs::remove_file(hv.guest_dir(g.id).join("disk0.qcow2")).unwrap();
        let err = hv.start(g.id).await.unwrap_err();
        let chain = error_chain(&err);
        eprintln!("start failed as expected: {chain}");
        // QEMU's own words (from its log: with -D they go there).
        assert!(chain.contains("disk0.qcow2") && chain.contains("Could not open"), "{chain}");
        assert_eq!(status(&hv, g.id).await.state, RuntimeState::Stopped);
        assert_no_host_leftovers(&lab, g.id, &[&tap]).await;

        // A limit the host cannot apply (a core it does not have) fails
        // the start before QEMU runs, naming the core and the file.
        let mut limits = all_limits();
        limits.cpu_pin = vec![4095];
        let (g, tap) = with_nic(limited("fail-pin-1", &[16], limits));
        hv.create(&g).await.unwrap();
        let err = hv.start(g.id).await.unwrap_err();
        let chain = error_chain(&err);
        eprintln!("start failed as expected: {chain}");
        assert!(chain.contains("host cores 4095") && chain.contains("cpuset.cpus"), "{chain}");
        assert_eq!(status(&hv, g.id).await.state, RuntimeState::Stopped);
        assert!(!serial_log(&hv, g.id).contains("DROVE-READY"));
        assert_no_host_leftovers(&lab, g.id, &[&tap]).await;
        hv.destroy(g.id).await.unwrap();
    }
}

// --- snapshots -------------------------------------------------------------------

/// Runs `script` with `sh -c` in the guest, waiting for its agent as long
/// as a boot takes; its stdout, trimmed. The command must succeed.
async fn sh(hv: &QemuHypervisor, id: GuestId, script: &str) -> String {
    let mut req = ExecRequest::new("sh", ["-c", script]);
    req.timeout = GUEST_TIMEOUT;
    let r = hv.exec(id, &req).await.unwrap_or_else(|e| panic!("{script:?}: {}", error_chain(&e)));
    assert_eq!(r.exit_code, 0, "{script:?}: {}", String::from_utf8_lossy(&r.stderr));
    String::from_utf8_lossy(&r.stdout).trim().to_owned()
}

/// The first 512-byte sector of the guest's disk as text, written raw
/// (no file system in the test image): straight to the device and synced.
const WRITE_MARKER: &str = "printf '%-511s\\n' \"$0\" | dd of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null && sync";
const READ_MARKER: &str = "dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d ' '";

async fn write_marker(hv: &QemuHypervisor, id: GuestId, marker: &str) {
    let mut req = ExecRequest::new("sh", ["-c", WRITE_MARKER, marker]);
    req.timeout = GUEST_TIMEOUT;
    let r = hv.exec(id, &req).await.unwrap();
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(sh(hv, id, READ_MARKER).await, marker);
}

fn qemu_img_snapshots(path: &Path) -> String {
    let out = std::process::Command::new("qemu-img").args(["snapshot", "-l", "-U"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn disk_snapshot_of_a_running_guest_rolls_its_disk_back_and_memory_snapshot_resumes_it_where_it_was() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("snap-1", &[16, 8]);
    booted(&hv, &g).await;

    // Disk-only: taken while the guest runs, without pausing it.
    write_marker(&hv, g.id, "marker-before").await;
    let pid = status(&hv, g.id).await.pid;
    hv.take_events(g.id).await;
    let t0 = Instant::now();
    let info = hv.snapshot_create(g.id, "before", SnapshotKind::Disk).await.unwrap();
    eprintln!("disk-only snapshot of a running guest took {:?}", t0.elapsed());
    assert_eq!((info.name.as_str(), info.kind), ("before", SnapshotKind::Disk));
    let events: Vec<String> = hv.take_events(g.id).await.into_iter().map(|e| e.event).collect();
    assert!(!events.iter().any(|e| e == "STOP"), "a disk-only snapshot stopped the guest: {events:?}");
    assert_eq!(status(&hv, g.id).await.pid, pid, "same incarnation");
    // Both disks carry it.
    for i in 0..2 {
        let listing = qemu_img_snapshots(&hv.guest_dir(g.id).join(format!("disk{i}.qcow2")));
        assert!(listing.contains("before"), "disk{i}: {listing}");
    }

    write_marker(&hv, g.id, "marker-after").await;
    let outcome = hv.snapshot_restore(g.id, "before").await.unwrap();
    assert_eq!(outcome, RestoreOutcome::Restarted);
    assert_eq!(status(&hv, g.id).await.state, RuntimeState::Running);
    assert_ne!(status(&hv, g.id).await.pid, pid, "a disk restore boots a new incarnation");
    assert_eq!(sh(&hv, g.id, READ_MARKER).await, "marker-before", "the disk is back as it was");

    // With memory: a file in the guest's RAM (its root is an initramfs)
    // and its processes come back exactly as they were: one started before
    // the snapshot runs again, one started after it never was. (Its clock
    // does not go back: under TCG the guest's clocksource follows the host.)
    sh(&hv, g.id, "echo ram-before > /ram-marker").await;
    let spawn = "sleep $0 </dev/null >/dev/null 2>&1 & echo $!";
    let mut req = ExecRequest::new("sh", ["-c", spawn, "1001"]);
    req.timeout = GUEST_TIMEOUT;
    let before_pid = String::from_utf8_lossy(&hv.exec(g.id, &req).await.unwrap().stdout).trim().to_owned();
    let pid = status(&hv, g.id).await.pid;
    let t0 = Instant::now();
    let info = hv.snapshot_create(g.id, "with-ram", SnapshotKind::Memory).await.unwrap();
    eprintln!("memory snapshot of a running guest took {:?} ({} of VM state)", t0.elapsed(), info.vm_state_size);
    assert_eq!(info.kind, SnapshotKind::Memory);
    assert!(info.vm_state_size.bytes() > 0, "{info:?}");
    sh(&hv, g.id, "echo ram-after > /ram-marker").await;
    sh(&hv, g.id, &format!("kill {before_pid}")).await;
    req.args[2] = "1002".to_owned();
    let after_pid = String::from_utf8_lossy(&hv.exec(g.id, &req).await.unwrap().stdout).trim().to_owned();
    write_marker(&hv, g.id, "marker-later").await;
    let cmdline = |p: &str| format!("cat /proc/{p}/cmdline 2>/dev/null | tr '\\0' ' '; true");
    assert_eq!(sh(&hv, g.id, &cmdline(&before_pid)).await, "", "killed before the restore");

    let t0 = Instant::now();
    assert_eq!(hv.snapshot_restore(g.id, "with-ram").await.unwrap(), RestoreOutcome::Live);
    eprintln!("live restore of a memory snapshot took {:?}", t0.elapsed());
    assert_eq!(status(&hv, g.id).await.pid, pid, "a live restore keeps the QEMU process");
    assert_eq!(sh(&hv, g.id, "cat /ram-marker").await, "ram-before");
    assert_eq!(sh(&hv, g.id, &cmdline(&before_pid)).await, "sleep 1001", "the process of before the snapshot runs");
    // (Its pid may be taken again: the guest's pid counter went back too.)
    let now = sh(&hv, g.id, &cmdline(&after_pid)).await;
    assert_ne!(now, "sleep 1002", "the process of after the snapshot is gone");
    // The disk went back with the memory.
    assert_eq!(sh(&hv, g.id, READ_MARKER).await, "marker-before");

    let names: Vec<(String, SnapshotKind)> =
        hv.snapshot_list(g.id).await.unwrap().into_iter().map(|s| (s.name, s.kind)).collect();
    assert_eq!(names, [("before".into(), SnapshotKind::Disk), ("with-ram".into(), SnapshotKind::Memory)]);

    // Stopped: the disks roll back offline, and the guest stays stopped.
    hv.stop(g.id, StopMode::Force).await.unwrap();
    hv.snapshot_delete(g.id, "with-ram").await.unwrap();
    assert_eq!(hv.snapshot_restore(g.id, "before").await.unwrap(), RestoreOutcome::DisksOnly);
    assert_eq!(status(&hv, g.id).await.state, RuntimeState::Stopped);
    let names: Vec<String> = hv.snapshot_list(g.id).await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["before"]);
    hv.destroy(g.id).await.unwrap();
    assert_no_qemu_for(&lab, g.id);
}

#[tokio::test]
async fn a_partial_snapshot_left_by_a_crash_is_not_listed_and_is_cleaned_by_create_and_delete() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = guest("snap-2", &[16, 16]);
    hv.create(&g).await.unwrap();
    // As if a qemu-img sequence died after the first disk.
    let disk0 = hv.guest_dir(g.id).join("disk0.qcow2");
    let out = std::process::Command::new("qemu-img").args(["snapshot", "-c", "half"]).arg(&disk0).output().unwrap();
    assert!(out.status.success());
    assert!(hv.snapshot_list(g.id).await.unwrap().is_empty(), "a snapshot on one disk of two is not a snapshot");
    let err = hv.snapshot_restore(g.id, "half").await.unwrap_err();
    assert!(matches!(err, HvError::SnapshotNotFound { .. }), "{err:?}");
    hv.snapshot_delete(g.id, "half").await.unwrap();
    assert!(!qemu_img_snapshots(&disk0).contains("half"), "delete removes the part");

    std::process::Command::new("qemu-img").args(["snapshot", "-c", "half"]).arg(&disk0).output().unwrap();
    hv.snapshot_create(g.id, "half", SnapshotKind::Disk).await.unwrap();
    assert_eq!(hv.snapshot_list(g.id).await.unwrap().len(), 1);
    assert_eq!(qemu_img_snapshots(&disk0).matches("half").count(), 1, "one snapshot, not the part and another");
    hv.destroy(g.id).await.unwrap();
}

/// A memory snapshot cut by QEMU's death midway (power loss, the OOM
/// killer) is no snapshot: the guest is crashed, not listed with it, boots
/// again, its disks' tables are sound, and the name can be taken again.
#[tokio::test]
async fn a_memory_snapshot_cut_by_qemus_death_is_not_listed_and_its_name_is_free() {
    let lab = Lab::new();
    let hv = std::sync::Arc::new(lab.hv());
    let mut g = guest("snap-cut", &[16, 16]);
    g.spec.memory = ByteSize::mib(384);
    let pid = booted(&hv, &g).await;
    // RAM that is not zeros, so the save has much to write.
    sh(&hv, g.id, "dd if=/dev/zero bs=1M count=200 2>/dev/null | tr '\\000' x > /tmp/fill; echo ok").await;
    let disk0 = hv.guest_dir(g.id).join("disk0.qcow2");
    let before = std::fs::metadata(&disk0).unwrap().len();

    let save = tokio::spawn({
        let (hv, id) = (hv.clone(), g.id);
        async move { hv.snapshot_create(id, "warm", SnapshotKind::Memory).await }
    });
    // Killed once the memory state is a good way in (it goes into disk 0).
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while std::fs::metadata(&disk0).unwrap().len() < before + (32 << 20) {
        assert!(!save.is_finished(), "the save ended before it could be cut: {:?}", save.await);
        assert!(Instant::now() < deadline, "the save never wrote its memory state");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sigkill(pid);
    let cut = save.await.unwrap();
    assert!(cut.is_err(), "a save whose QEMU died is not a snapshot: {cut:?}");
    while alive(pid) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(hv.as_ref(), g.id).await.state, RuntimeState::Crashed);
    assert!(hv.snapshot_list(g.id).await.unwrap().is_empty(), "not listed");
    for disk in ["disk0.qcow2", "disk1.qcow2"] {
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(hv.guest_dir(g.id).join(disk))
            .status()
            .unwrap();
        // 0: clean; 3: leaked clusters only, which cost space, not data.
        assert!(matches!(check.code(), Some(0 | 3)), "{disk}: qemu-img check gave {check:?}");
    }

    hv.start(g.id).await.unwrap();
    wait_for_serial(&hv, g.id, "DROVE-READY", 2).await;
    hv.snapshot_create(g.id, "warm", SnapshotKind::Memory).await.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let names: Vec<String> = hv.snapshot_list(g.id).await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["warm"]);
    hv.destroy(g.id).await.unwrap();
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
    async fn reset(&self, id: GuestId) -> Result<(), HvError> {
        self.hv.reset(id).await
    }
    async fn destroy(&self, id: GuestId) -> Result<(), HvError> {
        self.hv.destroy(id).await
    }
    async fn forget(&self, id: GuestId) -> Result<(), HvError> {
        self.hv.forget(id).await
    }
    async fn status(&self, id: GuestId) -> Result<GuestStatus, HvError> {
        self.hv.status(id).await
    }
    async fn list(&self) -> Result<Vec<GuestStatus>, HvError> {
        self.hv.list().await
    }
    async fn exec(&self, id: GuestId, req: &ExecRequest) -> Result<ExecResult, HvError> {
        self.hv.exec(id, req).await
    }
    async fn guest_interfaces(&self, id: GuestId) -> Result<Vec<GuestInterface>, HvError> {
        self.hv.guest_interfaces(id).await
    }
    async fn usage(&self, id: GuestId) -> Result<drove_hypervisor::GuestUsage, HvError> {
        self.hv.usage(id).await
    }
    async fn snapshot_create(&self, id: GuestId, name: &str, kind: SnapshotKind) -> Result<SnapshotInfo, HvError> {
        self.hv.snapshot_create(id, name, kind).await
    }
    async fn snapshot_list(&self, id: GuestId) -> Result<Vec<SnapshotInfo>, HvError> {
        self.hv.snapshot_list(id).await
    }
    async fn snapshot_delete(&self, id: GuestId, name: &str) -> Result<(), HvError> {
        self.hv.snapshot_delete(id, name).await
    }
    async fn snapshot_restore(&self, id: GuestId, name: &str) -> Result<RestoreOutcome, HvError> {
        self.hv.snapshot_restore(id, name).await
    }
    async fn set_limits(&self, id: GuestId, limits: &drove_model::ResourceLimits) -> Result<(), HvError> {
        self.hv.set_limits(id, limits).await
    }
    async fn definition(&self, id: GuestId) -> Result<GuestConfig, HvError> {
        self.hv.definition(id).await
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

// --- users' images (BIOS boot of a base qcow2) ------------------------------------

/// The bootable test disk `scripts/build-image.sh` makes beside the kernel.
fn test_disk_image() -> PathBuf {
    image_dir().join("disk.qcow2")
}

/// What must not change about a base image: its bytes, size and mtime.
fn fingerprint(path: &Path) -> (Vec<u8>, u64, std::time::SystemTime) {
    let meta = std::fs::metadata(path).unwrap();
    (std::fs::read(path).unwrap(), meta.len(), meta.modified().unwrap())
}

#[tokio::test]
async fn image_guest_boots_its_own_qcow2_through_the_bios_and_leaves_the_base_alone() {
    let lab = Lab::new();
    let hv = lab.hv();
    let base = test_disk_image();
    let before = fingerprint(&base);
    // No disks in the spec: disk 0 is made anyway, as the boot disk.
    let mut g = guest("image-1", &[]);
    g.spec.image = Some(base.to_string_lossy().into_owned());
    // Its identity cannot go on a kernel command line: it comes from the
    // config drive (the disk's own boot line says drove.name=drove-disk).
    g.spec.nics = vec![NicSpec {
        address: Some(NicAddress { ip: "10.251.0.7".parse().unwrap(), prefix: 24, gateway: None }),
        ..NicSpec::new(VlanTag::new(10).unwrap(), "52:54:00:12:34:77")
    }];
    let _tap = Tap::create(&QemuHypervisor::tap_name(g.id, 0));
    hv.create(&g).await.unwrap();
    let disk0 = hv.guest_dir(g.id).join("disk0.qcow2");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "--force-share"])
        .arg(&disk0)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["backing-filename"].as_str(), Some(&*base.to_string_lossy()), "{info}");

    hv.start(g.id).await.unwrap();
    let pid = status(&hv, g.id).await.pid.unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    for direct in ["-kernel", "-initrd", "-append"] {
        assert!(!args.iter().any(|a| a == direct), "{direct} on a BIOS-booted guest's command line: {args:?}");
    }
    assert!(args.iter().any(|a| a.contains("disk0.qcow2")), "{args:?}");
    let log = wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    assert!(log.contains("drove: disk vda"), "{log}");
    assert!(log.contains("drove: config drive vdb read"), "{log}");
    assert!(log.contains("drove: ip eth0 10.251.0.7/24"), "{log}");
    let out = exec(&hv, g.id, "hostname", &[]).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "image-1", "the config drive's name wins");

    // The drive is the same bytes when written again (each start, and the
    // target of a migration, writes its own while the guest may have it
    // mounted).
    let drive = hv.guest_dir(g.id).join("config-drive.img");
    let first = std::fs::read(&drive).unwrap();
    hv.stop(g.id, StopMode::Force).await.unwrap();
    hv.start(g.id).await.unwrap();
    assert!(std::fs::read(&drive).unwrap() == first, "the config drive changed between two starts");

    hv.stop(g.id, StopMode::Force).await.unwrap();
    hv.destroy(g.id).await.unwrap();
    assert_no_qemu_for(&lab, g.id);
    assert!(fingerprint(&base) == before, "the base image {} changed", base.display());
}

#[tokio::test]
async fn image_first_disk_larger_than_the_base_grows_the_overlay() {
    let lab = Lab::new();
    let hv = lab.hv();
    let mut g = guest("image-2", &[256, 16]);
    g.spec.image = Some(test_disk_image().to_string_lossy().into_owned());
    hv.create(&g).await.unwrap();
    let size = |i: usize| {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(hv.guest_dir(g.id).join(format!("disk{i}.qcow2")))
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (info["virtual-size"].as_u64().unwrap(), info.get("backing-filename").is_some())
    };
    assert_eq!(size(0), (ByteSize::mib(256).bytes(), true));
    assert_eq!(size(1), (ByteSize::mib(16).bytes(), false));
    hv.destroy(g.id).await.unwrap();
}

#[tokio::test]
async fn image_missing_or_non_qcow2_bases_are_refused_at_create_leaving_nothing() {
    let lab = Lab::new();
    let hv = lab.hv();
    let garbage = lab.state_dir().join("garbage.img");
    std::fs::write(&garbage, b"this is not a disk image\n".repeat(4096)).unwrap();
    let missing = lab.state_dir().join("no-such-image.qcow2");
    let cases = [
        (missing.to_string_lossy().into_owned(), "does not exist"),
        (garbage.to_string_lossy().into_owned(), "unknown format"),
        ("relative/disk.qcow2".to_owned(), "not absolute"),
    ];
    for (path, reason) in cases {
        let mut g = guest("image-bad", &[16]);
        g.spec.image = Some(path.clone());
        let err = hv.create(&g).await.unwrap_err();
        let text = error_chain(&err);
        assert!(text.contains(&path) && text.contains(reason), "{path}: {text}");
        assert!(!hv.guest_dir(g.id).exists(), "{path}: a guest directory was left behind");
        assert!(matches!(hv.status(g.id).await, Err(HvError::NotFound { .. })), "{path}");
    }
    assert!(hv.list().await.unwrap().is_empty());
}

// --- live migration --------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn migration_key() -> drove_hypervisor::migration::MigrationKey {
    drove_hypervisor::migration::MigrationKey { identity: "drove-test".into(), key_hex: "0123456789abcdef".repeat(4) }
}

/// A migration over loopback with mirrored disks, on fresh ports: what the
/// target listens for and what the source sends (50 ms pause allowed, no
/// bandwidth cap).
fn loopback_migration(
    key: Option<drove_hypervisor::migration::MigrationKey>,
) -> (drove_hypervisor::migration::Incoming, drove_hypervisor::migration::Outgoing) {
    use drove_hypervisor::migration::{DiskTransfer, Incoming, Outgoing};
    let (port, nbd_port) = (free_port(), free_port());
    let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let incoming = Incoming { listen: lo, port, nbd_port, disks: DiskTransfer::Mirror, key: key.clone() };
    let outgoing = Outgoing {
        target: lo,
        port,
        nbd_port,
        disks: DiskTransfer::Mirror,
        key,
        downtime_limit_ms: 50,
        max_bandwidth: 0,
    };
    (incoming, outgoing)
}

/// Two "hosts" (two backends over separate state directories) on loopback.
fn two_hosts(lab: &Lab) -> (QemuHypervisor, QemuHypervisor) {
    let mk = |name: &str| {
        let mut c = QemuConfig::new(lab.state_dir().join(name), image_dir()).unwrap();
        c.accel = Accel::Tcg;
        c.cgroup_scope = Some(format!("test-{name}"));
        QemuHypervisor::new(c).unwrap()
    };
    (mk("a"), mk("b"))
}

/// A running guest moves to another host with its disk mirrored over an
/// encrypted NBD link and its RAM over an encrypted stream: a process in it
/// keeps counting, its disk content arrives, the source is left paused and
/// then removed, and exactly one QEMU remains.
#[tokio::test]
async fn a_running_guest_migrates_with_its_disk_and_keeps_running() {
    use drove_hypervisor::migration::TransferPhase;
    let lab = Lab::new();
    let (a, b) = two_hosts(&lab);
    let g = guest("mig-1", &[64]);
    a.create(&g).await.unwrap();
    a.start(g.id).await.unwrap();
    wait_for_serial(&a, g.id, "DROVE-READY", 1).await;
    write_marker(&a, g.id, "marker-before-migration").await;
    sh(
        &a,
        g.id,
        "(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; usleep 20000; done) >/dev/null 2>&1 & \
         echo $! > /tmp/counter.pid",
    )
    .await;
    // The test image's console ticker: the guest's own account of its
    // pause.
    sh(&a, g.id, "drove-guest-agent tick 2 >/dev/ttyS0 2>&1 </dev/null & echo ok").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before: u64 = sh(&a, g.id, "cat /tmp/count").await.parse().unwrap();
    let counter_pid = sh(&a, g.id, "cat /tmp/counter.pid").await;
    assert!(counter_pid.parse::<u32>().is_ok(), "{counter_pid:?}");

    let source_qemu = pids_mentioning(lab.state_dir());
    assert_eq!(source_qemu.len(), 1, "{source_qemu:?}");
    // A booted guest's QEMU keeps huge pages as it inherits them (the
    // kernel may lack them, or a parent of this test may have turned them
    // off).
    let inherited = thp_enabled(std::process::id());
    assert_eq!(thp_enabled(source_qemu[0]), inherited, "a booted guest keeps huge pages");
    let (incoming, out) = loopback_migration(Some(migration_key()));
    b.migrate_incoming(&g, &incoming).await.unwrap();
    assert_eq!(status(&b, g.id).await.state, RuntimeState::Paused, "the target waits, not runs");
    let phases = std::sync::Mutex::new(Vec::new());
    let stats = a
        .migrate_out(g.id, &out, &|p| phases.lock().unwrap().push(p.phase))
        .await
        .unwrap_or_else(|e| panic!("migration failed: {}", error_chain(&e)));
    let done = b.migrate_finish(g.id, Duration::from_secs(30), stats.console_last_us.is_some()).await.unwrap();
    let phases = phases.into_inner().unwrap();
    assert!(phases.contains(&TransferPhase::Disks) && phases.last() == Some(&TransferPhase::Done), "{phases:?}");
    let (stop, resume) = match (stats.stopped_at_us, done.resumed_at_us) {
        (Some(stop), Some(resume)) => (stop, resume),
        other => panic!("no STOP/RESUME timestamps: {other:?}"),
    };
    let gap_ms = (resume.saturating_sub(stop)) as f64 / 1000.0;
    eprintln!("migration: {stats:?} {done:?}; paused {gap_ms:.1} ms from STOP on the source to RESUME on the target");
    // The ticker's silence spans the pause: its last line came before the
    // source stopped, its first on the target after the resume.
    let (Some(last), Some(first)) = (stats.console_last_us, done.console_first_us) else {
        panic!("the ticking console was not measured: {stats:?} {done:?}");
    };
    assert!(last <= stop && first > resume, "last {last} <= stop {stop}, first {first} > resume {resume}");
    let interval = stats.console_interval_us.expect("the ticker's interval");
    assert!((1_000..100_000).contains(&interval), "the ticker wrote every {interval} µs");
    assert!(first - last < 5_000_000, "the console was silent for {} ms", (first - last) / 1000);
    // While the disk and memory were copied the guest ran on, writing: its
    // longest silence then is known, at least one interval, well under the
    // copy's whole time.
    let copy_gap = stats.console_copy_gap_us.expect("the silence while copied");
    assert!(copy_gap >= interval / 2 && copy_gap < stats.total_ms * 1000, "{copy_gap} µs");
    assert_eq!(status(&b, g.id).await.state, RuntimeState::Running);
    assert_eq!(status(&a, g.id).await.state, RuntimeState::Paused, "the source stays paused");
    a.destroy(g.id).await.unwrap();

    // The same guest, on the other host: its process kept counting, its
    // disk holds what was written before.
    assert_eq!(sh(&b, g.id, READ_MARKER).await, "marker-before-migration");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after: u64 = sh(&b, g.id, "cat /tmp/count").await.parse().unwrap();
    assert!(after > before, "the counter kept running: {before} -> {after}");
    let alive = format!("kill -0 {counter_pid} && echo alive");
    assert_eq!(sh(&b, g.id, &alive).await, "alive", "the same process runs on");
    let qemus = pids_mentioning(lab.state_dir());
    assert_eq!(qemus.len(), 1, "exactly one QEMU for the guest: {qemus:?}");
    // The TCG target runs without huge pages (they made its pause long).
    assert_eq!(thp_enabled(qemus[0]), Some(false), "the target QEMU {}", qemus[0]);
    b.destroy(g.id).await.unwrap();
    let left = pids_mentioning(lab.state_dir());
    assert!(left.is_empty(), "QEMUs left after destroy: {left:?}");
}

/// The `THP_enabled` of process `pid`'s status: whether its memory may get
/// transparent huge pages.
fn thp_enabled(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("THP_enabled:")).map(|v| v.trim() == "1")
}

/// A guest that got hardware while running (a vCPU, memory, a disk)
/// migrates with it: the target is built from the record the source keeps,
/// and the guest on the target still sees all of it.
#[tokio::test]
async fn a_guest_with_hot_added_hardware_migrates_with_it() {
    use drove_hypervisor::migration::Outgoing;
    let lab = Lab::new();
    let (a, b) = two_hosts(&lab);
    let g = guest("mig-hot", &[16]);
    a.create(&g).await.unwrap();
    a.start(g.id).await.unwrap();
    wait_for_serial(&a, g.id, "DROVE-READY", 1).await;
    a.hotplug(g.id, &Hotplug::SetVcpus { vcpus: 2 }).await.unwrap();
    a.hotplug(g.id, &Hotplug::SetMemory { memory: ByteSize::mib(384) }).await.unwrap();
    a.hotplug(g.id, &Hotplug::AddDisk { size: ByteSize::mib(32) }).await.unwrap();
    let online = "test -e /sys/devices/system/cpu/cpu1/online && echo 1 > /sys/devices/system/cpu/cpu1/online; \
                  for s in /sys/devices/system/memory/memory*/state; do grep -q offline $s && echo online > $s; done; \
                  echo $(nproc) $(cat /sys/block/vdb/size)";
    wait_for_guest_output(&a, g.id, online, "2 65536").await;
    let mem_before = guest_mem_total_kib(&a, g.id).await;

    // The manager builds the target from the guest's stored spec, which
    // the hotplugs updated like the source's record.
    let mut moved = g.clone();
    moved.spec = serde_json::from_value(record_spec(&a, g.id)).unwrap();
    assert_eq!((moved.spec.vcpus, moved.spec.memory, moved.spec.disks.len()), (2, ByteSize::mib(384), 2));
    let (incoming, out) = loopback_migration(Some(migration_key()));
    b.migrate_incoming(&moved, &incoming).await.unwrap();
    let out = Outgoing { downtime_limit_ms: 300, ..out };
    a.migrate_out(g.id, &out, &|_| {}).await.unwrap_or_else(|e| panic!("migration failed: {}", error_chain(&e)));
    b.migrate_finish(g.id, Duration::from_secs(30), false).await.unwrap();
    a.destroy(g.id).await.unwrap();
    assert_eq!(sh(&b, g.id, "echo $(nproc) $(cat /sys/block/vdb/size)").await, "2 65536");
    assert_eq!(guest_mem_total_kib(&b, g.id).await, mem_before);
    b.destroy(g.id).await.unwrap();
    assert!(pids_mentioning(lab.state_dir()).is_empty());
}

/// A cancelled migration leaves the guest running on its source, its disk
/// untouched; the half-made target is destroyed.
#[tokio::test]
async fn a_cancelled_migration_leaves_the_guest_running_on_its_source() {
    use drove_hypervisor::migration::Outgoing;
    let lab = Lab::new();
    let (a, b) = two_hosts(&lab);
    let g = guest("mig-cancel", &[256]);
    a.create(&g).await.unwrap();
    a.start(g.id).await.unwrap();
    wait_for_serial(&a, g.id, "DROVE-READY", 1).await;
    write_marker(&a, g.id, "stays-here").await;
    let (incoming, out) = loopback_migration(None);
    b.migrate_incoming(&g, &incoming).await.unwrap();
    // Slow enough to be caught in the middle: 1 MiB/s for 256 MiB of RAM.
    let out = Outgoing { max_bandwidth: 1 << 20, ..out };
    let a = std::sync::Arc::new(a);
    let migrating = {
        let a = a.clone();
        let out = out.clone();
        tokio::spawn(async move { a.migrate_out(g.id, &out, &|_| {}).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.migrate_cancel(g.id).await.unwrap();
    let result = migrating.await.unwrap();
    assert!(result.is_err(), "a cancelled migration reports failure: {result:?}");
    b.destroy(g.id).await.unwrap();
    assert_eq!(status(&*a, g.id).await.state, RuntimeState::Running);
    assert_eq!(sh(&a, g.id, READ_MARKER).await, "stays-here");
    // Cancelling again (nothing in flight) is harmless.
    a.migrate_cancel(g.id).await.unwrap();
    assert_eq!(status(&*a, g.id).await.state, RuntimeState::Running);
    a.destroy(g.id).await.unwrap();
}

// --- clones -------------------------------------------------------------------------

/// `qemu-io` on a disk file (read-only, shared: its guest may run).
fn qemu_io(disk: &Path, cmd: &str) -> String {
    let out = std::process::Command::new("qemu-io").args(["-U", "-r", "-c", cmd]).arg(disk).output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Whether the first 64 KiB of `disk` hold byte `pattern`.
fn holds(disk: &Path, pattern: u8) -> bool {
    let out = qemu_io(disk, &format!("read -P {pattern:#x} 0 64k"));
    out.contains("read 65536/65536") && !out.contains("Pattern verification failed")
}

fn qemu_img_info(disk: &Path) -> serde_json::Value {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "--force-share"])
        .arg(disk)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn clones_hold_the_sources_data_from_one_instant_a_snapshot_or_a_template() {
    use drove_model::{CloneMode, CloneSource};
    let lab = Lab::new();
    let hv = lab.hv();
    let src = guest("clone-src", &[16]);
    hv.create(&src).await.unwrap();
    let disk = |id: GuestId| hv.guest_dir(id).join("disk0.qcow2");
    let write = |pattern: u8| {
        let out = std::process::Command::new("qemu-io")
            .args(["-c", &format!("write -P {pattern:#x} 0 64k")])
            .arg(disk(src.id))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    write(0xa1);
    hv.snapshot_create(src.id, "first", SnapshotKind::Disk).await.unwrap();
    write(0xa2);
    let clone = |n: &str, snapshot: Option<&str>, mode| {
        let mut c = guest(n, &[16]);
        c.spec.clone_of =
            Some(CloneSource { guest: src.id, snapshot: snapshot.map(Into::into), mode, shared_disks: None });
        c
    };

    // From the running source: its present data, and it keeps running.
    hv.start(src.id).await.unwrap();
    let pid = hv.status(src.id).await.unwrap().pid;
    let now = clone("clone-now", None, CloneMode::Copy);
    let t0 = Instant::now();
    hv.create(&now).await.unwrap();
    eprintln!("copy of a running 16 MiB disk: {:?}", t0.elapsed());
    assert!(holds(&disk(now.id), 0xa2), "{}", qemu_io(&disk(now.id), "read -v 0 16"));
    let at = clone("clone-at", Some("first"), CloneMode::Copy);
    hv.create(&at).await.unwrap();
    assert!(holds(&disk(at.id), 0xa1), "{}", qemu_io(&disk(at.id), "read -v 0 16"));
    let s = hv.status(src.id).await.unwrap();
    assert_eq!((s.state, s.pid), (RuntimeState::Running, pid));
    // No transient snapshot is left in the source, none is carried over.
    let names: Vec<String> = qemu_img_info(&disk(src.id))["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["first"]);
    assert!(qemu_img_info(&disk(now.id)).get("snapshots").is_none());
    // The copies are the clones' own: they run beside the source.
    hv.start(now.id).await.unwrap();
    hv.start(at.id).await.unwrap();

    // A template (a source that does not run) gets thin overlays.
    hv.stop(src.id, StopMode::Force).await.unwrap();
    let thin = clone("clone-thin", None, CloneMode::Overlay);
    let t0 = Instant::now();
    hv.create(&thin).await.unwrap();
    eprintln!("overlay clone: {:?}", t0.elapsed());
    let info = qemu_img_info(&disk(thin.id));
    assert_eq!(info["backing-filename"].as_str().map(PathBuf::from), Some(disk(src.id)), "{info}");
    assert!(holds(&disk(thin.id), 0xa2));
    hv.start(thin.id).await.unwrap();
    // Its base is open read-only under a running overlay: it cannot start.
    assert!(hv.start(src.id).await.is_err(), "the template started under its running overlay");
    for g in [&now, &at, &thin, &src] {
        hv.destroy(g.id).await.unwrap();
    }
}

/// A clone of a running guest interrupted mid-copy (its call dropped, as
/// when the agent's task is cancelled) leaves nothing that looks finished:
/// no record, no disk under its final name, no qemu-img still writing. The
/// next create of it starts afresh and succeeds, removing the transient
/// snapshot the first attempt left in the source; a destroy leaves nothing.
#[tokio::test]
async fn an_interrupted_clone_leaves_nothing_that_looks_finished() {
    use drove_model::{CloneMode, CloneSource};
    let lab = Lab::new();
    let hv = std::sync::Arc::new(lab.hv());
    let src = guest("cut-src", &[768]);
    hv.create(&src).await.unwrap();
    let disk = |id: GuestId| hv.guest_dir(id).join("disk0.qcow2");
    let filled = std::process::Command::new("qemu-io").args(["-c", "write -P 0x5a 0 640M"]).arg(disk(src.id)).output();
    assert!(filled.unwrap().status.success());
    hv.start(src.id).await.unwrap();
    let mut clone = guest("cut-clone", &[768]);
    clone.spec.clone_of =
        Some(CloneSource { guest: src.id, snapshot: None, mode: CloneMode::Copy, shared_disks: None });

    let task = tokio::spawn({
        let (hv, clone) = (hv.clone(), clone.clone());
        async move { hv.create(&clone).await }
    });
    let tmp = hv.guest_dir(clone.id).join("disk0.qcow2.tmp");
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while !tmp.exists() {
        assert!(!task.is_finished(), "the copy finished before it could be cut: make the source bigger");
        assert!(Instant::now() < deadline, "the copy never began");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    // At once, not when a qemu-img left running has finished its copy.
    let writers = || pids_mentioning(&hv.guest_dir(clone.id));
    let deadline = Instant::now() + Duration::from_millis(500);
    while !writers().is_empty() {
        assert!(Instant::now() < deadline, "qemu-img still writes the cut clone: {:?}", writers());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!disk(clone.id).exists(), "no disk under its final name");
    assert!(matches!(hv.status(clone.id).await, Err(HvError::NotFound { .. })), "no record");

    hv.create(&clone).await.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert!(holds(&disk(clone.id), 0x5a), "the clone holds the source's data");
    assert!(!tmp.exists(), "no temporary file left");
    let left = qemu_img_info(&disk(src.id));
    assert!(left.get("snapshots").is_none_or(|s| s.as_array().is_some_and(Vec::is_empty)), "{left}");
    hv.destroy(clone.id).await.unwrap();
    assert!(!hv.guest_dir(clone.id).exists(), "destroy leaves nothing");
    hv.destroy(src.id).await.unwrap();
}

// --- shared storage ----------------------------------------------------------------

/// Two hosts' backends over one shared pool, as a lab's hosts (or NFS
/// clients) see it.
fn shared_pair(lab: &Lab) -> (QemuHypervisor, QemuHypervisor, PathBuf) {
    let pool = lab.state_dir().join("pool");
    let host = |name: &str| {
        let mut c = lab.config(Accel::Tcg);
        c.state_dir = lab.state_dir().join(name);
        c.shared_dir = Some(pool.clone());
        c.cgroup_scope = Some(format!("{name}-{}", std::process::id()));
        QemuHypervisor::new(c).unwrap()
    };
    (host("a"), host("b"), pool)
}

#[tokio::test]
async fn a_guest_on_shared_storage_restarts_on_another_host_with_its_disk_and_never_runs_twice() {
    let lab = Lab::new();
    let (a, b, pool) = shared_pair(&lab);
    let mut g = guest("shared-1", &[16]);
    g.spec.storage = drove_model::guest::Storage::Shared;
    a.create(&g).await.unwrap();
    let disk = pool.join(g.id.to_string()).join("disk0.qcow2");
    assert!(disk.is_file(), "the disk lives on the pool");
    a.start(g.id).await.unwrap();
    wait_for_serial(&a, g.id, "DROVE-READY", 1).await;
    write_marker(&a, g.id, "written-on-a").await;

    // The second line behind fencing: while it runs on a, b cannot run it
    // (QEMU's lock on the shared disk), and a's copy is untouched.
    b.create(&g).await.unwrap();
    let err = b.start(g.id).await.expect_err("the disk is locked by the running copy");
    let chain = format!("{err}: {}", std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default());
    assert!(chain.contains("lock"), "{chain}");
    assert_eq!(status(&a, g.id).await.state, RuntimeState::Running);

    // a fences (hard stop) and forgets it: the disk stays on the pool.
    a.stop(g.id, StopMode::Force).await.unwrap();
    a.forget(g.id).await.unwrap();
    assert!(matches!(a.status(g.id).await, Err(HvError::NotFound { .. })));
    assert!(disk.is_file(), "forget kept the shared disk");

    // b runs it, with what a wrote.
    b.start(g.id).await.unwrap();
    wait_for_serial(&b, g.id, "DROVE-READY", 1).await;
    assert_eq!(sh(&b, g.id, READ_MARKER).await, "written-on-a");

    // A guest with local disks is never forgotten (its disks would go).
    let local = guest("local-1", &[8]);
    a.create(&local).await.unwrap();
    let err = a.forget(local.id).await.expect_err("local disks are not forgotten");
    assert!(matches!(err, HvError::Unsupported { .. }), "{err:?}");
    assert_eq!(status(&a, local.id).await.state, RuntimeState::Stopped);
    a.destroy(local.id).await.unwrap();

    // Destroying it deletes it for good, pool and all.
    b.destroy(g.id).await.unwrap();
    assert!(!pool.join(g.id.to_string()).exists(), "destroy removed the shared disks");
    assert!(pids_mentioning(lab.state_dir()).is_empty());
}

/// A source on the shared pool is cloned by another host, which has no
/// record of it, from its files there: refused (image lock, nothing left)
/// while the source runs on its host, a copy once it is stopped, and an
/// overlay on its file that then keeps its own host from writing it.
#[tokio::test]
async fn another_host_clones_a_source_on_the_shared_pool_only_while_no_qemu_writes_it() {
    use drove_model::guest::Storage;
    use drove_model::{CloneMode, CloneSource};
    let lab = Lab::new();
    let (a, b, pool) = shared_pair(&lab);
    let mut src = guest("pool-src", &[16]);
    src.spec.storage = Storage::Shared;
    a.create(&src).await.unwrap();
    a.start(src.id).await.unwrap();
    wait_for_serial(&a, src.id, "DROVE-READY", 1).await;
    write_marker(&a, src.id, "written-on-a").await;
    let clone = |name: &str, mode| {
        let mut c = guest(name, &[16]);
        c.spec.storage = Storage::Shared;
        c.spec.clone_of =
            Some(CloneSource { guest: src.id, snapshot: None, mode, shared_disks: Some(src.spec.disks.clone()) });
        c
    };

    let copy = clone("pool-copy", CloneMode::Copy);
    let err = b.create(&copy).await.expect_err("a's QEMU writes the source");
    assert!(error_chain(&err).contains("lock"), "{}", error_chain(&err));
    assert!(!b.guest_dir(copy.id).exists(), "nothing of the clone on b");
    assert!(!pool.join(copy.id.to_string()).exists(), "nothing of the clone on the pool");

    a.stop(src.id, StopMode::Force).await.unwrap();
    b.create(&copy).await.unwrap();
    b.start(copy.id).await.unwrap();
    wait_for_serial(&b, copy.id, "DROVE-READY", 1).await;
    assert_eq!(sh(&b, copy.id, READ_MARKER).await, "written-on-a");

    let overlay = clone("pool-overlay", CloneMode::Overlay);
    b.create(&overlay).await.unwrap();
    let file = pool.join(overlay.id.to_string()).join("disk0.qcow2");
    let info = std::process::Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(&file).output();
    let info: serde_json::Value = serde_json::from_slice(&info.unwrap().stdout).unwrap();
    let base = pool.join(src.id.to_string()).join("disk0.qcow2");
    assert_eq!(info["backing-filename"].as_str(), base.to_str(), "an overlay on the source's pool file");
    b.start(overlay.id).await.unwrap();
    wait_for_serial(&b, overlay.id, "DROVE-READY", 1).await;
    assert_eq!(sh(&b, overlay.id, READ_MARKER).await, "written-on-a");
    // Its base must not change under it: a's QEMU cannot write it now.
    let err = a.start(src.id).await.expect_err("the overlay on b holds its base");
    assert!(error_chain(&err).contains("lock"), "{}", error_chain(&err));

    for g in [&copy, &overlay] {
        b.destroy(g.id).await.unwrap();
    }
    a.destroy(src.id).await.unwrap();
    assert!(pids_mentioning(lab.state_dir()).is_empty());
}

#[tokio::test]
async fn a_guest_on_shared_storage_is_refused_by_a_host_without_a_pool_and_nothing_is_left() {
    let lab = Lab::new();
    let hv = lab.hv();
    let mut g = guest("shared-2", &[8]);
    g.spec.storage = drove_model::guest::Storage::Shared;
    let err = hv.create(&g).await.expect_err("no pool here");
    assert!(err.to_string().contains("no shared pool"), "{err}");
    assert!(!lab.state_dir().join("guests").join(g.id.to_string()).exists());
}

/// A heartbeat's `list` neither waits for a guest's first boot nor
/// misreports a running guest that is busy with a long operation.
#[tokio::test]
async fn list_answers_during_a_first_start_and_sees_a_busy_running_guest_running() {
    let lab = Lab::new();
    let hv = std::sync::Arc::new(lab.hv());
    let g = guest("list-1", &[16]);
    hv.create(&g).await.unwrap();
    let starting = {
        let hv = hv.clone();
        tokio::spawn(async move { hv.start(g.id).await })
    };
    // Whatever moment list lands on, it answers at once, and never says
    // the guest crashed.
    let t0 = Instant::now();
    let listed = hv.list().await.unwrap();
    assert!(t0.elapsed() < Duration::from_millis(1500), "list waited {:?} for a start", t0.elapsed());
    let state = listed.iter().find(|s| s.id == g.id).unwrap().state;
    assert!(matches!(state, RuntimeState::Stopped | RuntimeState::Running), "{state:?}");
    starting.await.unwrap().unwrap();
    wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;

    // A memory snapshot holds the guest for a while; list sees it as it is.
    let snap = {
        let hv = hv.clone();
        tokio::spawn(async move { hv.snapshot_create(g.id, "busy", SnapshotKind::Memory).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let listed = hv.list().await.unwrap();
    let state = listed.iter().find(|s| s.id == g.id).unwrap().state;
    assert!(matches!(state, RuntimeState::Running | RuntimeState::Paused), "a busy running guest listed {state:?}");
    snap.await.unwrap().unwrap();
    hv.destroy(g.id).await.unwrap();
}

// --- storage moves -------------------------------------------------------------------

/// A tmpfs of `mib` MiB mounted at `path` for the length of a test (a
/// pool that fills up half-way through a copy); unmounted on drop.
struct SmallPool(PathBuf);

impl SmallPool {
    fn mount(path: PathBuf, mib: u64) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "drove-test-pool"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "mounting a tmpfs (needs root): {}", String::from_utf8_lossy(&out.stderr));
        Self(path)
    }
}

impl Drop for SmallPool {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The `md5sum` of the first `mib` MiB of `/dev/vdX` in the guest.
async fn disk_sum(hv: &QemuHypervisor, id: GuestId, dev: &str, mib: u64) -> String {
    sh(hv, id, &format!("dd if=/dev/{dev} bs=1M count={mib} 2>/dev/null | md5sum")).await
}

/// Starts a loop in the guest that writes an increasing counter to the
/// first sector of /dev/vdb (synced) and to /tmp/count, forever.
const COUNTER: &str = "(i=0; while true; do i=$((i+1)); printf '%-511s\\n' $i | dd of=/dev/vdb bs=512 count=1 \
    conv=fsync 2>/dev/null; echo $i > /tmp/count; done) >/dev/null 2>&1 & sleep 0.5; cat /tmp/count";

fn disk_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| n.contains(".qcow2"));
    names.sort();
    names
}

/// Local → shared → local under a running guest that keeps writing: the
/// same QEMU process throughout, what it wrote before and during the moves
/// intact, the files where the pool says and nowhere else, standalone; a
/// snapshot taken between moves works (the moved node is found) and is
/// refused as a move's passenger; a stopped guest moves by copy; a move to
/// where it is does nothing.
#[tokio::test]
async fn a_running_guests_disks_move_between_pools_live_and_it_keeps_writing() {
    use drove_model::guest::Storage;
    let lab = Lab::new();
    let (hv, _, pool) = shared_pair(&lab);
    let g = guest("mover", &[64, 16]);
    let id = g.id;
    hv.create(&g).await.unwrap();
    hv.start(id).await.unwrap();
    wait_for_serial(&hv, id, "DROVE-READY", 1).await;
    sh(&hv, id, "dd if=/dev/urandom of=/dev/vda bs=1M count=48 conv=fsync 2>/dev/null").await;
    let sum = disk_sum(&hv, id, "vda", 48).await;
    let before: u64 = sh(&hv, id, COUNTER).await.parse().unwrap();
    let pid = status(&hv, id).await.pid.unwrap();
    let local = hv.guest_dir(id);
    let shared = pool.join(id.to_string());

    let moved = hv.move_storage(id, Storage::Shared).await.unwrap();
    eprintln!("local -> shared: {moved:?}");
    assert_eq!((moved.from, moved.to, moved.live), (Storage::Local, Storage::Shared, true));
    assert!(moved.bytes >= 48 << 20, "{moved:?}");
    let s = status(&hv, id).await;
    assert_eq!((s.state, s.pid), (RuntimeState::Running, Some(pid)), "the same process runs on");
    assert_eq!(disk_files(&shared), ["disk0.qcow2", "disk1.qcow2"]);
    assert!(disk_files(&local).is_empty(), "the old files are gone: {:?}", disk_files(&local));
    assert_eq!(record_spec(&hv, id)["storage"], "shared");
    let moved_nodes =
        |nodes: &[String], i: usize| nodes.iter().filter(|n| n.starts_with(&format!("disk{i}-m"))).count();
    let nodes = block_nodes(&hv, id).await;
    assert!(!nodes.iter().any(|n| n == "disk0" || n == "disk1"), "the old image nodes are closed: {nodes:?}");
    assert_eq!((moved_nodes(&nodes, 0), moved_nodes(&nodes, 1)), (1, 1), "{nodes:?}");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(shared.join("disk0.qcow2"))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info.get("backing-filename").is_none(), "standalone: {info}");
    assert_eq!(disk_sum(&hv, id, "vda", 48).await, sum, "the data written before the move");
    let during: u64 = sh(&hv, id, "cat /tmp/count").await.parse().unwrap();
    assert!(during > before, "the counter ran on: {before} then {during}");
    // What the counter wrote last is on the disk it reads now.
    let on_disk: u64 = sh(&hv, id, "dd if=/dev/vdb bs=512 count=1 2>/dev/null | tr -d ' '").await.parse().unwrap();
    assert!(on_disk >= during, "the disk has the latest count: {on_disk} < {during}");

    // Snapshots work on the moved nodes, and bar a move while they exist.
    hv.snapshot_create(id, "after-move", SnapshotKind::Disk).await.unwrap();
    assert_eq!(hv.snapshot_list(id).await.unwrap().len(), 1);
    let err = hv.move_storage(id, Storage::Local).await.unwrap_err();
    assert!(matches!(err, HvError::Unsupported { .. }) && err.to_string().contains("after-move"), "{err}");
    assert!(disk_files(&local).is_empty(), "a refused move makes nothing");
    hv.snapshot_delete(id, "after-move").await.unwrap();

    // And back, live.
    let moved = hv.move_storage(id, Storage::Local).await.unwrap();
    eprintln!("shared -> local: {moved:?}");
    assert_eq!((moved.from, moved.to, moved.live), (Storage::Shared, Storage::Local, true));
    assert_eq!(status(&hv, id).await.pid, Some(pid));
    assert_eq!(disk_files(&local), ["disk0.qcow2", "disk1.qcow2"]);
    assert!(!shared.exists(), "the guest's directory on the pool is gone");
    assert!(!hv.guest_dir(id).join("shared").exists());
    assert_eq!(record_spec(&hv, id)["storage"], "local");
    let nodes = block_nodes(&hv, id).await;
    assert_eq!(
        (moved_nodes(&nodes, 0), moved_nodes(&nodes, 1)),
        (1, 1),
        "the first move's nodes are closed: {nodes:?}"
    );
    assert_eq!(disk_sum(&hv, id, "vda", 48).await, sum);
    let after: u64 = sh(&hv, id, "cat /tmp/count").await.parse().unwrap();
    assert!(after > during, "the counter ran on: {during} then {after}");
    // A move to where it is: nothing to do.
    let moved = hv.move_storage(id, Storage::Local).await.unwrap();
    assert_eq!((moved.from, moved.to, moved.bytes), (Storage::Local, Storage::Local, 0));

    // Stopped: copied; it boots from the new files with its data. The
    // transient snapshot an interrupted clone left in it does not bar the
    // move: it is nobody's, and removed.
    hv.stop(id, StopMode::Force).await.unwrap();
    let leftover = format!("{}interrupted", drove_hypervisor::CLONE_SNAPSHOT_PREFIX);
    let staged = std::process::Command::new("qemu-img")
        .args(["snapshot", "-c", &leftover])
        .arg(local.join("disk0.qcow2"))
        .status();
    assert!(staged.unwrap().success());
    let moved = hv.move_storage(id, Storage::Shared).await.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_eq!((moved.live, moved.to), (false, Storage::Shared));
    assert_eq!(disk_files(&shared), ["disk0.qcow2", "disk1.qcow2"]);
    let listed =
        std::process::Command::new("qemu-img").args(["snapshot", "-l"]).arg(shared.join("disk0.qcow2")).output();
    let listed = String::from_utf8_lossy(&listed.unwrap().stdout).into_owned();
    assert!(!listed.contains(&leftover), "the leftover snapshot is gone: {listed}");
    assert!(disk_files(&local).is_empty());
    hv.start(id).await.unwrap();
    wait_for_serial(&hv, id, "DROVE-READY", 2).await;
    assert_eq!(disk_sum(&hv, id, "vda", 48).await, sum, "the copy boots with its data");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", status(&hv, id).await.pid.unwrap())).unwrap();
    let link = hv.guest_dir(id).join("shared").join("disk0.qcow2");
    assert!(
        String::from_utf8_lossy(&cmdline).contains(&link.to_string_lossy().into_owned()),
        "it boots the pool's file"
    );
    hv.destroy(id).await.unwrap();
    assert!(!shared.exists(), "destroy removes the moved disks");
}

/// A move whose target fills up half-way (a pool with less room than the
/// guest's data) fails, and leaves the guest running on its old disk, on
/// the same process, with its data, and nothing of the new files behind;
/// a host without a shared pool refuses a move there.
#[tokio::test]
async fn a_move_that_fails_half_way_leaves_the_guest_on_its_old_disk_and_nothing_behind() {
    use drove_model::guest::Storage;
    let lab = Lab::new();
    let pool = lab.state_dir().join("small");
    let _small = SmallPool::mount(pool.clone(), 24);
    let mut c = lab.config(Accel::Tcg);
    c.shared_dir = Some(pool.clone());
    let hv = QemuHypervisor::new(c).unwrap();
    let g = guest("filler", &[64]);
    let id = g.id;
    hv.create(&g).await.unwrap();
    hv.start(id).await.unwrap();
    wait_for_serial(&hv, id, "DROVE-READY", 1).await;
    sh(&hv, id, "dd if=/dev/urandom of=/dev/vda bs=1M count=48 conv=fsync 2>/dev/null").await;
    let sum = disk_sum(&hv, id, "vda", 48).await;
    let pid = status(&hv, id).await.pid.unwrap();

    let err = hv.move_storage(id, Storage::Shared).await.expect_err("48M of data cannot fit in a 24M pool");
    let chain = error_chain(&err);
    eprintln!("the failed move: {chain}");
    assert!(chain.contains("drove-move0"), "the error names the mirror: {chain}");
    let s = status(&hv, id).await;
    assert_eq!((s.state, s.pid), (RuntimeState::Running, Some(pid)));
    assert_eq!(disk_files(&hv.guest_dir(id)), ["disk0.qcow2"]);
    assert!(!hv.guest_dir(id).join("shared").exists());
    assert_eq!(record_spec(&hv, id)["storage"], "local");
    let left: Vec<_> = std::fs::read_dir(&pool).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "nothing left on the pool: {left:?}");
    let nodes = block_nodes(&hv, id).await;
    assert!(!nodes.iter().any(|n| n.contains("-m")), "no new node left: {nodes:?}");
    let jobs = hv.qmp_execute(id, "query-block-jobs", None).await.unwrap();
    assert_eq!(jobs, serde_json::json!([]), "no job left");
    assert_eq!(disk_sum(&hv, id, "vda", 48).await, sum, "its data is intact");
    sh(&hv, id, "echo still-writable | dd of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null").await;

    // Without a shared pool: refused, nothing made.
    let plain = lab.hv();
    let err = plain.move_storage(id, Storage::Shared).await.unwrap_err();
    assert!(err.to_string().contains("no shared pool"), "{err}");
    hv.destroy(id).await.unwrap();
}

/// Starts what a storage move of disk 0 does up to its commit, by hand:
/// a new file at `target`, its node, a write-blocking mirror into it,
/// until ready.
async fn mirror_by_hand(hv: &QemuHypervisor, id: GuestId, target: &Path) {
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let size = hv
        .qmp_execute(id, "query-named-block-nodes", None)
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap()["image"]["virtual-size"]
        .as_u64()
        .unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(target)
        .arg(size.to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    let node = serde_json::json!({ "driver": "qcow2", "node-name": "disk0-m1",
        "file": { "driver": "file", "filename": target.to_string_lossy() } });
    hv.qmp_execute(id, "blockdev-add", Some(node)).await.unwrap();
    let mirror = serde_json::json!({ "job-id": "drove-move0", "device": "throttled0", "target": "disk0-m1",
        "replaces": "disk0", "sync": "full", "copy-mode": "write-blocking", "auto-dismiss": false });
    hv.qmp_execute(id, "blockdev-mirror", Some(mirror)).await.unwrap();
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let jobs = hv.qmp_execute(id, "query-block-jobs", None).await.unwrap();
        if jobs[0]["ready"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the mirror did not get ready: {jobs}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An agent that died half-way through a move left a mirror running in
/// the guest's QEMU. If the link had flipped (the commit), the next move
/// call finishes the switch: the guest ends up on the new files, with its
/// data, and boots from them. If it had not, the mirror is ended and its
/// file removed: the guest stays on its old files.
#[tokio::test]
async fn an_interrupted_move_is_finished_after_its_commit_and_undone_before_it() {
    use drove_model::guest::Storage;
    let lab = Lab::new();
    let (hv, _, pool) = shared_pair(&lab);
    let g = guest("survivor", &[32]);
    let id = g.id;
    hv.create(&g).await.unwrap();
    hv.start(id).await.unwrap();
    wait_for_serial(&hv, id, "DROVE-READY", 1).await;
    sh(&hv, id, "dd if=/dev/urandom of=/dev/vda bs=1M count=16 conv=fsync 2>/dev/null").await;
    let sum = disk_sum(&hv, id, "vda", 16).await;
    let pid = status(&hv, id).await.pid.unwrap();
    let local = hv.guest_dir(id);
    let on_pool = pool.join(id.to_string()).join("disk0.qcow2");

    // Before the commit: a mirror into the pool, the link untouched.
    mirror_by_hand(&hv, id, &on_pool).await;
    let moved = hv.move_storage(id, Storage::Local).await.unwrap();
    assert_eq!((moved.from, moved.to, moved.bytes), (Storage::Local, Storage::Local, 0));
    assert_eq!(hv.qmp_execute(id, "query-block-jobs", None).await.unwrap(), serde_json::json!([]));
    assert!(!on_pool.exists(), "the uncommitted copy is removed");
    assert!(!block_nodes(&hv, id).await.iter().any(|n| n.starts_with("disk0-m")));
    assert_eq!(disk_sum(&hv, id, "vda", 16).await, sum);

    // After it: the link flipped, the record not yet written.
    mirror_by_hand(&hv, id, &on_pool).await;
    std::os::unix::fs::symlink(pool.join(id.to_string()), local.join("shared")).unwrap();
    sh(&hv, id, "echo written-after-the-commit | dd of=/dev/vda bs=512 seek=40000 count=1 conv=fsync 2>/dev/null")
        .await;
    let moved = hv.move_storage(id, Storage::Shared).await.unwrap();
    assert_eq!((moved.from, moved.to, moved.bytes), (Storage::Shared, Storage::Shared, 0));
    assert_eq!(record_spec(&hv, id)["storage"], "shared", "the record follows the link");
    assert_eq!(hv.qmp_execute(id, "query-block-jobs", None).await.unwrap(), serde_json::json!([]));
    let nodes = block_nodes(&hv, id).await;
    assert!(nodes.contains(&"disk0-m1".to_owned()) && !nodes.contains(&"disk0".to_owned()), "switched: {nodes:?}");
    assert!(!local.join("disk0.qcow2").exists(), "the old local file is removed");
    assert_eq!(status(&hv, id).await.pid, Some(pid));
    assert_eq!(disk_sum(&hv, id, "vda", 16).await, sum);
    // Its next boot is from the pool's file, with everything.
    hv.stop(id, StopMode::Force).await.unwrap();
    hv.start(id).await.unwrap();
    wait_for_serial(&hv, id, "DROVE-READY", 2).await;
    assert_eq!(disk_sum(&hv, id, "vda", 16).await, sum);
    let after = sh(&hv, id, "dd if=/dev/vda bs=512 skip=40000 count=1 2>/dev/null | head -n 1").await;
    assert_eq!(after, "written-after-the-commit");
    hv.destroy(id).await.unwrap();
}

// --- disk kinds: raw files and host block devices ----------------------------------

/// The format `qemu-img info` finds in the file at `path`.
fn qemu_img_format(path: &Path) -> String {
    let out = std::process::Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(path).output().unwrap();
    assert!(out.status.success(), "qemu-img info {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["format"].as_str().unwrap_or_default().to_owned()
}

fn with_disks(name: &str, disks: Vec<DiskSpec>) -> GuestConfig {
    let mut g = guest(name, &[]);
    g.spec.disks = disks;
    g
}

#[tokio::test]
async fn a_raw_disk_keeps_what_the_guest_wrote_across_a_restart_and_refuses_a_snapshot() {
    let lab = Lab::new();
    let hv = lab.hv();
    let g = with_disks("raw-1", vec![DiskSpec::raw(ByteSize::mib(64))]);
    hv.create(&g).await.unwrap();
    let file = hv.guest_dir(g.id).join("disk0.raw");
    assert_eq!(qemu_img_format(&file), "raw", "the file on the pool is raw");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 << 20);
    hv.start(g.id).await.unwrap();
    let log = wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    assert!(log.contains("drove: disk vda 64M"), "the guest does not see its disk:\n{log}");
    write_marker(&hv, g.id, "written-to-a-raw-disk").await;

    // Refused before anything is touched, naming the disk.
    let err = hv.snapshot_create(g.id, "s1", SnapshotKind::Disk).await.unwrap_err();
    assert!(matches!(err, HvError::DiskKind { .. }), "{err:?}");
    assert!(err.to_string().contains("its disk 0 is a raw file"), "{err}");
    assert!(hv.snapshot_list(g.id).await.unwrap().is_empty());
    assert_eq!(status(&hv, g.id).await.state, RuntimeState::Running, "the refusal left the guest running");

    hv.stop(g.id, GRACEFUL).await.unwrap();
    // What the guest wrote is in the file itself, raw: sector 0 is the marker.
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.starts_with(b"written-to-a-raw-disk"), "{:?}", String::from_utf8_lossy(&bytes[..32]));
    hv.start(g.id).await.unwrap();
    wait_for_serial(&hv, g.id, "DROVE-READY", 2).await;
    assert_eq!(sh(&hv, g.id, READ_MARKER).await, "written-to-a-raw-disk");
    assert_eq!(qemu_img_format(&file), "raw");
    hv.destroy(g.id).await.unwrap();
    assert!(!file.exists());
    assert_no_qemu_for(&lab, g.id);
}

/// A loop device over a file of its own, detached when dropped (also when
/// the test fails). Declare it before the [`Lab`]: the lab's reaper must
/// have killed QEMU before the device is detached.
struct LoopDev {
    dev: String,
    _dir: tempfile::TempDir,
}

impl LoopDev {
    fn new(size: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("backing.img");
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        let out = std::process::Command::new("losetup").args(["-f", "--show"]).arg(&file).output().unwrap();
        assert!(out.status.success(), "losetup (needs root): {}", String::from_utf8_lossy(&out.stderr));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(dev.starts_with("/dev/loop"), "{dev:?}");
        Self { dev, _dir: dir }
    }

    /// The first `n` bytes of the device, read from the host.
    fn head(&self, n: usize) -> Vec<u8> {
        use std::io::Read;
        let mut buf = vec![0; n];
        std::fs::File::open(&self.dev).unwrap().read_exact(&mut buf).unwrap();
        buf
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[tokio::test]
async fn a_guest_gets_a_whole_host_block_device_and_destroy_leaves_it_with_its_data() {
    let loopdev = LoopDev::new(32 << 20);
    let lab = Lab::new();
    let hv = lab.hv();
    let g = with_disks("block-1", vec![DiskSpec::block(loopdev.dev.clone())]);

    // A size that is not the device's is refused, and makes nothing.
    let wrong = GuestConfig {
        id: GuestId::new_v4(),
        ..with_disks("block-x", vec![DiskSpec { size: ByteSize::mib(64), ..DiskSpec::block(loopdev.dev.clone()) }])
    };
    let err = hv.create(&wrong).await.unwrap_err();
    assert!(err.to_string().contains("has 32M"), "{err}");
    assert!(!hv.guest_dir(wrong.id).exists());

    hv.create(&g).await.unwrap();
    let files: Vec<String> = std::fs::read_dir(hv.guest_dir(g.id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("disk"))
        .collect();
    assert!(files.is_empty(), "no file is made for a device: {files:?}");
    hv.start(g.id).await.unwrap();
    let log = wait_for_serial(&hv, g.id, "DROVE-READY", 1).await;
    assert!(log.contains("drove: disk vda 32M"), "the guest does not see the device's size:\n{log}");
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", status(&hv, g.id).await.pid.unwrap())).unwrap();
    assert!(
        cmdline.contains(&format!("file.driver=host_device,file.filename={},cache.direct=on", loopdev.dev)),
        "{cmdline}"
    );
    write_marker(&hv, g.id, "written-to-a-host-device").await;
    assert!(loopdev.head(24).starts_with(b"written-to-a-host-device"), "{:?}", loopdev.head(24));

    // What cannot work for a device is refused and changes nothing.
    let err = hv.snapshot_create(g.id, "s1", SnapshotKind::Disk).await.unwrap_err();
    assert!(err.to_string().contains(&format!("host block device {}", loopdev.dev)), "{err}");
    let err = hv.hotplug(g.id, &Hotplug::GrowDisk { index: 0, size: ByteSize::mib(64) }).await.unwrap_err();
    assert!(err.to_string().contains("its size is the device's"), "{err}");
    assert_eq!(status(&hv, g.id).await.state, RuntimeState::Running);

    hv.destroy(g.id).await.unwrap();
    assert_no_qemu_for(&lab, g.id);
    assert!(Path::new(&loopdev.dev).exists(), "destroy never removes a device");
    assert!(loopdev.head(24).starts_with(b"written-to-a-host-device"), "destroy leaves the device's data");
}

/// A raw-file disk is mirrored over NBD like a qcow2 one: the target's file
/// is raw too and holds what the guest wrote; a guest with a host block
/// device is refused before anything is made on either side.
#[tokio::test]
async fn a_guest_with_a_raw_disk_migrates_and_one_with_a_block_device_is_refused() {
    let loopdev = LoopDev::new(16 << 20);
    let lab = Lab::new();
    let (a, b) = two_hosts(&lab);
    let g = with_disks("mig-raw", vec![DiskSpec::raw(ByteSize::mib(64))]);
    a.create(&g).await.unwrap();
    a.start(g.id).await.unwrap();
    wait_for_serial(&a, g.id, "DROVE-READY", 1).await;
    write_marker(&a, g.id, "raw-before-migration").await;
    let (incoming, out) = loopback_migration(Some(migration_key()));
    b.migrate_incoming(&g, &incoming).await.unwrap();
    a.migrate_out(g.id, &out, &|_| {}).await.unwrap_or_else(|e| panic!("migration failed: {}", error_chain(&e)));
    b.migrate_finish(g.id, Duration::from_secs(30), false).await.unwrap();
    a.destroy(g.id).await.unwrap();
    assert_eq!(sh(&b, g.id, READ_MARKER).await, "raw-before-migration");
    assert_eq!(qemu_img_format(&b.guest_dir(g.id).join("disk0.raw")), "raw");
    b.destroy(g.id).await.unwrap();

    let d = with_disks("mig-dev", vec![DiskSpec::block(loopdev.dev.clone())]);
    a.create(&d).await.unwrap();
    a.start(d.id).await.unwrap();
    let (incoming, out) = loopback_migration(None);
    let err = b.migrate_incoming(&d, &incoming).await.unwrap_err();
    assert!(err.to_string().contains("shared SAN"), "{err}");
    assert!(!b.guest_dir(d.id).exists(), "nothing made on the target");
    let err = a.migrate_out(d.id, &out, &|_| {}).await.unwrap_err();
    assert!(matches!(err, HvError::DiskKind { .. }), "{err:?}");
    assert_eq!(status(&a, d.id).await.state, RuntimeState::Running, "it runs on where it was");
    a.destroy(d.id).await.unwrap();
    assert!(pids_mentioning(lab.state_dir()).is_empty());
}

/// A raw disk moves between pools live and stays raw, its data whole; a
/// stopped one moves by copy and stays raw too.
#[tokio::test]
async fn a_raw_disk_moves_between_pools_live_and_stopped_and_stays_raw() {
    use drove_model::guest::Storage;
    let lab = Lab::new();
    let (hv, _, pool) = shared_pair(&lab);
    let g = with_disks("mover-raw", vec![DiskSpec::raw(ByteSize::mib(32))]);
    let id = g.id;
    hv.create(&g).await.unwrap();
    hv.start(id).await.unwrap();
    wait_for_serial(&hv, id, "DROVE-READY", 1).await;
    sh(&hv, id, "dd if=/dev/urandom of=/dev/vda bs=1M count=16 conv=fsync 2>/dev/null").await;
    let sum = disk_sum(&hv, id, "vda", 16).await;
    let moved = hv.move_storage(id, Storage::Shared).await.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert!(moved.live, "{moved:?}");
    let on_pool = pool.join(id.to_string()).join("disk0.raw");
    assert_eq!(qemu_img_format(&on_pool), "raw");
    assert_eq!(disk_sum(&hv, id, "vda", 16).await, sum);
    hv.stop(id, GRACEFUL).await.unwrap();
    let moved = hv.move_storage(id, Storage::Local).await.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert!(!moved.live, "{moved:?}");
    assert_eq!(qemu_img_format(&hv.guest_dir(id).join("disk0.raw")), "raw");
    hv.start(id).await.unwrap();
    wait_for_serial(&hv, id, "DROVE-READY", 2).await;
    assert_eq!(disk_sum(&hv, id, "vda", 16).await, sum);
    hv.destroy(id).await.unwrap();
}

/// A stopped guest with a raw disk clones: as a template (a qcow2 overlay
/// backed by the raw file) and as a copy (converted to qcow2); both clones
/// boot holding what the source wrote.
#[tokio::test]
async fn a_raw_source_clones_as_qcow2_overlays_and_copies() {
    use drove_model::{CloneMode, CloneSource};
    let lab = Lab::new();
    let hv = lab.hv();
    let src = with_disks("raw-src", vec![DiskSpec::raw(ByteSize::mib(32))]);
    hv.create(&src).await.unwrap();
    hv.start(src.id).await.unwrap();
    wait_for_serial(&hv, src.id, "DROVE-READY", 1).await;
    write_marker(&hv, src.id, "written-in-the-raw-source").await;
    hv.stop(src.id, GRACEFUL).await.unwrap();
    for mode in [CloneMode::Overlay, CloneMode::Copy] {
        let mut c = with_disks("raw-clone", vec![DiskSpec::qcow2(ByteSize::mib(32))]);
        c.spec.clone_of = Some(CloneSource { guest: src.id, snapshot: None, mode, shared_disks: None });
        hv.create(&c).await.unwrap_or_else(|e| panic!("{mode:?}: {}", error_chain(&e)));
        let file = hv.guest_dir(c.id).join("disk0.qcow2");
        assert_eq!(qemu_img_format(&file), "qcow2", "{mode:?}");
        hv.start(c.id).await.unwrap();
        wait_for_serial(&hv, c.id, "DROVE-READY", 1).await;
        assert_eq!(sh(&hv, c.id, READ_MARKER).await, "written-in-the-raw-source", "{mode:?}");
        hv.destroy(c.id).await.unwrap();
    }
    assert_eq!(qemu_img_format(&hv.guest_dir(src.id).join("disk0.raw")), "raw");
    hv.destroy(src.id).await.unwrap();
}
