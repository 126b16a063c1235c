//! Policies: what decides placement, migrations and power in a run.

pub mod baseline;
pub mod drove;

use crate::world::{Accounting, Action, View};

/// A placement policy driven by the simulator.
pub trait Policy: std::fmt::Debug {
    /// The name it is reported under.
    fn name(&self) -> String;

    /// How host power is charged under this policy.
    fn accounting(&self) -> Accounting {
        Accounting::Measured
    }

    /// Where each VM starts (one host index per VM).
    fn initial(&mut self, view: &View<'_>) -> Vec<usize>;

    /// What to do at the start of an interval.
    fn decide(&mut self, view: &View<'_>) -> Vec<Action>;
}

/// The policies `by_name` knows, with their default parameter.
pub const NAMES: [&str; 7] = ["drove", "npa", "dvfs", "thr-mmt:0.8", "iqr-mmt:1.5", "mad-mmt:2.5", "lr-mmt:1.2"];

/// A policy name `by_name` does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {name:?}: {reason} (known: {})", NAMES.join(", "))]
pub struct UnknownPolicy {
    pub name: String,
    pub reason: &'static str,
}

/// A policy by name, `NAME` or `NAME:PARAMETER` (e.g. `thr-mmt:0.8`).
pub fn by_name(spec: &str) -> Result<Box<dyn Policy>, UnknownPolicy> {
    let (name, param) = match spec.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (spec, None),
    };
    let err = |reason| UnknownPolicy { name: spec.to_owned(), reason };
    let param = |default: f64| -> Result<f64, UnknownPolicy> {
        match param {
            None => Ok(default),
            Some(p) => p
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| err("the parameter must be a positive number")),
        }
    };
    use baseline::{Classic, Detector};
    let no_param = |p: Option<&str>| if p.is_some() { Err(err("takes no parameter")) } else { Ok(()) };
    let policy: Box<dyn Policy> = match name {
        "drove" => {
            no_param(spec.split_once(':').map(|x| x.1))?;
            Box::new(drove::Drove::default())
        }
        "npa" => {
            no_param(spec.split_once(':').map(|x| x.1))?;
            Box::new(Classic::npa())
        }
        "dvfs" => {
            no_param(spec.split_once(':').map(|x| x.1))?;
            Box::new(Classic::dvfs())
        }
        "thr-mmt" => Box::new(Classic::migrating(Detector::Thr(param(0.8)?))),
        "iqr-mmt" => Box::new(Classic::migrating(Detector::Iqr(param(1.5)?))),
        "mad-mmt" => Box::new(Classic::migrating(Detector::Mad(param(2.5)?))),
        "lr-mmt" => Box::new(Classic::migrating(Detector::Lr(param(1.2)?))),
        _ => return Err(err("no such policy")),
    };
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_and_without_parameters() {
        for name in NAMES {
            assert_eq!(by_name(name).expect("known").name(), *name);
        }
        assert_eq!(by_name("lr-mmt").expect("default parameter").name(), "lr-mmt:1.2");
        assert_eq!(by_name("thr-mmt:0.7").expect("parameter").name(), "thr-mmt:0.7");
        let err = by_name("thr-mmt:-1").expect_err("negative");
        assert!(err.to_string().contains("positive number"), "{err}");
        assert!(by_name("drove:2").is_err());
        let err = by_name("best-fit").expect_err("unknown");
        assert!(err.to_string().starts_with("unknown policy \"best-fit\": no such policy (known: drove, npa"), "{err}");
    }
}
