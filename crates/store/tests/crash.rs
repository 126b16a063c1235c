//! Kill a writing process with SIGKILL and check that nothing it was told is
//! durable got lost.
//!
//! The test re-executes its own binary as the writer: with
//! [`CHILD_ENV`] set, the same test function opens the store, writes from
//! several tasks and prints one `ACK` line per acknowledged key. The parent
//! kills it mid-stream, reopens the store and checks every acknowledged key,
//! and that multi-key transactions are all there or not at all. Three rounds,
//! each on the store the previous kill left behind.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use drove_store::embedded::EmbeddedStore;
use drove_store::{Op, Precondition, Store};

const CHILD_ENV: &str = "DROVE_STORE_CRASH_CHILD";
const ROUND_ENV: &str = "DROVE_STORE_CRASH_ROUND";
const TEST_NAME: &str = "acknowledged_writes_survive_sigkill";
const WRITERS: usize = 4;
/// Keys per multi-key transaction.
const GROUP: usize = 3;
/// Acknowledgements the parent waits for before killing; varied per round.
const KILL_AFTER: [usize; 3] = [150, 400, 77];
/// Stops a child whose parent never killed it.
const CHILD_MAX_WRITES: usize = 200_000;
/// The same on every Unix; spelled out rather than adding libc for it.
const SIGKILL: i32 = 9;

#[test]
fn acknowledged_writes_survive_sigkill() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        let round: usize = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
        write_until_killed(Path::new(&path), round);
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    // key -> value, for every key a child acknowledged.
    let mut acked: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (round, kill_after) in KILL_AFTER.into_iter().enumerate() {
        let mut child = KillOnDrop(
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, &path)
                .env(ROUND_ENV, round.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut lines = whole_lines(BufReader::new(child.0.stdout.take().unwrap()));
        let mut this_round = 0;
        for line in lines.by_ref() {
            if record_ack(&line, &mut acked) {
                this_round += 1;
                if this_round == kill_after {
                    break;
                }
            }
        }
        assert_eq!(this_round, kill_after, "round {round}: the child stopped before it was killed");
        child.0.kill().unwrap();
        // Whatever it printed before dying was acknowledged too.
        for line in lines {
            this_round += usize::from(record_ack(&line, &mut acked));
        }
        let status = child.0.wait().unwrap();
        assert_eq!(status.signal(), Some(SIGKILL), "round {round}: child ended with {status}");
        eprintln!("round {round}: killed after {this_round} acknowledged keys");

        check_store(&path, &acked, round);
    }
}

/// The child's output, line by line, each whole. A line longer than the
/// child's stdout buffer reaches the pipe in several writes, and the kill
/// can fall between them: the parent never got that acknowledgement whole,
/// so it does not count it.
fn whole_lines(mut out: impl BufRead) -> impl Iterator<Item = String> {
    std::iter::from_fn(move || {
        let mut line = Vec::new();
        out.read_until(b'\n', &mut line).unwrap();
        (line.pop() == Some(b'\n')).then(|| String::from_utf8(line).unwrap())
    })
}

/// Parse `ACK <key> <value>`; other lines are the test harness talking.
fn record_ack(line: &str, acked: &mut BTreeMap<String, Vec<u8>>) -> bool {
    let Some(rest) = line.strip_prefix("ACK ") else {
        return false;
    };
    let (key, value) = rest.split_once(' ').unwrap();
    assert!(acked.insert(key.to_owned(), value.as_bytes().to_vec()).is_none(), "key {key} acknowledged twice");
    true
}

fn check_store(path: &Path, acked: &BTreeMap<String, Vec<u8>>, round: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = EmbeddedStore::open(path).unwrap_or_else(|e| panic!("round {round}: reopening after SIGKILL: {e}"));
        let revision = store.revision().await.unwrap();
        let (all, _) = store.list("").await.unwrap();
        let stored: BTreeMap<&str, &[u8]> = all.iter().map(|kv| (kv.key.as_str(), kv.value.as_slice())).collect();
        for (key, value) in acked {
            assert_eq!(stored.get(key.as_str()), Some(&value.as_slice()), "round {round}: acknowledged key {key} lost");
        }
        for kv in &all {
            assert!(kv.mod_revision <= revision, "round {round}: {} is newer than the store revision", kv.key);
        }
        // Unacknowledged transactions may or may not have landed, but never in part.
        let mut groups: BTreeMap<&str, usize> = BTreeMap::new();
        for kv in &all {
            if let Some((group, _)) = kv.key.rsplit_once("/member") {
                *groups.entry(group).or_default() += 1;
            }
        }
        for (group, members) in groups {
            assert_eq!(members, GROUP, "round {round}: transaction {group} landed in part");
        }
    });
}

/// The child: write from several tasks until killed.
fn write_until_killed(path: &Path, round: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let store = Arc::new(EmbeddedStore::open(path).unwrap());
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    for i in 0..CHILD_MAX_WRITES / WRITERS {
                        // Values of varying size, so commits touch varying pages.
                        let value = format!("{round}.{writer}.{i}.{}", "x".repeat((i * 37) % 3000));
                        let keys: Vec<String> = if i % 4 == 3 {
                            (0..GROUP).map(|m| format!("r{round}/w{writer}/txn{i}/member{m}")).collect()
                        } else {
                            vec![format!("r{round}/w{writer}/k{i}")]
                        };
                        let ops = keys
                            .iter()
                            .map(|key| Op::Put {
                                key: key.clone(),
                                value: value.clone().into_bytes(),
                                precondition: Precondition::Absent,
                            })
                            .collect();
                        store.txn(ops).await.unwrap();
                        for key in keys {
                            println!("ACK {key} {value}");
                        }
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
    });
}

/// Never leave a writer running if the parent fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
