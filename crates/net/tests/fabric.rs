//! VLAN segments on a real two-host lab fabric (namespaces, veths,
//! bridges, VXLAN). Needs root, like the lab itself.

use std::process::Command;

use drove_model::VlanTag;
use drove_net::fabric::{self, Fabric, TRUNK_IF};
use drove_net::{HostNetwork, NicAttachment, VxlanNetwork, bridge_name};

fn nic(device: &str, vlan: VlanTag) -> NicAttachment<'_> {
    NicAttachment { device, vlan, mac: "52:54:00:00:00:01", rate_bps: None }
}

struct Lab(Fabric);

impl Drop for Lab {
    fn drop(&mut self) {
        fabric::destroy(&self.0.id);
    }
}

fn lab_id() -> String {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{:06x}", (n ^ std::process::id()) & 0xffffff)
}

fn ns_run(ns: &str, args: &[&str]) -> bool {
    Command::new("ip").args(["netns", "exec", ns]).args(args).output().is_ok_and(|o| o.status.success())
}

fn ifindex(ns: &str, dev: &str) -> String {
    let out = Command::new("ip").args(["-n", ns, "-o", "link", "show", dev]).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).split(':').next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn segments_join_hosts_isolate_vlans_and_come_and_go_with_their_taps() {
    let id = lab_id();
    let lab = Lab(Fabric::choose(&id, 200).await.expect("fabric"));
    let f = &lab.0;
    f.create_switches().await.expect("switches");
    for h in [1, 2] {
        f.add_host(h).await.expect("host");
        // Idempotent: a second call changes nothing and fails nothing.
        f.add_host(h).await.expect("host again");
    }
    let (ns1, ns2) = (f.namespace(1), f.namespace(2));
    let net1 = VxlanNetwork::new(TRUNK_IF, Some(ns1.clone())).expect("net");
    let net2 = VxlanNetwork::new(TRUNK_IF, Some(ns2.clone())).expect("net");
    let (blue, red) = (VlanTag::new(100).expect("tag"), VlanTag::new(200).expect("tag"));

    net1.attach(&nic("tapa", blue)).await.expect("attach");
    net2.attach(&nic("tapb", blue)).await.expect("attach");
    net2.attach(&nic("tapc", red)).await.expect("attach");
    let before = ifindex(&ns1, "tapa");
    net1.attach(&nic("tapa", blue)).await.expect("re-attach");
    assert_eq!(ifindex(&ns1, "tapa"), before, "re-attaching must not recreate the tap");
    let segs = net2.segments().await.expect("segments");
    assert_eq!(segs.len(), 2, "{segs:?}");
    assert!(segs[&blue].contains("tapb") && segs[&red].contains("tapc"), "{segs:?}");

    // Stand-ins for guests: addresses on the segments' bridges.
    let addr = |ns: &str, vlan: VlanTag, ip: &str| {
        assert!(ns_run(ns, &["ip", "addr", "add", ip, "dev", &bridge_name(vlan)]), "adding {ip}");
    };
    addr(&ns1, blue, "192.168.77.1/24");
    addr(&ns2, blue, "192.168.77.2/24");
    assert!(
        ns_run(&ns1, &["busybox", "ping", "-c", "2", "-W", "2", "192.168.77.2"]),
        "VLAN 100 must reach across hosts"
    );
    addr(&ns2, red, "192.168.78.3/24");
    // Same subnet on another VLAN: only layer 2 could carry it, and must not.
    assert!(ns_run(&ns1, &["ip", "addr", "add", "192.168.78.1/24", "dev", &bridge_name(blue)]));
    assert!(
        !ns_run(&ns1, &["busybox", "ping", "-c", "2", "-W", "1", "192.168.78.3"]),
        "VLAN 100 must not reach VLAN 200"
    );

    net2.detach(&["tapc".to_owned(), "nonexistent".to_owned()]).await.expect("detach");
    let segs = net2.segments().await.expect("segments");
    assert!(!segs.contains_key(&red), "an unused segment is removed: {segs:?}");
    assert!(segs.contains_key(&blue), "a used one stays: {segs:?}");
    assert!(matches!(net1.attach(&nic("bad/name", blue)).await, Err(drove_net::NetError::BadName(_))));

    drop(lab);
    assert!(!fabric::namespaces().expect("list").iter().any(|n| n.contains(&id)), "destroy leaves no namespace");
}

fn classes(ns: &str) -> String {
    let out = Command::new("tc").args(["-n", ns, "class", "show", "dev", TRUNK_IF]).output().expect("tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The default (best-effort) class's guaranteed rate, in Mbit.
fn best_effort(ns: &str) -> String {
    let c = classes(ns);
    let line = c.lines().find(|l| l.contains("d8:1 ")).unwrap_or_default().to_owned();
    line.split_whitespace().skip_while(|w| *w != "rate").nth(1).unwrap_or_default().to_owned()
}

#[tokio::test]
async fn nic_limits_reserve_uplink_shares_that_survive_an_agent_restart() {
    let id = lab_id();
    let lab = Lab(Fabric::choose(&id, 100).await.expect("fabric"));
    let f = &lab.0;
    f.create_switches().await.expect("switches");
    f.add_host(1).await.expect("host");
    let ns = f.namespace(1);
    let net = VxlanNetwork::new(TRUNK_IF, Some(ns.clone())).expect("net").with_uplink(Some(40_000_000));
    net.prepare().await.expect("prepare");
    assert_eq!(best_effort(&ns), "40Mbit", "{}", classes(&ns));
    let blue = VlanTag::new(100).expect("tag");
    let limited = |device, mac, rate| NicAttachment { device, vlan: blue, mac, rate_bps: Some(rate) };
    net.attach(&limited("tapx", "52:54:00:00:00:0a", 10_000_000)).await.expect("attach");
    net.attach(&limited("tapx", "52:54:00:00:00:0a", 10_000_000)).await.expect("idempotent");
    net.attach(&limited("tapy", "52:54:00:00:00:0b", 20_000_000)).await.expect("attach");
    net.attach(&nic("tapz", blue)).await.expect("attach best effort");
    assert_eq!(best_effort(&ns), "10Mbit", "{}", classes(&ns));
    assert_eq!(classes(&ns).matches("ceil 40Mbit").count(), 4, "parent, default and two NICs: {}", classes(&ns));
    // A restarted agent prepares again: the reservations stay.
    let again = VxlanNetwork::new(TRUNK_IF, Some(ns.clone())).expect("net").with_uplink(Some(40_000_000));
    again.prepare().await.expect("prepare again");
    assert_eq!(best_effort(&ns), "10Mbit", "{}", classes(&ns));
    again.detach(&["tapx".to_owned()]).await.expect("detach");
    assert_eq!(best_effort(&ns), "20Mbit", "{}", classes(&ns));
    let filters = Command::new("tc").args(["-n", &ns, "filter", "show", "dev", TRUNK_IF]).output().expect("tc");
    let filters = String::from_utf8_lossy(&filters.stdout);
    assert!(filters.contains("match 0000000b/ffffffff at 44") || filters.contains("0000000b"), "{filters}");
    assert!(!filters.contains("0000000a"), "the detached NIC's filter is gone: {filters}");
    // Unshaped again on request.
    VxlanNetwork::new(TRUNK_IF, Some(ns.clone())).expect("net").prepare().await.expect("unshape");
    assert!(!classes(&ns).contains("d8:"), "{}", classes(&ns));
}
