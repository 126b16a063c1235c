//! VLAN segments on a real two-host lab fabric (namespaces, veths,
//! bridges, VXLAN). Needs root, like the lab itself.

use std::process::Command;

use drove_model::VlanTag;
use drove_net::fabric::{self, Fabric, TRUNK_IF};
use drove_net::{HostNetwork, VxlanNetwork, bridge_name};

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

    net1.attach("tapa", blue).await.expect("attach");
    net2.attach("tapb", blue).await.expect("attach");
    net2.attach("tapc", red).await.expect("attach");
    let before = ifindex(&ns1, "tapa");
    net1.attach("tapa", blue).await.expect("re-attach");
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
    assert!(matches!(net1.attach("bad/name", blue).await, Err(drove_net::NetError::BadName(_))));

    drop(lab);
    assert!(!fabric::namespaces().expect("list").iter().any(|n| n.contains(&id)), "destroy leaves no namespace");
}
