//! Host networking: the host side of guests' NICs.
//!
//! A VLAN is a layer-2 segment present on every host that needs it. This
//! kernel family may lack 802.1q devices and bridge VLAN filtering (see
//! docs/adr/0007-vlans-as-vxlan-segments.md), so a VLAN is, per host, its
//! own bridge joined to the other hosts' bridges of the same VLAN by a VXLAN
//! device whose VNI is the VLAN id, over the host's underlay (trunk)
//! interface:
//!
//! ```text
//!   guest A ── tap dv…0 ─┐
//!                        ├── bridge dbr100 ── vxlan dvx100 (VNI 100) ── trunk0 ══ other hosts
//!   guest B ── tap dv…0 ─┘
//!   guest C ── tap dv…0 ──── bridge dbr200 ── vxlan dvx200 (VNI 200) ── trunk0 ══
//! ```
//!
//! Broadcasts and unknown unicast flood to the VLAN's multicast group
//! (239.1.hi.lo of the VLAN id); the VXLAN devices learn where each guest MAC
//! lives. The bridges carry no IP address, so nothing of the host (its
//! management or migration addresses, the agent) is reachable from a VLAN:
//! isolation by construction, not by firewall rules.
//!
//! Segments are made on demand, when the first NIC of a VLAN arrives on a
//! host, and removed when the last one leaves. Every call is idempotent and
//! leaves existing devices untouched, so an agent that restarts re-adopts
//! what runs without disturbing the guests' traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use drove_model::VlanTag;

pub mod cmd;
pub mod fabric;
pub mod tc_rate;
pub mod uplink;

pub use cmd::CmdError;

/// The UDP port of VXLAN (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN's outer headers: IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;
/// What guests assume: a standard Ethernet MTU.
pub const GUEST_MTU: u32 = 1500;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the underlay interface {0:?} does not exist on this host")]
    NoUnderlay(String),
    #[error("network device name {0:?} is not valid (1 to 15 bytes, no '/', ':' or whitespace)")]
    BadName(String),
    #[error("{0:?} is not a MAC address (six hex pairs separated by colons)")]
    BadMac(String),
    #[error("device {device} exists but is a {kind}, not a tap")]
    NotATap { device: String, kind: String },
    #[error("changing the host network")]
    Command(#[from] CmdError),
}

/// The bridge of a VLAN's segment on a host.
pub fn bridge_name(vlan: VlanTag) -> String {
    format!("dbr{}", vlan.get())
}

/// The VXLAN device joining a VLAN's bridge to the other hosts.
pub fn vxlan_name(vlan: VlanTag) -> String {
    format!("dvx{}", vlan.get())
}

/// The multicast group a VLAN's segment floods to.
pub fn vxlan_group(vlan: VlanTag) -> String {
    let v = vlan.get();
    format!("239.1.{}.{}", v >> 8, v & 0xff)
}

fn check_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
        && name != "."
        && name != "..";
    if ok { Ok(()) } else { Err(NetError::BadName(name.to_owned())) }
}

/// A guest NIC's host side, as the network layer needs it.
#[derive(Debug, Clone, Copy)]
pub struct NicAttachment<'a> {
    /// The host device (tap) the hypervisor connects the NIC to.
    pub device: &'a str,
    pub vlan: VlanTag,
    pub mac: &'a str,
    /// The NIC's rate limit, reserved on the host's uplink.
    pub rate_bps: Option<u64>,
}

/// The host side of guests' NICs.
#[async_trait::async_trait]
pub trait HostNetwork: Send + Sync + Debug + 'static {
    /// Host-wide set-up at agent start (the uplink's shaping). Keeps what
    /// guests already use.
    async fn prepare(&self) -> Result<(), NetError> {
        Ok(())
    }

    /// Makes the NIC's device a tap on its VLAN's segment, creating the
    /// segment on first use, and reserves its rate on the uplink. A tap
    /// that is already there, on that segment and up, is left as it is.
    async fn attach(&self, nic: &NicAttachment<'_>) -> Result<(), NetError>;

    /// Removes `devices` (those that exist), then every segment left with no
    /// guest device.
    async fn detach(&self, devices: &[String]) -> Result<(), NetError>;

    /// The segments on this host, each with the guest devices on it.
    async fn segments(&self) -> Result<BTreeMap<VlanTag, BTreeSet<String>>, NetError>;
}

/// For backends without host-side NICs (the simulator): nothing to do.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoNetwork;

#[async_trait::async_trait]
impl HostNetwork for NoNetwork {
    async fn attach(&self, _nic: &NicAttachment<'_>) -> Result<(), NetError> {
        Ok(())
    }
    async fn detach(&self, _devices: &[String]) -> Result<(), NetError> {
        Ok(())
    }
    async fn segments(&self) -> Result<BTreeMap<VlanTag, BTreeSet<String>>, NetError> {
        Ok(BTreeMap::new())
    }
}

/// VLAN segments as bridges joined by VXLAN over `underlay`, in the network
/// namespace `netns` (`None`: the agent's own).
#[derive(Debug)]
pub struct VxlanNetwork {
    underlay: String,
    netns: Option<String>,
    /// The underlay's capacity for guest traffic, shaped (see `uplink`).
    uplink_bps: Option<u64>,
    /// One change at a time: an attach and the pruning after a detach must
    /// not interleave, or a segment could go while a tap joins it.
    lock: tokio::sync::Mutex<()>,
}

/// A network device as `ip -d -j link show` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    name: String,
    ifindex: u32,
    kind: String,
    master: Option<String>,
    up: bool,
    mtu: u32,
}

impl VxlanNetwork {
    pub fn new(underlay: impl Into<String>, netns: Option<String>) -> Result<Self, NetError> {
        let underlay = underlay.into();
        check_name(&underlay)?;
        Ok(VxlanNetwork { underlay, netns, uplink_bps: None, lock: tokio::sync::Mutex::new(()) })
    }

    /// Shapes the underlay to `rate_bps` (see [`uplink`]).
    pub fn with_uplink(mut self, rate_bps: Option<u64>) -> Self {
        self.uplink_bps = rate_bps;
        self
    }

    pub fn underlay(&self) -> &str {
        &self.underlay
    }

    async fn ip(&self, args: &[&str]) -> Result<(), NetError> {
        let mut full: Vec<&str> = Vec::with_capacity(args.len() + 2);
        if let Some(ns) = &self.netns {
            full.extend(["-n", ns.as_str()]);
        }
        full.extend_from_slice(args);
        cmd::run("ip", &full).await?;
        Ok(())
    }

    async fn links(&self) -> Result<BTreeMap<String, Link>, NetError> {
        let mut args: Vec<&str> = Vec::new();
        if let Some(ns) = &self.netns {
            args.extend(["-n", ns.as_str()]);
        }
        args.extend(["-d", "-j", "link", "show"]);
        let value = cmd::run_json("ip", &args).await?;
        Ok(parse_links(&value).into_iter().map(|l| (l.name.clone(), l)).collect())
    }

    /// The MTU the segment devices get: a guest's 1500 when the underlay
    /// leaves room for VXLAN's headers, less (with a warning) otherwise.
    fn segment_mtu(&self, links: &BTreeMap<String, Link>) -> Result<u32, NetError> {
        let underlay = links.get(&self.underlay).ok_or_else(|| NetError::NoUnderlay(self.underlay.clone()))?;
        let mtu = underlay.mtu.saturating_sub(VXLAN_OVERHEAD).min(GUEST_MTU);
        if mtu < GUEST_MTU {
            tracing::warn!(
                underlay = %self.underlay,
                underlay_mtu = underlay.mtu,
                "underlay MTU leaves less than {GUEST_MTU} bytes for guests; raise it to {} or more",
                GUEST_MTU + VXLAN_OVERHEAD
            );
        }
        Ok(mtu)
    }

    async fn ensure_segment(&self, vlan: VlanTag, links: &BTreeMap<String, Link>) -> Result<(), NetError> {
        let bridge = bridge_name(vlan);
        let vxlan = vxlan_name(vlan);
        let mtu = self.segment_mtu(links)?.to_string();
        if !links.contains_key(&bridge) {
            self.ip(&["link", "add", &bridge, "mtu", &mtu, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
                .await?;
            tracing::info!(%vlan, %bridge, "created the VLAN's bridge");
        }
        if !links.get(&bridge).is_some_and(|l| l.up) {
            self.ip(&["link", "set", &bridge, "up"]).await?;
        }
        if !links.contains_key(&vxlan) {
            let id = vlan.get().to_string();
            let group = vxlan_group(vlan);
            let port = VXLAN_PORT.to_string();
            self.ip(&[
                "link",
                "add",
                &vxlan,
                "mtu",
                &mtu,
                "type",
                "vxlan",
                "id",
                &id,
                "group",
                &group,
                "dev",
                &self.underlay,
                "dstport",
                &port,
            ])
            .await?;
            tracing::info!(%vlan, %vxlan, underlay = %self.underlay, %group, "created the VLAN's VXLAN link");
        }
        let vx = links.get(&vxlan);
        if vx.and_then(|l| l.master.as_deref()) != Some(bridge.as_str()) {
            self.ip(&["link", "set", &vxlan, "master", &bridge]).await?;
        }
        if !vx.is_some_and(|l| l.up) {
            self.ip(&["link", "set", &vxlan, "up"]).await?;
        }
        Ok(())
    }

    async fn prune(&self, links: &BTreeMap<String, Link>) -> Result<(), NetError> {
        for (vlan, members) in segments_of(links) {
            if members.is_empty() {
                let (bridge, vxlan) = (bridge_name(vlan), vxlan_name(vlan));
                if links.contains_key(&vxlan) {
                    self.ip(&["link", "del", &vxlan]).await?;
                }
                self.ip(&["link", "del", &bridge]).await?;
                tracing::info!(%vlan, "removed the VLAN's segment: no guest uses it here");
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl HostNetwork for VxlanNetwork {
    async fn prepare(&self) -> Result<(), NetError> {
        let _guard = self.lock.lock().await;
        if !self.links().await?.contains_key(&self.underlay) {
            return Err(NetError::NoUnderlay(self.underlay.clone()));
        }
        uplink::configure(self.netns.as_deref(), &self.underlay, self.uplink_bps).await
    }

    async fn attach(&self, nic: &NicAttachment<'_>) -> Result<(), NetError> {
        let (device, vlan) = (nic.device, nic.vlan);
        check_name(device)?;
        let _guard = self.lock.lock().await;
        let links = self.links().await?;
        self.ensure_segment(vlan, &links).await?;
        let bridge = bridge_name(vlan);
        match links.get(device) {
            Some(l) if l.kind != "tun" => {
                return Err(NetError::NotATap { device: device.to_owned(), kind: l.kind.clone() });
            }
            Some(_) => {}
            None => {
                self.ip(&["tuntap", "add", "dev", device, "mode", "tap"]).await?;
                let mtu = self.segment_mtu(&links)?.to_string();
                self.ip(&["link", "set", device, "mtu", &mtu]).await?;
            }
        }
        let tap = links.get(device);
        if tap.and_then(|l| l.master.as_deref()) != Some(bridge.as_str()) {
            self.ip(&["link", "set", device, "master", &bridge]).await?;
            tracing::info!(%device, %vlan, "tap joined the VLAN");
        }
        if !tap.is_some_and(|l| l.up) {
            self.ip(&["link", "set", device, "up"]).await?;
        }
        let ifindex = match tap {
            Some(l) => l.ifindex,
            None => self.links().await?.get(device).map_or(0, |l| l.ifindex),
        };
        let ns = self.netns.as_deref();
        match nic.rate_bps {
            Some(rate) => uplink::reserve(ns, &self.underlay, ifindex, nic.mac, rate).await,
            None => uplink::release(ns, &self.underlay, ifindex).await,
        }
    }

    async fn detach(&self, devices: &[String]) -> Result<(), NetError> {
        let _guard = self.lock.lock().await;
        let links = self.links().await?;
        for device in devices {
            check_name(device)?;
            if let Some(l) = links.get(device) {
                uplink::release(self.netns.as_deref(), &self.underlay, l.ifindex).await?;
                self.ip(&["link", "del", device]).await?;
            }
        }
        let links = self.links().await?;
        self.prune(&links).await
    }

    async fn segments(&self) -> Result<BTreeMap<VlanTag, BTreeSet<String>>, NetError> {
        Ok(segments_of(&self.links().await?))
    }
}

/// The segments (our bridges) among `links`, each with its guest devices:
/// every member but the VXLAN link.
fn segments_of(links: &BTreeMap<String, Link>) -> BTreeMap<VlanTag, BTreeSet<String>> {
    let mut segments: BTreeMap<VlanTag, BTreeSet<String>> = links
        .values()
        .filter(|l| l.kind == "bridge")
        .filter_map(|l| {
            let tag: u16 = l.name.strip_prefix("dbr")?.parse().ok()?;
            Some((VlanTag::try_from(tag).ok()?, BTreeSet::new()))
        })
        .collect();
    for l in links.values() {
        let Some(master) = &l.master else { continue };
        let Some(tag) = master.strip_prefix("dbr").and_then(|t| t.parse::<u16>().ok()) else { continue };
        let Ok(vlan) = VlanTag::try_from(tag) else { continue };
        if l.name != vxlan_name(vlan)
            && let Some(members) = segments.get_mut(&vlan)
        {
            members.insert(l.name.clone());
        }
    }
    segments
}

fn parse_links(value: &serde_json::Value) -> Vec<Link> {
    let Some(list) = value.as_array() else { return Vec::new() };
    list.iter()
        .filter_map(|l| {
            let name = l.get("ifname")?.as_str()?.to_owned();
            let ifindex = l.get("ifindex").and_then(|i| i.as_u64()).unwrap_or(0) as u32;
            let kind = l.pointer("/linkinfo/info_kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
            let master = l.get("master").and_then(|m| m.as_str()).map(str::to_owned);
            let up = l
                .get("flags")
                .and_then(|f| f.as_array())
                .is_some_and(|flags| flags.iter().any(|f| f.as_str() == Some("UP")));
            let mtu = l.get("mtu").and_then(|m| m.as_u64()).unwrap_or(1500) as u32;
            Some(Link { name, ifindex, kind, master, up, mtu })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_groups_are_per_vlan() {
        let max = VlanTag::new(4094).expect("tag");
        assert!(bridge_name(max).len() <= 15 && vxlan_name(max).len() <= 15);
        assert_eq!(vxlan_group(max), "239.1.15.254");
        assert_eq!(vxlan_group(VlanTag::new(100).expect("tag")), "239.1.0.100");
        assert!(check_name("dv0123456789a0").is_ok());
        assert!(check_name("").is_err() && check_name("a/b").is_err() && check_name("sixteen-chars-xx").is_err());
    }

    #[test]
    fn segments_list_guest_devices_but_not_the_vxlan_link() {
        let value = serde_json::json!([
            {"ifname": "trunk0", "mtu": 1600, "flags": ["UP"]},
            {"ifname": "dbr100", "mtu": 1500, "flags": ["UP"], "linkinfo": {"info_kind": "bridge"}},
            {"ifname": "dvx100", "mtu": 1500, "master": "dbr100", "linkinfo": {"info_kind": "vxlan"}},
            {"ifname": "dvaaa0", "mtu": 1500, "master": "dbr100", "linkinfo": {"info_kind": "tun"}},
            {"ifname": "dbr200", "mtu": 1500, "linkinfo": {"info_kind": "bridge"}},
            {"ifname": "dvx200", "mtu": 1500, "master": "dbr200", "linkinfo": {"info_kind": "vxlan"}},
            {"ifname": "br0", "mtu": 1500, "linkinfo": {"info_kind": "bridge"}},
        ]);
        let links: BTreeMap<String, Link> = parse_links(&value).into_iter().map(|l| (l.name.clone(), l)).collect();
        assert!(links["trunk0"].up && !links["dbr200"].up);
        let segs = segments_of(&links);
        let v = |t| VlanTag::new(t).expect("tag");
        assert_eq!(segs.len(), 2, "{segs:?}");
        assert_eq!(segs[&v(100)], BTreeSet::from(["dvaaa0".to_owned()]));
        assert!(segs[&v(200)].is_empty());
    }
}
