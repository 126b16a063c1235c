//! The `drove` command line as an operator meets it: a simulated lab started
//! with `drove up`, driven through `drove vm/vlan/op/audit`, stopped with
//! `drove down`. Every test has its own data directory and client config.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::{CONVERGE_DEADLINE, Lab, Output, mode, wait_for};
use drove_api::{AuditRecord, GuestView, HostView, VlanView};
use drove_model::{GuestState, HostState, Operation, OperationKind, OperationState, PowerIntent};

fn guests(lab: &Lab) -> Vec<GuestView> {
    lab.run(&["vm", "list", "-o", "json"]).ok().json()
}

fn guest_names(lab: &Lab) -> Vec<String> {
    guests(lab).into_iter().map(|g| g.guest.spec.name).collect()
}

/// The rows of a table printed by the CLI, split on whitespace, header
/// first.
fn table(out: &Output) -> Vec<Vec<String>> {
    out.stdout.lines().map(|l| l.split_whitespace().map(str::to_owned).collect()).collect()
}

#[test]
fn up_detach_starts_hosts_and_down_stops_everything() {
    let mut lab = Lab::new();
    let up = lab.up(&["--hosts", "3"]).ok();

    // The client config: written, private, pointing at the manager.
    let cfg = lab.client_config();
    assert!(cfg.endpoint.starts_with("http://127.0.0.1:"), "endpoint {:?}", cfg.endpoint);
    assert!(!cfg.token.is_empty());
    assert_eq!(mode(&lab.config), 0o600, "the client config holds the admin token");
    assert!(up.stdout.contains(&cfg.endpoint), "`drove up` must print the endpoint {}: {up}", cfg.endpoint);
    assert_eq!(lab.lab_file().endpoint, cfg.endpoint);
    let admin_token = lab.dir.join("manager").join("admin.token");
    assert_eq!(mode(&admin_token), 0o600, "{}", admin_token.display());
    assert_eq!(std::fs::read_to_string(&admin_token).unwrap().trim(), cfg.token);

    let hosts: Vec<HostView> = lab.run(&["host", "list", "-o", "json"]).ok().json();
    let mut names: Vec<&str> = hosts.iter().map(|h| h.info.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["host-1", "host-2", "host-3"]);
    for h in &hosts {
        assert_eq!(h.info.state, HostState::Up, "{}", h.info.name);
        assert!(h.last_seen_ms.is_some(), "{} never heard from", h.info.name);
    }

    // A guest to find again after a restart.
    let created: GuestView = lab.run(&["vm", "create", "keeper", "-o", "json"]).ok().json();
    assert_eq!(created.guest.state, GuestState::Running);
    let lab_file = lab.lab_file();
    let pids: Vec<u32> = lab_file.agents.iter().map(|(_, p)| *p).chain(lab_file.manager_pid).collect();
    assert_eq!(pids.len(), 4, "a manager and three agents: {lab_file:?}");
    assert!(pids.iter().all(|&p| common::alive(p)), "every recorded daemon runs: {pids:?}");

    let down = lab.down().ok();
    assert!(down.stdout.contains("down"), "{down}");
    // `down` waits for its daemons; allow a moment for a straggling SIGKILL.
    wait_for("no process of the lab is alive after `drove down`", std::time::Duration::from_secs(15), || {
        let left = lab.live_processes();
        if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) }
    });
    assert!(!lab.dir.join("lab.json").exists(), "lab.json must go with the lab");

    lab.down().ok();

    // Up again on the same data dir: same store, same tokens, same guest.
    lab.up(&["--hosts", "3"]).ok();
    assert_eq!(lab.client_config().token, cfg.token, "a restarted lab keeps its admin token");
    let again = wait_for("the guest created before `drove down` runs again", CONVERGE_DEADLINE, || {
        let gs = guests(&lab);
        match gs.iter().find(|g| g.guest.spec.name == "keeper") {
            Some(g) if g.guest.state == GuestState::Running => Ok(gs),
            Some(g) => Err(format!("keeper is {}", g.guest.state)),
            None => {
                Err(format!("keeper is not listed: {:?}", gs.iter().map(|g| &g.guest.spec.name).collect::<Vec<_>>()))
            }
        }
    });
    assert_eq!(again.len(), 1, "exactly the one guest");
    assert_eq!(again[0].guest.id, created.guest.id, "the same guest, not a new one");
    let hosts: Vec<HostView> = lab.run(&["host", "list", "-o", "json"]).ok().json();
    assert_eq!(hosts.len(), 3, "the hosts re-registered under their names, not as new ones");
    assert_eq!(hosts.iter().map(|h| h.guests).sum::<u32>(), 1);
}

#[test]
fn vm_lifecycle_through_the_cli() {
    let mut lab = Lab::new();
    lab.up(&["--hosts", "2"]).ok();

    // VLANs.
    let created = lab.run(&["vlan", "create", "100", "--name", "blue", "--subnet", "10.0.100.0/24"]).ok();
    assert!(created.stdout.contains("blue"), "{created}");
    let rows = table(&lab.run(&["vlan", "list"]).ok());
    assert_eq!(rows[0], ["ID", "NAME", "SUBNET", "GATEWAY", "NICS"]);
    assert_eq!(rows[1..], [["100", "blue", "10.0.100.0/24", "-", "0"]]);
    let vlans: Vec<VlanView> = lab.run(&["vlan", "list", "-o", "json"]).ok().json();
    assert_eq!(vlans.len(), 1);
    assert_eq!((vlans[0].vlan.tag.get(), vlans[0].vlan.name.as_str()), (100, "blue"));
    assert_eq!(vlans[0].vlan.subnet.as_ref().map(ToString::to_string).as_deref(), Some("10.0.100.0/24"));

    // Create waits until the guest runs.
    let out = lab
        .run(&[
            "vm", "create", "web-1", "--vcpus", "2", "--memory", "512M", "--disk", "1G", "--disk", "2G", "--nic",
            "blue",
        ])
        .ok();
    assert!(out.stdout.contains("created web-1") && out.stdout.contains("running"), "{out}");

    let list = guests(&lab);
    assert_eq!(list.len(), 1);
    let g = &list[0];
    let s = &g.guest.spec;
    assert_eq!((s.name.as_str(), s.vcpus, s.memory.bytes()), ("web-1", 2, 512 << 20));
    assert_eq!(s.disks.iter().map(|d| d.size.bytes()).collect::<Vec<_>>(), [1 << 30, 2 << 30]);
    assert_eq!(s.nics.len(), 1);
    assert_eq!(s.nics[0].vlan.get(), 100);
    assert!(s.nics[0].mac.starts_with("52:54:00:") && s.nics[0].mac.len() == 17, "mac {}", s.nics[0].mac);
    assert_eq!((g.guest.state, g.guest.intent), (GuestState::Running, PowerIntent::Running));
    assert!(g.host_name.starts_with("host-"), "host {:?}", g.host_name);

    let rows = table(&lab.run(&["vm", "list"]).ok());
    assert_eq!(rows[0], ["NAME", "STATE", "HOST", "VCPUS", "MEMORY", "DISKS", "NICS"]);
    assert_eq!(rows[1..], [["web-1", "running", g.host_name.as_str(), "2", "512M", "1G,2G", "100:10.0.100.1"]]);

    let shown: GuestView = lab.run(&["vm", "show", "web-1", "-o", "json"]).ok().json();
    assert_eq!(&shown, g);
    let by_id: GuestView = lab.run(&["vm", "show", &g.guest.id.to_string(), "-o", "json"]).ok().json();
    assert_eq!(by_id.guest.id, g.guest.id, "a guest can be named by its id");
    let text = lab.run(&["vm", "show", "web-1"]).ok().stdout;
    assert!(text.lines().any(|l| l.split_whitespace().eq(["state:", "running"])), "{text}");

    // What the guest holds shows on its host and its VLAN.
    let hosts: Vec<HostView> = lab.run(&["host", "list", "-o", "json"]).ok().json();
    let host = hosts.iter().find(|h| h.info.name == g.host_name).unwrap();
    assert_eq!((host.allocated_vcpus, host.allocated_memory.bytes(), host.guests), (2, 512 << 20, 1));
    let vlans: Vec<VlanView> = lab.run(&["vlan", "list", "-o", "json"]).ok().json();
    assert_eq!(vlans[0].nics, 1);

    // Power.
    let out = lab.run(&["vm", "reset", "web-1"]).ok();
    assert!(out.stdout.contains("reset web-1"), "{out}");
    let g: GuestView = lab.run(&["vm", "show", "web-1", "-o", "json"]).ok().json();
    assert_eq!(g.guest.state, GuestState::Running, "a reset guest runs on");
    lab.run(&["vm", "stop", "web-1"]).ok();
    let g: GuestView = lab.run(&["vm", "show", "web-1", "-o", "json"]).ok().json();
    assert_eq!((g.guest.state, g.guest.intent), (GuestState::Stopped, PowerIntent::Stopped));
    lab.run(&["vm", "start", "web-1"]).ok();
    let g: GuestView = lab.run(&["vm", "show", "web-1", "-o", "json"]).ok().json();
    assert_eq!((g.guest.state, g.guest.intent), (GuestState::Running, PowerIntent::Running));

    // Delete.
    lab.run(&["vm", "delete", "web-1"]).ok();
    assert!(guest_names(&lab).is_empty());
    let gone = lab.run(&["vm", "show", "web-1"]);
    assert!(!gone.success() && gone.stderr.contains("does not exist"), "{gone}");
    let hosts: Vec<HostView> = lab.run(&["host", "list", "-o", "json"]).ok().json();
    assert!(
        hosts.iter().all(|h| h.allocated_vcpus == 0 && h.allocated_memory.bytes() == 0 && h.guests == 0),
        "{hosts:?}"
    );

    // Operations: one per request, each succeeded.
    let ops: Vec<Operation> = lab.run(&["op", "list", "-o", "json"]).ok().json();
    let kinds: Vec<(OperationKind, &str, OperationState)> =
        ops.iter().map(|o| (o.kind, o.target_name.as_str(), o.state)).collect();
    use OperationKind::*;
    assert_eq!(
        kinds,
        [CreateGuest, StopGuest, StartGuest, DeleteGuest].map(|k| (k, "web-1", OperationState::Succeeded)),
        "{ops:#?}"
    );
    assert!(ops.iter().all(|o| o.progress == 100 && o.finished_at.is_some() && o.principal == "admin"), "{ops:#?}");
    let rows = table(&lab.run(&["op", "list"]).ok());
    assert_eq!(rows.len(), 5, "a header and four operations");
    assert!(rows[1..].iter().all(|r| r.iter().any(|c| c == "succeeded")), "{rows:?}");
    let op = lab.run(&["op", "show", &ops[0].id.to_string(), "-o", "json"]).ok().json::<Operation>();
    assert_eq!(op, ops[0]);

    // Audit: a successful record by admin for every mutating call.
    let audit: Vec<AuditRecord> = lab.run(&["audit", "list", "-o", "json"]).ok().json();
    let admin: Vec<(&str, Option<&str>, u16, &str)> = audit
        .iter()
        .filter(|r| r.principal == "admin")
        .map(|r| (r.action.as_str(), r.target.as_deref(), r.status, r.result.as_str()))
        .collect();
    assert_eq!(
        admin,
        [
            ("POST /v1/vlans", Some("vlan/100"), 201, "ok"),
            ("POST /v1/guests", Some("guest/web-1"), 202, "ok"),
            ("POST /v1/guests/web-1/reset", Some("guest/web-1"), 200, "ok"),
            ("POST /v1/guests/web-1/stop", Some("guest/web-1"), 202, "ok"),
            ("POST /v1/guests/web-1/start", Some("guest/web-1"), 202, "ok"),
            ("DELETE /v1/guests/web-1", Some("guest/web-1"), 202, "ok"),
        ],
        "{audit:#?}"
    );
    let seqs: Vec<u64> = audit.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "audit sequence numbers increase: {seqs:?}");
}

/// Checks `out` is a refusal: non-zero exit, one line on stderr starting
/// with `error:` that mentions each of `mentions`. Returns what is wrong.
fn refusal_problems(what: &str, out: &Output, mentions: &[&str]) -> Option<String> {
    let err = out.stderr.trim_end();
    let mut problems = Vec::new();
    if out.success() {
        problems.push("exited 0".to_owned());
    }
    if err.lines().count() != 1 {
        problems.push(format!("stderr has {} lines, not one", err.lines().count()));
    }
    if !err.starts_with("error:") {
        problems.push("stderr does not start with `error:`".to_owned());
    }
    for m in mentions {
        if !err.to_lowercase().contains(&m.to_lowercase()) {
            problems.push(format!("stderr does not mention {m:?}"));
        }
    }
    (!problems.is_empty()).then(|| format!("{what}: {}\n{out}", problems.join("; ")))
}

#[test]
fn bad_input_fails_with_one_line_and_nonzero_exit() {
    let mut lab = Lab::new();
    lab.up(&["--hosts", "2", "--host-memory", "4G"]).ok();
    lab.run(&["vlan", "create", "7", "--name", "red"]).ok();
    lab.run(&["vm", "create", "dup", "--host", "host-1", "--disk", "1G"]).ok();

    let cases: &[(&str, &[&str], &[&str])] = &[
        ("zero vCPUs", &["vm", "create", "bad-1", "--vcpus", "0"], &["vcpus"]),
        ("zero memory", &["vm", "create", "bad-2", "--memory", "0"], &["memory"]),
        ("memory that is not a size", &["vm", "create", "bad-3", "--memory", "banana"], &["memory", "banana"]),
        ("unknown VLAN", &["vm", "create", "bad-4", "--nic", "chartreuse"], &["vlan", "chartreuse"]),
        ("unknown host", &["vm", "create", "bad-5", "--host", "host-99"], &["host", "host-99"]),
        ("duplicate name", &["vm", "create", "dup"], &["dup", "exists"]),
        ("more memory than any host", &["vm", "create", "bad-6", "--memory", "64G"], &["memory", "64G"]),
        ("reset of an unknown guest", &["vm", "reset", "nope"], &["nope"]),
        ("unknown disk format", &["vm", "create", "bad-7", "--disk", "1G,format=vhdx"], &["format", "vhdx"]),
        (
            "clone of local disks onto another host",
            &["vm", "clone", "dup", "dup-c", "--host", "host-2"],
            &["host-2", "local pool", "drove vm move-storage dup --to shared"],
        ),
    ];
    let mut problems: Vec<String> =
        cases.iter().filter_map(|(what, args, mentions)| refusal_problems(what, &lab.run(args), mentions)).collect();

    let after = guests(&lab);
    let names: Vec<&str> = after.iter().map(|g| g.guest.spec.name.as_str()).collect();
    if names != ["dup"] {
        problems.push(format!("refused creates left guests behind: {names:?}"));
    }
    let hosts: Vec<HostView> = lab.run(&["host", "list", "-o", "json"]).ok().json();
    if hosts.iter().map(|h| h.guests).sum::<u32>() != 1 {
        problems.push(format!("refused creates hold capacity: {hosts:?}"));
    }

    // A wrong token: refused, explained, and nothing changes.
    let audit_before: Vec<AuditRecord> = lab.run(&["audit", "list", "-o", "json"]).ok().json();
    let bad_token: &[(&str, &[&str])] = &[
        ("list with a wrong token", &["vm", "list"]),
        ("create with a wrong token", &["vm", "create", "sneaky"]),
        ("stop with a wrong token", &["vm", "stop", "dup"]),
        ("reset with a wrong token", &["vm", "reset", "dup"]),
        ("console with a wrong token", &["vm", "console", "dup"]),
        ("console log with a wrong token", &["vm", "log", "dup"]),
        ("delete with a wrong token", &["vm", "delete", "dup"]),
        ("VLAN delete with a wrong token", &["vlan", "delete", "red"]),
    ];
    for (what, args) in bad_token {
        let mut cmd = lab.cmd(args);
        cmd.env("DROVE_TOKEN", "bad");
        problems.extend(refusal_problems(what, &lab.run_cmd(cmd), &["token"]));
    }
    let unchanged = guests(&lab);
    if unchanged.len() != 1
        || unchanged[0].guest.id != after[0].guest.id
        || unchanged[0].guest.state != GuestState::Running
    {
        problems.push(format!("a wrong token changed the guests: {unchanged:?}"));
    }
    let vlans: Vec<VlanView> = lab.run(&["vlan", "list", "-o", "json"]).ok().json();
    if vlans.len() != 1 {
        problems.push(format!("a wrong token changed the VLANs: {vlans:?}"));
    }
    let audit_after: Vec<AuditRecord> = lab.run(&["audit", "list", "-o", "json"]).ok().json();
    let refusals: HashSet<&str> = audit_after[audit_before.len()..]
        .iter()
        .filter(|r| r.principal == "anonymous" && r.status == 401)
        .map(|r| r.action.as_str())
        .collect();
    if refusals
        != HashSet::from([
            "POST /v1/guests",
            "POST /v1/guests/dup/stop",
            "POST /v1/guests/dup/reset",
            "DELETE /v1/guests/dup",
            "DELETE /v1/vlans/red",
        ])
    {
        problems.push(format!(
            "refused mutations with a wrong token are not audited as such: {:#?}",
            &audit_after[audit_before.len()..]
        ));
    }

    // Only a running guest has a reset button to press.
    lab.run(&["vm", "stop", "dup"]).ok();
    problems.extend(refusal_problems(
        "reset of a stopped guest",
        &lab.run(&["vm", "reset", "dup"]),
        &["dup", "stopped"],
    ));

    assert!(problems.is_empty(), "{} problem(s):\n\n{}", problems.len(), problems.join("\n\n"));
}

#[test]
fn snapshots_through_the_cli_show_a_tree_and_refuse_clearly() {
    let mut lab = Lab::new();
    lab.up(&["--hosts", "1"]).ok();
    lab.run(&["vm", "create", "web-1", "--disk", "1G"]).ok();

    let out = lab.run(&["vm", "snapshot", "create", "web-1", "a"]).ok();
    assert_eq!(out.stdout.trim(), "web-1: snapshot a taken", "{out}");
    lab.run(&["vm", "snapshot", "create", "web-1", "b", "--memory"]).ok();
    let out = lab.run(&["vm", "snapshot", "restore", "web-1", "a"]).ok();
    assert!(out.stdout.contains("restored a: guest stopped, disks rolled back, guest started again"), "{out}");
    lab.run(&["vm", "snapshot", "create", "web-1", "c"]).ok();

    let out = lab.run(&["vm", "snapshot", "list", "web-1"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("NAME") && lines[0].contains("KIND") && lines[0].contains("VM STATE"), "{out}");
    assert!(lines[1].starts_with("a ") && lines[1].contains(" disk ") && lines[1].contains(" ready "), "{out}");
    assert!(lines[2].starts_with("└─ b ") && lines[2].contains(" memory "), "{out}");
    assert!(lines[3].starts_with("└─ c * ") && lines[3].contains(" disk "), "the current one is marked: {out}");
    let list: drove_api::SnapshotList = lab.run(&["vm", "snapshot", "list", "web-1", "-o", "json"]).ok().json();
    let parents: Vec<(String, Option<String>)> =
        list.snapshots.iter().map(|s| (s.name.clone(), s.parent.clone())).collect();
    assert_eq!(
        parents,
        [("a".into(), None), ("b".into(), Some("a".into())), ("c".into(), Some("a".into()))],
        "{list:?}"
    );

    lab.run(&["vm", "stop", "web-1"]).ok();
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("a parent", &["vm", "snapshot", "delete", "web-1", "a"], &["children (b, c)", "--force"]),
        ("a taken name", &["vm", "snapshot", "create", "web-1", "b"], &["already has a snapshot", "\"b\""]),
        ("a bad name", &["vm", "snapshot", "create", "web-1", "No_Way"], &["snapshot name", "No_Way"]),
        ("memory of a stopped guest", &["vm", "snapshot", "create", "web-1", "m", "--memory"], &["stopped", "memory"]),
        ("an unknown snapshot", &["vm", "snapshot", "restore", "web-1", "zz"], &["zz", "does not exist"]),
        ("an unknown guest", &["vm", "snapshot", "list", "web-9"], &["web-9", "does not exist"]),
    ];
    let problems: Vec<String> =
        cases.iter().filter_map(|(what, args, mentions)| refusal_problems(what, &lab.run(args), mentions)).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let after: drove_api::SnapshotList = lab.run(&["vm", "snapshot", "list", "web-1", "-o", "json"]).ok().json();
    assert_eq!(after, list, "refusals changed nothing");

    let out = lab.run(&["vm", "snapshot", "delete", "web-1", "a", "--force"]).ok();
    assert!(out.stdout.contains("snapshot a deleted"), "{out}");
    let out = lab.run(&["vm", "snapshot", "restore", "web-1", "b"]).ok();
    assert!(out.stdout.contains("stays stopped"), "{out}");
}

#[test]
fn vm_limits_change_only_the_named_limits_and_none_removes_one() {
    let mut lab = Lab::new();
    lab.up(&["--hosts", "1"]).ok();
    lab.run(&["vm", "create", "tuned", "--vcpus", "2", "--disk", "1G", "--cpu-cap", "50", "--disk-bps", "10M"]).ok();

    let g: GuestView =
        lab.run(&["vm", "limits", "tuned", "--cpu-cap", "150", "--disk-iops", "100", "-o", "json"]).ok().json();
    let l = &g.guest.spec.limits;
    assert_eq!((l.cpu_cap_percent, l.disk_iops, l.disk_bps), (Some(150), Some(100), Some(10 << 20)), "{l:?}");

    let out = lab.run(&["vm", "limits", "tuned", "--disk-bps", "none", "--nic-rate", "100mbit"]).ok();
    let rows = table(&out);
    for want in [
        &["disk", "bps:", "none"][..],
        &["nic", "rate:", "100mbit"],
        &["cpu", "cap:", "150%"],
        &["applied:", "now", "(live)"],
    ] {
        assert!(rows.iter().any(|r| r == want), "no row {want:?} in:\n{out}");
    }
    let shown: GuestView = lab.run(&["vm", "show", "tuned", "-o", "json"]).ok().json();
    let l = &shown.guest.spec.limits;
    assert_eq!((l.disk_bps, l.nic_rate_bps, l.cpu_cap_percent), (None, Some(100_000_000), Some(150)), "{l:?}");

    let cases: &[(&str, &[&str], &[&str])] = &[
        ("no limit named", &["vm", "limits", "tuned"], &["--cpu-cap"]),
        ("a cap of zero", &["vm", "limits", "tuned", "--cpu-cap", "0"], &["cpu cap", "got 0"]),
        ("a cap above the vCPUs", &["vm", "limits", "tuned", "--cpu-cap", "300"], &["200%"]),
        ("a cap that is not a number", &["vm", "limits", "tuned", "--cpu-cap", "lots"], &["--cpu-cap", "lots"]),
        ("an unknown guest", &["vm", "limits", "nobody", "--cpu-cap", "10"], &["nobody"]),
    ];
    let problems: Vec<String> =
        cases.iter().filter_map(|(what, args, mentions)| refusal_problems(what, &lab.run(args), mentions)).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let after: GuestView = lab.run(&["vm", "show", "tuned", "-o", "json"]).ok().json();
    assert_eq!(after.guest.spec.limits, shown.guest.spec.limits, "a refusal changed the limits");
    lab.down().ok();
}

/// `drove vm move-storage` says in one line why it will not move (the
/// simulated lab's hosts have no shared pool), and changes nothing.
#[test]
fn vm_move_storage_refusals_are_one_line_and_change_nothing() {
    let mut lab = Lab::new();
    lab.up(&["--hosts", "1"]).ok();
    lab.run(&["vm", "create", "stay", "--disk", "1G"]).ok();
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("no shared pool", &["vm", "move-storage", "stay", "--to", "shared"], &["no shared pool", "host-1"]),
        ("already there", &["vm", "move-storage", "stay", "--to", "local"], &["local pool already"]),
        ("no such pool", &["vm", "move-storage", "stay", "--to", "tape"], &["tape"]),
        ("an unknown guest", &["vm", "move-storage", "nobody", "--to", "shared"], &["nobody"]),
    ];
    let problems: Vec<String> =
        cases.iter().filter_map(|(what, args, mentions)| refusal_problems(what, &lab.run(args), mentions)).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let g: GuestView = lab.run(&["vm", "show", "stay", "-o", "json"]).ok().json();
    assert_eq!((g.guest.spec.storage, g.guest.last_storage_move), (drove_model::guest::Storage::Local, None));
    let help = lab.run(&["vm", "move-storage", "--help"]).ok().stdout;
    for teaches in ["Examples:", "--to shared", "same process", "snapshots", "stays on its old disks"] {
        assert!(help.contains(teaches), "`drove vm move-storage --help` explains {teaches:?}:\n{help}");
    }
    lab.down().ok();
}

#[test]
fn help_teaches() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let run = |args: &[&str]| {
        let mut cmd = common::drove(&config);
        cmd.args(args);
        common::run(cmd, common::COMMAND_DEADLINE).ok()
    };

    let top = run(&["--help"]).stdout;
    for sub in ["up", "down", "vm", "vlan", "host", "op", "audit"] {
        assert!(top.lines().any(|l| l.split_whitespace().next() == Some(sub)), "`drove --help` lists `{sub}`:\n{top}");
    }
    assert!(
        top.contains("drove up --detach") && top.contains("drove host list"),
        "`drove --help` shows how to begin:\n{top}"
    );

    let create = run(&["vm", "create", "--help"]).stdout;
    assert!(create.contains("Example: drove vm create"), "`drove vm create --help` shows an example:\n{create}");
    for flag in ["--vcpus", "--memory", "--disk", "--nic", "--host", "--no-wait"] {
        assert!(create.contains(flag), "`drove vm create --help` documents {flag}:\n{create}");
    }

    let vlan = run(&["vlan", "create", "--help"]).stdout;
    assert!(vlan.contains("Example: drove vlan create"), "{vlan}");
    assert!(!config.exists(), "help touches no configuration");
}
