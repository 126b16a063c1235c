//! `drove plan capacity|balance|power` against simulated labs: the
//! recommendations are read-only and agree with what the manager reports.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Lab, Output};
use drove_api::{GuestView, HostView};
use serde_json::Value;

/// A 3-host sim lab (4 cores, 16 GiB each).
fn lab() -> Lab {
    let mut lab = Lab::new();
    lab.up(&["--hosts", "3"]).ok();
    lab
}

fn create(lab: &Lab, name: &str, vcpus: u32, memory: &str, host: Option<&str>) -> GuestView {
    let vcpus = vcpus.to_string();
    let mut args = vec!["vm", "create", name, "--vcpus", &vcpus, "--memory", memory, "-o", "json"];
    if let Some(h) = host {
        args.extend(["--host", h]);
    }
    lab.run(&args).ok().json()
}

fn hosts(lab: &Lab) -> Vec<HostView> {
    lab.run(&["host", "list", "-o", "json"]).ok().json()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_u64().unwrap()).collect()
}

/// A failed command with one line on stderr that mentions `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.success(), "expected failure: {out}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "one-line error expected: {out}");
    assert!(out.stderr.contains(needle), "error should mention {needle:?}: {out}");
}

#[test]
fn capacity_headroom_is_capacity_minus_allocations_and_what_ifs_answer() {
    let lab = lab();
    create(&lab, "small", 1, "512M", Some("host-1"));
    create(&lab, "medium", 2, "1G", Some("host-1"));
    create(&lab, "large", 4, "3G", Some("host-2"));

    let report: Value = lab.run(&["plan", "capacity", "-o", "json"]).ok().json();
    assert_eq!(report["slots_per_day"], 24);
    assert_eq!(report["unprofiled_guests"], 3);
    let mut cluster_mem = vec![0u64; 24];
    let mut cluster_cpu = vec![0u64; 24];
    for h in hosts(&lab) {
        let row = report["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["host"] == h.info.name.as_str())
            .unwrap_or_else(|| panic!("{} missing from {report}", h.info.name));
        let mib = |b: drove_model::ByteSize| b.bytes() / (1024 * 1024);
        let mem_free = mib(h.info.memory) - mib(h.allocated_memory);
        // Guests without a profile: a quarter of their vCPUs all day.
        let cpu_free = u64::from(h.info.cores) * 1000 - u64::from(h.allocated_vcpus) * 250;
        assert_eq!(u64s(&row["memory_free_mib"]), vec![mem_free; 24], "{}: {row}", h.info.name);
        assert_eq!(u64s(&row["cpu_free_millicores"]), vec![cpu_free; 24], "{}: {row}", h.info.name);
        for s in 0..24 {
            cluster_mem[s] += mem_free;
            cluster_cpu[s] += cpu_free;
        }
    }
    assert_eq!(u64s(&report["cluster"]["memory_free_mib"]), cluster_mem);
    assert_eq!(u64s(&report["cluster"]["cpu_free_millicores"]), cluster_cpu);

    // Lose host-1: its two guests restart on the others.
    let lose: Value = lab.run(&["plan", "capacity", "--what-if-lose", "host-1", "-o", "json"]).ok().json();
    let w = &lose["what_if_lose"];
    assert_eq!(w["host"], "host-1");
    assert_eq!(w["guests"], 2);
    assert_eq!(w["all_fit"], true, "{w}");
    let restarts = w["restarts"].as_array().unwrap();
    assert_eq!(restarts.len(), 2, "{w}");
    assert!(restarts.iter().all(|r| r["host"] != "host-1"), "{w}");

    // Add guests like `large` (1 core, 3 GiB each in the plan): a few fit,
    // a hundred do not, and the answer says why.
    let few: Value = lab.run(&["plan", "capacity", "--what-if-add", "3", "--like", "large", "-o", "json"]).ok().json();
    assert_eq!(few["what_if_add"]["fits"], 3, "{few}");
    assert!(few["what_if_add"]["first_failure"].is_null(), "{few}");
    let many: Value =
        lab.run(&["plan", "capacity", "--what-if-add", "100", "--like", "large", "-o", "json"]).ok().json();
    let fits = many["what_if_add"]["fits"].as_u64().unwrap();
    assert!((3..100).contains(&fits), "{many}");
    assert!(many["what_if_add"]["first_failure"].as_str().is_some_and(|s| s.contains("no host")), "{many}");

    // Tables for people.
    let table = lab.run(&["plan", "capacity", "--what-if-lose", "host-1"]).ok();
    assert!(table.stdout.contains("FREE 00-06H") && table.stdout.contains("cluster"), "{table}");
    assert!(table.stdout.contains("what if host-1 is lost"), "{table}");

    // Bad input: one line, non-zero exit.
    assert_one_line_error(&lab.run(&["plan", "capacity", "--what-if-lose", "host-9"]), "unknown host");
    assert_one_line_error(&lab.run(&["plan", "capacity", "--what-if-add", "2", "--like", "nope"]), "unknown guest");
    assert_one_line_error(&lab.run(&["plan", "capacity", "--what-if-add", "2"]), "--like");
}

#[test]
fn balance_recommends_moves_off_a_hot_host_and_executes_nothing() {
    let lab = lab();
    // host-1 full by admission (16 vCPUs on 4 cores): hot; the others idle.
    for i in 1..=4 {
        create(&lab, &format!("busy-{i}"), 4, "1G", Some("host-1"));
    }
    let before: Vec<GuestView> = lab.run(&["vm", "list", "-o", "json"]).ok().json();

    let report: Value = lab.run(&["plan", "balance", "-o", "json"]).ok().json();
    assert_eq!(report["mode"], "manual");
    assert_eq!(report["executed"], false);
    let moves = report["moves"].as_array().unwrap();
    let off_hot: Vec<&Value> = moves.iter().filter(|m| m["from"] == "host-1").collect();
    assert!(!off_hot.is_empty(), "expected a move off host-1: {report}");
    for m in &off_hot {
        assert_ne!(m["to"], "host-1");
        assert!(m["reason"].as_str().is_some_and(|r| r.contains("host-1") && r.len() > 20), "{m}");
    }
    assert_eq!(off_hot[0]["kind"], "hot", "{report}");
    let hot = report["hosts"].as_array().unwrap().iter().find(|h| h["host"] == "host-1").unwrap();
    assert_eq!(hot["hot"], true, "{report}");

    let table = lab.run(&["plan", "balance"]).ok();
    assert!(table.stdout.contains("manual mode"), "{table}");
    assert!(table.stdout.contains("busy-"), "{table}");

    // Read-only: every guest is still where it was.
    let after: Vec<GuestView> = lab.run(&["vm", "list", "-o", "json"]).ok().json();
    let place = |v: &[GuestView]| {
        let mut p: Vec<(String, String)> = v.iter().map(|g| (g.guest.spec.name.clone(), g.host_name.clone())).collect();
        p.sort();
        p
    };
    assert_eq!(place(&before), place(&after));
}

#[test]
fn power_proposes_standby_on_a_nearly_empty_lab() {
    let lab = lab();
    create(&lab, "lonely", 1, "512M", None);

    let report: Value = lab.run(&["plan", "power", "--hour", "12", "-o", "json"]).ok().json();
    assert_eq!(report["executed"], false);
    assert_eq!(report["hour"], 12);
    let standby = report["standby"].as_array().unwrap();
    assert!(!standby.is_empty(), "{report}");
    assert!(standby.len() <= 2, "at least one host stays on: {report}");
    let (now, after) = (report["watts_now"].as_f64().unwrap(), report["watts_after"].as_f64().unwrap());
    assert!(after < now, "watts after {after} must be below {now}: {report}");
    assert!((report["watts_saved"].as_f64().unwrap() - (now - after)).abs() < 1e-6);

    let table = lab.run(&["plan", "power", "--hour", "12"]).ok();
    assert!(table.stdout.contains("standby") && table.stdout.contains("W saved"), "{table}");

    // Bad input is refused in one line.
    assert_one_line_error(&lab.run(&["plan", "power", "--psu-efficiency", "1.5"]), "efficiency");
}
