//! NIC bandwidth caps with `tc`, on the host side of each guest NIC: its
//! tap.
//!
//! # The idea
//!
//! A tap is the host's end of a guest NIC: what the host sends out of the
//! tap (its egress) reaches the guest, what the guest sends arrives on the
//! tap's ingress. Both directions are capped at the NIC's rate:
//!
//! ```text
//!               host ──► tap egress:  tbf (handle d7:)        ──► guest
//!   host ◄── IFB egress: tbf (d7:) ◄── tap ingress (ffff:): redirect ◄── guest
//! ```
//!
//! * Towards the guest: a token bucket (`tbf`) as the tap's root qdisc.
//! * From the guest: packets arriving on a device can be policed (dropped
//!   above the rate) but not queued. This platform's kernel has no policer
//!   (`act_police`) and no `matchall`, so the tap's ingress qdisc redirects
//!   every packet (`u32` matching all, `mirred`) to an IFB device of that
//!   NIC, whose egress carries the same `tbf`; the IFB then hands the
//!   packets back to the tap's receive path. That shapes instead of
//!   dropping, which TCP takes better than a policer, and works wherever
//!   IFB and mirred are (both common in distribution kernels).
//!
//! The IFB `di<10 hex digits of the guest id><NIC index>` is created first
//! and removed last, so its existence says that limits may be set on that
//! NIC's tap. Removal looks for IFBs in `/proc/self/net/dev` (no process
//! started), which keeps it cheap for guests without NIC limits, and works
//! from the guest id alone, without its record. The tap's root qdisc is
//! removed only when it is ours (handle `d7:`); its ingress qdisc belongs
//! to us on guest taps.
//!
//! A tap deleted by the network layer takes its qdiscs along; the IFB is
//! ours to delete.
//!
//! A running guest's rate changes with [`set`]: where both shapers are in
//! place, `tc qdisc change` gives them the new rate where they are, so the
//! NIC is never unshaped on the way and no queued packet is dropped;
//! otherwise (no limit before, or a half-removed one) the limit is made
//! afresh, and a rate of `None` removes it.

use std::path::PathBuf;

use drove_model::GuestId;
pub use drove_net::cmd::device_exists;
use drove_net::cmd::{CmdError, run, run_json};
pub use drove_net::tc_rate::burst_bytes;

/// The handle of our root `tbf` qdiscs, so that we remove only our own.
pub const ROOT_HANDLE: &str = "d7:";
/// How long a packet may wait in a `tbf` before it is dropped.
const LATENCY: &str = "50ms";

#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error(transparent)]
    Command(#[from] CmdError),
    #[error("cannot read the output of `{command}`: {reason}")]
    Output { command: String, reason: String },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The IFB that shapes what the guest's `index`-th NIC sends. At most 15
/// bytes (IFNAMSIZ) for indexes below 1000, like the tap names.
pub fn ifb_name(id: GuestId, index: usize) -> String {
    format!("{}{index}", ifb_prefix(id))
}

fn ifb_prefix(id: GuestId) -> String {
    let hex = id.as_uuid().simple().to_string();
    format!("di{}", &hex[..10])
}

/// The guest's IFBs that exist, with their NIC index.
pub fn guest_ifbs(id: GuestId) -> Result<Vec<(usize, String)>, TcError> {
    let prefix = ifb_prefix(id);
    let devices = drove_net::cmd::devices().map_err(|source| TcError::Io {
        action: "reading",
        path: "/proc/self/net/dev".into(),
        source,
    })?;
    let mut ifbs: Vec<(usize, String)> = devices
        .into_iter()
        .filter_map(|name| {
            let index = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((index, name))
        })
        .collect();
    ifbs.sort();
    Ok(ifbs)
}

/// Caps both directions of the NIC on `tap` at `rate_bps` bits per second,
/// replacing what an earlier run left. On failure nothing of it remains.
pub async fn apply(tap: &str, ifb: &str, rate_bps: u64) -> Result<(), TcError> {
    clear(tap, ifb).await?;
    let result = apply_fresh(tap, ifb, rate_bps).await;
    if result.is_err()
        && let Err(e) = clear(tap, ifb).await
    {
        tracing::warn!(tap, ifb, error = %e, "cannot remove a half-applied NIC limit");
    }
    result
}

async fn apply_fresh(tap: &str, ifb: &str, rate_bps: u64) -> Result<(), TcError> {
    let rate = format!("{rate_bps}bit");
    let burst = burst_bytes(rate_bps).to_string();
    let tbf = |dev: &str| -> Vec<String> {
        ["qdisc", "add", "dev", dev, "root", "handle", ROOT_HANDLE, "tbf", "rate", &rate, "burst", &burst]
            .into_iter()
            .chain(["latency", LATENCY])
            .map(str::to_owned)
            .collect()
    };
    // The IFB first: it marks the NIC as limited for `clear`.
    run("ip", &["link", "add", ifb, "type", "ifb"]).await?;
    run("ip", &["link", "set", "dev", ifb, "up"]).await?;
    run("tc", &tbf(ifb)).await?;
    run("tc", &tbf(tap)).await?;
    run("tc", &["qdisc", "add", "dev", tap, "handle", "ffff:", "ingress"]).await?;
    run(
        "tc",
        &[
            "filter", "add", "dev", tap, "parent", "ffff:", "protocol", "all", "prio", "1", "u32", "match", "u32", "0",
            "0", "action", "mirred", "egress", "redirect", "dev", ifb,
        ],
    )
    .await?;
    Ok(())
}

/// Makes the NIC on `tap` capped at `rate_bps` (`None`: not capped),
/// whatever limit it had. Idempotent, so that putting an old rate back is
/// the same call.
pub async fn set(tap: &str, ifb: &str, rate_bps: Option<u64>) -> Result<(), TcError> {
    let Some(rate_bps) = rate_bps else { return clear(tap, ifb).await };
    if !shaped(tap, ifb).await? {
        return apply(tap, ifb, rate_bps).await;
    }
    let (rate, burst) = (format!("{rate_bps}bit"), burst_bytes(rate_bps).to_string());
    for dev in [ifb, tap] {
        run(
            "tc",
            &[
                "qdisc",
                "change",
                "dev",
                dev,
                "root",
                "handle",
                ROOT_HANDLE,
                "tbf",
                "rate",
                &rate,
                "burst",
                &burst,
                "latency",
                LATENCY,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Whether all of [`apply`]'s shaping is in place on `tap` and `ifb`.
async fn shaped(tap: &str, ifb: &str) -> Result<bool, TcError> {
    if !device_exists(tap) || !device_exists(ifb) {
        return Ok(false);
    }
    let ours = |q: &Qdisc| q.root && q.handle == ROOT_HANDLE && q.kind == "tbf";
    let on_tap = qdiscs(tap).await?;
    Ok(on_tap.iter().any(ours) && on_tap.iter().any(|q| q.kind == "ingress") && qdiscs(ifb).await?.iter().any(ours))
}

/// Removes the limits [`apply`] set on `tap` and its IFB: the tap's root
/// qdisc if it is ours, its ingress qdisc, then the IFB. Whatever is gone
/// already is fine.
pub async fn clear(tap: &str, ifb: &str) -> Result<(), TcError> {
    if device_exists(tap) {
        for qdisc in qdiscs(tap).await? {
            if qdisc.root && qdisc.handle == ROOT_HANDLE {
                run("tc", &["qdisc", "del", "dev", tap, "root"]).await?;
            } else if qdisc.kind == "ingress" {
                run("tc", &["qdisc", "del", "dev", tap, "ingress"]).await?;
            }
        }
    }
    if device_exists(ifb) {
        run("ip", &["link", "del", "dev", ifb]).await?;
    }
    Ok(())
}

/// A qdisc as `tc -j qdisc show` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qdisc {
    pub kind: String,
    pub handle: String,
    pub root: bool,
    /// The rate of a `tbf`, bytes per second.
    pub rate_bytes: Option<u64>,
}

/// The qdiscs on `dev`.
pub async fn qdiscs(dev: &str) -> Result<Vec<Qdisc>, TcError> {
    let args = ["-j", "qdisc", "show", "dev", dev];
    let value = run_json("tc", &args).await?;
    let Some(list) = value.as_array() else {
        return Err(TcError::Output {
            command: format!("tc {}", args.join(" ")),
            reason: format!("not a JSON array: {value}"),
        });
    };
    Ok(list
        .iter()
        .map(|q| {
            let text = |key: &str| q.get(key).and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
            Qdisc {
                kind: text("kind"),
                handle: text("handle"),
                root: q.get("root").and_then(serde_json::Value::as_bool).unwrap_or(false),
                rate_bytes: q.pointer("/options/rate").and_then(serde_json::Value::as_u64),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifb_names_fit_ifnamsiz_and_differ_from_tap_names() {
        let id = GuestId::new_v4();
        for i in [0, 9, 10, 999] {
            let ifb = ifb_name(id, i);
            assert!(ifb.len() <= 15, "{ifb}");
            assert_ne!(ifb, super::super::QemuHypervisor::tap_name(id, i));
        }
        assert_ne!(ifb_name(id, 1), ifb_name(GuestId::new_v4(), 1));
    }
}
