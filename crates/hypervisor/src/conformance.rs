//! The behaviour every [`Hypervisor`] backend must show.
//!
//! The trait's documentation states the rules; this suite is their
//! executable form. Each rule is a [`Property`], checked against a live
//! backend through the trait alone, so the same checks run against the
//! simulator in milliseconds and against QEMU booting real guests in
//! minutes. A backend that passes can be swapped for another without the
//! agent noticing.
//!
//! The caller supplies the backend and a *template*: `template(n)` returns
//! the definition of the suite's `n`-th guest. Real backends need real specs
//! (an image, a network), so only the caller can write them. The template
//! must return a fresh guest id for every call; the suite chooses
//! generations itself, starting from the template's.
//!
//! Every property creates its own guests and destroys them afterwards, so
//! properties can run one after another against the same backend, and other
//! guests on the backend are left alone (the suite never assumes the host is
//! empty). Every call is bounded by [`Options::op_timeout`]: a hung backend
//! fails the suite instead of hanging it.
//!
//! Run everything with one call:
//!
//! ```
//! use drove_hypervisor::conformance;
//! use drove_hypervisor::sim::{sample_guest, SimConfig, SimHypervisor};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let hv = SimHypervisor::new(SimConfig::instant());
//! conformance::run_all(&hv, sample_guest).await;
//! # }
//! ```
//!
//! or get one `#[tokio::test]` per property with [`conformance_tests!`](crate::conformance_tests).
//!
//! What the suite cannot check generically — crashes, which need a way to
//! kill a guest's process, and what a restored disk or memory holds, which
//! needs a look inside the guest — each backend tests on its own.
//!
//! Snapshots need somewhere to live: the snapshot properties give the
//! template's guest one small disk if it has none.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use drove_model::GuestId;

use crate::{
    GuestConfig, GuestStatus, HvError, Hypervisor, RestoreOutcome, RuntimeState, SnapshotInfo, SnapshotKind, StopMode,
};

/// How patient the suite is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The longest any single call may take before the suite calls it hung.
    /// Must exceed `graceful_timeout` plus a forced stop.
    pub op_timeout: Duration,
    /// The timeout the suite passes in [`StopMode::Graceful`].
    pub graceful_timeout: Duration,
}

impl Default for Options {
    /// Generous for the simulator; real backends under TCG want more.
    fn default() -> Self {
        Self { op_timeout: Duration::from_secs(10), graceful_timeout: Duration::from_secs(5) }
    }
}

/// One rule of the trait, checkable on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Property {
    /// `resources` reports a host with some cores and memory.
    ResourcesAreReported,
    /// `create` defines a guest that is Stopped, at the given generation,
    /// and listed.
    CreateLeavesGuestStopped,
    /// Repeating `create` succeeds and leaves the guest as it is, whether
    /// Stopped or Running.
    CreateIsIdempotent,
    /// `create` with a newer generation updates the generation and nothing
    /// else.
    CreateWithNewerGenerationUpdatesIt,
    /// `start` makes a guest Running; starting it again succeeds without a
    /// new incarnation.
    StartRunsGuestAndIsIdempotent,
    /// `pause` makes a Running guest Paused, `resume` makes it Running again,
    /// same incarnation.
    PauseAndResume,
    /// A graceful stop makes a Running guest Stopped, and it can be started
    /// again.
    StopGracefully,
    /// A forced stop makes Running and Paused guests Stopped.
    StopForcefully,
    /// Stopping a Stopped guest succeeds, in either mode.
    StopIsIdempotent,
    /// `destroy` removes a guest in any state: `status` gives NotFound,
    /// `list` omits it, and destroying it again succeeds.
    DestroyRemovesGuest,
    /// Destroying a guest that never existed succeeds and defines nothing.
    DestroyOfUnknownGuestSucceeds,
    /// `list` shows every guest once, with its state and generation.
    ListShowsAllGuests,
    /// Operations not allowed in a state give InvalidState naming the guest
    /// and its state, and change nothing.
    InvalidStateOpsAreRefused,
    /// Operations on an unknown guest give NotFound naming it.
    UnknownGuestsAreNotFound,
    /// Disk snapshots of Stopped and Running guests are listed with their
    /// kind, leave the guest as it was, refuse taken and invalid names, and
    /// go with `snapshot_delete` (which is idempotent). Snapshot calls on
    /// an unknown guest give NotFound.
    SnapshotsAreCreatedListedAndDeleted,
    /// A memory snapshot needs a guest with a process; it keeps a Running
    /// guest running in the same incarnation.
    MemorySnapshotsNeedAProcess,
    /// `snapshot_restore` leaves the guest as its outcome says: a memory
    /// snapshot resumes a Running guest live (same incarnation), a disk
    /// snapshot reboots it, a Stopped guest stays Stopped; snapshots stay;
    /// an unknown snapshot is SnapshotNotFound.
    SnapshotRestoreRollsBack,
    /// A clone (`create` with `clone_of`) of a Stopped source, of a Running
    /// one and of one of its snapshots is a Stopped guest with the source's
    /// disks and no snapshots, that starts; the source keeps its state,
    /// incarnation and snapshots, and outlives its clones.
    ClonesCopyDisksAndLeaveTheSourceAlone,
    /// A clone of an unknown source (`CloneSource`) or snapshot
    /// (`SnapshotNotFound`), or an overlay on a Running source
    /// (`CloneSource`), is refused and defines nothing; an overlay on a
    /// Stopped source starts.
    ClonesAreRefusedWithoutEffect,
    /// `set_limits` succeeds on a Stopped guest (which then starts) and on
    /// a Running one, keeping its state, generation and incarnation, also
    /// when it removes every limit; invalid values and a pin change of a
    /// Running guest are InvalidLimits naming the field; an unknown guest
    /// is NotFound.
    LimitsChangeInAnyStateAndRefusalsNameTheField,
    /// A guest with a raw-file disk is created, starts and stops; a
    /// snapshot of it (create or restore) is `DiskKind` naming the disk and
    /// changes nothing, its list is empty and a delete succeeds; a copy of
    /// it while it runs is `CloneSource`; a block disk whose path is not
    /// under /dev is `DiskKind` and defines nothing.
    DiskKindsRefuseWhatTheyCannotDo,
    /// `usage` of a guest with a process (Running, Paused) names that
    /// process (the pid `status` reports), has some resident memory, and
    /// its counters never go back while the process lives; a restart is a
    /// new incarnation (so no rate is taken across it). A Stopped guest is
    /// InvalidState, an unknown one NotFound.
    UsageIsCountedPerIncarnation,
    /// `reset` reboots a Running guest in the same process (same pid); it
    /// stays Running. A Paused or Stopped guest is InvalidState, an unknown
    /// one NotFound.
    ResetRebootsInPlace,
}

impl Property {
    pub const ALL: [Property; 23] = [
        Property::ResourcesAreReported,
        Property::CreateLeavesGuestStopped,
        Property::CreateIsIdempotent,
        Property::CreateWithNewerGenerationUpdatesIt,
        Property::StartRunsGuestAndIsIdempotent,
        Property::PauseAndResume,
        Property::StopGracefully,
        Property::StopForcefully,
        Property::StopIsIdempotent,
        Property::DestroyRemovesGuest,
        Property::DestroyOfUnknownGuestSucceeds,
        Property::ListShowsAllGuests,
        Property::InvalidStateOpsAreRefused,
        Property::UnknownGuestsAreNotFound,
        Property::SnapshotsAreCreatedListedAndDeleted,
        Property::MemorySnapshotsNeedAProcess,
        Property::SnapshotRestoreRollsBack,
        Property::ClonesCopyDisksAndLeaveTheSourceAlone,
        Property::ClonesAreRefusedWithoutEffect,
        Property::LimitsChangeInAnyStateAndRefusalsNameTheField,
        Property::DiskKindsRefuseWhatTheyCannotDo,
        Property::UsageIsCountedPerIncarnation,
        Property::ResetRebootsInPlace,
    ];

    /// The snake-case name, as in test names.
    pub const fn name(self) -> &'static str {
        match self {
            Property::ResourcesAreReported => "resources_are_reported",
            Property::CreateLeavesGuestStopped => "create_leaves_guest_stopped",
            Property::CreateIsIdempotent => "create_is_idempotent",
            Property::CreateWithNewerGenerationUpdatesIt => "create_with_newer_generation_updates_it",
            Property::StartRunsGuestAndIsIdempotent => "start_runs_guest_and_is_idempotent",
            Property::PauseAndResume => "pause_and_resume",
            Property::ResetRebootsInPlace => "reset_reboots_in_place",
            Property::StopGracefully => "stop_gracefully",
            Property::StopForcefully => "stop_forcefully",
            Property::StopIsIdempotent => "stop_is_idempotent",
            Property::DestroyRemovesGuest => "destroy_removes_guest",
            Property::DestroyOfUnknownGuestSucceeds => "destroy_of_unknown_guest_succeeds",
            Property::ListShowsAllGuests => "list_shows_all_guests",
            Property::InvalidStateOpsAreRefused => "invalid_state_ops_are_refused",
            Property::UnknownGuestsAreNotFound => "unknown_guests_are_not_found",
            Property::SnapshotsAreCreatedListedAndDeleted => "snapshots_are_created_listed_and_deleted",
            Property::MemorySnapshotsNeedAProcess => "memory_snapshots_need_a_process",
            Property::SnapshotRestoreRollsBack => "snapshot_restore_rolls_back",
            Property::ClonesCopyDisksAndLeaveTheSourceAlone => "clones_copy_disks_and_leave_the_source_alone",
            Property::ClonesAreRefusedWithoutEffect => "clones_are_refused_without_effect",
            Property::LimitsChangeInAnyStateAndRefusalsNameTheField => {
                "limits_change_in_any_state_and_refusals_name_the_field"
            }
            Property::DiskKindsRefuseWhatTheyCannotDo => "disk_kinds_refuse_what_they_cannot_do",
            Property::UsageIsCountedPerIncarnation => "usage_is_counted_per_incarnation",
        }
    }

    /// Checks this property against `hv`, then destroys the guests it
    /// created (a failed cleanup is a violation too).
    pub async fn check<H, F>(self, hv: &H, template: F, options: &Options) -> Result<(), Violation>
    where
        H: Hypervisor,
        F: Fn(u32) -> GuestConfig,
    {
        let mut next_index = 0;
        self.check_from(hv, &template, options, &mut next_index).await
    }

    async fn check_from<H, F>(
        self,
        hv: &H,
        template: &F,
        options: &Options,
        next_index: &mut u32,
    ) -> Result<(), Violation>
    where
        H: Hypervisor,
        F: Fn(u32) -> GuestConfig,
    {
        let mut cx = Cx { hv, template, options, next_index, created: Vec::new() };
        let outcome = self.run(&mut cx).await;
        let cleanup = cx.cleanup().await;
        let message = match (outcome, cleanup) {
            (Ok(()), Ok(())) => return Ok(()),
            (Err(e), Ok(())) => e,
            (Ok(()), Err(c)) => format!("cleanup: {c}"),
            (Err(e), Err(c)) => format!("{e}; and cleanup: {c}"),
        };
        Err(Violation { property: self, message })
    }

    async fn run<H, F>(self, cx: &mut Cx<'_, H, F>) -> Check
    where
        H: Hypervisor,
        F: Fn(u32) -> GuestConfig,
    {
        match self {
            Property::ResourcesAreReported => resources_are_reported(cx).await,
            Property::CreateLeavesGuestStopped => create_leaves_guest_stopped(cx).await,
            Property::CreateIsIdempotent => create_is_idempotent(cx).await,
            Property::CreateWithNewerGenerationUpdatesIt => create_with_newer_generation_updates_it(cx).await,
            Property::StartRunsGuestAndIsIdempotent => start_runs_guest_and_is_idempotent(cx).await,
            Property::PauseAndResume => pause_and_resume(cx).await,
            Property::ResetRebootsInPlace => reset_reboots_in_place(cx).await,
            Property::StopGracefully => stop_gracefully(cx).await,
            Property::StopForcefully => stop_forcefully(cx).await,
            Property::StopIsIdempotent => stop_is_idempotent(cx).await,
            Property::DestroyRemovesGuest => destroy_removes_guest(cx).await,
            Property::DestroyOfUnknownGuestSucceeds => destroy_of_unknown_guest_succeeds(cx).await,
            Property::ListShowsAllGuests => list_shows_all_guests(cx).await,
            Property::InvalidStateOpsAreRefused => invalid_state_ops_are_refused(cx).await,
            Property::UnknownGuestsAreNotFound => unknown_guests_are_not_found(cx).await,
            Property::SnapshotsAreCreatedListedAndDeleted => snapshots_are_created_listed_and_deleted(cx).await,
            Property::MemorySnapshotsNeedAProcess => memory_snapshots_need_a_process(cx).await,
            Property::SnapshotRestoreRollsBack => snapshot_restore_rolls_back(cx).await,
            Property::ClonesCopyDisksAndLeaveTheSourceAlone => clones_copy_disks_and_leave_the_source_alone(cx).await,
            Property::ClonesAreRefusedWithoutEffect => clones_are_refused_without_effect(cx).await,
            Property::LimitsChangeInAnyStateAndRefusalsNameTheField => {
                limits_change_in_any_state_and_refusals_name_the_field(cx).await
            }
            Property::DiskKindsRefuseWhatTheyCannotDo => disk_kinds_refuse_what_they_cannot_do(cx).await,
            Property::UsageIsCountedPerIncarnation => usage_is_counted_per_incarnation(cx).await,
        }
    }
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A property the backend does not have, and what was observed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{property}: {message}")]
pub struct Violation {
    pub property: Property,
    pub message: String,
}

/// Every violation found by one run of the suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteFailure {
    pub violations: Vec<Violation>,
}

impl fmt::Display for SuiteFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {} hypervisor conformance properties violated", self.violations.len(), Property::ALL.len())?;
        for v in &self.violations {
            write!(f, "\n  - {v}")?;
        }
        Ok(())
    }
}

impl Error for SuiteFailure {}

/// Runs every property with default [`Options`]; panics listing all
/// violations.
pub async fn run_all<H, F>(hv: &H, template: F)
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    run_all_with(hv, template, &Options::default()).await;
}

/// Runs every property; panics listing all violations.
pub async fn run_all_with<H, F>(hv: &H, template: F, options: &Options)
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    if let Err(failure) = check_all(hv, template, options).await {
        panic!("{failure}");
    }
}

/// Runs one property; panics with the violation. What the tests generated
/// by [`conformance_tests!`](crate::conformance_tests) call.
pub async fn run_one<H, F>(hv: &H, template: F, property: Property, options: &Options)
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    if let Err(violation) = property.check(hv, template, options).await {
        panic!("{hv:?} violates {violation}");
    }
}

/// Runs every property, one after another, and returns all violations
/// rather than stopping at the first.
pub async fn check_all<H, F>(hv: &H, template: F, options: &Options) -> Result<(), SuiteFailure>
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    // One index sequence across properties: template(n) is called once per
    // n, so templates that derive names or disk paths from n never collide.
    let mut next_index = 0;
    let mut violations = Vec::new();
    for property in Property::ALL {
        if let Err(v) = property.check_from(hv, &template, options, &mut next_index).await {
            violations.push(v);
        }
    }
    if violations.is_empty() { Ok(()) } else { Err(SuiteFailure { violations }) }
}

/// Generates a module with one `#[tokio::test]` per [`Property`].
///
/// `hypervisor` is evaluated inside each (async) test, so it may `.await`;
/// `template` is anything `Fn(u32) -> GuestConfig`; `options` defaults to
/// [`Options::default()`]. Items of the calling module are in scope.
///
/// ```ignore
/// drove_hypervisor::conformance_tests!(
///     sim_conformance,
///     hypervisor = SimHypervisor::new(SimConfig::instant()),
///     template = sample_guest,
/// );
/// ```
#[macro_export]
macro_rules! conformance_tests {
    (
        $module:ident,
        hypervisor = $hv:expr,
        template = $template:expr
        $(, options = $options:expr)?
        $(,)?
    ) => {
        $crate::conformance_tests!(@module $module ($hv) ($template)
            ($crate::conformance_tests!(@options $($options)?))
            resources_are_reported => ResourcesAreReported,
            create_leaves_guest_stopped => CreateLeavesGuestStopped,
            create_is_idempotent => CreateIsIdempotent,
            create_with_newer_generation_updates_it => CreateWithNewerGenerationUpdatesIt,
            start_runs_guest_and_is_idempotent => StartRunsGuestAndIsIdempotent,
            pause_and_resume => PauseAndResume,
            stop_gracefully => StopGracefully,
            stop_forcefully => StopForcefully,
            stop_is_idempotent => StopIsIdempotent,
            destroy_removes_guest => DestroyRemovesGuest,
            destroy_of_unknown_guest_succeeds => DestroyOfUnknownGuestSucceeds,
            list_shows_all_guests => ListShowsAllGuests,
            invalid_state_ops_are_refused => InvalidStateOpsAreRefused,
            unknown_guests_are_not_found => UnknownGuestsAreNotFound,
            snapshots_are_created_listed_and_deleted => SnapshotsAreCreatedListedAndDeleted,
            memory_snapshots_need_a_process => MemorySnapshotsNeedAProcess,
            snapshot_restore_rolls_back => SnapshotRestoreRollsBack,
            clones_copy_disks_and_leave_the_source_alone => ClonesCopyDisksAndLeaveTheSourceAlone,
            clones_are_refused_without_effect => ClonesAreRefusedWithoutEffect,
            limits_change_in_any_state_and_refusals_name_the_field => LimitsChangeInAnyStateAndRefusalsNameTheField,
            disk_kinds_refuse_what_they_cannot_do => DiskKindsRefuseWhatTheyCannotDo,
            usage_is_counted_per_incarnation => UsageIsCountedPerIncarnation,
            reset_reboots_in_place => ResetRebootsInPlace,
        );
    };
    (@module $module:ident ($hv:expr) ($template:expr) ($options:expr)
        $($test:ident => $property:ident,)*
    ) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            // A property added to the enum but not to this list fails to
            // compile here instead of silently going untested.
            const _: () = assert!(
                [$(stringify!($test)),*].len() == $crate::conformance::Property::ALL.len()
            );

            $(
                #[::tokio::test]
                async fn $test() {
                    let hv = $hv;
                    let options: $crate::conformance::Options = $options;
                    $crate::conformance::run_one(
                        &hv,
                        $template,
                        $crate::conformance::Property::$property,
                        &options,
                    )
                    .await;
                }
            )*
        }
    };
    (@options) => { ::std::default::Default::default() };
    (@options $options:expr) => { $options };
}

/// The outcome of a check: what was observed when it failed.
type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// The context of one property check: the backend, the template, and the
/// guests to clean up afterwards.
struct Cx<'a, H, F> {
    hv: &'a H,
    template: &'a F,
    options: &'a Options,
    next_index: &'a mut u32,
    created: Vec<GuestId>,
}

impl<H, F> Cx<'_, H, F>
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    /// The next guest definition from the template, after making sure the
    /// backend does not know its id yet.
    async fn fresh(&mut self) -> Result<GuestConfig, String> {
        let n = *self.next_index;
        *self.next_index += 1;
        let config = (self.template)(n);
        let id = config.id;
        ensure!(
            !self.created.contains(&id),
            "template({n}) returned id {id} again; the suite needs a fresh id per call"
        );
        let seen = self.call(format!("status({id})"), self.hv.status(id)).await?;
        ensure!(
            matches!(seen, Err(HvError::NotFound { .. })),
            "template({n}) returned id {id}, which the backend already knows ({}); the suite needs fresh ids",
            describe(&seen)
        );
        // Recorded before `create` runs: a create that fails half-way must
        // still be cleaned up.
        self.created.push(id);
        Ok(config)
    }

    /// A fresh guest, created (Stopped).
    async fn stopped(&mut self) -> Result<GuestConfig, String> {
        let config = self.fresh().await?;
        self.create(&config).await?;
        Ok(config)
    }

    /// A fresh guest with at least one disk, created (Stopped).
    async fn stopped_with_disk(&mut self) -> Result<GuestConfig, String> {
        let mut config = self.fresh().await?;
        if config.spec.disks.is_empty() {
            config.spec.disks.push(drove_model::DiskSpec::qcow2(drove_model::ByteSize::mib(16)));
        }
        self.create(&config).await?;
        Ok(config)
    }

    /// A fresh definition cloned from `source` (not created yet).
    async fn clone_of(
        &mut self,
        source: &GuestConfig,
        snapshot: Option<&str>,
        mode: drove_model::CloneMode,
    ) -> Result<GuestConfig, String> {
        let mut config = self.fresh().await?;
        config.spec.disks = source.spec.disks.clone();
        config.spec.image = source.spec.image.clone();
        config.spec.clone_of = Some(drove_model::CloneSource {
            guest: source.id,
            snapshot: snapshot.map(Into::into),
            mode,
            shared_disks: None,
        });
        Ok(config)
    }

    async fn snapshot(&self, id: GuestId, name: &str, kind: SnapshotKind) -> Result<SnapshotInfo, String> {
        self.ok(format!("snapshot_create({id}, {name:?}, {kind:?})"), self.hv.snapshot_create(id, name, kind)).await
    }

    async fn restore(&self, id: GuestId, name: &str) -> Result<RestoreOutcome, String> {
        self.ok(format!("snapshot_restore({id}, {name:?})"), self.hv.snapshot_restore(id, name)).await
    }

    /// `snapshot_list(id)` as (name, kind) pairs.
    async fn snapshots(&self, id: GuestId) -> Result<Vec<(String, SnapshotKind)>, String> {
        let list = self.ok(format!("snapshot_list({id})"), self.hv.snapshot_list(id)).await?;
        Ok(list.into_iter().map(|s| (s.name, s.kind)).collect())
    }

    /// A fresh guest, created and started.
    async fn running(&mut self) -> Result<GuestConfig, String> {
        let config = self.stopped().await?;
        self.start(config.id).await?;
        Ok(config)
    }

    /// A fresh guest, created, started and paused.
    async fn paused(&mut self) -> Result<GuestConfig, String> {
        let config = self.running().await?;
        self.pause(config.id).await?;
        Ok(config)
    }

    /// Awaits `fut` within the call timeout. The outer error is the timeout,
    /// the inner result the backend's answer.
    async fn call<T>(
        &self,
        what: String,
        fut: impl Future<Output = Result<T, HvError>>,
    ) -> Result<Result<T, HvError>, String> {
        let limit = self.options.op_timeout;
        tokio::time::timeout(limit, fut).await.map_err(|_| format!("{what} did not return within {limit:?}"))
    }

    /// Awaits `fut`, which must succeed.
    async fn ok<T>(&self, what: String, fut: impl Future<Output = Result<T, HvError>>) -> Result<T, String> {
        match self.call(what.clone(), fut).await? {
            Ok(v) => Ok(v),
            Err(e) => Err(format!("{what} failed: {}", chain(&e))),
        }
    }

    async fn create(&self, config: &GuestConfig) -> Check {
        let what = format!("create({}, generation {})", config.id, config.generation);
        self.ok(what, self.hv.create(config)).await
    }

    async fn start(&self, id: GuestId) -> Check {
        self.ok(format!("start({id})"), self.hv.start(id)).await
    }

    async fn stop(&self, id: GuestId, mode: StopMode) -> Check {
        self.ok(format!("stop({id}, {mode:?})"), self.hv.stop(id, mode)).await
    }

    async fn pause(&self, id: GuestId) -> Check {
        self.ok(format!("pause({id})"), self.hv.pause(id)).await
    }

    async fn resume(&self, id: GuestId) -> Check {
        self.ok(format!("resume({id})"), self.hv.resume(id)).await
    }

    async fn destroy(&self, id: GuestId) -> Check {
        self.ok(format!("destroy({id})"), self.hv.destroy(id)).await
    }

    async fn list(&self) -> Result<Vec<GuestStatus>, String> {
        self.ok("list()".to_owned(), self.hv.list()).await
    }

    fn graceful(&self) -> StopMode {
        StopMode::Graceful { timeout: self.options.graceful_timeout }
    }

    /// `status(id)` must report `state` at `generation`; returns the status.
    async fn expect(
        &self,
        id: GuestId,
        state: RuntimeState,
        generation: u64,
        after: &str,
    ) -> Result<GuestStatus, String> {
        let status = self.ok(format!("status({id}) after {after}"), self.hv.status(id)).await?;
        ensure!(status.id == id, "status({id}) after {after} describes guest {}", status.id);
        ensure!(
            status.state == state && status.generation == generation,
            "after {after}, guest {id} should be {state:?} at generation {generation}, \
             but status says {:?} at generation {}",
            status.state,
            status.generation
        );
        Ok(status)
    }

    /// `list()` must contain `id` exactly once; returns its entry.
    async fn listed(&self, id: GuestId, after: &str) -> Result<GuestStatus, String> {
        let list = self.list().await?;
        let mut entries = list.iter().filter(|s| s.id == id);
        let entry = entries.next().cloned();
        let more = entries.count();
        ensure!(more == 0, "after {after}, list() shows guest {id} {} times", more + 1);
        entry.ok_or_else(|| format!("after {after}, list() does not show guest {id}"))
    }

    /// Destroys every guest this check created, reporting all failures.
    async fn cleanup(&mut self) -> Check {
        let mut failures = Vec::new();
        for id in std::mem::take(&mut self.created) {
            if let Err(e) = self.destroy(id).await {
                failures.push(e);
            }
        }
        if failures.is_empty() { Ok(()) } else { Err(failures.join("; ")) }
    }
}

/// The error and its causes on one line: `HvError`'s own message names the
/// operation and guest, its sources say why.
fn chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn describe<T: fmt::Debug>(result: &Result<T, HvError>) -> String {
    match result {
        Ok(v) => format!("succeeded with {v:?}"),
        Err(e) => format!("failed with {}", chain(e)),
    }
}

/// The same incarnation: if the backend reports pids, they must not change.
fn same_incarnation(before: &GuestStatus, after: &GuestStatus, during: &str) -> Check {
    ensure!(
        before.pid.is_none() || before.pid == after.pid,
        "{during} of guest {} changed its process from {:?} to {:?}; it must keep the incarnation",
        before.id,
        before.pid,
        after.pid
    );
    Ok(())
}

fn expect_not_found<T: fmt::Debug>(what: &str, result: &Result<T, HvError>, id: GuestId) -> Check {
    match result {
        Err(HvError::NotFound { id: got }) if *got == id => Ok(()),
        Err(HvError::NotFound { id: got }) => Err(format!("{what} gave NotFound for guest {got} instead of {id}")),
        other => Err(format!("{what} should give NotFound, but {}", describe(other))),
    }
}

fn expect_invalid_state<T: fmt::Debug>(
    what: &str,
    result: &Result<T, HvError>,
    id: GuestId,
    state: RuntimeState,
) -> Check {
    match result {
        Err(HvError::InvalidState { id: got_id, state: got_state, .. }) if *got_id == id && *got_state == state => {
            Ok(())
        }
        Err(HvError::InvalidState { id: got_id, state: got_state, .. }) => Err(format!(
            "{what} gave InvalidState for guest {got_id} in state {got_state:?}, \
             expected guest {id} in state {state:?}"
        )),
        other => Err(format!("{what} on a {state:?} guest should give InvalidState, but {}", describe(other))),
    }
}

async fn resources_are_reported<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let r = cx.ok("resources()".to_owned(), cx.hv.resources()).await?;
    ensure!(r.cores > 0, "resources() reports no cores: {r:?}");
    ensure!(r.memory.bytes() > 0, "resources() reports no memory: {r:?}");
    Ok(())
}

async fn create_leaves_guest_stopped<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let g = cx.stopped().await?;
    cx.expect(g.id, RuntimeState::Stopped, g.generation, "create").await?;
    let entry = cx.listed(g.id, "create").await?;
    ensure!(
        entry.state == RuntimeState::Stopped && entry.generation == g.generation,
        "after create, list() shows guest {} as {:?} at generation {}, expected Stopped at {}",
        g.id,
        entry.state,
        entry.generation,
        g.generation
    );
    Ok(())
}

async fn create_is_idempotent<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let g = cx.stopped().await?;
    cx.create(&g).await?;
    cx.expect(g.id, RuntimeState::Stopped, g.generation, "a repeated create").await?;
    cx.listed(g.id, "a repeated create").await?;

    // "An existing guest is left as it is": a repeated create must not stop
    // or reboot a running guest.
    cx.start(g.id).await?;
    let before = cx.expect(g.id, RuntimeState::Running, g.generation, "start").await?;
    cx.create(&g).await?;
    let after = cx.expect(g.id, RuntimeState::Running, g.generation, "create of a running guest").await?;
    same_incarnation(&before, &after, "a repeated create")
}

async fn create_with_newer_generation_updates_it<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let mut g = cx.stopped().await?;
    g.generation += 1;
    cx.create(&g).await?;
    cx.expect(g.id, RuntimeState::Stopped, g.generation, "create with a newer generation").await?;

    cx.start(g.id).await?;
    let before = cx.expect(g.id, RuntimeState::Running, g.generation, "start").await?;
    g.generation += 1;
    cx.create(&g).await?;
    let after = cx
        .expect(g.id, RuntimeState::Running, g.generation, "create with a newer generation of a running guest")
        .await?;
    same_incarnation(&before, &after, "create with a newer generation")?;
    let entry = cx.listed(g.id, "create with a newer generation").await?;
    ensure!(
        entry.generation == g.generation,
        "list() shows guest {} at generation {}, status at {}",
        g.id,
        entry.generation,
        g.generation
    );
    Ok(())
}

async fn start_runs_guest_and_is_idempotent<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let g = cx.running().await?;
    let first = cx.expect(g.id, RuntimeState::Running, g.generation, "start").await?;
    cx.start(g.id).await?;
    let second = cx.expect(g.id, RuntimeState::Running, g.generation, "start of a running guest").await?;
    same_incarnation(&first, &second, "a repeated start")
}

async fn pause_and_resume<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let g = cx.running().await?;
    let running = cx.expect(g.id, RuntimeState::Running, g.generation, "start").await?;
    cx.pause(g.id).await?;
    let paused = cx.expect(g.id, RuntimeState::Paused, g.generation, "pause").await?;
    same_incarnation(&running, &paused, "pause")?;
    cx.resume(g.id).await?;
    let resumed = cx.expect(g.id, RuntimeState::Running, g.generation, "resume").await?;
    same_incarnation(&running, &resumed, "pause and resume")
}

async fn reset_reboots_in_place<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let g = cx.stopped().await?;
    let refused = cx.call(format!("reset({}) while stopped", g.id), cx.hv.reset(g.id)).await?;
    ensure!(
        matches!(refused, Err(HvError::InvalidState { id, state: RuntimeState::Stopped, .. }) if id == g.id),
        "reset of a Stopped guest gave {}, not InvalidState naming it",
        describe(&refused)
    );
    cx.start(g.id).await?;
    let running = cx.expect(g.id, RuntimeState::Running, g.generation, "start").await?;
    cx.ok(format!("reset({})", g.id), cx.hv.reset(g.id)).await?;
    let reset = cx.expect(g.id, RuntimeState::Running, g.generation, "reset").await?;
    same_incarnation(&running, &reset, "reset")?;
    cx.pause(g.id).await?;
    let refused = cx.call(format!("reset({}) while paused", g.id), cx.hv.reset(g.id)).await?;
    ensure!(
        matches!(refused, Err(HvError::InvalidState { id, state: RuntimeState::Paused, .. }) if id == g.id),
        "reset of a Paused guest gave {}, not InvalidState naming it",
        describe(&refused)
    );
    cx.expect(g.id, RuntimeState::Paused, g.generation, "a refused reset").await?;
    let unknown = GuestId::new_v4();
    let missing = cx.call(format!("reset({unknown})"), cx.hv.reset(unknown)).await?;
    ensure!(
        matches!(missing, Err(HvError::NotFound { id }) if id == unknown),
        "reset of an unknown guest gave {}, not NotFound naming it",
        describe(&missing)
    );
    Ok(())
}

async fn usage_is_counted_per_incarnation<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let g = cx.stopped().await?;
    let stopped = cx.call(format!("usage({})", g.id), cx.hv.usage(g.id)).await?;
    ensure!(
        matches!(stopped, Err(HvError::InvalidState { id, .. }) if id == g.id),
        "usage of a Stopped guest gave {}, not InvalidState naming it",
        describe(&stopped)
    );
    let unknown = GuestId::new_v4();
    let missing = cx.call(format!("usage({unknown})"), cx.hv.usage(unknown)).await?;
    ensure!(
        matches!(missing, Err(HvError::NotFound { id }) if id == unknown),
        "usage of an unknown guest gave {}, not NotFound naming it",
        describe(&missing)
    );
    cx.start(g.id).await?;
    let running = cx.expect(g.id, RuntimeState::Running, g.generation, "start").await?;
    let first = cx.ok(format!("usage({})", g.id), cx.hv.usage(g.id)).await?;
    ensure!(Some(first.pid) == running.pid, "usage names pid {} but status says {:?}", first.pid, running.pid);
    ensure!(first.memory_bytes > 0, "a running guest has no resident memory: {first:?}");
    cx.pause(g.id).await?;
    let paused = cx.ok(format!("usage({}) while paused", g.id), cx.hv.usage(g.id)).await?;
    cx.resume(g.id).await?;
    let later = cx.ok(format!("usage({}) after resume", g.id), cx.hv.usage(g.id)).await?;
    for (before, after, when) in [(&first, &paused, "pause"), (&paused, &later, "resume")] {
        ensure!(
            (after.pid, after.started) == (before.pid, before.started),
            "the same process reads as another incarnation across {when}: {before:?} then {after:?}"
        );
        ensure!(
            after.cpu_ns >= before.cpu_ns
                && after.net_rx_bytes >= before.net_rx_bytes
                && after.net_tx_bytes >= before.net_tx_bytes
                && after.disk_read_bytes >= before.disk_read_bytes
                && after.disk_written_bytes >= before.disk_written_bytes,
            "a counter went back across {when}: {before:?} then {after:?}"
        );
    }
    cx.stop(g.id, StopMode::Force).await?;
    cx.start(g.id).await?;
    let again = cx.ok(format!("usage({}) after a restart", g.id), cx.hv.usage(g.id)).await?;
    ensure!(
        (again.pid, again.started) != (later.pid, later.started),
        "a restarted guest reads as the same incarnation: {later:?} then {again:?}"
    );
    ensure!(
        again.rate_since(&later, Duration::from_secs(1)).is_none(),
        "a rate was taken across a restart: {later:?} then {again:?}"
    );
    Ok(())
}

async fn stop_gracefully<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let g = cx.running().await?;
    cx.stop(g.id, cx.graceful()).await?;
    cx.expect(g.id, RuntimeState::Stopped, g.generation, "a graceful stop").await?;
    cx.start(g.id).await?;
    cx.expect(g.id, RuntimeState::Running, g.generation, "start after a graceful stop").await?;
    Ok(())
}

async fn stop_forcefully<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let running = cx.running().await?;
    cx.stop(running.id, StopMode::Force).await?;
    cx.expect(running.id, RuntimeState::Stopped, running.generation, "a forced stop of a running guest").await?;

    let paused = cx.paused().await?;
    cx.stop(paused.id, StopMode::Force).await?;
    cx.expect(paused.id, RuntimeState::Stopped, paused.generation, "a forced stop of a paused guest").await?;
    Ok(())
}

async fn stop_is_idempotent<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    // Never started.
    let g = cx.stopped().await?;
    cx.stop(g.id, StopMode::Force).await?;
    cx.stop(g.id, cx.graceful()).await?;
    cx.expect(g.id, RuntimeState::Stopped, g.generation, "stops of a never-started guest").await?;

    // Started, stopped, stopped again.
    cx.start(g.id).await?;
    cx.stop(g.id, cx.graceful()).await?;
    cx.stop(g.id, cx.graceful()).await?;
    cx.stop(g.id, StopMode::Force).await?;
    cx.expect(g.id, RuntimeState::Stopped, g.generation, "repeated stops of a stopped guest").await?;
    Ok(())
}

async fn destroy_removes_guest<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let guests = [("Stopped", cx.stopped().await?), ("Running", cx.running().await?), ("Paused", cx.paused().await?)];
    for (state, g) in &guests {
        let id = g.id;
        cx.destroy(id).await?;
        let after = format!("destroy of a {state} guest");
        let status = cx.call(format!("status({id})"), cx.hv.status(id)).await?;
        expect_not_found(&format!("status({id}) after {after}"), &status, id)?;
        let list = cx.list().await?;
        ensure!(list.iter().all(|s| s.id != id), "after {after}, list() still shows guest {id}");
        cx.destroy(id).await.map_err(|e| format!("a repeated destroy must succeed: {e}"))?;
    }
    Ok(())
}

async fn destroy_of_unknown_guest_succeeds<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let g = cx.fresh().await?;
    cx.destroy(g.id).await?;
    let status = cx.call(format!("status({})", g.id), cx.hv.status(g.id)).await?;
    expect_not_found(&format!("status({}) after destroying it unknown", g.id), &status, g.id)
}

async fn list_shows_all_guests<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let stopped = cx.stopped().await?;
    let mut running = cx.fresh().await?;
    // Different generations, so a backend that mixes them up is caught.
    running.generation += 1;
    cx.create(&running).await?;
    cx.start(running.id).await?;
    let mut paused = cx.fresh().await?;
    paused.generation += 2;
    cx.create(&paused).await?;
    cx.start(paused.id).await?;
    cx.pause(paused.id).await?;

    let list = cx.list().await?;
    for (g, state) in
        [(&stopped, RuntimeState::Stopped), (&running, RuntimeState::Running), (&paused, RuntimeState::Paused)]
    {
        let entries: Vec<&GuestStatus> = list.iter().filter(|s| s.id == g.id).collect();
        ensure!(entries.len() == 1, "list() shows guest {} {} times, expected once", g.id, entries.len());
        let entry = entries[0];
        ensure!(
            entry.state == state && entry.generation == g.generation,
            "list() shows guest {} as {:?} at generation {}, expected {state:?} at {}",
            g.id,
            entry.state,
            entry.generation,
            g.generation
        );
    }
    let mut ids: Vec<GuestId> = list.iter().map(|s| s.id).collect();
    ids.sort();
    ids.dedup();
    ensure!(ids.len() == list.len(), "list() shows some guest more than once: {list:?}");
    Ok(())
}

async fn invalid_state_ops_are_refused<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    use RuntimeState::{Paused, Running, Stopped};

    let g = cx.stopped().await?;
    let id = g.id;
    let r = cx.call(format!("pause({id})"), cx.hv.pause(id)).await?;
    expect_invalid_state(&format!("pause({id})"), &r, id, Stopped)?;
    let r = cx.call(format!("resume({id})"), cx.hv.resume(id)).await?;
    expect_invalid_state(&format!("resume({id})"), &r, id, Stopped)?;
    cx.expect(id, Stopped, g.generation, "refused pause and resume").await?;

    cx.start(id).await?;
    let r = cx.call(format!("resume({id})"), cx.hv.resume(id)).await?;
    expect_invalid_state(&format!("resume({id})"), &r, id, Running)?;
    cx.expect(id, Running, g.generation, "a refused resume").await?;

    cx.pause(id).await?;
    let r = cx.call(format!("pause({id})"), cx.hv.pause(id)).await?;
    expect_invalid_state(&format!("pause({id})"), &r, id, Paused)?;
    // A paused guest is resumed, not booted.
    let r = cx.call(format!("start({id})"), cx.hv.start(id)).await?;
    expect_invalid_state(&format!("start({id})"), &r, id, Paused)?;
    cx.expect(id, Paused, g.generation, "refused pause and start").await?;
    Ok(())
}

async fn unknown_guests_are_not_found<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    let id = cx.fresh().await?.id;
    let graceful = cx.graceful();
    let r = cx.call(format!("start({id})"), cx.hv.start(id)).await?;
    expect_not_found(&format!("start({id})"), &r, id)?;
    let r = cx.call(format!("stop({id}, Force)"), cx.hv.stop(id, StopMode::Force)).await?;
    expect_not_found(&format!("stop({id}, Force)"), &r, id)?;
    let r = cx.call(format!("stop({id}, {graceful:?})"), cx.hv.stop(id, graceful)).await?;
    expect_not_found(&format!("stop({id}, Graceful)"), &r, id)?;
    let r = cx.call(format!("pause({id})"), cx.hv.pause(id)).await?;
    expect_not_found(&format!("pause({id})"), &r, id)?;
    let r = cx.call(format!("resume({id})"), cx.hv.resume(id)).await?;
    expect_not_found(&format!("resume({id})"), &r, id)?;
    let r = cx.call(format!("status({id})"), cx.hv.status(id)).await?;
    expect_not_found(&format!("status({id})"), &r, id)?;
    Ok(())
}

fn expect_invalid_snapshot<T: fmt::Debug>(what: &str, result: &Result<T, HvError>, id: GuestId, name: &str) -> Check {
    match result {
        Err(HvError::InvalidSnapshot { id: got, name: n, .. }) if *got == id && n == name => Ok(()),
        other => {
            Err(format!("{what} should give InvalidSnapshot for guest {id} and {name:?}, but {}", describe(other)))
        }
    }
}

fn names(list: &[(&str, SnapshotKind)]) -> Vec<(String, SnapshotKind)> {
    list.iter().map(|(n, k)| ((*n).to_owned(), *k)).collect()
}

async fn disk_kinds_refuse_what_they_cannot_do<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    use drove_model::{ByteSize, DiskSpec};
    let mut g = cx.fresh().await?;
    g.spec.disks = vec![DiskSpec::qcow2(ByteSize::mib(16)), DiskSpec::raw(ByteSize::mib(16))];
    let id = g.id;
    cx.create(&g).await?;
    cx.start(id).await?;
    let before = cx.expect(id, RuntimeState::Running, g.generation, "start of a guest with a raw disk").await?;
    let refused_kind = |what: &str, err: Option<&HvError>| -> Check {
        match err {
            Some(e @ HvError::DiskKind { id: got, .. })
                if *got == id && e.to_string().contains("disk 1 is a raw file") =>
            {
                Ok(())
            }
            Some(e) => {
                Err(format!("{what} of guest {id} with a raw disk 1: expected DiskKind naming it, got {}", chain(e)))
            }
            None => Err(format!("{what} of guest {id} with a raw disk 1 succeeded; expected DiskKind")),
        }
    };
    let r = cx.call(format!("snapshot_create({id})"), cx.hv.snapshot_create(id, "s", SnapshotKind::Disk)).await?;
    refused_kind("snapshot_create", r.as_ref().err())?;
    let r = cx.call(format!("snapshot_restore({id})"), cx.hv.snapshot_restore(id, "s")).await?;
    refused_kind("snapshot_restore", r.as_ref().err())?;
    let listed = cx.snapshots(id).await?;
    ensure!(listed.is_empty(), "snapshot_list of a guest with a raw disk gives {listed:?}");
    cx.ok(format!("snapshot_delete({id})"), cx.hv.snapshot_delete(id, "s")).await?;
    let after = cx.expect(id, RuntimeState::Running, g.generation, "refused snapshots").await?;
    same_incarnation(&before, &after, "refused snapshots")?;

    let mut copy = cx.clone_of(&g, None, drove_model::CloneMode::Copy).await?;
    copy.spec.disks = vec![DiskSpec::qcow2(ByteSize::mib(16)), DiskSpec::qcow2(ByteSize::mib(16))];
    let r = cx.call(format!("create({}) cloning running {id}", copy.id), cx.hv.create(&copy)).await?;
    ensure!(
        matches!(&r, Err(HvError::CloneSource { reason, .. }) if reason.contains("disk 1 is raw")),
        "a copy of running guest {id} with a raw disk: expected CloneSource naming disk 1, got {}",
        describe(&r)
    );
    let seen = cx.call(format!("status({})", copy.id), cx.hv.status(copy.id)).await?;
    ensure!(matches!(seen, Err(HvError::NotFound { .. })), "the refused clone is defined: {}", describe(&seen));
    cx.stop(id, cx.graceful()).await?;

    let mut bad = cx.fresh().await?;
    bad.spec.disks = vec![DiskSpec::block("/tmp/not-a-device")];
    let r = cx.call(format!("create({})", bad.id), cx.hv.create(&bad)).await?;
    ensure!(
        matches!(&r, Err(HvError::DiskKind { .. })) && describe(&r).contains("under /dev"),
        "a block disk at /tmp/not-a-device: expected DiskKind saying it must be under /dev, got {}",
        describe(&r)
    );
    let seen = cx.call(format!("status({})", bad.id), cx.hv.status(bad.id)).await?;
    ensure!(matches!(seen, Err(HvError::NotFound { .. })), "a refused create defined {}: {}", bad.id, describe(&seen));
    Ok(())
}

async fn snapshots_are_created_listed_and_deleted<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    use SnapshotKind::Disk;
    let g = cx.stopped_with_disk().await?;
    let id = g.id;
    let listed = cx.snapshots(id).await?;
    ensure!(listed.is_empty(), "a new guest {id} lists snapshots: {listed:?}");

    let info = cx.snapshot(id, "cold", Disk).await?;
    ensure!(info.name == "cold" && info.kind == Disk, "snapshot_create returned {info:?} for a disk snapshot \"cold\"");
    cx.expect(id, RuntimeState::Stopped, g.generation, "a snapshot of a stopped guest").await?;

    cx.start(id).await?;
    let before = cx.expect(id, RuntimeState::Running, g.generation, "start").await?;
    cx.snapshot(id, "warm", Disk).await?;
    let after = cx.expect(id, RuntimeState::Running, g.generation, "a disk snapshot of a running guest").await?;
    same_incarnation(&before, &after, "a disk snapshot")?;
    let listed = cx.snapshots(id).await?;
    ensure!(listed == names(&[("cold", Disk), ("warm", Disk)]), "snapshot_list({id}) gives {listed:?}");

    // Refusals change nothing.
    let r = cx.call(format!("snapshot_create({id}, \"warm\")"), cx.hv.snapshot_create(id, "warm", Disk)).await?;
    expect_invalid_snapshot("a second snapshot named \"warm\"", &r, id, "warm")?;
    for bad in ["", "Bad_Name", "-x"] {
        let r = cx.call(format!("snapshot_create({id}, {bad:?})"), cx.hv.snapshot_create(id, bad, Disk)).await?;
        expect_invalid_snapshot(&format!("a snapshot named {bad:?}"), &r, id, bad)?;
    }
    let listed = cx.snapshots(id).await?;
    ensure!(listed == names(&[("cold", Disk), ("warm", Disk)]), "refused creates changed the list to {listed:?}");

    cx.ok(format!("snapshot_delete({id}, \"cold\")"), cx.hv.snapshot_delete(id, "cold")).await?;
    cx.ok(format!("snapshot_delete({id}, \"cold\") again"), cx.hv.snapshot_delete(id, "cold"))
        .await
        .map_err(|e| format!("deleting a deleted snapshot must succeed: {e}"))?;
    let listed = cx.snapshots(id).await?;
    ensure!(listed == names(&[("warm", Disk)]), "after deleting \"cold\", snapshot_list gives {listed:?}");
    let after_delete = cx.expect(id, RuntimeState::Running, g.generation, "a snapshot delete").await?;
    same_incarnation(&before, &after_delete, "a snapshot delete")?;
    // The name is free again.
    cx.snapshot(id, "cold", Disk).await?;

    let unknown = cx.fresh().await?.id;
    let r = cx.call(format!("snapshot_create({unknown})"), cx.hv.snapshot_create(unknown, "s", Disk)).await?;
    expect_not_found(&format!("snapshot_create({unknown})"), &r, unknown)?;
    let r = cx.call(format!("snapshot_list({unknown})"), cx.hv.snapshot_list(unknown)).await?;
    expect_not_found(&format!("snapshot_list({unknown})"), &r, unknown)?;
    let r = cx.call(format!("snapshot_delete({unknown})"), cx.hv.snapshot_delete(unknown, "s")).await?;
    expect_not_found(&format!("snapshot_delete({unknown})"), &r, unknown)?;
    let r = cx.call(format!("snapshot_restore({unknown})"), cx.hv.snapshot_restore(unknown, "s")).await?;
    expect_not_found(&format!("snapshot_restore({unknown})"), &r, unknown)
}

async fn memory_snapshots_need_a_process<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    use SnapshotKind::Memory;
    let g = cx.stopped_with_disk().await?;
    let id = g.id;
    let r = cx.call(format!("snapshot_create({id}, Memory)"), cx.hv.snapshot_create(id, "mem", Memory)).await?;
    expect_invalid_state("a memory snapshot", &r, id, RuntimeState::Stopped)?;
    let listed = cx.snapshots(id).await?;
    ensure!(listed.is_empty(), "a refused memory snapshot left {listed:?}");

    cx.start(id).await?;
    let before = cx.expect(id, RuntimeState::Running, g.generation, "start").await?;
    let info = cx.snapshot(id, "mem", Memory).await?;
    ensure!(info.kind == Memory, "a memory snapshot was recorded as {info:?}");
    let after = cx.expect(id, RuntimeState::Running, g.generation, "a memory snapshot").await?;
    same_incarnation(&before, &after, "a memory snapshot")?;
    let listed = cx.snapshots(id).await?;
    ensure!(listed == names(&[("mem", Memory)]), "snapshot_list({id}) gives {listed:?}");
    Ok(())
}

async fn snapshot_restore_rolls_back<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    use SnapshotKind::{Disk, Memory};
    let g = cx.stopped_with_disk().await?;
    let id = g.id;
    cx.snapshot(id, "disk", Disk).await?;
    cx.start(id).await?;
    let first = cx.expect(id, RuntimeState::Running, g.generation, "start").await?;
    cx.snapshot(id, "mem", Memory).await?;

    let outcome = cx.restore(id, "mem").await?;
    ensure!(outcome == RestoreOutcome::Live, "restoring a memory snapshot of a running guest gave {outcome:?}");
    let live = cx.expect(id, RuntimeState::Running, g.generation, "a live restore").await?;
    same_incarnation(&first, &live, "a live restore")?;

    let outcome = cx.restore(id, "disk").await?;
    ensure!(outcome == RestoreOutcome::Restarted, "restoring a disk snapshot of a running guest gave {outcome:?}");
    cx.expect(id, RuntimeState::Running, g.generation, "a disk restore of a running guest").await?;

    cx.stop(id, StopMode::Force).await?;
    for name in ["disk", "mem"] {
        let outcome = cx.restore(id, name).await?;
        ensure!(outcome == RestoreOutcome::DisksOnly, "restoring {name:?} of a stopped guest gave {outcome:?}");
        cx.expect(id, RuntimeState::Stopped, g.generation, "a restore of a stopped guest").await?;
    }
    let listed = cx.snapshots(id).await?;
    ensure!(listed == names(&[("disk", Disk), ("mem", Memory)]), "restores changed the snapshots to {listed:?}");

    let r = cx.call(format!("snapshot_restore({id}, \"nope\")"), cx.hv.snapshot_restore(id, "nope")).await?;
    match &r {
        Err(HvError::SnapshotNotFound { id: got, name }) if *got == id && name == "nope" => {}
        other => {
            return Err(format!("restoring an unknown snapshot should give SnapshotNotFound, but {}", describe(other)));
        }
    }
    cx.expect(id, RuntimeState::Stopped, g.generation, "a refused restore").await?;
    Ok(())
}

async fn clones_copy_disks_and_leave_the_source_alone<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    use drove_model::CloneMode::Copy;
    let src = cx.stopped_with_disk().await?;
    cx.snapshot(src.id, "base", SnapshotKind::Disk).await?;
    let of_stopped = cx.clone_of(&src, None, Copy).await?;
    cx.create(&of_stopped).await?;
    cx.expect(of_stopped.id, RuntimeState::Stopped, of_stopped.generation, "a clone of a stopped guest").await?;
    cx.expect(src.id, RuntimeState::Stopped, src.generation, "cloning it").await?;

    cx.start(src.id).await?;
    let before = cx.expect(src.id, RuntimeState::Running, src.generation, "start").await?;
    let of_running = cx.clone_of(&src, None, Copy).await?;
    cx.create(&of_running).await?;
    let after = cx.expect(src.id, RuntimeState::Running, src.generation, "cloning it while it runs").await?;
    same_incarnation(&before, &after, "a clone of a running guest")?;
    let at_snapshot = cx.clone_of(&src, Some("base"), Copy).await?;
    cx.create(&at_snapshot).await?;

    let listed = cx.snapshots(src.id).await?;
    ensure!(listed == names(&[("base", SnapshotKind::Disk)]), "cloning changed the source's snapshots to {listed:?}");
    for clone in [&of_stopped, &of_running, &at_snapshot] {
        let listed = cx.snapshots(clone.id).await?;
        ensure!(listed.is_empty(), "clone {} carries snapshots: {listed:?}", clone.id);
        // Its own disks: it runs beside its running source.
        cx.start(clone.id).await?;
        cx.expect(clone.id, RuntimeState::Running, clone.generation, "starting a clone").await?;
        cx.destroy(clone.id).await?;
    }
    let last = cx.expect(src.id, RuntimeState::Running, src.generation, "its clones' destroy").await?;
    same_incarnation(&before, &last, "its clones' lives")?;
    Ok(())
}

async fn clones_are_refused_without_effect<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    use drove_model::CloneMode::{Copy, Overlay};
    let src = cx.stopped_with_disk().await?;
    let mut absent = src.clone();
    absent.id = GuestId::new_v4();
    let refused = |what: &str, r: &Result<(), HvError>, snapshot: bool| -> Check {
        match r {
            Err(HvError::SnapshotNotFound { .. }) if snapshot => Ok(()),
            Err(HvError::CloneSource { .. }) if !snapshot => Ok(()),
            other => Err(format!("{what} should be refused, but {}", describe(other))),
        }
    };
    let cases = [
        ("a clone of an unknown guest", cx.clone_of(&absent, None, Copy).await?, false),
        ("a clone of an unknown snapshot", cx.clone_of(&src, Some("nope"), Copy).await?, true),
    ];
    for (what, clone, snapshot) in cases {
        let r = cx.call(format!("create({what})"), cx.hv.create(&clone)).await?;
        refused(what, &r, snapshot)?;
        let seen = cx.call(format!("status of {what}"), cx.hv.status(clone.id)).await?;
        expect_not_found(&format!("status of refused {what}"), &seen, clone.id)?;
    }

    let thin = cx.clone_of(&src, None, Overlay).await?;
    cx.start(src.id).await?;
    let r = cx.call("create(an overlay on a running guest)".into(), cx.hv.create(&thin)).await?;
    refused("an overlay on a running guest", &r, false)?;
    let seen = cx.call("status of a refused overlay".into(), cx.hv.status(thin.id)).await?;
    expect_not_found("status of a refused overlay", &seen, thin.id)?;

    cx.stop(src.id, StopMode::Force).await?;
    cx.create(&thin).await?;
    cx.start(thin.id).await?;
    cx.expect(thin.id, RuntimeState::Running, thin.generation, "starting an overlay clone").await?;
    cx.expect(src.id, RuntimeState::Stopped, src.generation, "its overlay clone's start").await?;
    Ok(())
}

async fn limits_change_in_any_state_and_refusals_name_the_field<H, F>(cx: &mut Cx<'_, H, F>) -> Check
where
    H: Hypervisor,
    F: Fn(u32) -> GuestConfig,
{
    use drove_model::ResourceLimits;
    let g = cx.stopped().await?;
    let id = g.id;
    let capped = ResourceLimits {
        cpu_cap_percent: Some(50),
        cpu_shares: Some(512),
        disk_bps: Some(8 << 20),
        disk_iops: Some(500),
        nic_rate_bps: Some(50_000_000),
        ..g.spec.limits.clone()
    };
    cx.ok(format!("set_limits({id}) of a Stopped guest"), cx.hv.set_limits(id, &capped)).await?;
    cx.expect(id, RuntimeState::Stopped, g.generation, "set_limits").await?;
    cx.start(id).await?;
    let before = cx.expect(id, RuntimeState::Running, g.generation, "a start with new limits").await?;

    let loose = ResourceLimits { cpu_cap_percent: Some(80), cpu_shares: None, disk_bps: None, ..capped.clone() };
    let none = ResourceLimits { cpu_pin: g.spec.limits.cpu_pin.clone(), ..ResourceLimits::default() };
    for (limits, what) in [(&loose, "changing and removing some limits"), (&none, "removing every limit")] {
        cx.ok(format!("set_limits({id}) of a Running guest, {what}"), cx.hv.set_limits(id, limits)).await?;
        let after = cx.expect(id, RuntimeState::Running, g.generation, what).await?;
        same_incarnation(&before, &after, what)?;
    }

    let zero_cap = ResourceLimits { cpu_cap_percent: Some(0), ..none.clone() };
    let mut pins = none.cpu_pin.clone();
    pins.push(pins.iter().max().map_or(0, |p| p + 1));
    let repinned = ResourceLimits { cpu_pin: pins, ..none.clone() };
    for (limits, field) in [(&zero_cap, "cpu_cap_percent"), (&repinned, "cpu_pin")] {
        let r = cx.call(format!("set_limits({id}) changing {field}"), cx.hv.set_limits(id, limits)).await?;
        ensure!(
            matches!(&r, Err(HvError::InvalidLimits { id: got, field: f, .. }) if *got == id && *f == field),
            "set_limits({id}) with a bad {field} should be InvalidLimits naming it, got {}",
            describe(&r)
        );
        let after = cx.expect(id, RuntimeState::Running, g.generation, "a refused set_limits").await?;
        same_incarnation(&before, &after, "a refused set_limits")?;
    }

    let unknown = GuestId::new_v4();
    let r = cx.call(format!("set_limits({unknown})"), cx.hv.set_limits(unknown, &none)).await?;
    expect_not_found("set_limits", &r, unknown)
}
