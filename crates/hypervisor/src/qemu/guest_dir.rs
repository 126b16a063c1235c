//! A guest's directory: everything the backend knows about one guest.
//!
//! ```text
//! <state_dir>/guests/<guest-id>/
//!   guest.json     the definition (GuestConfig), versioned; its presence
//!                  is what makes the guest exist
//!   intent         "running" or "stopped": what we last asked for, so a
//!                  QEMU that is gone can be told crashed from stopped
//!   disk<N>.qcow2  the virtual disks, created by `create` (`disk<N>.raw`
//!                  for a raw one; a host block device has no file)
//!   shared         for a guest on shared storage: a symlink to its
//!                  directory on the shared pool, `<shared_dir>/<guest-id>/`,
//!                  which holds its disks instead (`shared/disk<N>.qcow2`)
//!   qemu.pid       written by QEMU (-pidfile) once it runs
//!   qmp.sock       the QMP socket
//!   console.sock   the serial console, for an interactive client
//!   qga.sock       the guest agent's virtio-serial port (see qga.rs)
//!   serial.log     everything the guest wrote to its serial console, across
//!                  boots, each boot preceded by a marker line of ours
//!   qemu.log       QEMU's own messages (warnings, errors, why it ended) for
//!                  the present start; qemu.log.1 those of the start before
//! ```
//!
//! Files that several readers may look at while we change them (the record
//! and the intent) are replaced atomically: written beside, then renamed.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use drove_model::{DiskFormat, GuestId};

/// The file name of disk `index` of `format` on its pool: named for what
/// it holds (`disk0.qcow2`, `disk1.raw`), so `ls` and `qemu-img info` agree.
pub fn disk_file_name(index: usize, format: DiskFormat) -> String {
    match format {
        DiskFormat::Raw => format!("disk{index}.raw"),
        // A block device has no file; the name is never made.
        DiskFormat::Qcow2 | DiskFormat::Block => format!("disk{index}.qcow2"),
    }
}
use serde::{Deserialize, Serialize};

use super::error::QemuError;
use crate::GuestConfig;

/// The version of `guest.json` this code writes and the only one it reads.
const RECORD_VERSION: u32 = 1;
const RECORD_FORMAT: &str = "drove-qemu-guest";

/// The longest path a unix socket address can hold (`sun_path` is 108 bytes
/// including the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// What we last asked of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    Running,
    Stopped,
}

#[derive(Serialize, Deserialize)]
struct Record {
    format: String,
    version: u32,
    config: GuestConfig,
}

#[derive(Debug, Clone)]
pub struct GuestDir {
    id: GuestId,
    root: PathBuf,
    cgroup_scope: Option<String>,
}

impl GuestDir {
    pub fn new(guests_dir: &Path, id: GuestId) -> Self {
        Self { id, root: guests_dir.join(id.to_string()), cgroup_scope: None }
    }

    /// See `QemuConfig::cgroup_scope`.
    pub fn with_cgroup_scope(mut self, scope: Option<&str>) -> Self {
        self.cgroup_scope = scope.map(str::to_owned);
        self
    }

    /// The name of the guest's cgroup (under `drove/`).
    pub fn cgroup_name(&self) -> String {
        match &self.cgroup_scope {
            Some(scope) => format!("{scope}.{}", self.id),
            None => self.id.to_string(),
        }
    }

    pub fn id(&self) -> GuestId {
        self.id
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn record_path(&self) -> PathBuf {
        self.root.join("guest.json")
    }
    pub fn intent_path(&self) -> PathBuf {
        self.root.join("intent")
    }
    pub fn pid_path(&self) -> PathBuf {
        self.root.join("qemu.pid")
    }
    pub fn qmp_path(&self) -> PathBuf {
        self.root.join("qmp.sock")
    }
    pub fn console_path(&self) -> PathBuf {
        self.root.join("console.sock")
    }
    pub fn qga_path(&self) -> PathBuf {
        self.root.join("qga.sock")
    }
    pub fn serial_log_path(&self) -> PathBuf {
        self.root.join("serial.log")
    }
    /// QEMU's own log (`-D`); QEMU truncates it at each start.
    pub fn qemu_log_path(&self) -> PathBuf {
        self.root.join("qemu.log")
    }
    /// The log of the start before, kept: it says why that one ended.
    pub fn previous_qemu_log_path(&self) -> PathBuf {
        self.root.join("qemu.log.1")
    }
    /// The config drive of a guest booting its own image (see `config_drive`).
    pub fn config_drive_path(&self) -> PathBuf {
        self.root.join(super::config_drive::FILE)
    }
    /// Where disk `index` is: through the `shared` link for a guest on
    /// shared storage. The link counts even when it dangles (the pool is
    /// not mounted), so a missing pool fails loudly instead of a fresh
    /// local disk appearing in its place.
    pub fn disk_path(&self, index: usize, format: DiskFormat) -> PathBuf {
        let name = disk_file_name(index, format);
        if self.is_shared() { self.shared_link().join(name) } else { self.root.join(name) }
    }

    /// Where disk `index` lives when the guest's disks are on the local
    /// pool (its directory), whatever the `shared` link says.
    pub fn local_disk_path(&self, index: usize, format: DiskFormat) -> PathBuf {
        self.root.join(disk_file_name(index, format))
    }

    /// The guest's directory on the shared pool at `pool`.
    pub fn pool_dir(&self, pool: &Path) -> PathBuf {
        pool.join(self.id.to_string())
    }

    /// Where disk `index` lives when the guest's disks are on the shared
    /// pool at `pool`, whatever the `shared` link says.
    pub fn pool_disk_path(&self, pool: &Path, index: usize, format: DiskFormat) -> PathBuf {
        self.pool_dir(pool).join(disk_file_name(index, format))
    }

    /// Removes the `shared` link (the guest's disks are local from now
    /// on); removing an absent one succeeds.
    pub fn unlink_shared(&self) -> Result<(), QemuError> {
        let link = self.shared_link();
        match std::fs::remove_file(&link) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(QemuError::io("unlinking", link, e)),
            _ => Ok(()),
        }
    }

    pub fn shared_link(&self) -> PathBuf {
        self.root.join("shared")
    }

    /// Whether the guest's disks live on shared storage.
    pub fn is_shared(&self) -> bool {
        std::fs::symlink_metadata(self.shared_link()).is_ok()
    }

    /// Links the guest's directory on the shared pool (made if missing),
    /// idempotently.
    pub fn link_shared(&self, pool: &Path) -> Result<(), QemuError> {
        let target = pool.join(self.id.to_string());
        std::fs::create_dir_all(&target).map_err(|e| QemuError::io("creating", &target, e))?;
        let link = self.shared_link();
        match std::fs::read_link(&link) {
            Ok(existing) if existing == target => Ok(()),
            Ok(existing) => Err(QemuError::io(
                "linking",
                &link,
                io::Error::other(format!("already links to {}, not {}", existing.display(), target.display())),
            )),
            Err(_) => std::os::unix::fs::symlink(&target, &link).map_err(|e| QemuError::io("linking", &link, e)),
        }
    }

    /// Refuses a directory whose sockets the kernel could not bind.
    pub fn check_socket_paths(&self) -> Result<(), QemuError> {
        for path in [self.qmp_path(), self.console_path(), self.qga_path()] {
            let len = path.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(QemuError::SocketPathTooLong { path, len, max: MAX_SOCKET_PATH });
            }
        }
        Ok(())
    }

    /// The definition, or `None` when the guest is not defined.
    pub fn read_record(&self) -> Result<Option<GuestConfig>, QemuError> {
        let path = self.record_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(QemuError::io("reading", path, e)),
        };
        let record: Record = serde_json::from_slice(&bytes)
            .map_err(|e| QemuError::Record { path: path.clone(), reason: e.to_string() })?;
        if record.format != RECORD_FORMAT || record.version != RECORD_VERSION {
            return Err(QemuError::Record {
                path,
                reason: format!(
                    "format {:?} version {} (expected {RECORD_FORMAT:?} version {RECORD_VERSION})",
                    record.format, record.version
                ),
            });
        }
        Ok(Some(record.config))
    }

    pub fn write_record(&self, config: &GuestConfig) -> Result<(), QemuError> {
        let record = Record { format: RECORD_FORMAT.to_owned(), version: RECORD_VERSION, config: config.clone() };
        let path = self.record_path();
        let bytes = serde_json::to_vec_pretty(&record)
            .map_err(|e| QemuError::Record { path: path.clone(), reason: e.to_string() })?;
        write_atomically(&path, &bytes)
    }

    /// The last intent; a guest never started has none and counts as
    /// stopped.
    pub fn read_intent(&self) -> Result<Intent, QemuError> {
        let path = self.intent_path();
        match std::fs::read_to_string(&path) {
            Ok(s) => match s.trim() {
                "running" => Ok(Intent::Running),
                "stopped" => Ok(Intent::Stopped),
                other => Err(QemuError::Record { path, reason: format!("unknown intent {other:?}") }),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Intent::Stopped),
            Err(e) => Err(QemuError::io("reading", path, e)),
        }
    }

    pub fn write_intent(&self, intent: Intent) -> Result<(), QemuError> {
        let text = match intent {
            Intent::Running => "running\n",
            Intent::Stopped => "stopped\n",
        };
        write_atomically(&self.intent_path(), text.as_bytes())
    }

    /// The pid QEMU wrote, if the file is there and holds a number.
    pub fn read_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.pid_path()).ok()?;
        text.trim().parse().ok()
    }

    /// Removes what only a running QEMU needs, so the next launch starts
    /// clean and a stale pid file cannot point at a reused pid.
    pub fn clear_runtime_files(&self) -> Result<(), QemuError> {
        for path in [self.pid_path(), self.qmp_path(), self.console_path(), self.qga_path()] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(QemuError::io("removing", path, e)),
            }
        }
        Ok(())
    }

    /// Appends a line of ours to the serial log, `--- drove: WHAT at unix
    /// time T ---`, so `vm log` shows where each boot (a start, a reset)
    /// begins.
    pub fn mark_serial_log(&self, what: &str) -> Result<(), QemuError> {
        let unix_time =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let line = format!("--- drove: {what} at unix time {unix_time} ---");
        let path = self.serial_log_path();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| QemuError::io("opening", path.clone(), e))?;
        file.write_all(format!("\n{line}\n").as_bytes()).map_err(|e| QemuError::io("writing", path, e))
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), QemuError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| QemuError::io("writing", tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| QemuError::io("renaming into place", path, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use drove_model::{ByteSize, GuestSpec, Priority};

    use super::*;

    fn config() -> GuestConfig {
        GuestConfig {
            id: GuestId::new_v4(),
            generation: 3,
            spec: GuestSpec {
                name: "web-1".into(),
                vcpus: 1,
                memory: ByteSize::mib(256),
                disks: vec![],
                nics: vec![],
                priority: Priority::default(),
                load_profile: None,
                limits: Default::default(),
                image: None,
                clone_of: None,
                storage: Default::default(),
                anti_affinity: None,
                hot_added: None,
            },
        }
    }

    #[test]
    fn record_and_intent_round_trip_and_unknown_versions_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let c = config();
        let dir = GuestDir::new(tmp.path(), c.id);
        std::fs::create_dir_all(dir.root()).unwrap();
        assert_eq!(dir.read_record().unwrap(), None);
        assert_eq!(dir.read_intent().unwrap(), Intent::Stopped);
        dir.write_record(&c).unwrap();
        dir.write_intent(Intent::Running).unwrap();
        assert_eq!(dir.read_record().unwrap(), Some(c.clone()));
        assert_eq!(dir.read_intent().unwrap(), Intent::Running);

        let text = std::fs::read_to_string(dir.record_path()).unwrap();
        std::fs::write(dir.record_path(), text.replace("\"version\": 1", "\"version\": 2")).unwrap();
        let err = dir.read_record().unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn long_socket_paths_are_refused() {
        let deep = PathBuf::from(format!("/{}", "d".repeat(80)));
        let err = GuestDir::new(&deep, GuestId::new_v4()).check_socket_paths().unwrap_err();
        assert!(matches!(err, QemuError::SocketPathTooLong { .. }), "{err}");
        assert!(GuestDir::new(Path::new("/var/lib/drove/guests"), GuestId::new_v4()).check_socket_paths().is_ok());
    }
}
