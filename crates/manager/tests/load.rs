//! Measured load with sim agents: a guest's measured profile appears in its
//! view, the placement model plans it from there (and a configured profile
//! still wins), and the profile survives a manager restart and goes with
//! its guest.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Dc, fast_config};
use drove_api::{CreateGuestRequest, GuestView};
use drove_hypervisor::sim::{SimConfig, SimLoad};
use drove_manager::drs::{DEFAULT_CPU_FRACTION, MILLI, Model, Window, default_power};
use drove_model::guest::LoadProfile;
use drove_model::{ByteSize, MeasuredLoad};
use drove_store::Store;

/// A manager whose profiles go to the store at every sample, and one host
/// whose agent samples every 50 ms.
async fn dc(flush: Duration) -> Dc {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config(dir.path());
    config.load_flush = flush;
    let mut dc = Dc::start_with(dir, config, 0).await;
    dc.usage_every = Duration::from_millis(50);
    dc.add_agent("host-1", SimConfig::default()).await;
    dc.wait_hosts_up(1).await;
    dc
}

/// A running guest on host-1 that uses `load` from its first sample on.
async fn guest(dc: &Dc, name: &str, vcpus: u32, profile: Option<f32>, load: SimLoad) -> drove_model::GuestId {
    let req = CreateGuestRequest {
        host: Some("host-1".into()),
        load_profile: profile.map(|f| LoadProfile { hourly_cpu: vec![f; 24] }),
        ..CreateGuestRequest::new(name, vcpus, ByteSize::mib(256))
    };
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.agents[0].sim.set_load(acc.guest, load);
    dc.wait_succeeded(&acc.operation).await;
    acc.guest
}

/// The guest's profile once its latest hour is trusted, with that hour.
async fn trusted(dc: &Dc, name: &str) -> (GuestView, usize) {
    dc.eventually(&format!("a trusted measured hour of {name}"), || async {
        let g = dc.admin.get_guest(name).await.ok()?;
        let m = g.measured_load.as_ref()?;
        let hour = usize::from(m.last_hour?);
        m.trusted(hour)?;
        Some((g, hour))
    })
    .await
}

#[tokio::test]
async fn a_guests_measured_load_appears_and_the_model_plans_it_from_there() {
    let dc = dc(Duration::from_secs(60)).await;
    // 80 % of two vCPUs, 20 Mbit/s each way, 8 Mbit/s disk each way.
    guest(&dc, "busy", 2, None, SimLoad { cpu_fraction: 0.8, net_mbps: 20.0, disk_mbps: 8.0 }).await;
    // Busier than its configured profile says: the profile still plans it.
    guest(&dc, "told", 2, Some(0.1), SimLoad { cpu_fraction: 0.9, ..SimLoad::default() }).await;
    guest(&dc, "quiet", 2, None, SimLoad { cpu_fraction: 0.05, ..SimLoad::default() }).await;

    let (busy_view, hour) = trusted(&dc, "busy").await;
    let slot = busy_view.measured_load.as_ref().unwrap().hours[hour];
    assert!((1500.0..1700.0).contains(&slot.cpu_millicores), "1600 milli-cores measured: {slot:?}");
    assert!((255.0..257.0).contains(&slot.memory_mib), "{slot:?}");
    assert!((18.0..22.0).contains(&slot.net_rx_mbps) && (18.0..22.0).contains(&slot.net_tx_mbps), "{slot:?}");
    assert!((7.0..9.0).contains(&slot.disk_write_mbps), "{slot:?}");
    trusted(&dc, "told").await;
    trusted(&dc, "quiet").await;

    let hosts = dc.admin.list_hosts().await.unwrap();
    let guests = dc.admin.list_guests().await.unwrap();
    let model = Model::build(&hosts, &guests, default_power()).unwrap();
    let demand = |name: &str| model.cluster.demand(model.find_guest(name).unwrap(), hour);
    let cpu = demand("busy").cpu;
    assert!((1500..1700).contains(&cpu), "planned from measurement, not at the default: {cpu}");
    assert!((36..44).contains(&demand("busy").net_mbps), "{:?}", demand("busy"));
    assert!((14..18).contains(&demand("busy").disk_mbps), "{:?}", demand("busy"));
    assert_eq!(demand("busy").memory_mib, 256, "memory stays what is reserved");
    assert_eq!(demand("told").cpu, 200, "a configured profile wins over measurement");
    let quiet_cpu = demand("quiet").cpu;
    let default = (2.0 * f64::from(MILLI) * f64::from(DEFAULT_CPU_FRACTION)) as u32;
    assert!(quiet_cpu < 150, "a measured idle guest is planned below the default {default}: {quiet_cpu}");
    assert_eq!(model.measured, 2, "busy and quiet");
    assert_eq!(model.profiled, 1);
    // An hour without samples falls back to the default.
    let other = (hour + 12) % 24;
    let unmeasured = model.cluster.demand(model.find_guest("busy").unwrap(), other).cpu;
    assert_eq!(unmeasured, default, "hour {other} has no samples");
    // A window of the hours ahead (what power management plans) takes each
    // slot's own hour.
    let ahead = Model::build_window(&hosts, &guests, default_power(), Window { start: other, hours: 13 }).unwrap();
    let busy = ahead.find_guest("busy").unwrap();
    assert_eq!(ahead.cluster.demand(busy, 0).cpu, default, "slot 0 is hour {other}");
    let cpu = ahead.cluster.demand(busy, 12).cpu;
    assert!((1500..1700).contains(&cpu), "slot 12 is hour {hour}, measured: {cpu}");
    dc.shutdown().await;
}

#[tokio::test]
async fn measured_profiles_survive_a_manager_restart_and_go_with_their_guest() {
    let mut dc = dc(Duration::ZERO).await;
    guest(&dc, "keep", 1, None, SimLoad { cpu_fraction: 0.5, ..SimLoad::default() }).await;
    trusted(&dc, "keep").await;
    // No agent: nothing new comes in, so what the restarted manager shows
    // came from the store.
    dc.agents[0].stop().await;
    let before: MeasuredLoad = dc.admin.get_guest("keep").await.unwrap().measured_load.unwrap();
    dc.restart_manager().await;
    let after = dc.admin.get_guest("keep").await.unwrap().measured_load.expect("the profile was loaded");
    assert_eq!(
        after.hours.iter().map(|s| s.samples).collect::<Vec<_>>(),
        before.hours.iter().map(|s| s.samples).collect::<Vec<_>>()
    );
    let hour = usize::from(after.last_hour.unwrap());
    assert!((after.hours[hour].cpu_millicores - before.hours[hour].cpu_millicores).abs() < 1e-6);

    dc.restart_agent(0).await;
    let acc = dc.admin.delete_guest("keep").await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    for a in &mut dc.agents {
        a.stop().await;
    }
    dc.kill_manager().await;
    // In-flight handlers may hold the old store for a moment.
    let path = dc.config.data_dir.join("state.redb");
    let store =
        dc.eventually("the store released", || async { drove_store::embedded::EmbeddedStore::open(&path).ok() }).await;
    let (left, _) = store.list("load/").await.unwrap();
    assert!(
        left.is_empty(),
        "a deleted guest's profile stays in the store: {:?}",
        left.iter().map(|kv| &kv.key).collect::<Vec<_>>()
    );
}
