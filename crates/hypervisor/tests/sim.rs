//! The simulated backend: the conformance suite, its fault knobs, its
//! persistence, its timing, and its scale.

#![allow(clippy::unwrap_used)]

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drove_hypervisor::conformance::{self, Options, Property};
use drove_hypervisor::sim::{InjectedFault, SimConfig, SimHypervisor, SimOp, SimStateError, sample_guest};
use drove_hypervisor::{GuestConfig, HvError, Hypervisor, RuntimeState, StopMode};
use drove_model::GuestId;

// One test per property, on an instant host and on one with the default
// (millisecond) delays, where calls really suspend.
drove_hypervisor::conformance_tests!(
    conformance_instant,
    hypervisor = SimHypervisor::new(SimConfig::instant()),
    template = sample_guest,
);
drove_hypervisor::conformance_tests!(
    conformance_default_delays,
    hypervisor = SimHypervisor::new(SimConfig::default()),
    template = sample_guest,
    options = Options { op_timeout: Duration::from_secs(5), graceful_timeout: Duration::from_secs(1) },
);

#[tokio::test]
async fn whole_conformance_suite_passes_in_one_call() {
    let hv = SimHypervisor::new(SimConfig::instant());
    conformance::run_all(&hv, sample_guest).await;
    assert!(hv.guests().is_empty(), "the suite must clean up after itself");
}

#[tokio::test]
async fn conformance_suite_passes_with_persistence() {
    let dir = tempfile::tempdir().unwrap();
    let hv = SimHypervisor::with_state_file(SimConfig::instant(), dir.path().join("state.json")).unwrap();
    conformance::run_all(&hv, sample_guest).await;
}

#[tokio::test]
async fn conformance_suite_leaves_other_guests_alone() {
    let hv = SimHypervisor::new(SimConfig::instant());
    let bystander = created(&hv, 1000).await;
    hv.start(bystander.id).await.unwrap();
    conformance::run_all(&hv, sample_guest).await;
    let left = hv.guests();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].id, bystander.id);
    assert_eq!(left[0].state, RuntimeState::Running);
}

/// The suite is only worth something if it catches a broken backend.
#[tokio::test]
async fn conformance_suite_reports_a_broken_backend() {
    let hv = SimHypervisor::new(SimConfig::instant());
    // A backend that cannot list: every property that lists must say so,
    // and the others must still run.
    for _ in 0..100 {
        hv.fail_next(SimOp::List, "list is broken");
    }
    let failure = conformance::check_all(&hv, sample_guest, &Options::default()).await.unwrap_err();
    let failed: Vec<Property> = failure.violations.iter().map(|v| v.property).collect();
    assert!(failed.contains(&Property::ListShowsAllGuests), "{failure}");
    assert!(failed.contains(&Property::CreateLeavesGuestStopped), "{failure}");
    assert!(!failed.contains(&Property::PauseAndResume), "{failure}");
    let text = failure.to_string();
    assert!(text.contains("list is broken"), "{text}");
    assert!(text.contains("list_shows_all_guests"), "{text}");
}

#[tokio::test]
async fn conformance_suite_reports_a_hung_call() {
    let hv = SimHypervisor::new(SimConfig { boot_delay: Duration::from_secs(60), ..SimConfig::instant() });
    let options = Options { op_timeout: Duration::from_millis(20), graceful_timeout: Duration::from_millis(5) };
    let violation = Property::StartRunsGuestAndIsIdempotent.check(&hv, sample_guest, &options).await.unwrap_err();
    assert!(violation.message.contains("did not return within"), "{violation}");
}

async fn created(hv: &SimHypervisor, n: u32) -> GuestConfig {
    let config = sample_guest(n);
    hv.create(&config).await.unwrap();
    config
}

async fn state_of(hv: &SimHypervisor, id: GuestId) -> RuntimeState {
    hv.status(id).await.unwrap().state
}

#[tokio::test]
async fn crash_makes_guest_crashed_and_start_brings_it_back() {
    let hv = SimHypervisor::new(SimConfig::instant());
    let g = created(&hv, 0).await;
    hv.start(g.id).await.unwrap();
    let first_pid = hv.status(g.id).await.unwrap().pid;
    assert!(first_pid.is_some());

    hv.crash(g.id).unwrap();
    let crashed = hv.status(g.id).await.unwrap();
    assert_eq!(crashed.state, RuntimeState::Crashed);
    assert_eq!(crashed.pid, None, "a crashed guest has no process");

    hv.start(g.id).await.unwrap();
    let restarted = hv.status(g.id).await.unwrap();
    assert_eq!(restarted.state, RuntimeState::Running);
    assert!(restarted.pid.is_some());
    assert_ne!(restarted.pid, first_pid, "a restart is a new incarnation");
}

#[tokio::test]
async fn crash_of_paused_guest_and_stop_of_crashed_guest() {
    let hv = SimHypervisor::new(SimConfig::instant());
    let g = created(&hv, 0).await;
    hv.start(g.id).await.unwrap();
    hv.pause(g.id).await.unwrap();
    hv.crash(g.id).unwrap();
    assert_eq!(state_of(&hv, g.id).await, RuntimeState::Crashed);
    // Stopping a crashed guest succeeds and acknowledges the crash.
    hv.stop(g.id, StopMode::Force).await.unwrap();
    assert_eq!(state_of(&hv, g.id).await, RuntimeState::Stopped);
}

#[tokio::test]
async fn crash_needs_a_known_guest_with_a_process() {
    let hv = SimHypervisor::new(SimConfig::instant());
    let unknown = GuestId::new_v4();
    assert!(matches!(hv.crash(unknown), Err(HvError::NotFound { id }) if id == unknown));
    let g = created(&hv, 0).await;
    let err = hv.crash(g.id).unwrap_err();
    assert!(matches!(err, HvError::InvalidState { op: "crash", state: RuntimeState::Stopped, .. }), "{err}");
}

#[tokio::test]
async fn crash_all_crashes_only_guests_with_a_process() {
    let hv = SimHypervisor::new(SimConfig::instant());
    let stopped = created(&hv, 0).await;
    let running = created(&hv, 1).await;
    let paused = created(&hv, 2).await;
    hv.start(running.id).await.unwrap();
    hv.start(paused.id).await.unwrap();
    hv.pause(paused.id).await.unwrap();
    assert_eq!(hv.crash_all().unwrap(), 2);
    assert_eq!(state_of(&hv, stopped.id).await, RuntimeState::Stopped);
    assert_eq!(state_of(&hv, running.id).await, RuntimeState::Crashed);
    assert_eq!(state_of(&hv, paused.id).await, RuntimeState::Crashed);
}

#[tokio::test]
async fn fail_next_fails_exactly_once_before_any_effect() {
    let hv = SimHypervisor::new(SimConfig::instant());
    let g = created(&hv, 0).await;
    hv.fail_next(SimOp::Start, "qemu would not launch");

    let err = hv.start(g.id).await.unwrap_err();
    match &err {
        HvError::Backend { op, id, .. } => {
            assert_eq!(*op, "start");
            assert_eq!(*id, g.id);
        }
        other => panic!("expected a Backend error, got {other:?}"),
    }
    let cause = err.source().and_then(|s| s.downcast_ref::<InjectedFault>()).unwrap();
    assert_eq!(cause.message, "qemu would not launch");
    assert_eq!(state_of(&hv, g.id).await, RuntimeState::Stopped, "no effect");

    hv.start(g.id).await.unwrap();
    assert_eq!(state_of(&hv, g.id).await, RuntimeState::Running);
    assert_eq!(hv.calls(SimOp::Start), 2, "failed calls count too");
    assert_eq!(hv.calls(SimOp::Create), 1);
    assert_eq!(hv.calls(SimOp::Pause), 0);
}

#[tokio::test]
async fn faults_queue_and_stay_with_their_op() {
    let hv = SimHypervisor::new(SimConfig::instant());
    let g = created(&hv, 0).await;
    hv.fail_next(SimOp::Stop, "first");
    hv.fail_next(SimOp::Stop, "second");
    // Other operations are unaffected.
    hv.start(g.id).await.unwrap();
    assert!(hv.stop(g.id, StopMode::Force).await.is_err());
    assert!(hv.stop(g.id, StopMode::Force).await.is_err());
    hv.stop(g.id, StopMode::Force).await.unwrap();
    assert_eq!(hv.calls(SimOp::Stop), 3);
}

#[tokio::test]
async fn fail_next_after_effect_reports_failure_of_a_done_operation() {
    let hv = SimHypervisor::new(SimConfig::instant());
    let g = sample_guest(0);
    hv.fail_next_after_effect(SimOp::Create, "reply lost");
    let err = hv.create(&g).await.unwrap_err();
    assert!(matches!(err, HvError::Backend { op: "create", .. }), "{err}");
    assert_eq!(state_of(&hv, g.id).await, RuntimeState::Stopped, "the create happened");
    // The caller's retry is absorbed by idempotency.
    hv.create(&g).await.unwrap();
    assert_eq!(hv.guests().len(), 1);
}

#[tokio::test]
async fn faults_of_calls_without_a_guest_are_host_errors() {
    let hv = SimHypervisor::new(SimConfig::instant());
    hv.fail_next(SimOp::List, "disk full");
    hv.fail_next(SimOp::Resources, "sysfs gone");
    let err = hv.list().await.unwrap_err();
    assert!(matches!(err, HvError::Host { op: "list", .. }), "{err}");
    let err = hv.resources().await.unwrap_err();
    assert!(matches!(err, HvError::Host { op: "resources", .. }), "{err}");
    assert!(hv.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn create_refuses_an_impossible_spec() {
    let hv = SimHypervisor::new(SimConfig::instant());
    let mut g = sample_guest(0);
    g.spec.vcpus = 0;
    let err = hv.create(&g).await.unwrap_err();
    assert!(matches!(err, HvError::Backend { op: "create", id, .. } if id == g.id));
    assert!(hv.guests().is_empty());
}

#[tokio::test]
async fn create_keeps_the_newest_definition() {
    let hv = SimHypervisor::new(SimConfig::instant());
    let mut g = sample_guest(0);
    g.generation = 5;
    hv.create(&g).await.unwrap();
    let mut newer = g.clone();
    newer.generation = 6;
    newer.spec.vcpus = 2;
    hv.create(&newer).await.unwrap();
    assert_eq!(hv.guest_config(g.id), Some(newer.clone()));
    // A stale create must not roll the definition back.
    hv.create(&g).await.unwrap();
    assert_eq!(hv.guest_config(g.id), Some(newer));
    assert_eq!(hv.status(g.id).await.unwrap().generation, 6);
}

#[tokio::test]
async fn clones_share_one_host() {
    let hv = SimHypervisor::new(SimConfig::instant());
    let handle = hv.clone();
    let g = created(&hv, 0).await;
    handle.start(g.id).await.unwrap();
    handle.crash(g.id).unwrap();
    assert_eq!(state_of(&hv, g.id).await, RuntimeState::Crashed);
}

#[tokio::test]
async fn guests_survive_a_restart_with_the_same_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim-state.json");

    let hv = SimHypervisor::with_state_file(SimConfig::instant(), &path).unwrap();
    let stopped = created(&hv, 0).await;
    let running = created(&hv, 1).await;
    let paused = created(&hv, 2).await;
    let crashed = created(&hv, 3).await;
    let destroyed = created(&hv, 4).await;
    for g in [&running, &paused, &crashed] {
        hv.start(g.id).await.unwrap();
    }
    hv.pause(paused.id).await.unwrap();
    hv.crash(crashed.id).unwrap();
    hv.destroy(destroyed.id).await.unwrap();
    let mut newer = stopped.clone();
    newer.generation = 7;
    hv.create(&newer).await.unwrap();
    hv.set_ignores_acpi(running.id, true).unwrap();
    let before = hv.list().await.unwrap();
    drop(hv);

    let hv = SimHypervisor::with_state_file(SimConfig::instant(), &path).unwrap();
    assert_eq!(hv.list().await.unwrap(), before, "same guests, states, generations, pids");
    assert_eq!(hv.guest_config(stopped.id), Some(newer));

    // The re-adopted guests work, and pids are never handed out twice.
    let used: Vec<u32> = before.iter().filter_map(|s| s.pid).collect();
    hv.start(crashed.id).await.unwrap();
    let pid = hv.status(crashed.id).await.unwrap().pid.unwrap();
    assert!(!used.contains(&pid), "pid {pid} reused from {used:?}");
    hv.resume(paused.id).await.unwrap();
    assert_eq!(state_of(&hv, paused.id).await, RuntimeState::Running);
    assert!(!dir.path().join("sim-state.json.tmp").exists());
}

#[tokio::test]
async fn guests_of_a_state_file_survive_a_failed_reply() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let hv = SimHypervisor::with_state_file(SimConfig::instant(), &path).unwrap();
    let g = created(&hv, 0).await;
    hv.fail_next_after_effect(SimOp::Start, "reply lost");
    hv.start(g.id).await.unwrap_err();
    drop(hv);
    let hv = SimHypervisor::with_state_file(SimConfig::instant(), &path).unwrap();
    assert_eq!(state_of(&hv, g.id).await, RuntimeState::Running);
}

#[test]
fn a_missing_state_file_is_an_empty_host() {
    let dir = tempfile::tempdir().unwrap();
    let hv = SimHypervisor::with_state_file(SimConfig::instant(), dir.path().join("absent.json")).unwrap();
    assert!(hv.guests().is_empty());
}

#[test]
fn a_corrupt_or_foreign_state_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");

    std::fs::write(&path, b"{ not json").unwrap();
    let err = SimHypervisor::with_state_file(SimConfig::instant(), &path).unwrap_err();
    assert!(matches!(err, SimStateError::Parse { .. }), "{err}");
    assert!(err.to_string().contains("state.json"), "{err}");

    std::fs::write(&path, br#"{"format":"drove-sim-state","version":99,"guests":"whatever"}"#).unwrap();
    let err = SimHypervisor::with_state_file(SimConfig::instant(), &path).unwrap_err();
    assert!(matches!(err, SimStateError::Unsupported { version: 99, .. }), "{err}");
}

#[tokio::test]
async fn an_unwritable_state_file_fails_the_call_as_a_host_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone").join("state.json");
    let hv = SimHypervisor::with_state_file(SimConfig::instant(), &path).unwrap();
    let err = hv.create(&sample_guest(0)).await.unwrap_err();
    assert!(matches!(err, HvError::Host { op: "create", .. }), "{err}");
    let cause = err.source().and_then(|s| s.downcast_ref::<SimStateError>()).unwrap();
    assert!(matches!(cause, SimStateError::Write { .. }), "{cause}");
}

/// Measures `fut`; only lower bounds are asserted, upper ones would be flaky.
async fn timed<T>(fut: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = fut.await;
    (out, started.elapsed())
}

#[tokio::test]
async fn timing_knobs_apply() {
    let ms = Duration::from_millis;
    let hv = SimHypervisor::new(SimConfig {
        create_delay: ms(30),
        boot_delay: ms(50),
        stop_delay: ms(40),
        command_delay: ms(20),
        destroy_delay: ms(25),
        ..SimConfig::instant()
    });
    let g = sample_guest(0);

    let (r, took) = timed(hv.create(&g)).await;
    r.unwrap();
    assert!(took >= ms(30), "create took {took:?}");
    let (r, took) = timed(hv.start(g.id)).await;
    r.unwrap();
    assert!(took >= ms(50), "start took {took:?}");
    let (r, took) = timed(hv.pause(g.id)).await;
    r.unwrap();
    assert!(took >= ms(20), "pause took {took:?}");
    let (r, took) = timed(hv.resume(g.id)).await;
    r.unwrap();
    assert!(took >= ms(20), "resume took {took:?}");
    let graceful = StopMode::Graceful { timeout: ms(500) };
    let (r, took) = timed(hv.stop(g.id, graceful)).await;
    r.unwrap();
    assert!(took >= ms(40), "graceful stop took {took:?}");
    let (r, took) = timed(hv.destroy(g.id)).await;
    r.unwrap();
    assert!(took >= ms(25), "destroy took {took:?}");
}

#[tokio::test]
async fn no_op_calls_take_no_simulated_time() {
    // Idempotent repeats have nothing to do, so they must not wait: the
    // agent's converge loop repeats them all the time. Set the guests up on
    // an instant host, then re-adopt them on a very slow one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let hv = SimHypervisor::with_state_file(SimConfig::instant(), &path).unwrap();
    let running = created(&hv, 0).await;
    let stopped = created(&hv, 1).await;
    hv.start(running.id).await.unwrap();
    drop(hv);

    let minute = Duration::from_secs(60);
    let slow = SimConfig {
        create_delay: minute,
        boot_delay: minute,
        stop_delay: minute,
        command_delay: minute,
        destroy_delay: minute,
        ..SimConfig::instant()
    };
    let hv = SimHypervisor::with_state_file(slow, &path).unwrap();
    let quick = Duration::from_secs(5);
    let graceful = StopMode::Graceful { timeout: minute };
    let repeats = async {
        hv.create(&running).await?;
        hv.start(running.id).await?;
        hv.stop(stopped.id, graceful).await?;
        hv.stop(stopped.id, StopMode::Force).await?;
        hv.destroy(GuestId::new_v4()).await
    };
    tokio::time::timeout(quick, repeats).await.expect("no-op calls waited for simulated time").unwrap();
}

#[tokio::test]
async fn a_cancelled_call_changes_nothing() {
    let hv = SimHypervisor::new(SimConfig { boot_delay: Duration::from_secs(60), ..SimConfig::instant() });
    let g = created(&hv, 0).await;
    let start = tokio::time::timeout(Duration::from_millis(20), hv.start(g.id)).await;
    assert!(start.is_err(), "a 60 s boot must not finish in 20 ms");
    assert_eq!(state_of(&hv, g.id).await, RuntimeState::Stopped);
}

#[tokio::test]
async fn graceful_stop_forces_a_guest_that_ignores_acpi_at_the_timeout() {
    let hv = SimHypervisor::new(SimConfig { stop_delay: Duration::from_millis(1), ..SimConfig::instant() });
    let g = created(&hv, 0).await;
    hv.start(g.id).await.unwrap();
    hv.set_ignores_acpi(g.id, true).unwrap();
    let timeout = Duration::from_millis(40);
    let (r, took) = timed(hv.stop(g.id, StopMode::Graceful { timeout })).await;
    r.unwrap();
    assert!(took >= timeout, "stop took {took:?}, before the timeout");
    assert_eq!(state_of(&hv, g.id).await, RuntimeState::Stopped);
}

#[tokio::test]
async fn graceful_stop_of_a_slow_guest_is_forced_at_the_timeout() {
    let hv = SimHypervisor::new(SimConfig { stop_delay: Duration::from_secs(60), ..SimConfig::instant() });
    let g = created(&hv, 0).await;
    hv.start(g.id).await.unwrap();
    let timeout = Duration::from_millis(30);
    let (r, took) = timed(hv.stop(g.id, StopMode::Graceful { timeout })).await;
    r.unwrap();
    assert!(took >= timeout, "stop took {took:?}");
    assert_eq!(state_of(&hv, g.id).await, RuntimeState::Stopped);
}

#[tokio::test]
async fn concurrent_starts_make_one_incarnation() {
    let hv = SimHypervisor::new(SimConfig { boot_delay: Duration::from_millis(20), ..SimConfig::instant() });
    let g = created(&hv, 0).await;
    let (a, b) = tokio::join!(hv.start(g.id), hv.start(g.id));
    a.unwrap();
    b.unwrap();
    let status = hv.status(g.id).await.unwrap();
    assert_eq!(status.state, RuntimeState::Running);
    // Pids are handed out from a counter: a second incarnation would have
    // consumed one, so a fresh boot would get pid + 2 instead of pid + 1.
    let pid = status.pid.unwrap();
    let other = created(&hv, 1).await;
    hv.start(other.id).await.unwrap();
    assert_eq!(hv.status(other.id).await.unwrap().pid, Some(pid + 1));
}

#[tokio::test]
async fn destroy_during_boot_makes_the_start_fail_with_not_found() {
    let hv = SimHypervisor::new(SimConfig { boot_delay: Duration::from_millis(50), ..SimConfig::instant() });
    let g = created(&hv, 0).await;
    let (started, destroyed) = tokio::join!(hv.start(g.id), async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        hv.destroy(g.id).await
    });
    destroyed.unwrap();
    assert!(matches!(started, Err(HvError::NotFound { id }) if id == g.id), "{started:?}");
    assert!(hv.guests().is_empty());
}

/// The scale target: a thousand hosts with ten guests each in one process,
/// with the default (millisecond) delays, all hosts busy at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hosts_with_ten_guests_each() {
    const HOSTS: usize = 1000;
    const GUESTS: u32 = 10;
    let hosts: Vec<Arc<SimHypervisor>> =
        (0..HOSTS).map(|_| Arc::new(SimHypervisor::new(SimConfig::default()))).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for hv in &hosts {
        let hv = Arc::clone(hv);
        tasks.spawn(async move {
            for n in 0..GUESTS {
                let g = sample_guest(n);
                hv.create(&g).await?;
                hv.start(g.id).await?;
            }
            Ok::<_, HvError>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap().unwrap();
    }
    for hv in &hosts {
        let list = hv.list().await.unwrap();
        assert_eq!(list.len(), GUESTS as usize);
        assert!(list.iter().all(|s| s.state == RuntimeState::Running));
    }
}

#[tokio::test]
async fn hotplug_updates_the_running_guests_definition_and_refuses_shrinking_and_stopped_guests() {
    use drove_hypervisor::Hotplug;
    use drove_model::ByteSize;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.json");
    let hv = SimHypervisor::with_state_file(SimConfig::instant(), &path).unwrap();
    let g = sample_guest(1);
    hv.create(&g).await.unwrap();
    let add_disk = Hotplug::AddDisk { size: ByteSize::mib(64) };
    assert!(matches!(hv.hotplug(g.id, &add_disk).await, Err(HvError::InvalidState { op: "hotplug", .. })));
    hv.start(g.id).await.unwrap();

    let (vcpus, memory) = (g.spec.vcpus, g.spec.memory);
    hv.hotplug(g.id, &add_disk).await.unwrap();
    hv.hotplug(
        g.id,
        &Hotplug::AddNic {
            nic: drove_model::NicSpec::new(drove_model::VlanTag::new(10).unwrap(), "52:54:00:aa:bb:cc"),
        },
    )
    .await
    .unwrap();
    hv.hotplug(g.id, &Hotplug::SetVcpus { vcpus: vcpus + 1 }).await.unwrap();
    hv.hotplug(g.id, &Hotplug::SetMemory { memory: ByteSize(memory.bytes() * 2) }).await.unwrap();
    let shrink = hv.hotplug(g.id, &Hotplug::SetVcpus { vcpus }).await.unwrap_err();
    assert!(shrink.to_string().contains("only be added while running"), "{shrink}");
    let shrink = hv.hotplug(g.id, &Hotplug::SetMemory { memory }).await.unwrap_err();
    assert!(matches!(shrink, HvError::Unsupported { .. }), "{shrink}");

    // Saved: a reloaded simulator has the new hardware.
    let reloaded = SimHypervisor::with_state_file(SimConfig::instant(), &path).unwrap();
    let spec = reloaded.guest_config(g.id).unwrap().spec;
    assert_eq!(spec.disks.len(), g.spec.disks.len() + 1);
    assert_eq!(spec.disks.last().unwrap().size, ByteSize::mib(64));
    assert_eq!(spec.nics.last().unwrap().mac, "52:54:00:aa:bb:cc");
    assert_eq!((spec.vcpus, spec.memory), (vcpus + 1, ByteSize(memory.bytes() * 2)));
}

/// The simulated live migration follows the protocol the QEMU backend
/// does: the target waits paused, the source ends paused, finishing runs
/// the guest on the target; a cancel leaves it running on the source.
#[tokio::test]
async fn sim_migration_moves_a_guest_and_a_cancel_keeps_it_home() {
    use drove_hypervisor::migration::{DiskTransfer, Incoming, Outgoing};
    let (a, b) = (SimHypervisor::new(SimConfig::instant()), SimHypervisor::new(SimConfig::instant()));
    let g = created(&a, 1).await;
    a.start(g.id).await.unwrap();
    let lo = "127.0.0.1".parse().unwrap();
    let incoming = Incoming { listen: lo, port: 1, nbd_port: 2, disks: DiskTransfer::Mirror, key: None };
    let outgoing = Outgoing {
        target: lo,
        port: 1,
        nbd_port: 2,
        disks: DiskTransfer::Mirror,
        key: None,
        downtime_limit_ms: 50,
        max_bandwidth: 0,
    };
    b.migrate_incoming(&g, &incoming).await.unwrap();
    b.migrate_incoming(&g, &incoming).await.unwrap(); // idempotent
    assert_eq!(state_of(&b, g.id).await, RuntimeState::Paused);
    let stats = a.migrate_out(g.id, &outgoing, &|_| {}).await.unwrap();
    assert!(stats.stopped_at_us.is_some());
    assert_eq!(state_of(&a, g.id).await, RuntimeState::Paused);
    b.migrate_finish(g.id, Duration::from_secs(1), false).await.unwrap();
    b.migrate_finish(g.id, Duration::from_secs(1), false).await.unwrap(); // a lost reply's repeat
    assert_eq!(state_of(&b, g.id).await, RuntimeState::Running);
    a.destroy(g.id).await.unwrap();

    // Back, but the target never runs it: once sent, a cancel is refused
    // (the target might run it); a resume, by whoever knows it does not,
    // brings the source's copy back.
    a.migrate_incoming(&g, &incoming).await.unwrap();
    b.migrate_out(g.id, &outgoing, &|_| {}).await.unwrap();
    assert!(matches!(b.migrate_cancel(g.id).await, Err(HvError::MigrationCompleted { .. })));
    assert_eq!(state_of(&b, g.id).await, RuntimeState::Paused);
    a.destroy(g.id).await.unwrap();
    b.resume(g.id).await.unwrap();
    assert_eq!(state_of(&b, g.id).await, RuntimeState::Running);
    b.migrate_cancel(g.id).await.unwrap(); // nothing in flight: harmless
    assert!(b.migrate_finish(g.id, Duration::ZERO, false).await.is_ok(), "a running guest counts as finished");
}

// --- storage moves -----------------------------------------------------------------

/// A running guest's disks move to the shared pool and back: it keeps its
/// process, the definition (and the saved state) names the new pool, a
/// move to where it is copies nothing; refusals change nothing.
#[tokio::test]
async fn storage_moves_are_recorded_and_refusals_change_nothing() {
    use drove_hypervisor::sim::SimPool;
    use drove_model::guest::Storage;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let hv = SimHypervisor::with_state_file(SimConfig::instant(), state.clone()).unwrap();
    let mut g = sample_guest(1);
    g.spec.disks = vec![drove_model::DiskSpec::qcow2(drove_model::ByteSize::gib(1))];
    hv.create(&g).await.unwrap();
    hv.start(g.id).await.unwrap();
    let pid = hv.status(g.id).await.unwrap().pid;

    // No shared pool yet.
    let err = hv.move_storage(g.id, Storage::Shared).await.unwrap_err();
    assert!(matches!(err, HvError::Unsupported { .. }) && err.to_string().contains("no shared pool"), "{err}");
    assert_eq!(hv.guest_config(g.id).unwrap().spec.storage, Storage::Local);

    let pool = SimPool::default();
    hv.join_pool(&pool);
    let moved = hv.move_storage(g.id, Storage::Shared).await.unwrap();
    assert_eq!((moved.from, moved.to, moved.live), (Storage::Local, Storage::Shared, true));
    assert_eq!(moved.bytes, g.spec.disks.iter().map(|d| d.size.bytes()).sum::<u64>());
    let s = hv.status(g.id).await.unwrap();
    assert_eq!((s.state, s.pid), (RuntimeState::Running, pid), "the same process runs on");
    assert_eq!(hv.guest_config(g.id).unwrap().spec.storage, Storage::Shared);
    let reopened = SimHypervisor::with_state_file(SimConfig::instant(), state).unwrap();
    assert_eq!(reopened.guest_config(g.id).unwrap().spec.storage, Storage::Shared, "saved");
    let again = hv.move_storage(g.id, Storage::Shared).await.unwrap();
    assert_eq!((again.from, again.to, again.bytes), (Storage::Shared, Storage::Shared, 0));

    // Snapshots would be dropped by the copy: refused.
    hv.snapshot_create(g.id, "s1", drove_hypervisor::SnapshotKind::Disk).await.unwrap();
    let err = hv.move_storage(g.id, Storage::Local).await.unwrap_err();
    assert!(err.to_string().contains("snapshots (s1)"), "{err}");
    assert_eq!(hv.guest_config(g.id).unwrap().spec.storage, Storage::Shared);
    hv.snapshot_delete(g.id, "s1").await.unwrap();

    // An injected failure leaves it where it was; then it moves, stopped.
    hv.fail_next(SimOp::MoveStorage, "the pool is full");
    assert!(hv.move_storage(g.id, Storage::Local).await.is_err());
    assert_eq!(hv.guest_config(g.id).unwrap().spec.storage, Storage::Shared);
    hv.stop(g.id, StopMode::Force).await.unwrap();
    let moved = hv.move_storage(g.id, Storage::Local).await.unwrap();
    assert_eq!((moved.to, moved.live), (Storage::Local, false));
    assert!(matches!(hv.move_storage(GuestId::new_v4(), Storage::Local).await, Err(HvError::NotFound { .. })));
}
