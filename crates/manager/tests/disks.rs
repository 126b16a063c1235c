//! Disk kinds through the manager's API with sim agents: raw files and whole
//! host block devices, the 1:1 rule for devices, pinning, and the refusals
//! of what a kind cannot do (each changes nothing).

#![allow(clippy::unwrap_used)]

mod common;

use common::Dc;
use drove_api::{
    CloneGuestRequest, CreateGuestRequest, CreateSnapshotRequest, GrowDisk, HotplugRequest, MigrateRequest,
    MoveStorageRequest,
};
use drove_client::ClientError;
use drove_model::guest::Storage;
use drove_model::{ByteSize, DiskFormat, DiskSpec};

fn with_disks(name: &str, disks: Vec<DiskSpec>, host: Option<&str>) -> CreateGuestRequest {
    CreateGuestRequest {
        disks: disks.into_iter().map(Into::into).collect(),
        host: host.map(Into::into),
        ..CreateGuestRequest::new(name, 1, ByteSize::mib(64))
    }
}

fn refused(err: ClientError, status: u16, says: &str) {
    assert_eq!(err.status(), Some(status), "{err}");
    assert!(err.to_string().contains(says), "{err:?} should say {says:?}");
}

#[tokio::test]
async fn a_block_device_belongs_to_one_guest_per_host_and_needs_a_pinned_guest() {
    let dc = Dc::start(2).await;
    let dev = DiskSpec::block("/dev/vg0/db");

    // Not pinned: the device exists only on one host.
    refused(dc.admin.create_guest(&with_disks("db", vec![dev.clone()], None)).await.unwrap_err(), 400, "--host");

    let acc = dc.admin.create_guest(&with_disks("db", vec![dev.clone()], Some("host-1"))).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let g = dc.admin.get_guest("db").await.unwrap();
    assert_eq!(g.guest.spec.disks, std::slice::from_ref(&dev));
    assert_eq!(g.host_name, "host-1");

    // The same device on the same host: 409 naming the guest that has it.
    let err = dc.admin.create_guest(&with_disks("db-2", vec![dev.clone()], Some("host-1"))).await.unwrap_err();
    refused(err, 409, "belongs to guest db");
    assert!(dc.admin.get_guest("db-2").await.is_err(), "nothing is left of the refused guest");
    // On another host the same path is another device.
    let acc = dc.admin.create_guest(&with_disks("db-3", vec![dev.clone()], Some("host-2"))).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    // Twice in one guest.
    let err = dc.admin.create_guest(&with_disks("db-4", vec![dev.clone(), dev.clone()], Some("host-2"))).await;
    refused(err.unwrap_err(), 400, "one device, one disk");

    // Once its guest is deleted, the device is free again.
    let acc = dc.admin.delete_guest("db").await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let acc = dc.admin.create_guest(&with_disks("db-5", vec![dev], Some("host-1"))).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    dc.shutdown().await;
}

#[tokio::test]
async fn bad_disks_are_refused_naming_the_disk() {
    let dc = Dc::start(1).await;
    let cases: Vec<(DiskSpec, &str, &str)> = vec![
        (DiskSpec::block("sdb"), "disks[0]", "under /dev"),
        (DiskSpec::block("/tmp/x"), "disks[0]", "under /dev"),
        (DiskSpec { path: None, ..DiskSpec::block("") }, "disks[0]", "needs the host device's path"),
        (DiskSpec::raw(ByteSize(1000)), "disks[0]", "whole number of MiB"),
        (DiskSpec { path: Some("/dev/sdb".into()), ..DiskSpec::raw(ByteSize::gib(1)) }, "disks[0]", "takes no path"),
    ];
    for (disk, field, says) in cases {
        let err = dc.admin.create_guest(&with_disks("x", vec![disk.clone()], Some("host-1"))).await.unwrap_err();
        let ClientError::Api { field: f, .. } = &err else { panic!("{err:?}") };
        assert_eq!(f.as_deref(), Some(field), "{disk:?}");
        refused(err, 400, says);
    }
    // A block device on shared storage is a SAN: not supported yet.
    let req = CreateGuestRequest {
        storage: Some(Storage::Shared),
        ..with_disks("x", vec![DiskSpec::block("/dev/sdb")], Some("host-1"))
    };
    refused(dc.admin.create_guest(&req).await.unwrap_err(), 400, "shared SAN");
    // Old clients: a bare size is a qcow2 disk.
    let body = serde_json::json!({"name": "old", "vcpus": 1, "memory": 67108864, "disks": [1073741824]});
    let req: CreateGuestRequest = serde_json::from_value(body).unwrap();
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    assert_eq!(dc.admin.get_guest("old").await.unwrap().guest.spec.disks, [DiskSpec::qcow2(ByteSize::gib(1))]);
    dc.shutdown().await;
}

#[tokio::test]
async fn what_a_disk_kind_cannot_do_is_refused_up_front() {
    let dc = Dc::start(2).await;
    let disks = vec![DiskSpec::qcow2(ByteSize::gib(1)), DiskSpec::raw(ByteSize::gib(1))];
    let acc = dc.admin.create_guest(&with_disks("files", disks, None)).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let disks = vec![DiskSpec::raw(ByteSize::gib(1)), DiskSpec::block("/dev/sdb")];
    let acc = dc.admin.create_guest(&with_disks("dev", disks, Some("host-1"))).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    assert_eq!(dc.admin.get_guest("files").await.unwrap().guest.spec.disks[1].format, DiskFormat::Raw);

    let snap = CreateSnapshotRequest { name: "s".into(), memory: false };
    refused(dc.admin.create_snapshot("files", &snap).await.unwrap_err(), 409, "its disk 1 is a raw file");
    refused(dc.admin.create_snapshot("dev", &snap).await.unwrap_err(), 409, "its disk 0 is a raw file");

    let migrate = MigrateRequest { to: None, downtime_limit_ms: None, max_bandwidth: None };
    refused(dc.admin.migrate_guest("dev", &migrate).await.unwrap_err(), 409, "host block device /dev/sdb");
    refused(dc.admin.migrate_guest("dev", &migrate).await.unwrap_err(), 409, "shared SAN");
    refused(
        dc.admin.move_storage("dev", &MoveStorageRequest { to: Storage::Shared }).await.unwrap_err(),
        409,
        "on no pool",
    );
    let grow = HotplugRequest { grow_disk: Some(GrowDisk { index: 1, size: ByteSize::gib(2) }), ..Default::default() };
    refused(dc.admin.hotplug("dev", &grow).await.unwrap_err(), 409, "its size is the device's");

    let clone = CloneGuestRequest { name: "c".into(), count: None, snapshot: None, start: None, host: None };
    refused(dc.admin.clone_guest("dev", &clone).await.unwrap_err(), 409, "neither copies nor overlays");
    refused(dc.admin.clone_guest("files", &clone).await.unwrap_err(), 409, "stop it first, or make it a template");

    // A raw file grows, and migrates (mirrored like any local disk).
    let grow = HotplugRequest { grow_disk: Some(GrowDisk { index: 1, size: ByteSize::gib(2) }), ..Default::default() };
    let g = dc.admin.hotplug("files", &grow).await.unwrap();
    assert_eq!(g.guest.spec.disks[1], DiskSpec::raw(ByteSize::gib(2)));
    let acc = dc.admin.migrate_guest("files", &migrate).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    // Nothing changed on the refused guest.
    let g = dc.admin.get_guest("dev").await.unwrap();
    assert!(g.guest.snapshots.is_empty());
    assert_eq!(g.host_name, "host-1");
    dc.shutdown().await;
}
