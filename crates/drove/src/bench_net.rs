//! `drove bench net`: guest-to-guest latency and throughput on real QEMU
//! guests in a two-host namespace lab.
//!
//! One server guest on host-1 serves a random file over HTTP (busybox
//! httpd); clients on host-1 (same host: tap, bridge, tap) and on host-2
//! (across hosts: VXLAN over the trunk) ping it and download the file, each
//! with and without a rate limit on the client's NIC. Times are taken
//! inside the guests, so the exec round trip through manager and agent is
//! not counted.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use drove_api::{CreateGuestRequest, CreateVlanRequest, ExecRequest, NicRequest};
use drove_client::Client;
use drove_model::ByteSize;
use serde::Serialize;

use crate::bench::percentile;
use crate::bench_boot::BenchLab;
use crate::{Format, OutputArgs};

#[derive(Debug, Args)]
pub struct NetBench {
    /// Size of the file each client downloads.
    #[arg(long, value_parser = crate::parse_size, default_value = "16M")]
    pub size: ByteSize,
    /// The limit on the limited clients' NICs, e.g. 50mbit.
    #[arg(long, value_parser = crate::cli::parse_rate, default_value = "50mbit")]
    pub rate: u64,
    /// Pings per latency figure.
    #[arg(long, default_value_t = 20)]
    pub pings: u32,
    /// Downloads per client; the median counts (TCG guests are noisy).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Serialize)]
struct Row {
    path: &'static str,
    limit_mbit: Option<f64>,
    rtt_min_ms: f64,
    rtt_avg_ms: f64,
    rtt_max_ms: f64,
    mbit_per_s: f64,
    /// Throughput over the limit, where there is one.
    of_limit: Option<f64>,
}

const SERVER: &str = "net-server";

async fn sh(c: &Client, guest: &str, script: &str, timeout_secs: u64) -> Result<String> {
    let req = ExecRequest {
        command: vec!["sh".into(), "-c".into(), script.into()],
        input: None,
        timeout_secs: Some(timeout_secs),
    };
    let r = c.exec(guest, &req).await.with_context(|| format!("running a command in {guest}"))?;
    if r.exit_code != 0 {
        bail!("`{script}` in {guest} exited with {}: {}{}", r.exit_code, r.stdout, r.stderr);
    }
    Ok(r.stdout)
}

/// Waits until the guest's agent runs a command (it has booted).
pub(crate) async fn wait_booted(c: &Client, guest: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while sh(c, guest, "true", 10).await.is_err() {
        if std::time::Instant::now() > deadline {
            bail!("guest {guest} did not answer within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// busybox ping's summary: "round-trip min/avg/max = 0.1/0.2/0.3 ms".
fn parse_rtt(out: &str) -> Option<(f64, f64, f64)> {
    let line = out.lines().find(|l| l.contains("min/avg/max"))?;
    let nums: Vec<f64> = line
        .split('=')
        .nth(1)?
        .trim()
        .trim_end_matches("ms")
        .trim()
        .split('/')
        .filter_map(|v| v.parse().ok())
        .collect();
    match nums[..] {
        [min, avg, max] => Some((min, avg, max)),
        _ => None,
    }
}

/// One download of the server's file by `client`, in Mbit/s, timed inside
/// the guest (centiseconds of uptime): no exec round trip counted.
async fn download_mbit(c: &Client, client: &str, server_ip: &str, size: ByteSize) -> Result<f64> {
    let out = sh(
        c,
        client,
        &format!(
            "a=$(cut -d' ' -f1 /proc/uptime); wget -q -O /dev/null http://{server_ip}:8080/blob || exit 1; \
             b=$(cut -d' ' -f1 /proc/uptime); echo $a $b"
        ),
        600,
    )
    .await?;
    let times: Vec<f64> = out.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    let [t0, t1] = times[..] else { bail!("unexpected timing output from {client}: {out}") };
    Ok(size.bytes() as f64 * 8.0 / (t1 - t0).max(0.01) / 1e6)
}

pub async fn run(a: NetBench) -> Result<()> {
    if a.size.as_mib() == 0 || a.runs == 0 {
        bail!("--size must be at least 1M and --runs at least 1");
    }
    let (lab, c) = BenchLab::start("net", &["--hosts", "2", "--net", "netns", "--vcpu-overcommit", "16"])?;
    c.create_vlan(&CreateVlanRequest {
        id: 900,
        name: "bench".into(),
        subnet: Some("10.90.0.0/24".into()),
        gateway: None,
    })
    .await?;
    let limited = NicRequest { rate_bps: Some(a.rate), ..NicRequest::on("bench") };
    let plan: [(&str, &str, &'static str, NicRequest); 5] = [
        (SERVER, "host-1", "", NicRequest::on("bench")),
        ("net-same", "host-1", "same host", NicRequest::on("bench")),
        ("net-cross", "host-2", "across hosts", NicRequest::on("bench")),
        ("net-same-lim", "host-1", "same host", limited.clone()),
        ("net-cross-lim", "host-2", "across hosts", limited),
    ];
    for (name, host, _, nic) in &plan {
        // The server keeps the blob in RAM (its /tmp is a tmpfs): room for
        // it beside the 128 MiB a client needs.
        let memory = ByteSize::mib(if *name == SERVER { 128 + a.size.as_mib() * 2 + 64 } else { 128 });
        let req = CreateGuestRequest {
            host: Some((*host).to_owned()),
            nics: vec![nic.clone()],
            ..CreateGuestRequest::new(name, 1, memory)
        };
        c.create_guest(&req).await.with_context(|| format!("creating {name}"))?;
    }
    for (name, ..) in &plan {
        eprint!("\rwaiting for {name} to boot   ");
        wait_booted(&c, name).await?;
    }
    eprintln!();
    let server_ip = c.get_guest(SERVER).await?.guest.spec.nics[0]
        .address
        .map(|a| a.ip.to_string())
        .context("the server got no address")?;
    let kib = a.size.bytes() / 1024;
    sh(
        &c,
        SERVER,
        &format!(
            "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/blob bs=64k count={} 2>/dev/null && \
             httpd -p 8080 -h /tmp/www </dev/null >/dev/null 2>&1",
            kib / 64
        ),
        600,
    )
    .await?;

    let mut rows = Vec::new();
    for (name, _, path, nic) in plan.iter().skip(1) {
        eprint!("\rmeasuring {name}   ");
        let out = sh(&c, name, &format!("ping -c {} -i 0.2 -W 2 {server_ip}", a.pings), 120).await?;
        let (rtt_min_ms, rtt_avg_ms, rtt_max_ms) =
            parse_rtt(&out).with_context(|| format!("no ping summary from {name}: {out}"))?;
        let mut speeds = Vec::with_capacity(a.runs);
        for _ in 0..a.runs {
            speeds.push(download_mbit(&c, name, &server_ip, a.size).await?);
        }
        speeds.sort_by(f64::total_cmp);
        let mbit_per_s = percentile(&speeds, 0.5);
        let limit_mbit = nic.rate_bps.map(|r| r as f64 / 1e6);
        rows.push(Row {
            path,
            limit_mbit,
            rtt_min_ms,
            rtt_avg_ms,
            rtt_max_ms,
            mbit_per_s,
            of_limit: limit_mbit.map(|l| mbit_per_s / l),
        });
    }
    eprintln!();
    if a.out.format == Format::Table {
        println!("drove bench net: real QEMU guests (TCG), {} per download, VLAN as VXLAN across hosts", a.size);
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.path.to_owned(),
                r.limit_mbit.map_or("none".to_owned(), |l| format!("{l} Mbit/s")),
                format!("{:.2} / {:.2} / {:.2}", r.rtt_min_ms, r.rtt_avg_ms, r.rtt_max_ms),
                format!("{:.1} Mbit/s", r.mbit_per_s),
                r.of_limit.map_or("-".to_owned(), |f| format!("{:.0} %", f * 100.0)),
            ]
        })
        .collect();
    crate::output::print(
        a.out.format,
        &rows,
        &["path", "NIC limit", "RTT min/avg/max (ms)", "throughput", "of limit"],
        table,
    )?;
    drop(lab);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ping_summaries_parse() {
        let out = "3 packets transmitted, 3 packets received, 0% packet loss\nround-trip min/avg/max = 0.512/1.234/3.001 ms\n";
        assert_eq!(super::parse_rtt(out), Some((0.512, 1.234, 3.001)));
        assert_eq!(super::parse_rtt("100% packet loss"), None);
    }
}
