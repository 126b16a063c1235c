//! The lab's physical network on one machine: every host a network
//! namespace, cabled to three switches (bridges in the root namespace).
//!
//! ```text
//!   root namespace                          namespace drove-<lab>-h<n>
//!   ┌──────────────────────────┐
//!   │ bridge dl<lab>m  10.213.K.1/24 ─ veth ─ mgmt0   10.213.K.(10+n)  agent ⇄ manager
//!   │ bridge dl<lab>x  (no address) ─── veth ─ mig0    10.214.K.(10+n)  migration
//!   │ bridge dl<lab>t  (no address) ─── veth ─ trunk0  10.215.K.(10+n)  VXLAN underlay
//!   └──────────────────────────┘
//! ```
//!
//! Only the management switch has an address in the root namespace: the
//! manager listens there, and the CLI reaches it. The migration and trunk
//! switches are pure layer 2 between hosts. The trunk carries VXLAN, whose
//! headers need 50 bytes, so its MTU leaves guests a full 1500.
//!
//! Everything is named after the lab id, so `destroy` finds all of it by
//! name alone: after a crash of `drove up` too, and without a record.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::cmd::{self, CmdError};

/// The trunk's MTU: a guest's 1500 plus VXLAN's headers, rounded up.
pub const TRUNK_MTU: u32 = 1600;
pub const MGMT_IF: &str = "mgmt0";
pub const MIGRATION_IF: &str = "mig0";
pub const TRUNK_IF: &str = "trunk0";
/// The most hosts one lab has (addresses .11 to .74 of each /24).
pub const MAX_HOSTS: u32 = 64;

/// One lab's network: its id (6 hex digits) and the third octet `k` of
/// its subnets, chosen so that its management subnet is unused here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fabric {
    pub id: String,
    pub k: u8,
}

impl Fabric {
    /// The fabric for lab `id`, with subnets no address of the root
    /// namespace is in (`hint` first, then the next ones).
    pub async fn choose(id: &str, hint: u8) -> Result<Fabric, CmdError> {
        let used = root_addresses().await?;
        let k = (0..=255u16)
            .map(|i| ((u16::from(hint) + i) % 256) as u8)
            .find(|k| !used.iter().any(|a| a.octets()[..3] == [10, 213, *k]))
            .unwrap_or(hint);
        Ok(Fabric { id: id.to_owned(), k })
    }

    pub fn namespace(&self, host: u32) -> String {
        format!("drove-{}-h{host}", self.id)
    }

    fn switch(&self, role: char) -> String {
        format!("dl{}{role}", self.id)
    }

    fn cable(&self, host: u32, role: char) -> String {
        format!("dl{}{host}{role}", self.id)
    }

    pub fn manager_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.k, 1)
    }

    pub fn mgmt_ip(&self, host: u32) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.k, (10 + host) as u8)
    }

    pub fn migration_ip(&self, host: u32) -> Ipv4Addr {
        Ipv4Addr::new(10, 214, self.k, (10 + host) as u8)
    }

    pub fn trunk_ip(&self, host: u32) -> Ipv4Addr {
        Ipv4Addr::new(10, 215, self.k, (10 + host) as u8)
    }

    /// The three switches. Idempotent.
    pub async fn create_switches(&self) -> Result<(), CmdError> {
        for role in ['m', 'x', 't'] {
            let name = self.switch(role);
            if !cmd::device_exists(&name) {
                cmd::run("ip", &["link", "add", &name, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
                    .await?;
            }
            if role == 't' {
                cmd::run("ip", &["link", "set", &name, "mtu", &TRUNK_MTU.to_string()]).await?;
            }
            cmd::run("ip", &["link", "set", &name, "up"]).await?;
        }
        let mgmt = self.switch('m');
        let addr = format!("{}/24", self.manager_ip());
        if !root_addresses().await?.contains(&self.manager_ip()) {
            cmd::run("ip", &["addr", "add", &addr, "dev", &mgmt]).await?;
        }
        Ok(())
    }

    /// Host `host`'s namespace, cabled to the switches. Idempotent: what
    /// exists stays.
    pub async fn add_host(&self, host: u32) -> Result<(), CmdError> {
        let ns = self.namespace(host);
        if !namespaces()?.contains(&ns) {
            cmd::run("ip", &["netns", "add", &ns]).await?;
        }
        cmd::run("ip", &["-n", &ns, "link", "set", "lo", "up"]).await?;
        let plan = [
            ('m', MGMT_IF, self.mgmt_ip(host), 1500),
            ('x', MIGRATION_IF, self.migration_ip(host), 1500),
            ('t', TRUNK_IF, self.trunk_ip(host), TRUNK_MTU),
        ];
        let inside = cmd::run("ip", &["-n", &ns, "-o", "link", "show"]).await?;
        for (role, ifname, ip, mtu) in plan {
            let outer = self.cable(host, role);
            let mtu = mtu.to_string();
            if !inside.contains(&format!(": {ifname}@")) {
                if cmd::device_exists(&outer) {
                    cmd::run("ip", &["link", "del", &outer]).await?;
                }
                cmd::run(
                    "ip",
                    &[
                        "link", "add", &outer, "mtu", &mtu, "type", "veth", "peer", "name", ifname, "mtu", &mtu,
                        "netns", &ns,
                    ],
                )
                .await?;
                cmd::run("ip", &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", ifname]).await?;
            }
            cmd::run("ip", &["link", "set", &outer, "master", &self.switch(role), "up"]).await?;
            cmd::run("ip", &["-n", &ns, "link", "set", ifname, "up"]).await?;
        }
        Ok(())
    }

    /// Cuts (or restores) one of a host's cables on the switch side.
    pub async fn set_link(&self, host: u32, role: LinkRole, up: bool) -> Result<(), CmdError> {
        let outer = self.cable(host, role.letter());
        cmd::run("ip", &["link", "set", &outer, if up { "up" } else { "down" }]).await?;
        Ok(())
    }
}

/// A host's three networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRole {
    Management,
    Migration,
    Trunk,
}

impl LinkRole {
    fn letter(self) -> char {
        match self {
            LinkRole::Management => 'm',
            LinkRole::Migration => 'x',
            LinkRole::Trunk => 't',
        }
    }
}

/// Removes every namespace and link of lab `id`, whatever state it is in;
/// returns how many it removed. Blocking (no runtime needed), so that guards
/// can call it from `Drop`. Processes still inside a namespace keep it alive
/// until they exit: stop them first.
pub fn destroy(id: &str) -> usize {
    let mut removed = 0;
    let ns_prefix = format!("drove-{id}-h");
    for ns in namespaces().unwrap_or_default().iter().filter(|n| n.starts_with(&ns_prefix)) {
        if quiet("ip", &["netns", "del", ns]) {
            removed += 1;
        }
    }
    // Cables first (deleting a namespace takes its veth ends with it, but
    // a crash between the two `ip link add` halves may leave one), then the
    // switches.
    let link_prefix = format!("dl{id}");
    let mut links: Vec<String> = cmd::devices().unwrap_or_default();
    links.retain(|l| l.starts_with(&link_prefix));
    links.sort_by_key(|l| l.len() == link_prefix.len() + 1);
    for l in links {
        if quiet("ip", &["link", "del", &l]) {
            removed += 1;
        }
    }
    removed
}

fn quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The named network namespaces (`ip netns add` makes them files here).
pub fn namespaces() -> Result<Vec<String>, CmdError> {
    match std::fs::read_dir("/run/netns") {
        Ok(d) => Ok(d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(CmdError::Output { command: "reading /run/netns".into(), reason: e.to_string() }),
    }
}

async fn root_addresses() -> Result<Vec<Ipv4Addr>, CmdError> {
    let value = cmd::run_json("ip", &["-j", "-4", "addr", "show"]).await?;
    Ok(value
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l.get("addr_info").and_then(|a| a.as_array()).cloned().unwrap_or_default())
        .filter_map(|a| a.get("local")?.as_str()?.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_addresses_are_per_host() {
        let f = Fabric { id: "abcdef".into(), k: 7 };
        assert!(f.cable(MAX_HOSTS, 'm').len() <= 15);
        assert_eq!(f.namespace(3), "drove-abcdef-h3");
        assert_eq!(f.mgmt_ip(1).to_string(), "10.213.7.11");
        assert_eq!(f.trunk_ip(MAX_HOSTS).to_string(), "10.215.7.74");
        assert_ne!(f.switch('m'), f.cable(1, 'm'));
    }
}
