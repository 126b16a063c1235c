//! `guest-network-get-interfaces`: the guest's NICs, MACs and addresses.
//!
//! Names and MACs come from `/sys/class/net/<name>/{ifindex,address}`;
//! addresses with their prefix lengths from `ip -o addr show`, whose
//! one-line-per-address format iproute2 and busybox share. That keeps the
//! agent free of netlink and unsafe ioctls; the guest images that carry this
//! agent (ours) have busybox `ip`.
//!
//! The reply has qemu-ga's shape: `[{"name", "hardware-address",
//! "ip-addresses": [{"ip-address-type": "ipv4"|"ipv6", "ip-address",
//! "prefix"}]}]`, ordered by interface index.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::protocol::CommandError;

/// One address as `ip -o addr` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub interface: String,
    pub ipv6: bool,
    pub address: String,
    pub prefix: u8,
}

/// One interface as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<String>,
}

pub fn interfaces() -> Result<Value, CommandError> {
    let links = read_links(Path::new("/sys/class/net"))?;
    let output = Command::new("ip")
        .args(["-o", "addr", "show"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| CommandError::generic(format!("running 'ip -o addr show': {e}")))?;
    if !output.status.success() {
        return Err(CommandError::generic(format!(
            "'ip -o addr show' exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let addresses = parse_ip_addr(&String::from_utf8_lossy(&output.stdout));
    Ok(reply(&links, &addresses))
}

/// The interfaces under `sysfs_net` (normally `/sys/class/net`).
pub fn read_links(sysfs_net: &Path) -> Result<Vec<Link>, CommandError> {
    let entries = std::fs::read_dir(sysfs_net)
        .map_err(|e| CommandError::generic(format!("reading {}: {e}", sysfs_net.display())))?;
    let mut links = Vec::new();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        let dir = entry.path();
        let read = |file: &str| std::fs::read_to_string(dir.join(file)).map(|s| s.trim().to_owned()).ok();
        // An interface that vanished meanwhile has no ifindex: skip it.
        let Some(index) = read("ifindex").and_then(|s| s.parse().ok()) else { continue };
        let mac = read("address").filter(|m| !m.is_empty());
        links.push(Link { index, name, mac });
    }
    links.sort_by_key(|l| l.index);
    Ok(links)
}

/// The addresses in `ip -o addr show` output. Lines look like
/// `2: eth0    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\ ...`;
/// lines of other families (`link/...`) are skipped.
pub fn parse_ip_addr(output: &str) -> Vec<Address> {
    let mut out = Vec::new();
    for line in output.lines() {
        let mut words = line.split_whitespace();
        let (Some(_index), Some(name), Some(family), Some(cidr)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let ipv6 = match family {
            "inet" => false,
            "inet6" => true,
            _ => continue,
        };
        // veth peers show as `veth0@if5`; some versions end the name with ':'.
        let name = name.trim_end_matches(':');
        let name = name.split('@').next().unwrap_or(name);
        // A point-to-point address has no prefix of its own (`inet A peer
        // B/32`): it is a host address.
        let (address, prefix) = match cidr.split_once('/') {
            Some((a, p)) => match p.parse() {
                Ok(p) => (a, p),
                Err(_) => continue,
            },
            None => (cidr, if ipv6 { 128 } else { 32 }),
        };
        out.push(Address { interface: name.to_owned(), ipv6, address: address.to_owned(), prefix });
    }
    out
}

/// qemu-ga's reply shape. Interfaces that have addresses but no sysfs entry
/// (none, in practice) come last.
pub fn reply(links: &[Link], addresses: &[Address]) -> Value {
    let mut by_name: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for a in addresses {
        by_name.entry(&a.interface).or_default().push(json!({
            "ip-address-type": if a.ipv6 { "ipv6" } else { "ipv4" },
            "ip-address": a.address,
            "prefix": a.prefix,
        }));
    }
    let mut out = Vec::new();
    for link in links {
        let mut iface =
            json!({ "name": link.name, "ip-addresses": by_name.remove(link.name.as_str()).unwrap_or_default() });
        if let Some(mac) = &link.mac {
            iface["hardware-address"] = json!(mac);
        }
        out.push(iface);
    }
    for (name, ips) in by_name {
        out.push(json!({ "name": name, "ip-addresses": ips }));
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const BUSYBOX_IP: &str = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
1: lo    inet6 ::1/128 scope host \\       valid_lft forever preferred_lft forever
2: eth0    inet 10.250.0.2/24 scope global eth0\\       valid_lft forever preferred_lft forever
2: eth0    inet 10.250.1.2/24 scope global eth0\\       valid_lft forever preferred_lft forever
2: eth0    inet6 fe80::5054:ff:fe12:3456/64 scope link \\       valid_lft forever preferred_lft forever
5: veth0@if4    inet 192.0.2.1 peer 192.0.2.2/32 scope global veth0\\       valid_lft forever
7: eth1: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN qlen 1000\\    link/ether 52:54:00:00:00:02 brd ff:ff:ff:ff:ff:ff
";

    #[test]
    fn ip_addr_lines_give_addresses_with_prefixes() {
        let a = parse_ip_addr(BUSYBOX_IP);
        let flat: Vec<String> =
            a.iter().map(|a| format!("{} {} {}/{}", a.interface, u8::from(a.ipv6), a.address, a.prefix)).collect();
        assert_eq!(
            flat,
            [
                "lo 0 127.0.0.1/8",
                "lo 1 ::1/128",
                "eth0 0 10.250.0.2/24",
                "eth0 0 10.250.1.2/24",
                "eth0 1 fe80::5054:ff:fe12:3456/64",
                "veth0 0 192.0.2.1/32",
            ]
        );
    }

    #[test]
    fn the_reply_has_qemu_gas_shape_in_index_order() {
        let links = vec![
            Link { index: 1, name: "lo".into(), mac: Some("00:00:00:00:00:00".into()) },
            Link { index: 2, name: "eth0".into(), mac: Some("52:54:00:12:34:56".into()) },
            Link { index: 3, name: "tun0".into(), mac: None },
        ];
        let v = reply(&links, &parse_ip_addr(BUSYBOX_IP)[..3]);
        assert_eq!(
            v,
            json!([
                {"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
                    {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}]},
                {"name": "eth0", "hardware-address": "52:54:00:12:34:56", "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": "10.250.0.2", "prefix": 24}]},
                {"name": "tun0", "ip-addresses": []},
            ])
        );
    }

    #[test]
    fn links_are_read_from_a_sysfs_like_tree() {
        let dir = tempfile::tempdir().unwrap();
        for (name, index, mac) in
            [("eth0", "2", "52:54:00:12:34:56\n"), ("lo", "1", "00:00:00:00:00:00\n"), ("tun0", "3", "\n")]
        {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("ifindex"), format!("{index}\n")).unwrap();
            std::fs::write(dir.path().join(name).join("address"), mac).unwrap();
        }
        let links = read_links(dir.path()).unwrap();
        let names: Vec<(&str, Option<&str>)> = links.iter().map(|l| (l.name.as_str(), l.mac.as_deref())).collect();
        assert_eq!(names, [("lo", Some("00:00:00:00:00:00")), ("eth0", Some("52:54:00:12:34:56")), ("tun0", None)]);
    }
}
