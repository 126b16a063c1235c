//! Quick latency figures for the embedded store on this machine's disk.
//!
//! `cargo run -p drove-store --example store_latency [dir]` (default: a temp
//! dir). Not a benchmark harness: a handful of timings with a raw fsync
//! alongside, so the store's overhead over the disk is visible.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drove_store::embedded::EmbeddedStore;
use drove_store::{Op, Precondition, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::args().nth(1) {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    println!("store in {}", dir.path().display());
    raw_fsync(dir.path())?;
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(run(dir.path()))
}

fn raw_fsync(dir: &Path) -> std::io::Result<()> {
    let mut file = std::fs::File::create(dir.join("fsync-probe"))?;
    let mut samples = Vec::new();
    for _ in 0..300 {
        let started = Instant::now();
        file.write_all(&[7u8; 4096])?;
        file.sync_data()?;
        samples.push(started.elapsed());
    }
    report("raw 4 KiB write + fdatasync", &mut samples);
    Ok(())
}

async fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let store = Arc::new(EmbeddedStore::open(&dir.join("store.redb"))?);
    let value = vec![b'v'; 200];
    for i in 0..50 {
        store.put(&format!("warm/{i}"), value.clone(), Precondition::Any).await?;
    }

    let mut samples = Vec::new();
    for i in 0..1000 {
        let started = Instant::now();
        store.put(&format!("single/{}", i % 100), value.clone(), Precondition::Any).await?;
        samples.push(started.elapsed());
    }
    report("single-key put (200 B), one writer", &mut samples);

    let mut samples = Vec::new();
    for i in 0..1000 {
        let started = Instant::now();
        store.get(&format!("single/{}", i % 100)).await?;
        samples.push(started.elapsed());
    }
    report("get", &mut samples);

    const TASKS: usize = 8;
    const PUTS: usize = 250;
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = Arc::clone(&store);
            let value = value.clone();
            tokio::spawn(async move {
                for i in 0..PUTS {
                    store.put(&format!("conc/{t}/{i}"), value.clone(), Precondition::Any).await?;
                }
                Ok::<_, drove_store::StoreError>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    println!(
        "{TASKS} concurrent writers x {PUTS} puts: {elapsed:?}, {:.0} txns/s (group commit)",
        (TASKS * PUTS) as f64 / elapsed.as_secs_f64()
    );

    let big = vec![b'x'; 500];
    let ops = (0..10_000)
        .map(|i| Op::Put { key: format!("guests/{i:05}"), value: big.clone(), precondition: Precondition::Any })
        .collect();
    let started = Instant::now();
    store.txn(ops).await?;
    println!("one txn of 10,000 puts (500 B): {:?}", started.elapsed());
    let mut samples = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let (listed, _) = store.list("guests/").await?;
        samples.push(started.elapsed());
        assert_eq!(listed.len(), 10_000);
    }
    report("list of 10,000 keys (500 B)", &mut samples);
    Ok(())
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{what}: median {:?}, p90 {:?}, p99 {:?}, mean {mean:?} (n={})",
        at(0.5),
        at(0.9),
        at(0.99),
        samples.len()
    );
}
