//! The manager's API against real HTTP, a real embedded store and sim
//! agents: lifecycle, refusals, authentication, audit, rollback, restarts.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Dc;
use drove_api::{CreateGuestRequest, CreateVlanRequest, NicRequest};
use drove_client::Client;
use drove_hypervisor::sim::SimOp;
use drove_model::{ByteSize, GuestState, OperationState};

fn guest(name: &str) -> CreateGuestRequest {
    CreateGuestRequest { disks: vec![ByteSize::gib(1).into()], ..CreateGuestRequest::new(name, 1, ByteSize::mib(256)) }
}

async fn raw(
    dc: &Dc,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", dc.endpoint));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

fn admin_token(dc: &Dc) -> String {
    std::fs::read_to_string(dc.dir.path().join("admin.token")).unwrap().trim().to_owned()
}

#[tokio::test]
async fn openapi_document_matches_the_checked_in_one() {
    let dc = Dc::start(0).await;
    let served = dc.admin.openapi().await.unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi/drove.json");
    if std::env::var_os("DROVE_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&served).unwrap() + "\n").unwrap();
    }
    let checked_in: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        served == checked_in,
        "the served OpenAPI document differs from openapi/drove.json; regenerate it with \
         `DROVE_UPDATE_OPENAPI=1 cargo test -p drove-manager --test api openapi` and review the diff"
    );
    dc.shutdown().await;
}

#[tokio::test]
async fn a_guest_goes_through_its_whole_lifecycle() {
    let dc = Dc::start(2).await;
    dc.admin
        .create_vlan(&CreateVlanRequest {
            id: 100,
            name: "blue".into(),
            subnet: Some("10.0.100.0/24".into()),
            gateway: None,
        })
        .await
        .unwrap();
    let mut req = guest("web-1");
    req.nics = vec![NicRequest::on("blue"), NicRequest::on("100")];
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let g = dc.admin.get_guest("web-1").await.unwrap();
    assert_eq!(g.guest.state, GuestState::Running);
    assert_eq!(g.guest.spec.nics.len(), 2);
    assert_ne!(g.guest.spec.nics[0].mac, g.guest.spec.nics[1].mac);
    // The host it landed on really runs it, and accounts for it.
    let i = dc.agents.iter().position(|a| a.name == g.host_name).unwrap();
    let on_host = dc.agents[i].sim.guests();
    assert_eq!(on_host.iter().filter(|s| s.id == acc.guest).count(), 1);
    let host = dc.admin.get_host(&g.host_name).await.unwrap();
    assert_eq!((host.allocated_vcpus, host.allocated_memory, host.guests), (1, ByteSize::mib(256), 1));

    let stop = dc.admin.stop_guest("web-1", false).await.unwrap();
    dc.wait_succeeded(&stop.operation).await;
    assert_eq!(dc.admin.get_guest("web-1").await.unwrap().guest.state, GuestState::Stopped);
    assert_eq!(dc.agents[i].sim.guests()[0].state, drove_hypervisor::RuntimeState::Stopped);

    let start = dc.admin.start_guest(&acc.guest.to_string()).await.unwrap();
    dc.wait_succeeded(&start.operation).await;
    assert_eq!(dc.admin.get_guest("web-1").await.unwrap().guest.state, GuestState::Running);

    let del = dc.admin.delete_guest("web-1").await.unwrap();
    dc.wait_succeeded(&del.operation).await;
    assert_eq!(dc.admin.get_guest("web-1").await.unwrap_err().status(), Some(404));
    assert!(dc.agents[i].sim.guests().is_empty(), "disks and definition removed from the host");
    assert_eq!(dc.admin.get_host(&g.host_name).await.unwrap().guests, 0);
    // The VLAN is free again and can go.
    dc.admin.delete_vlan("blue").await.unwrap();
    dc.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_naming_the_field_and_leave_nothing() {
    let dc = Dc::start(2).await;
    let token = admin_token(&dc);
    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (serde_json::json!({"name": "a", "vcpus": 0, "memory": 268435456}), 400, "vcpus"),
        (serde_json::json!({"name": "a", "vcpus": 1, "memory": 0}), 400, "memory"),
        (serde_json::json!({"name": "a", "vcpus": 1, "memory": -5}), 400, "memory"),
        (serde_json::json!({"name": "a", "vcpus": 1, "memory": 268435456, "disks": [0]}), 400, "disks[0]"),
        (serde_json::json!({"name": "Bad_Name", "vcpus": 1, "memory": 268435456}), 400, "name"),
        (
            serde_json::json!({"name": "a", "vcpus": 1, "memory": 268435456, "nics": [{"vlan": "nope"}]}),
            400,
            "nics[0].vlan",
        ),
        (serde_json::json!({"name": "a", "vcpus": 1, "memory": 268435456, "host": "nowhere"}), 400, "host"),
        (serde_json::json!({"name": "a", "vcpus": 1, "memory": 1099511627776u64}), 400, "memory"),
        (serde_json::json!({"name": "a", "vcpus": 1, "memory": 268435456, "priority": 101}), 400, "priority"),
        (
            serde_json::json!({"name": "a", "vcpus": 1, "memory": 268435456, "limits": {"cpu_cap_percent": 0}}),
            400,
            "limits.cpu_cap_percent",
        ),
        (
            serde_json::json!({"name": "a", "vcpus": 1, "memory": 268435456, "limits": {"cpu_cap_percent": 150}}),
            400,
            "limits.cpu_cap_percent",
        ),
        (
            serde_json::json!({"name": "a", "vcpus": 1, "memory": 268435456, "limits": {"cpu_pin": [99]}}),
            400,
            "limits.cpu_pin",
        ),
        (
            serde_json::json!({"name": "a", "vcpus": 1, "memory": 268435456, "limits": {"disk_bps": 0}}),
            400,
            "limits.disk_bps",
        ),
    ];
    for (body, status, field) in cases {
        let (s, v) = raw(&dc, reqwest::Method::POST, "/v1/guests", Some(&token), Some(body.clone())).await;
        assert_eq!(s, status, "{body}: {v}");
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(!msg.contains('\n') && !msg.is_empty(), "one line: {msg:?}");
    }
    // Duplicate names conflict; the first guest is untouched.
    let acc = dc.admin.create_guest(&guest("dup")).await.unwrap();
    let err = dc.admin.create_guest(&guest("dup")).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("already exists"), "{err}");
    dc.wait_succeeded(&acc.operation).await;
    // More than any host can hold, and more than is free.
    let mut big = guest("big");
    big.memory = ByteSize::gib(17);
    assert_eq!(dc.admin.create_guest(&big).await.unwrap_err().status(), Some(400));
    let guests = dc.admin.list_guests().await.unwrap();
    assert_eq!(guests.len(), 1, "no partial guest left: {guests:?}");
    assert_eq!(dc.admin.list_operations().await.unwrap().len(), 1);
    dc.shutdown().await;
}

#[tokio::test]
async fn placement_refuses_when_full_and_honours_pins() {
    let dc = Dc::start(2).await;
    let mut req = guest("pinned");
    req.host = Some("host-2".into());
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    assert_eq!(dc.admin.get_guest("pinned").await.unwrap().host_name, "host-2");
    // Fill both 16G hosts with 8G guests, then one more is refused.
    let mut ops = Vec::new();
    for i in 0..3 {
        let mut r = guest(&format!("fat-{i}"));
        r.memory = ByteSize::gib(8);
        ops.push(dc.admin.create_guest(&r).await.unwrap().operation);
    }
    let mut r = guest("one-too-many");
    r.memory = ByteSize::gib(8);
    let err = dc.admin.create_guest(&r).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("no host has room"), "{err}");
    for op in &ops {
        dc.wait_succeeded(op).await;
    }
    for h in dc.admin.list_hosts().await.unwrap() {
        assert!(h.allocated_memory <= h.info.memory, "{h:?}");
    }
    dc.shutdown().await;
}

#[tokio::test]
async fn a_host_in_maintenance_takes_no_new_guests() {
    let dc = Dc::start(2).await;
    let h = dc.admin.set_maintenance("host-1", true).await.unwrap();
    assert_eq!(h.info.state, drove_model::HostState::Maintenance);
    // Heartbeats do not take it out of maintenance.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dc.admin.get_host("host-1").await.unwrap().info.state, drove_model::HostState::Maintenance);
    for i in 0..4 {
        let acc = dc.admin.create_guest(&guest(&format!("m-{i}"))).await.unwrap();
        dc.wait_succeeded(&acc.operation).await;
        assert_eq!(dc.admin.get_guest(&format!("m-{i}")).await.unwrap().host_name, "host-2");
    }
    let mut pinned = guest("pinned");
    pinned.host = Some("host-1".into());
    let err = dc.admin.create_guest(&pinned).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("not accepting guests"), "{err}");
    let h = dc.admin.set_maintenance("host-1", false).await.unwrap();
    assert_eq!(h.info.state, drove_model::HostState::Up);
    let acc = dc.admin.create_guest(&pinned).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let metrics = dc.admin.metrics().await.unwrap();
    assert!(metrics.contains("drove_guests{state=\"running\"} 5"), "{metrics}");
    assert!(metrics.contains("drove_hosts{state=\"up\"} 2"), "{metrics}");
    dc.shutdown().await;
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401_change_nothing_and_are_audited() {
    let dc = Dc::start(1).await;
    let body = serde_json::json!({"name": "sneaky", "vcpus": 1, "memory": 268435456});
    for token in [None, Some("not-a-token")] {
        let (s, v) = raw(&dc, reqwest::Method::POST, "/v1/guests", token, Some(body.clone())).await;
        assert_eq!(s, 401, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("token"));
        let (s, _) = raw(&dc, reqwest::Method::GET, "/v1/guests", token, None).await;
        assert_eq!(s, 401);
    }
    // The agent token is for the agent protocol only.
    let (s, v) = raw(&dc, reqwest::Method::POST, "/v1/guests", Some(dc.agent_token.trim()), Some(body)).await;
    assert_eq!(s, 403, "{v}");
    assert!(dc.admin.list_guests().await.unwrap().is_empty());
    let audit = dc.admin.audit(0, 1000).await.unwrap();
    let refused: Vec<_> = audit.iter().filter(|r| r.action == "POST /v1/guests").collect();
    assert_eq!(refused.len(), 3, "{audit:?}");
    assert_eq!(refused.iter().filter(|r| r.status == 401 && r.principal == "anonymous").count(), 2);
    assert_eq!(refused.iter().filter(|r| r.status == 403 && r.principal == "agent").count(), 1);
    dc.shutdown().await;
}

#[tokio::test]
async fn every_mutating_call_is_audited_with_who_what_and_result() {
    let dc = Dc::start(1).await;
    let before = dc.admin.audit(0, 10_000).await.unwrap().len();
    dc.admin
        .create_vlan(&CreateVlanRequest { id: 7, name: "green".into(), subnet: None, gateway: None })
        .await
        .unwrap();
    let acc = dc.admin.create_guest(&guest("g1")).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let _ = dc.admin.create_guest(&guest("g1")).await.unwrap_err();
    dc.wait_succeeded(&dc.admin.stop_guest("g1", true).await.unwrap().operation).await;
    dc.wait_succeeded(&dc.admin.delete_guest("g1").await.unwrap().operation).await;
    let _ = dc.admin.delete_vlan("nope").await.unwrap_err();
    let recs = dc.admin.audit(0, 10_000).await.unwrap();
    let new: Vec<_> = recs[before..].iter().filter(|r| r.principal == "admin").collect();
    let summary: Vec<(String, u16)> = new.iter().map(|r| (r.action.clone(), r.status)).collect();
    assert_eq!(
        summary,
        vec![
            ("POST /v1/vlans".to_owned(), 201),
            ("POST /v1/guests".to_owned(), 202),
            ("POST /v1/guests".to_owned(), 409),
            ("POST /v1/guests/g1/stop".to_owned(), 202),
            ("DELETE /v1/guests/g1".to_owned(), 202),
            ("DELETE /v1/vlans/nope".to_owned(), 404),
        ]
    );
    assert!(new[2].result.contains("already exists"));
    assert!(recs.windows(2).all(|w| w[0].seq < w[1].seq), "sequence strictly increases");
    dc.shutdown().await;
}

#[tokio::test]
async fn concurrent_creates_of_one_name_have_exactly_one_winner() {
    let dc = Dc::start(2).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = dc.admin.clone();
        tasks.push(tokio::spawn(async move { c.create_guest(&guest("same")).await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.status(), Some(409), "{e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(dc.admin.list_guests().await.unwrap().len(), 1);
    dc.shutdown().await;
}

#[tokio::test]
async fn a_failed_provisioning_rolls_back_and_leaves_no_guest() {
    let dc = Dc::start(1).await;
    dc.agents[0].sim.fail_next(SimOp::Create, "disk pool full");
    let acc = dc.admin.create_guest(&guest("doomed")).await.unwrap();
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Failed, "{op:?}");
    assert!(op.error.as_deref().unwrap().contains("disk pool full"), "{op:?}");
    assert_eq!(dc.admin.get_guest("doomed").await.unwrap_err().status(), Some(404));
    assert!(dc.agents[0].sim.guests().is_empty());
    assert_eq!(dc.admin.get_host("host-1").await.unwrap().allocated_memory, ByteSize(0));
    // A boot failure rolls back too: the half-made guest is destroyed on the host.
    dc.agents[0].sim.fail_next(SimOp::Start, "firmware exploded");
    let acc = dc.admin.create_guest(&guest("doomed")).await.unwrap();
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Failed, "{op:?}");
    assert!(dc.agents[0].sim.guests().is_empty(), "{:?}", dc.agents[0].sim.guests());
    assert!(dc.admin.list_guests().await.unwrap().is_empty());
    dc.shutdown().await;
}

#[tokio::test]
async fn an_operation_on_a_dead_host_times_out_and_rolls_back_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::fast_config(dir.path());
    config.op_timeout = Duration::from_secs(1);
    let mut dc = Dc::start_with(dir, config, 1).await;
    dc.agents[0].stop().await;
    let acc = dc.admin.create_guest(&guest("stranded")).await.unwrap();
    let op = dc
        .eventually("rollback", || async {
            let o = dc.admin.get_operation(acc.operation.id).await.ok()?;
            (o.state != OperationState::Running).then_some(o)
        })
        .await;
    assert_eq!(op.state, OperationState::RollingBack, "{op:?}");
    assert!(op.error.as_deref().unwrap().contains("timed out"));
    dc.restart_agent(0).await;
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Failed);
    assert!(dc.admin.list_guests().await.unwrap().is_empty());
    assert!(dc.agents[0].sim.guests().is_empty());
    dc.shutdown().await;
}

#[tokio::test]
async fn a_restarted_manager_keeps_every_definition_and_operation() {
    let mut dc = Dc::start(2).await;
    let mut ops = Vec::new();
    for i in 0..20 {
        ops.push(dc.admin.create_guest(&guest(&format!("keep-{i}"))).await.unwrap().operation);
    }
    for op in &ops[..10] {
        dc.wait_succeeded(op).await;
    }
    dc.restart_manager().await;
    let guests = dc.admin.list_guests().await.unwrap();
    assert_eq!(guests.len(), 20);
    for op in &ops {
        dc.wait_succeeded(op).await;
    }
    for g in dc.admin.list_guests().await.unwrap() {
        assert_eq!(g.guest.state, GuestState::Running, "{g:?}");
    }
    // Exactly one copy of each guest across all hosts.
    let total: usize = dc.agents.iter().map(|a| a.sim.guests().len()).sum();
    assert_eq!(total, 20);
    // Tokens survive too.
    let c = Client::new(&dc.endpoint, &admin_token(&dc));
    assert!(c.list_hosts().await.is_ok());
    dc.shutdown().await;
}

#[tokio::test]
async fn an_agent_restarted_mid_operation_converges() {
    let mut dc = Dc::start(1).await;
    let acc = dc.admin.create_guest(&guest("survivor")).await.unwrap();
    dc.restart_agent(0).await;
    dc.wait_succeeded(&acc.operation).await;
    dc.restart_agent(0).await;
    let stop = dc.admin.stop_guest("survivor", false).await.unwrap();
    dc.wait_succeeded(&stop.operation).await;
    let on_host = dc.agents[0].sim.guests();
    assert_eq!(on_host.len(), 1);
    assert_eq!(on_host[0].state, drove_hypervisor::RuntimeState::Stopped);
    dc.shutdown().await;
}

#[tokio::test]
async fn a_crashed_guest_is_restarted_and_a_silent_host_goes_down() {
    let mut dc = Dc::start(1).await;
    let acc = dc.admin.create_guest(&guest("phoenix")).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    // Crash it twice: restarted at once the first time, after the backoff
    // (500 ms in these tests) the second time; both counted.
    for round in 1..=2u32 {
        let pid = dc.agents[0].sim.guests()[0].pid;
        let crashed = std::time::Instant::now();
        dc.agents[0].sim.crash(acc.guest).unwrap();
        dc.eventually("restart after crash", || async {
            let s = dc.agents[0].sim.guests();
            (s[0].state == drove_hypervisor::RuntimeState::Running && s[0].pid != pid).then_some(())
        })
        .await;
        if round == 2 {
            assert!(crashed.elapsed() >= Duration::from_millis(500), "second restart came before the backoff");
        }
        let g = dc
            .eventually("restart counted", || async {
                let g = dc.admin.get_guest("phoenix").await.ok()?;
                (g.guest.restarts == round).then_some(g)
            })
            .await;
        assert_eq!(g.guest.state, GuestState::Running);
        assert!(g.guest.last_error.as_deref().unwrap().contains("restarted"), "{g:?}");
    }
    // With policy `never`, a crashed guest is left crashed and off.
    let mut req = guest("fragile");
    req.restart_policy = Some(drove_model::RestartPolicy::Never);
    let acc2 = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc2.operation).await;
    dc.agents[0].sim.crash(acc2.guest).unwrap();
    let g = dc
        .eventually("crash seen", || async {
            let g = dc.admin.get_guest("fragile").await.ok()?;
            (g.guest.state == GuestState::Crashed && g.guest.intent == drove_model::PowerIntent::Stopped).then_some(g)
        })
        .await;
    assert_eq!(g.guest.restarts, 0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let on_host = dc.agents[0].sim.guests();
    assert_eq!(on_host.iter().find(|s| s.id == acc2.guest).unwrap().state, drove_hypervisor::RuntimeState::Crashed);
    dc.agents[0].stop().await;
    dc.eventually("host down", || async {
        let h = dc.admin.get_host("host-1").await.ok()?;
        (h.info.state == drove_model::HostState::Down).then_some(())
    })
    .await;
    dc.restart_agent(0).await;
    dc.wait_hosts_up(1).await;
    dc.shutdown().await;
}

#[tokio::test]
async fn console_history_and_interactive_console_are_relayed_through_the_agent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dc = Dc::start(1).await;
    let acc = dc.admin.create_guest(&guest("talky")).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let log = dc.admin.console_log("talky", 4096).await.unwrap();
    assert!(log.text.contains("sim guest talky is Running"), "{log:?}");
    // The sim console echoes: what goes in through the manager and the agent
    // comes back the same way.
    let mut conn = dc.admin.console("talky").await.unwrap();
    conn.write_all(b"hello console\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !got.ends_with(b"hello console\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "console closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(conn);
    let audit = dc.admin.audit(0, 1000).await.unwrap();
    assert!(audit.iter().any(|r| r.result == "console opened" && r.principal == "admin"), "{audit:?}");
    // A stopped guest has no console; the error says so, in one line.
    dc.wait_succeeded(&dc.admin.stop_guest("talky", false).await.unwrap().operation).await;
    let err = dc.admin.console("talky").await.expect_err("no console while stopped");
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("console"), "{err}");
    // Without a token: nothing.
    let anon = Client::new(&dc.endpoint, "wrong");
    assert_eq!(anon.console("talky").await.err().and_then(|e| e.status()), Some(401));
    assert_eq!(anon.console_log("talky", 10).await.unwrap_err().status(), Some(401));
    dc.shutdown().await;
}

#[tokio::test]
async fn commands_and_interfaces_are_relayed_to_the_guest_agent_and_audited() {
    let dc = Dc::start(1).await;
    dc.admin.create_vlan(&CreateVlanRequest { id: 5, name: "red".into(), subnet: None, gateway: None }).await.unwrap();
    let mut req = guest("inside");
    req.nics = vec![NicRequest::on("red")];
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let exec = |command: &[&str], input: Option<&str>| drove_api::ExecRequest {
        command: command.iter().map(|s| s.to_string()).collect(),
        input: input.map(str::to_owned),
        timeout_secs: None,
    };
    let r = dc.admin.exec("inside", &exec(&["echo", "hello", "there"], None)).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "hello there\n"));
    let r = dc.admin.exec("inside", &exec(&["cat"], Some("piped"))).await.unwrap();
    assert_eq!(r.stdout, "piped");
    assert_eq!(dc.admin.exec("inside", &exec(&["false"], None)).await.unwrap().exit_code, 1);
    // A program the guest does not have: a clear refusal, not a hang.
    let err = dc.admin.exec("inside", &exec(&["frobnicate"], None)).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("frobnicate"), "{err}");
    let err = dc.admin.exec("inside", &exec(&[], None)).await.unwrap_err();
    assert_eq!(err.status(), Some(400));
    let nics = dc.admin.guest_interfaces("inside").await.unwrap();
    let mac = &dc.admin.get_guest("inside").await.unwrap().guest.spec.nics[0].mac;
    assert!(nics.iter().any(|i| i.mac.as_deref() == Some(mac.as_str())), "{nics:?}");
    let audit = dc.admin.audit(0, 1000).await.unwrap();
    assert!(
        audit.iter().any(|r| r.action == "POST /v1/guests/inside/exec" && r.result.contains("exit 0")),
        "{audit:?}"
    );
    assert!(audit.iter().any(|r| r.action == "POST /v1/guests/inside/exec" && r.status == 409));
    dc.shutdown().await;
}

#[tokio::test]
async fn hardware_is_hot_added_to_running_guests_and_refusals_change_nothing() {
    let dc = Dc::start(1).await;
    dc.admin.create_vlan(&CreateVlanRequest { id: 9, name: "hp".into(), subnet: None, gateway: None }).await.unwrap();
    let acc = dc.admin.create_guest(&guest("grow")).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let add = |r: drove_api::HotplugRequest| r;
    let g = dc
        .admin
        .hotplug("grow", &add(drove_api::HotplugRequest { add_disk: Some(ByteSize::gib(2)), ..Default::default() }))
        .await
        .unwrap();
    assert_eq!(g.guest.spec.disks.len(), 2);
    let g = dc
        .admin
        .hotplug("grow", &drove_api::HotplugRequest { memory: Some(ByteSize::mib(512)), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(g.guest.spec.memory, ByteSize::mib(512));
    let g = dc
        .admin
        .hotplug("grow", &drove_api::HotplugRequest { add_nic: Some(NicRequest::on("hp")), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(g.guest.spec.nics.len(), 1);
    let grow = drove_api::GrowDisk { index: 1, size: ByteSize::gib(3) };
    let g = dc
        .admin
        .hotplug("grow", &drove_api::HotplugRequest { grow_disk: Some(grow), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(g.guest.spec.disks[1].size, ByteSize::gib(3));
    // The host holds the same hardware, and the allocation follows.
    let on_host = dc.agents[0].sim.guest_config(acc.guest).unwrap();
    assert_eq!((on_host.spec.disks.len(), on_host.spec.memory, on_host.spec.nics.len()), (2, ByteSize::mib(512), 1));
    assert_eq!(on_host.spec.disks[1].size, ByteSize::gib(3));
    // Its host's pool counts the grown disk (the simulator's disks are
    // thick: free space shrinks by their size).
    let pools = dc
        .eventually("the pools reported", || async {
            let pools = dc.admin.list_pools().await.ok()?;
            // The host's next heartbeat measures the grown disk.
            let used = |p: &drove_api::PoolView| p.capacity.bytes() - p.free.bytes();
            pools
                .iter()
                .any(|p| {
                    p.name == "local@host-1" && p.provisioned == ByteSize::gib(4) && used(p) == ByteSize::gib(4).bytes()
                })
                .then_some(pools)
        })
        .await;
    let local = pools.iter().find(|p| p.name == "local@host-1").unwrap();
    assert_eq!(local.guests, 1, "{pools:?}");
    let shared = pools.iter().find(|p| p.name == "shared").expect("the shared pool");
    assert_eq!((shared.hosts.clone(), shared.guests), (vec!["host-1".to_owned()], 0), "{pools:?}");
    assert_eq!(on_host.spec.nics[0].mac, g.guest.spec.nics[0].mac);
    assert_eq!(dc.admin.get_host("host-1").await.unwrap().allocated_memory, ByteSize::mib(512));
    // Refusals: shrink, two changes at once, more than the host has, a stopped guest.
    let before = dc.admin.get_guest("grow").await.unwrap();
    for (req, status) in [
        (drove_api::HotplugRequest { memory: Some(ByteSize::mib(256)), ..Default::default() }, 400),
        (drove_api::HotplugRequest { vcpus: Some(2), memory: Some(ByteSize::gib(1)), ..Default::default() }, 400),
        (drove_api::HotplugRequest { memory: Some(ByteSize::gib(64)), ..Default::default() }, 409),
        (drove_api::HotplugRequest { add_nic: Some(NicRequest::on("nope")), ..Default::default() }, 400),
        (
            drove_api::HotplugRequest {
                grow_disk: Some(drove_api::GrowDisk { index: 1, size: ByteSize::gib(1) }),
                ..Default::default()
            },
            400,
        ),
        (
            drove_api::HotplugRequest {
                grow_disk: Some(drove_api::GrowDisk { index: 5, size: ByteSize::gib(9) }),
                ..Default::default()
            },
            400,
        ),
    ] {
        let err = dc.admin.hotplug("grow", &req).await.unwrap_err();
        assert_eq!(err.status(), Some(status), "{req:?}: {err}");
    }
    dc.wait_succeeded(&dc.admin.stop_guest("grow", true).await.unwrap().operation).await;
    let err = dc
        .admin
        .hotplug("grow", &drove_api::HotplugRequest { vcpus: Some(2), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("only while it runs"), "{err}");
    let after = dc.admin.get_guest("grow").await.unwrap();
    assert_eq!(after.guest.spec, before.guest.spec);
    dc.shutdown().await;
}

#[tokio::test]
async fn a_guest_the_manager_does_not_know_is_reported_as_an_orphan_and_left_alone() {
    use drove_hypervisor::Hypervisor;
    let dc = Dc::start(1).await;
    let stray = drove_hypervisor::sim::sample_guest(7);
    dc.agents[0].sim.create(&stray).await.unwrap();
    dc.agents[0].sim.start(stray.id).await.unwrap();
    let h = dc
        .eventually("orphan reported", || async {
            let h = dc.admin.get_host("host-1").await.ok()?;
            (h.orphans == 1).then_some(h)
        })
        .await;
    assert_eq!(h.guests, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let on_host = dc.agents[0].sim.guests();
    assert_eq!(on_host.len(), 1, "the stray guest and its disks are never destroyed by the agent");
    assert_eq!(on_host[0].state, drove_hypervisor::RuntimeState::Running);
    dc.shutdown().await;
}

#[tokio::test]
async fn the_audit_log_is_a_hash_chain_that_reveals_tampering() {
    use drove_store::Store;
    let mut dc = Dc::start(1).await;
    for id in [11, 12, 13] {
        dc.admin
            .create_vlan(&CreateVlanRequest { id, name: format!("v{id}"), subnet: None, gateway: None })
            .await
            .unwrap();
    }
    let v = dc.admin.verify_audit().await.unwrap();
    assert!(v.intact && v.records >= 4, "{v:?}");
    let recs = dc.admin.audit(0, 1000).await.unwrap();
    assert!(recs.windows(2).all(|w| w[1].prev_hash == w[0].hash));
    // Someone with access to the store rewrites history: who created v12.
    let victim = recs.iter().find(|r| r.target.as_deref() == Some("vlan/12")).unwrap().seq;
    dc.kill_manager().await;
    {
        // The old manager's last handlers may hold the store for a moment.
        let path = dc.dir.path().join("state.redb");
        let store =
            dc.eventually("store released", || async { drove_store::embedded::EmbeddedStore::open(&path).ok() }).await;
        let key = format!("audit/{victim:020}");
        let kv = store.get(&key).await.unwrap().unwrap();
        let mut rec: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
        rec["principal"] = serde_json::json!("nobody");
        store.put(&key, serde_json::to_vec(&rec).unwrap(), drove_store::Precondition::Any).await.unwrap();
    }
    dc.restart_manager().await;
    let v = dc.admin.verify_audit().await.unwrap();
    assert!(!v.intact, "{v:?}");
    assert_eq!(v.first_bad_seq, Some(victim), "{v:?}");
    assert!(v.reason.as_deref().unwrap().contains("hash"), "{v:?}");
    dc.shutdown().await;
}

#[tokio::test]
async fn a_lost_admin_token_file_is_replaced_and_the_old_token_revoked() {
    let mut dc = Dc::start(1).await;
    let old = admin_token(&dc);
    let old_agent = dc.agent_token.clone();
    dc.kill_manager().await;
    std::fs::remove_file(dc.dir.path().join("admin.token")).unwrap();
    dc.restart_manager().await;
    let new = admin_token(&dc);
    assert_ne!(new, old);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dc.dir.path().join("admin.token")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(Client::new(&dc.endpoint, &old).list_hosts().await.unwrap_err().status(), Some(401));
    assert!(Client::new(&dc.endpoint, &new).list_hosts().await.is_ok());
    // The agent token was not touched: its file still matches.
    assert_eq!(dc.agent_token, old_agent);
    dc.wait_hosts_up(1).await;
    dc.shutdown().await;
}

#[tokio::test]
async fn images_are_imported_checked_used_as_a_base_and_protected_while_used() {
    let dc = Dc::start(1).await;
    let src = dc.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let qemu_img = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is installed (scripts/install-deps.sh)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let base = src.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
    let import = |name: &str, path: &std::path::Path| drove_api::ImportImageRequest {
        name: name.into(),
        path: path.display().to_string(),
    };
    let img = dc.admin.import_image(&import("base", &base)).await.unwrap();
    assert_eq!((img.format.as_str(), img.virtual_size), ("qcow2", ByteSize::mib(64)));
    assert!(std::path::Path::new(&img.path).exists(), "copied into the pool");
    assert_ne!(img.path, base.display().to_string());
    // Refused: not qcow2, a backing chain, a taken name, a missing file,
    // and a qcow2 whose header is fine but whose refcount table points
    // past the end of the file (qemu-img info accepts it; check does not).
    let damaged = src.join("damaged.qcow2");
    std::fs::copy(&base, &damaged).unwrap();
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&damaged).unwrap();
        f.seek(std::io::SeekFrom::Start(48)).unwrap();
        f.write_all(&0x7f00_0000u64.to_be_bytes()).unwrap();
    }
    let garbage = src.join("garbage.img");
    std::fs::write(&garbage, vec![7u8; 4096]).unwrap();
    let overlay = src.join("overlay.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", base.to_str().unwrap(), "-F", "qcow2", overlay.to_str().unwrap()]);
    for (req, status, needle) in [
        (import("junk", &garbage), 400, "not a qcow2"),
        (import("layered", &overlay), 400, "backing file"),
        (import("base", &base), 409, "already exists"),
        (import("ghost", &src.join("nope.qcow2")), 400, "cannot read"),
        (import("damaged", &damaged), 400, "corruption"),
    ] {
        let err = dc.admin.import_image(&req).await.unwrap_err();
        assert_eq!(err.status(), Some(status), "{req:?}: {err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    let pool: Vec<_> =
        std::fs::read_dir(dc.dir.path().join("images")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(pool.len(), 1, "refused imports leave nothing in the pool: {pool:?}");
    assert_eq!(dc.admin.list_images().await.unwrap().len(), 1);
    // A guest built on it: disk 0 is at least the image's size.
    let mut req = CreateGuestRequest::new("from-image", 1, ByteSize::mib(128));
    req.image = Some("base".into());
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let g = dc.admin.get_guest("from-image").await.unwrap();
    assert_eq!(g.guest.spec.image.as_deref(), Some(img.path.as_str()));
    assert_eq!(g.guest.spec.disks[0].size, ByteSize::mib(64));
    let mut small = CreateGuestRequest::new("too-small", 1, ByteSize::mib(128));
    small.image = Some("base".into());
    small.disks = vec![ByteSize::mib(32).into()];
    assert_eq!(dc.admin.create_guest(&small).await.unwrap_err().status(), Some(400));
    small.image = Some("nope".into());
    assert_eq!(dc.admin.create_guest(&small).await.unwrap_err().status(), Some(400));
    // In use: cannot go. Unused: goes, with its file.
    let err = dc.admin.delete_image("base").await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    dc.wait_succeeded(&dc.admin.delete_guest("from-image").await.unwrap().operation).await;
    dc.admin.delete_image("base").await.unwrap();
    assert!(!std::path::Path::new(&img.path).exists());
    dc.shutdown().await;
}

/// Per-VLAN IPAM: concurrent creates never share an address, the gateway is
/// never handed out, a full subnet and a taken or foreign address are
/// refused with the reason, a deleted guest's address comes back (after the
/// cursor wrapped), and addresses survive a manager restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_nic_gets_its_own_address_also_under_concurrent_creates() {
    let mut dc = Dc::start(3).await;
    // A /27: 30 host addresses, one of them the gateway.
    dc.admin
        .create_vlan(&CreateVlanRequest {
            id: 300,
            name: "ipam".into(),
            subnet: Some("10.3.0.0/27".into()),
            gateway: Some("10.3.0.1".into()),
        })
        .await
        .unwrap();
    let creates: Vec<_> = (0..29)
        .map(|i| {
            let admin = dc.admin.clone();
            tokio::spawn(async move {
                let mut req = guest(&format!("ip-{i}"));
                req.disks.clear();
                req.nics = vec![NicRequest::on("ipam")];
                admin.create_guest(&req).await
            })
        })
        .collect();
    let mut results = Vec::new();
    for c in creates {
        results.push(c.await.unwrap());
    }
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let addresses = |guests: &[drove_api::GuestView]| -> Vec<std::net::Ipv4Addr> {
        guests.iter().flat_map(|g| &g.guest.spec.nics).filter_map(|n| n.address.map(|a| a.ip)).collect()
    };
    let guests = dc.admin.list_guests().await.unwrap();
    let mut ips = addresses(&guests);
    assert_eq!(ips.len(), 29);
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 29, "an address was handed out twice");
    assert!(!ips.contains(&"10.3.0.1".parse().unwrap()), "the gateway is not a guest address");
    assert!(guests.iter().flat_map(|g| &g.guest.spec.nics).all(|n| n.address.unwrap().prefix == 27));

    // Full: the next one is refused, and says why.
    let mut req = guest("ip-full");
    req.nics = vec![NicRequest::on("ipam")];
    let err = dc.admin.create_guest(&req).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("no free address"), "{err}");

    // A deleted guest's address is free again; a fixed address is honoured
    // when free and refused when taken or outside the subnet.
    let victim = dc.admin.get_guest("ip-7").await.unwrap();
    let freed = victim.guest.spec.nics[0].address.unwrap().ip;
    let del = dc.admin.delete_guest("ip-7").await.unwrap();
    dc.wait_succeeded(&del.operation).await;
    let taken = dc.admin.get_guest("ip-8").await.unwrap().guest.spec.nics[0].address.unwrap().ip;
    let mut req = guest("ip-fixed-taken");
    req.nics = vec![NicRequest { ip: Some(taken), ..NicRequest::on("ipam") }];
    let err = dc.admin.create_guest(&req).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("already in use"), "{err}");
    let mut req = guest("ip-fixed-outside");
    req.nics = vec![NicRequest { ip: Some("10.3.1.5".parse().unwrap()), ..NicRequest::on("ipam") }];
    let err = dc.admin.create_guest(&req).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("not a host address of subnet 10.3.0.0/27"), "{err}");
    let mut req = guest("ip-fixed");
    req.nics = vec![NicRequest { ip: Some(freed), rate_bps: Some(100_000_000), ..NicRequest::on("ipam") }];
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let fixed = dc.admin.get_guest("ip-fixed").await.unwrap();
    assert_eq!(fixed.guest.spec.nics[0].address.unwrap().ip, freed);
    assert_eq!(fixed.guest.spec.nics[0].rate_bps, Some(100_000_000));
    let mut req = guest("ip-slow");
    req.nics = vec![NicRequest { rate_bps: Some(10), ..NicRequest::on("ipam") }];
    let err = dc.admin.create_guest(&req).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");

    // Durable: after a restart the same addresses, and still none free.
    let before = addresses(&dc.admin.list_guests().await.unwrap());
    dc.restart_manager().await;
    let after = addresses(&dc.admin.list_guests().await.unwrap());
    assert_eq!(before.len(), after.len());
    let mut req = guest("ip-full-again");
    req.nics = vec![NicRequest::on("ipam")];
    assert_eq!(dc.admin.create_guest(&req).await.unwrap_err().status(), Some(409));
    dc.shutdown().await;
}
