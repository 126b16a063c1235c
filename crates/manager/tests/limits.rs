//! Changing a guest's resource limits through the manager, with sim agents:
//! a running guest's host applies them and the manager stores them (across
//! a manager restart and a migration), a stopped guest's are kept for its
//! next start, `null` removes a limit, and refused values change nothing
//! anywhere.

#![allow(clippy::unwrap_used)]

mod common;

use common::Dc;
use drove_api::{CreateGuestRequest, MigrateRequest, SetLimitsRequest};
use drove_model::{ByteSize, GuestId, GuestState, OperationState, ResourceLimits};

fn initial() -> ResourceLimits {
    ResourceLimits { cpu_cap_percent: Some(50), disk_bps: Some(4 << 20), ..Default::default() }
}

async fn limited_guest(dc: &Dc, name: &str, host: &str) -> GuestId {
    let req = CreateGuestRequest {
        disks: vec![ByteSize::gib(1).into()],
        host: Some(host.into()),
        limits: Some(initial()),
        ..CreateGuestRequest::new(name, 2, ByteSize::mib(256))
    };
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    acc.guest
}

/// The limits the host at `agent` holds for the guest.
fn on_host(dc: &Dc, agent: usize, id: GuestId) -> ResourceLimits {
    dc.agents[agent].sim.guest_config(id).unwrap().spec.limits
}

#[tokio::test]
async fn a_running_guests_new_limits_reach_its_host_and_are_stored_durably() {
    let mut dc = Dc::start(2).await;
    let id = limited_guest(&dc, "tuned", "host-1").await;
    let generation = dc.admin.get_guest("tuned").await.unwrap().guest.generation;

    let req = SetLimitsRequest {
        cpu_cap_percent: Some(Some(150)),
        cpu_shares: Some(Some(2048)),
        disk_iops: Some(Some(300)),
        nic_rate_bps: Some(Some(100_000_000)),
        ..Default::default()
    };
    let g = dc.admin.set_limits("tuned", &req).await.unwrap();
    let want = ResourceLimits {
        cpu_cap_percent: Some(150),
        cpu_shares: Some(2048),
        disk_iops: Some(300),
        nic_rate_bps: Some(100_000_000),
        // Not named: kept.
        disk_bps: Some(4 << 20),
        cpu_pin: Vec::new(),
    };
    assert_eq!(g.guest.spec.limits, want);
    assert_eq!(g.guest.state, GuestState::Running);
    assert!(g.guest.generation > generation, "the definition changed: {} -> {}", generation, g.guest.generation);
    assert_eq!(on_host(&dc, 0, id), want, "the host applied them before the manager stored them");

    let audit = dc.admin.audit(0, 10_000).await.unwrap();
    assert!(
        audit.iter().any(|r| r.action == "POST /v1/guests/tuned/limits" && r.status == 200),
        "the change is audited: {audit:?}"
    );

    // Durable: a restarted manager has them, and so does the host that
    // receives the guest by live migration.
    dc.restart_manager().await;
    assert_eq!(dc.admin.get_guest("tuned").await.unwrap().guest.spec.limits, want);
    let to = MigrateRequest { to: Some("host-2".into()), ..Default::default() };
    let acc = dc.admin.migrate_guest("tuned", &to).await.unwrap();
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    dc.eventually("the guest runs on host-2", || async {
        let g = dc.admin.get_guest("tuned").await.ok()?;
        (g.host_name == "host-2" && g.guest.migration.is_none()).then_some(())
    })
    .await;
    assert_eq!(on_host(&dc, 1, id), want, "the migration target started with the current limits");
    dc.shutdown().await;
}

#[tokio::test]
async fn null_removes_a_limit_and_keeps_the_others() {
    let dc = Dc::start(1).await;
    let id = limited_guest(&dc, "loose", "host-1").await;
    let body = serde_json::json!({ "disk_bps": null });
    let req: SetLimitsRequest = serde_json::from_value(body).unwrap();
    let g = dc.admin.set_limits("loose", &req).await.unwrap();
    let want = ResourceLimits { disk_bps: None, ..initial() };
    assert_eq!(g.guest.spec.limits, want);
    assert_eq!(on_host(&dc, 0, id), want);

    // Asking for what it has already changes nothing, not even the
    // generation.
    let generation = g.guest.generation;
    let g = dc.admin.set_limits("loose", &req).await.unwrap();
    assert_eq!((g.guest.spec.limits, g.guest.generation), (want, generation));
    dc.shutdown().await;
}

#[tokio::test]
async fn a_stopped_guest_keeps_its_new_limits_for_its_next_start() {
    let dc = Dc::start(1).await;
    let id = limited_guest(&dc, "resting", "host-1").await;
    dc.wait_succeeded(&dc.admin.stop_guest("resting", false).await.unwrap().operation).await;
    let req = SetLimitsRequest { cpu_cap_percent: Some(None), disk_bps: Some(Some(1 << 20)), ..Default::default() };
    let g = dc.admin.set_limits("resting", &req).await.unwrap();
    let want = ResourceLimits { cpu_cap_percent: None, disk_bps: Some(1 << 20), ..initial() };
    assert_eq!((g.guest.state, &g.guest.spec.limits), (GuestState::Stopped, &want));
    assert_eq!(on_host(&dc, 0, id), want, "the host's definition has them for the next start");
    dc.wait_succeeded(&dc.admin.start_guest("resting").await.unwrap().operation).await;
    assert_eq!(on_host(&dc, 0, id), want);
    assert_eq!(dc.admin.get_guest("resting").await.unwrap().guest.spec.limits, want);
    dc.shutdown().await;
}

#[tokio::test]
async fn invalid_limits_are_refused_by_name_and_change_nothing() {
    let dc = Dc::start(1).await;
    let id = limited_guest(&dc, "strict", "host-1").await;
    let before = dc.admin.get_guest("strict").await.unwrap().guest;
    let cases = [
        (SetLimitsRequest { cpu_cap_percent: Some(Some(0)), ..Default::default() }, "cpu_cap_percent", "1..=200%"),
        // Two vCPUs: at most two cores' worth.
        (SetLimitsRequest { cpu_cap_percent: Some(Some(250)), ..Default::default() }, "cpu_cap_percent", "250"),
        (SetLimitsRequest { cpu_shares: Some(Some(1)), ..Default::default() }, "cpu_shares", "2..=262144"),
        (SetLimitsRequest { disk_bps: Some(Some(0)), ..Default::default() }, "disk_bps", "positive"),
        (SetLimitsRequest { nic_rate_bps: Some(Some(100)), ..Default::default() }, "nic_rate_bps", "8000"),
        // A valid value next to an invalid one is not applied either.
        (
            SetLimitsRequest { disk_iops: Some(Some(10)), cpu_shares: Some(Some(0)), ..Default::default() },
            "cpu_shares",
            "got 0",
        ),
        (SetLimitsRequest::default(), "body", "at least one"),
    ];
    for (req, field, says) in cases {
        let err = dc.admin.set_limits("strict", &req).await.unwrap_err();
        let drove_client::ClientError::Api { status: 400, field: Some(named), message, .. } = &err else {
            panic!("{req:?}: not a refusal naming a field: {err:?}");
        };
        assert_eq!(named, field, "{req:?}: {message}");
        assert!(message.contains(says), "{req:?}: {message}");
    }
    let after = dc.admin.get_guest("strict").await.unwrap().guest;
    assert_eq!((after.spec, after.generation), (before.spec.clone(), before.generation));
    assert_eq!(on_host(&dc, 0, id), before.spec.limits);
    let audit = dc.admin.audit(0, 10_000).await.unwrap();
    let refused = audit.iter().filter(|r| r.action == "POST /v1/guests/strict/limits" && r.status == 400).count();
    assert_eq!(refused, 7, "every refusal is audited");

    // Without a token: refused before anything is looked at.
    let anonymous = drove_client::Client::new(&dc.endpoint, "");
    let req = SetLimitsRequest { cpu_cap_percent: Some(Some(10)), ..Default::default() };
    let err = anonymous.set_limits("strict", &req).await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert_eq!(dc.admin.get_guest("strict").await.unwrap().guest.spec.limits, before.spec.limits);
    dc.shutdown().await;
}
