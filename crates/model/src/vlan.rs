//! VLANs: named layer-2 segments identified by an 802.1Q tag, optionally
//! with an IPv4 subnet that drove hands addresses out of.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An 802.1Q VLAN id, 1..=4094.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "u16", into = "u16")]
#[schema(value_type = u16)]
pub struct VlanTag(u16);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VlanError {
    #[error("VLAN id {0} is out of range (valid: 1..=4094)")]
    TagOutOfRange(u32),
    #[error("VLAN name {name:?} is invalid: {reason}")]
    Name { name: String, reason: &'static str },
    #[error("subnet {input:?} is invalid: {reason}")]
    Subnet { input: String, reason: &'static str },
    #[error("gateway {gateway} is not inside subnet {subnet}")]
    GatewayOutsideSubnet { gateway: Ipv4Addr, subnet: Ipv4Cidr },
}

impl VlanTag {
    pub fn new(tag: u32) -> Result<Self, VlanError> {
        if (1..=4094).contains(&tag) { Ok(Self(tag as u16)) } else { Err(VlanError::TagOutOfRange(tag)) }
    }
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u16> for VlanTag {
    type Error = VlanError;
    fn try_from(v: u16) -> Result<Self, Self::Error> {
        Self::new(v.into())
    }
}
impl From<VlanTag> for u16 {
    fn from(v: VlanTag) -> u16 {
        v.0
    }
}
impl fmt::Display for VlanTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An IPv4 network in CIDR notation with its host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl utoipa::PartialSchema for Ipv4Cidr {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("IPv4 network in CIDR notation, host bits zero"))
            .examples(["10.0.100.0/24"])
            .into()
    }
}
impl utoipa::ToSchema for Ipv4Cidr {}

impl Ipv4Cidr {
    fn mask(prefix: u8) -> u32 {
        if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) }
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.addr)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = VlanError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| VlanError::Subnet { input: s.to_owned(), reason };
        let (addr, prefix) = s.split_once('/').ok_or_else(|| err("expected ADDRESS/PREFIX"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err("address is not IPv4"))?;
        let prefix: u8 = prefix.parse().map_err(|_| err("prefix is not a number"))?;
        if !(8..=30).contains(&prefix) {
            return Err(err("prefix must be between /8 and /30"));
        }
        if u32::from(addr) & !Self::mask(prefix) != 0 {
            return Err(err("host bits are set"));
        }
        Ok(Self { addr, prefix })
    }
}
impl TryFrom<String> for Ipv4Cidr {
    type Error = VlanError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}
impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> String {
        c.to_string()
    }
}
impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A VLAN as defined by an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Vlan {
    pub tag: VlanTag,
    pub name: String,
    pub subnet: Option<Ipv4Cidr>,
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub gateway: Option<Ipv4Addr>,
}

impl Vlan {
    pub fn new(
        tag: VlanTag,
        name: String,
        subnet: Option<Ipv4Cidr>,
        gateway: Option<Ipv4Addr>,
    ) -> Result<Self, VlanError> {
        crate::guest::validate_name(&name).map_err(|reason| VlanError::Name { name: name.clone(), reason })?;
        if name.parse::<u32>().is_ok() {
            return Err(VlanError::Name { name, reason: "must not be a number (numbers name VLAN ids)" });
        }
        if let (Some(gw), Some(net)) = (gateway, subnet)
            && !net.contains(gw)
        {
            return Err(VlanError::GatewayOutsideSubnet { gateway: gw, subnet: net });
        }
        Ok(Self { tag, name, subnet, gateway })
    }
}

/// A NIC's IPv4 configuration: its address, the prefix length of its VLAN's
/// subnet, and the VLAN's gateway if it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NicAddress {
    #[schema(value_type = String, format = Ipv4)]
    pub ip: Ipv4Addr,
    pub prefix: u8,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub gateway: Option<Ipv4Addr>,
}

impl fmt::Display for NicAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// Why an address cannot be given to a NIC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("VLAN {vlan} has no subnet, so its NICs get no address")]
    NoSubnet { vlan: VlanTag },
    #[error("{ip} is not a host address of subnet {subnet}")]
    Outside { ip: Ipv4Addr, subnet: Ipv4Cidr },
    #[error("{ip} is the gateway of VLAN {vlan}")]
    Gateway { ip: Ipv4Addr, vlan: VlanTag },
    #[error("{ip} is already in use on VLAN {vlan}")]
    Taken { ip: Ipv4Addr, vlan: VlanTag },
    #[error("subnet {subnet} of VLAN {vlan} has no free address left")]
    Exhausted { subnet: Ipv4Cidr, vlan: VlanTag },
}

impl Ipv4Cidr {
    /// The first and last addresses a host may use: the network and
    /// broadcast addresses are excluded.
    pub fn host_range(&self) -> (u32, u32) {
        let net = u32::from(self.addr);
        let broadcast = net | !Self::mask(self.prefix);
        (net + 1, broadcast - 1)
    }

    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        let (first, last) = self.host_range();
        (first..=last).contains(&u32::from(ip))
    }
}

impl Vlan {
    /// Checks that `ip` may be given to a NIC on this VLAN, `used` telling
    /// the addresses its NICs already have.
    pub fn claim(&self, ip: Ipv4Addr, used: impl Fn(Ipv4Addr) -> bool) -> Result<NicAddress, IpamError> {
        let subnet = self.subnet.ok_or(IpamError::NoSubnet { vlan: self.tag })?;
        if !subnet.is_host(ip) {
            return Err(IpamError::Outside { ip, subnet });
        }
        if self.gateway == Some(ip) {
            return Err(IpamError::Gateway { ip, vlan: self.tag });
        }
        if used(ip) {
            return Err(IpamError::Taken { ip, vlan: self.tag });
        }
        Ok(NicAddress { ip, prefix: subnet.prefix, gateway: self.gateway })
    }

    /// The next free address at or after `from` (wrapping around the
    /// subnet), or `None` on a VLAN without a subnet. Next-fit rather than
    /// lowest-free: a released address is not handed out again at once
    /// (peers' ARP caches still point at the old MAC), and allocation stays
    /// O(1) amortised on a large, busy subnet.
    pub fn allocate(
        &self,
        used: impl Fn(Ipv4Addr) -> bool,
        from: Option<Ipv4Addr>,
    ) -> Result<Option<NicAddress>, IpamError> {
        let Some(subnet) = self.subnet else { return Ok(None) };
        let (first, last) = subnet.host_range();
        let size = u64::from(last - first) + 1;
        let start = from.map(u32::from).filter(|&a| (first..=last).contains(&a)).unwrap_or(first);
        for step in 0..size {
            let candidate = first + ((u64::from(start - first) + step) % size) as u32;
            let ip = Ipv4Addr::from(candidate);
            if Some(ip) != self.gateway && !used(ip) {
                return Ok(Some(NicAddress { ip, prefix: subnet.prefix, gateway: self.gateway }));
            }
        }
        Err(IpamError::Exhausted { subnet, vlan: self.tag })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn blue() -> Vlan {
        let tag = VlanTag::new(100).expect("tag");
        Vlan::new(
            tag,
            "blue".into(),
            Some("10.0.100.0/29".parse().expect("net")),
            Some("10.0.100.1".parse().expect("gw")),
        )
        .expect("vlan")
    }

    #[test]
    fn allocation_skips_gateway_network_broadcast_and_used_until_exhausted() {
        let v = blue();
        let mut used: BTreeSet<Ipv4Addr> = BTreeSet::new();
        let mut got = Vec::new();
        let mut from = None;
        while let Ok(Some(a)) = v.allocate(|ip| used.contains(&ip), from) {
            assert_eq!(a.prefix, 29);
            assert_eq!(a.gateway, v.gateway);
            assert!(used.insert(a.ip), "{} handed out twice", a.ip);
            got.push(a.ip.to_string());
            from = Some(Ipv4Addr::from(u32::from(a.ip) + 1));
        }
        assert_eq!(got, ["10.0.100.2", "10.0.100.3", "10.0.100.4", "10.0.100.5", "10.0.100.6"]);
        assert!(matches!(v.allocate(|ip| used.contains(&ip), from), Err(IpamError::Exhausted { .. })));
        // A released address comes back only after the cursor wraps.
        used.remove(&"10.0.100.3".parse().expect("ip"));
        let again = v.allocate(|ip| used.contains(&ip), from).expect("free").expect("subnet");
        assert_eq!(again.ip.to_string(), "10.0.100.3");
    }

    #[test]
    fn claims_are_checked() {
        let v = blue();
        let mut used: BTreeSet<Ipv4Addr> = BTreeSet::new();
        used.insert("10.0.100.4".parse().expect("ip"));
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        assert!(matches!(v.claim(ip("10.0.100.4"), |a| used.contains(&a)), Err(IpamError::Taken { .. })));
        assert!(matches!(v.claim(ip("10.0.100.1"), |a| used.contains(&a)), Err(IpamError::Gateway { .. })));
        assert!(matches!(v.claim(ip("10.0.100.0"), |a| used.contains(&a)), Err(IpamError::Outside { .. })));
        assert!(matches!(v.claim(ip("10.0.100.7"), |a| used.contains(&a)), Err(IpamError::Outside { .. })));
        assert!(matches!(v.claim(ip("10.0.101.2"), |a| used.contains(&a)), Err(IpamError::Outside { .. })));
        assert_eq!(
            v.claim(ip("10.0.100.6"), |a| used.contains(&a)).map(|a| a.to_string()),
            Ok("10.0.100.6/29".to_owned())
        );
        let plain = Vlan::new(VlanTag::new(7).expect("tag"), "plain".into(), None, None).expect("vlan");
        assert_eq!(plain.allocate(|ip| used.contains(&ip), None), Ok(None));
        assert!(matches!(plain.claim(ip("10.0.0.1"), |a| used.contains(&a)), Err(IpamError::NoSubnet { .. })));
    }

    #[test]
    fn tags_and_subnets_are_checked() {
        assert!(VlanTag::new(0).is_err());
        assert!(VlanTag::new(4095).is_err());
        assert_eq!(VlanTag::new(100).map(VlanTag::get), Ok(100));
        assert!(serde_json::from_str::<VlanTag>("5000").is_err());
        let net: Ipv4Cidr = "10.0.100.0/24".parse().expect("valid");
        assert!(net.contains("10.0.100.7".parse().expect("ip")));
        assert!(!net.contains("10.0.101.7".parse().expect("ip")));
        assert!("10.0.100.1/24".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.100.0/31".parse::<Ipv4Cidr>().is_err());
        let tag = VlanTag::new(100).expect("tag");
        assert!(Vlan::new(tag, "blue".into(), Some(net), Some("10.0.0.1".parse().expect("ip"))).is_err());
        assert!(Vlan::new(tag, "200".into(), None, None).is_err());
        assert!(Vlan::new(tag, "blue".into(), Some(net), Some("10.0.100.1".parse().expect("ip"))).is_ok());
    }
}
