//! What can go wrong below the [`HvError`](crate::HvError) surface.
//!
//! Each variant names the input that failed (a path, a program, a QMP
//! command) and leaves the cause to `source`, so a chain reads like
//! "start of guest G failed: launching qemu-system-x86_64 for /var/...:
//! exited with status 1: could not open disk0.qcow2: ...".

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use super::qga::QgaError;
use super::qmp::QmpError;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("running {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} {what} exited with {status}: {stderr}")]
    CommandFailed { program: String, what: String, status: ExitStatus, stderr: String },
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("connecting the migration stream to {to}")]
    MigrationConnect {
        to: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("QMP of the QEMU process {pid} at {socket}")]
    Qmp {
        pid: u32,
        socket: PathBuf,
        #[source]
        source: QmpError,
    },
    #[error("{what} through the guest agent at {socket}")]
    Qga {
        socket: PathBuf,
        what: String,
        #[source]
        source: QgaError,
    },
    #[error("{path} is not a guest record this version understands: {reason}")]
    Record { path: PathBuf, reason: String },
    #[error(
        "the unix socket path {path} is {len} bytes, longer than the {max} the kernel allows; \
         use a shorter state_dir"
    )]
    SocketPathTooLong { path: PathBuf, len: usize, max: usize },
    #[error("writing the config drive: {what}")]
    ConfigDrive {
        what: String,
        #[source]
        source: drove_net::cmd::CmdError,
    },
    #[error("the guest image file {path} is missing; build it with scripts/build-image.sh")]
    ImageMissing { path: PathBuf },
    #[error("the base image {path} cannot be used: {reason}")]
    BaseImage { path: PathBuf, reason: String },
    #[error("QEMU reports the unexpected run state {status:?} after {after}")]
    UnexpectedRunState { status: String, after: &'static str },
    #[error("the QEMU job {job} failed: {error}")]
    Job { job: String, error: String },
    #[error("sending {signal} to the QEMU process {pid}")]
    Signal {
        pid: u32,
        signal: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the QEMU process {pid} is still alive after SIGKILL and {after:?}")]
    Unkillable { pid: u32, after: Duration },
    #[error("the QEMU launcher wrote no usable pid to {path}: {content:?}")]
    PidFile { path: PathBuf, content: String },
    #[error("reading host {what} from {path}")]
    HostInfo { what: &'static str, path: PathBuf },
    #[error("changing {what} of the running guest")]
    Limit {
        what: String,
        #[source]
        source: Box<QemuError>,
    },
    #[error(transparent)]
    Cgroup(#[from] super::cgroup::CgroupError),
    #[error(transparent)]
    Tc(#[from] super::tc::TcError),
}

impl QemuError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io { action, path: path.into(), source }
    }
}
