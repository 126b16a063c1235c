//! Uplink shares: the host's uplink (the underlay its guests' VLAN traffic
//! leaves by) shaped with HTB so that each NIC with a rate limit is
//! guaranteed that rate, and NICs without one share the rest.
//!
//! ```text
//!   underlay root qdisc  htb d8:  (unclassified traffic -> d8:1)
//!     class d8:ffff  rate = ceil = uplink
//!       class d8:1   rate = uplink - reservations (at least 1 %), ceil = uplink   best effort
//!       class d8:N   rate = the NIC's limit, ceil = uplink                        one per limited NIC
//! ```
//!
//! A NIC's packets are recognised on the underlay after VXLAN
//! encapsulation, by the inner source MAC (at byte 42 of the IP packet:
//! outer IPv4 20, UDP 8, VXLAN 8, inner destination MAC 6), with a `u32`
//! filter whose priority is N. N is the NIC's tap ifindex: unique on the
//! host while the tap exists, and found again from the tap alone. Placement
//! keeps the reservations within the uplink (`drove-placement`), so every
//! guarantee holds. The kernel's qdiscs are the only record: an agent
//! restart finds them as they are.

use crate::cmd;
use crate::{NetError, tc_rate};

const ROOT: &str = "d8:";
const PARENT: &str = "d8:ffff";
const DEFAULT: &str = "d8:1";

/// The `tc`/`ip` argument prefix for a namespace.
fn ns_args(netns: Option<&str>) -> Vec<&str> {
    netns.map(|ns| vec!["-n", ns]).unwrap_or_default()
}

async fn tc(netns: Option<&str>, args: &[&str]) -> Result<String, NetError> {
    let mut full = ns_args(netns);
    full.extend_from_slice(args);
    Ok(cmd::run("tc", &full).await?)
}

/// The classes under our root and their guaranteed rates (bit/s).
async fn classes(netns: Option<&str>, dev: &str) -> Result<Vec<(String, u64)>, NetError> {
    let out = tc(netns, &["class", "show", "dev", dev]).await?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let id = words.nth(2)?.to_owned();
            let rate = l.split_whitespace().skip_while(|w| *w != "rate").nth(1).and_then(tc_rate::parse)?;
            id.starts_with(ROOT).then_some((id, rate))
        })
        .collect())
}

/// Shapes `dev` to `uplink_bps`, keeping the NIC classes already there.
/// `None` removes our shaping.
pub async fn configure(netns: Option<&str>, dev: &str, uplink_bps: Option<u64>) -> Result<(), NetError> {
    let ours = tc(netns, &["qdisc", "show", "dev", dev]).await?.contains(&format!("htb {ROOT} root"));
    let Some(uplink) = uplink_bps else {
        if ours {
            tc(netns, &["qdisc", "del", "dev", dev, "root"]).await?;
        }
        return Ok(());
    };
    if !ours {
        // r2q: HTB's quantum is rate / r2q; 100 keeps it sane from Mbit to Gbit.
        tc(netns, &["qdisc", "replace", "dev", dev, "root", "handle", ROOT, "htb", "default", "1", "r2q", "100"])
            .await?;
    }
    let rate = format!("{uplink}bit");
    tc(
        netns,
        &["class", "replace", "dev", dev, "parent", ROOT, "classid", PARENT, "htb", "rate", &rate, "ceil", &rate],
    )
    .await?;
    rebalance(netns, dev, uplink).await
}

/// The uplink rate our shaping on `dev` has, if any.
async fn uplink_of(netns: Option<&str>, dev: &str) -> Result<Option<u64>, NetError> {
    Ok(classes(netns, dev).await?.into_iter().find(|(id, _)| id == PARENT).map(|(_, r)| r))
}

/// The best-effort class gets what the reservations leave (at least 1 %).
async fn rebalance(netns: Option<&str>, dev: &str, uplink: u64) -> Result<(), NetError> {
    let reserved: u64 =
        classes(netns, dev).await?.iter().filter(|(id, _)| id != PARENT && id != DEFAULT).map(|(_, r)| r).sum();
    let rest = uplink.saturating_sub(reserved).max(uplink / 100).max(8_000);
    htb_class(netns, dev, DEFAULT, rest, uplink).await
}

/// A child of the uplink class guaranteed `rate`, borrowing up to `ceil`.
async fn htb_class(netns: Option<&str>, dev: &str, classid: &str, rate: u64, ceil: u64) -> Result<(), NetError> {
    let (r, c) = (format!("{rate}bit"), format!("{ceil}bit"));
    let (burst, cburst) = (tc_rate::burst_bytes(rate).to_string(), tc_rate::burst_bytes(ceil).to_string());
    tc(
        netns,
        &[
            "class", "replace", "dev", dev, "parent", PARENT, "classid", classid, "htb", "rate", &r, "ceil", &c,
            "burst", &burst, "cburst", &cburst,
        ],
    )
    .await?;
    Ok(())
}

/// Guarantees `rate_bps` on the uplink to the NIC with `mac` whose tap has
/// `ifindex`. Idempotent. Nothing to do when the uplink is not shaped.
pub async fn reserve(netns: Option<&str>, dev: &str, ifindex: u32, mac: &str, rate_bps: u64) -> Result<(), NetError> {
    let Some(uplink) = uplink_of(netns, dev).await? else { return Ok(()) };
    let mac_bytes: Vec<u8> = mac.split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
    let [a, b, c, d, e, f] = mac_bytes[..] else { return Err(NetError::BadMac(mac.to_owned())) };
    let minor = format!("{ifindex:x}");
    let classid = format!("{ROOT}{minor}");
    htb_class(netns, dev, &classid, rate_bps, uplink).await?;
    let prio = ifindex.to_string();
    // Replace: drop whatever filter this priority had (none is fine).
    let _ = tc(netns, &["filter", "del", "dev", dev, "parent", ROOT, "prio", &prio]).await;
    let hi = format!("0x{a:02x}{b:02x}");
    let lo = format!("0x{c:02x}{d:02x}{e:02x}{f:02x}");
    tc(
        netns,
        &[
            "filter",
            "add",
            "dev",
            dev,
            "parent",
            ROOT,
            "protocol",
            "ip",
            "prio",
            &prio,
            "u32",
            "match",
            "u16",
            &hi,
            "0xffff",
            "at",
            "42",
            "match",
            "u32",
            &lo,
            "0xffffffff",
            "at",
            "44",
            "flowid",
            &classid,
        ],
    )
    .await?;
    rebalance(netns, dev, uplink).await
}

/// Drops the reservation of the tap with `ifindex`, if there is one.
pub async fn release(netns: Option<&str>, dev: &str, ifindex: u32) -> Result<(), NetError> {
    let Some(uplink) = uplink_of(netns, dev).await? else { return Ok(()) };
    let classid = format!("{ROOT}{ifindex:x}");
    if !classes(netns, dev).await?.iter().any(|(id, _)| *id == classid) {
        return Ok(());
    }
    let _ = tc(netns, &["filter", "del", "dev", dev, "parent", ROOT, "prio", &ifindex.to_string()]).await;
    tc(netns, &["class", "del", "dev", dev, "classid", &classid]).await?;
    rebalance(netns, dev, uplink).await
}
