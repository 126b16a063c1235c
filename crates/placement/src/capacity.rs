//! Capacity planning: headroom per host and per time of day, and what-if
//! questions ("add 20 guests like X", "lose host Y"), answered by running
//! the same placement and failover code on a copy of the cluster.

use crate::cluster::{Cluster, ClusterError, GuestSpec, HostIx, Limits, NoHost, Strategy};
use crate::plan::{FailoverParams, FailoverPlan, failover, place_all};
use crate::resources::{DIMS, Resources};

/// Free capacity of one host per slot, within `limits` (HA reserve and
/// targets already taken off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Headroom {
    pub host: HostIx,
    pub free: Vec<Resources>,
}

/// Headroom of every host that takes guests.
pub fn headroom(cluster: &Cluster, limits: &Limits) -> Vec<Headroom> {
    cluster
        .hosts()
        .filter(|&h| cluster.host(h).schedulable && cluster.host(h).state.accepts_guests())
        .map(|h| {
            let cap = cluster.host(h).capacity.to_array();
            let free = (0..cluster.slots())
                .map(|s| {
                    let load = cluster.load(h, s).to_array();
                    Resources::from_array(std::array::from_fn(|d| {
                        let lim = (f64::from(cap[d]) * limits.usable[d]).floor() as u64;
                        lim.saturating_sub(u64::from(load[d])).min(u64::from(u32::MAX)) as u32
                    }))
                })
                .collect();
            Headroom { host: h, free }
        })
        .collect()
}

/// The cluster's total headroom per slot.
pub fn cluster_headroom(cluster: &Cluster, limits: &Limits) -> Vec<Resources> {
    let mut total = vec![[0u64; DIMS]; cluster.slots()];
    for hr in headroom(cluster, limits) {
        for (t, f) in total.iter_mut().zip(&hr.free) {
            let f = f.to_array();
            for d in 0..DIMS {
                t[d] += u64::from(f[d]);
            }
        }
    }
    total.into_iter().map(|t| Resources::from_array(t.map(|v| v.min(u64::from(u32::MAX)) as u32))).collect()
}

/// The answer to "add `count` guests like this one".
#[derive(Debug, Clone, PartialEq)]
pub struct WhatIfAdd {
    /// How many of them fit.
    pub fits: usize,
    /// Why the first one that did not fit did not.
    pub first_failure: Option<NoHost>,
}

/// Would `count` more guests like `template` fit?
pub fn what_if_add(
    cluster: &Cluster,
    template: &GuestSpec,
    count: usize,
    limits: &Limits,
    strategy: Strategy,
) -> Result<WhatIfAdd, ClusterError> {
    let mut scratch = cluster.clone();
    let mut new = Vec::with_capacity(count);
    for i in 0..count {
        let spec = GuestSpec { name: format!("{}-whatif-{i}", template.name), ..template.clone() };
        new.push(scratch.add_guest(spec, None)?);
    }
    let plan = place_all(&mut scratch, &new, limits, strategy);
    Ok(WhatIfAdd { fits: plan.placed.len(), first_failure: plan.unplaced.into_iter().next().map(|(_, e)| e) })
}

/// What happens if `host` fails: where its guests would restart.
pub fn what_if_lose(cluster: &Cluster, host: HostIx, params: &FailoverParams) -> FailoverPlan {
    failover(cluster, host, params)
}
