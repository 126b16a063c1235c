//! Power drivers: how the manager powers a physical host off and on.
//!
//! Power management ([`crate::dpm`]) and the operator's `drove host
//! standby|wake` decide *when*; a [`PowerDriver`] does it. Deployments
//! differ in how (a BMC over IPMI, Wake-on-LAN plus an OS shutdown, a
//! cloud API, the lab's own `drove lab power`), so the driver is a trait
//! with a few implementations:
//!
//! - [`CommandDriver`]: runs an operator's command with the host's name
//!   and the action filled in — the general one (the lab uses it; so can a
//!   site script);
//! - [`Ipmi`]: `ipmitool chassis power on|soft` against the host's BMC;
//! - [`WakeOnLan`]: a magic packet to wake, a command to power off (WoL
//!   cannot);
//! - [`NoDriver`]: refuses; DPM then only recommends.
//!
//! A driver's job ends when the request is accepted: the manager learns
//! that a host is up from its agent registering, not from the driver.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

/// What to do to a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    On,
    Off,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::On => "on",
            PowerAction::Off => "off",
        }
    }
}

/// The host a driver acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerTarget {
    pub name: String,
    pub id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("no power driver is configured (start the manager with --power-driver) to power {host} {action}")]
    NoDriver { host: String, action: &'static str },
    #[error("{driver} cannot power a host {action} ({why})")]
    Unsupported { driver: &'static str, action: &'static str, why: String },
    #[error("powering {host} {action}: cannot run {program:?}: {source}")]
    Spawn { host: String, action: &'static str, program: String, source: std::io::Error },
    #[error("powering {host} {action}: {program:?} did not finish within {timeout:?}")]
    Timeout { host: String, action: &'static str, program: String, timeout: Duration },
    #[error("powering {host} {action}: {program:?} failed ({status}): {stderr}")]
    Failed { host: String, action: &'static str, program: String, status: String, stderr: String },
    #[error("waking {host}: no MAC address is configured for it (--wol-mac {host}=MAC)")]
    NoMac { host: String },
    #[error("waking {host}: sending the magic packet to {to}: {source}")]
    Send { host: String, to: SocketAddr, source: std::io::Error },
    #[error("invalid power driver setting {what:?}: {why}")]
    Config { what: String, why: String },
}

/// Powers hosts off and on.
#[async_trait::async_trait]
pub trait PowerDriver: std::fmt::Debug + Send + Sync {
    /// Short name for logs and the API.
    fn name(&self) -> &'static str;
    /// Whether it can act at all (DPM in `full` mode needs one that can).
    fn can_act(&self) -> bool {
        true
    }
    async fn power(&self, host: &PowerTarget, action: PowerAction) -> Result<(), PowerError>;
}

/// No driver: every request is refused with the way to configure one.
#[derive(Debug, Default)]
pub struct NoDriver;

#[async_trait::async_trait]
impl PowerDriver for NoDriver {
    fn name(&self) -> &'static str {
        "none"
    }
    fn can_act(&self) -> bool {
        false
    }
    async fn power(&self, host: &PowerTarget, action: PowerAction) -> Result<(), PowerError> {
        Err(PowerError::NoDriver { host: host.name.clone(), action: action.as_str() })
    }
}

/// Runs a command per request. The template is split on whitespace; in
/// each word `{host}` becomes the host's name, `{host_id}` its id and
/// `{action}` `on` or `off`. It must exit 0 within the timeout.
#[derive(Debug, Clone)]
pub struct CommandDriver {
    argv: Vec<String>,
    timeout: Duration,
}

/// How long a power command may take: a BMC answers in seconds; the
/// lab's stops an agent and brings links down.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

impl CommandDriver {
    pub fn new(template: &str) -> Result<Self, PowerError> {
        let argv: Vec<String> = template.split_whitespace().map(str::to_owned).collect();
        if argv.is_empty() {
            return Err(PowerError::Config { what: template.into(), why: "the power command is empty".into() });
        }
        if !argv.iter().any(|w| w.contains("{action}")) {
            return Err(PowerError::Config {
                what: template.into(),
                why: "the power command must contain {action} (it is run with `on` and with `off`)".into(),
            });
        }
        Ok(CommandDriver { argv, timeout: COMMAND_TIMEOUT })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The command line for one request.
    pub fn argv(&self, host: &PowerTarget, action: PowerAction) -> Vec<String> {
        self.argv
            .iter()
            .map(|w| {
                w.replace("{host}", &host.name).replace("{host_id}", &host.id).replace("{action}", action.as_str())
            })
            .collect()
    }
}

/// Runs `argv`, which must succeed within `timeout`.
async fn run(argv: &[String], host: &PowerTarget, action: PowerAction, timeout: Duration) -> Result<(), PowerError> {
    let action_s = action.as_str();
    let program = argv.first().cloned().unwrap_or_default();
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| PowerError::Spawn {
        host: host.name.clone(),
        action: action_s,
        program: program.clone(),
        source,
    })?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| PowerError::Timeout {
            host: host.name.clone(),
            action: action_s,
            program: program.clone(),
            timeout,
        })?
        .map_err(|source| PowerError::Spawn {
            host: host.name.clone(),
            action: action_s,
            program: program.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").trim().to_owned();
    Err(PowerError::Failed {
        host: host.name.clone(),
        action: action_s,
        program,
        status: out.status.to_string(),
        stderr: last,
    })
}

#[async_trait::async_trait]
impl PowerDriver for CommandDriver {
    fn name(&self) -> &'static str {
        "command"
    }
    async fn power(&self, host: &PowerTarget, action: PowerAction) -> Result<(), PowerError> {
        run(&self.argv(host, action), host, action, self.timeout).await
    }
}

/// IPMI through `ipmitool` over the LAN. `bmc` names a host's BMC, with
/// `{host}` replaced (e.g. `{host}-bmc.example.net`); the password comes
/// from `IPMI_PASSWORD` in the manager's environment (`-E`), never from
/// its command line. Off is `soft`: an ACPI shutdown, so the OS ends
/// cleanly (the host holds no guests by then).
#[derive(Debug, Clone)]
pub struct Ipmi {
    pub bmc: String,
    pub user: String,
}

impl Ipmi {
    pub fn argv(&self, host: &PowerTarget, action: PowerAction) -> Vec<String> {
        let verb = match action {
            PowerAction::On => "on",
            PowerAction::Off => "soft",
        };
        let bmc = self.bmc.replace("{host}", &host.name);
        ["ipmitool", "-I", "lanplus", "-H", &bmc, "-U", &self.user, "-E", "chassis", "power", verb]
            .map(str::to_owned)
            .to_vec()
    }
}

#[async_trait::async_trait]
impl PowerDriver for Ipmi {
    fn name(&self) -> &'static str {
        "ipmi"
    }
    async fn power(&self, host: &PowerTarget, action: PowerAction) -> Result<(), PowerError> {
        run(&self.argv(host, action), host, action, COMMAND_TIMEOUT).await
    }
}

/// Wake-on-LAN: a magic packet to the host's MAC wakes it; powering off is
/// the `off` command's job (typically an ssh `systemctl poweroff`).
#[derive(Debug, Clone)]
pub struct WakeOnLan {
    pub macs: HashMap<String, [u8; 6]>,
    /// Where the packet goes: the hosts' broadcast address, port 9.
    pub to: SocketAddr,
    pub off: Option<CommandDriver>,
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Result<[u8; 6], PowerError> {
    let bad = || PowerError::Config { what: s.into(), why: "a MAC address is six hex bytes, aa:bb:cc:dd:ee:ff".into() };
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// The magic packet: six 0xff bytes, then the MAC sixteen times.
pub fn magic_packet(mac: [u8; 6]) -> [u8; 102] {
    let mut p = [0xffu8; 102];
    for i in 0..16 {
        p[6 + i * 6..12 + i * 6].copy_from_slice(&mac);
    }
    p
}

#[async_trait::async_trait]
impl PowerDriver for WakeOnLan {
    fn name(&self) -> &'static str {
        "wol"
    }
    async fn power(&self, host: &PowerTarget, action: PowerAction) -> Result<(), PowerError> {
        match action {
            PowerAction::Off => match &self.off {
                Some(cmd) => cmd.power(host, action).await,
                None => Err(PowerError::Unsupported {
                    driver: "Wake-on-LAN",
                    action: "off",
                    why: "give --power-cmd for powering off".into(),
                }),
            },
            PowerAction::On => {
                let mac = *self.macs.get(&host.name).ok_or_else(|| PowerError::NoMac { host: host.name.clone() })?;
                let send = |source| PowerError::Send { host: host.name.clone(), to: self.to, source };
                let bind: SocketAddr = if self.to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
                let sock = tokio::net::UdpSocket::bind(bind).await.map_err(send)?;
                sock.set_broadcast(true).map_err(send)?;
                // UDP may drop one; a host woken twice stays woken.
                for _ in 0..3 {
                    sock.send_to(&magic_packet(mac), self.to).await.map_err(send)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn target() -> PowerTarget {
        PowerTarget { name: "host-2".into(), id: "7".into() }
    }

    #[test]
    fn command_templates_fill_in_the_host_and_action_and_need_the_action() {
        let d = CommandDriver::new("power-ctl --node {host} --id={host_id} {action}").unwrap();
        assert_eq!(d.argv(&target(), PowerAction::Off), ["power-ctl", "--node", "host-2", "--id=7", "off"]);
        assert!(CommandDriver::new("  ").unwrap_err().to_string().contains("empty"));
        assert!(CommandDriver::new("power-ctl {host}").unwrap_err().to_string().contains("{action}"));
    }

    #[tokio::test]
    async fn a_command_that_fails_says_how_with_its_last_line_of_stderr() {
        let ok = CommandDriver::new("true {action}").unwrap();
        ok.power(&target(), PowerAction::On).await.unwrap();
        let bad = CommandDriver::new("ls /nonexistent-drove-power-{host}-{action}").unwrap();
        let e = bad.power(&target(), PowerAction::Off).await.unwrap_err().to_string();
        assert!(e.contains("powering host-2 off") && e.contains("nonexistent-drove-power-host-2-off"), "{e}");
        let missing = CommandDriver::new("/nonexistent/power {action}").unwrap();
        let e = missing.power(&target(), PowerAction::On).await.unwrap_err().to_string();
        assert!(e.contains("cannot run") && e.contains("/nonexistent/power"), "{e}");
        let slow =
            CommandDriver::new("env DROVE_ACTION={action} sleep 5").unwrap().with_timeout(Duration::from_millis(100));
        let e = slow.power(&target(), PowerAction::On).await.unwrap_err().to_string();
        assert!(e.contains("did not finish"), "{e}");
    }

    #[test]
    fn ipmi_soft_powers_off_and_keeps_the_password_off_the_command_line() {
        let d = Ipmi { bmc: "{host}-bmc.lab".into(), user: "admin".into() };
        let off = d.argv(&target(), PowerAction::Off);
        assert_eq!(off.join(" "), "ipmitool -I lanplus -H host-2-bmc.lab -U admin -E chassis power soft");
        assert_eq!(d.argv(&target(), PowerAction::On).last().map(String::as_str), Some("on"));
    }

    #[tokio::test]
    async fn wake_on_lan_sends_the_magic_packet_for_the_hosts_mac() {
        let rx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mac = parse_mac("52:54:00:ab:cd:ef").unwrap();
        let d =
            WakeOnLan { macs: HashMap::from([("host-2".to_owned(), mac)]), to: rx.local_addr().unwrap(), off: None };
        d.power(&target(), PowerAction::On).await.unwrap();
        let mut buf = [0u8; 200];
        let n = tokio::time::timeout(Duration::from_secs(5), rx.recv(&mut buf)).await.unwrap().unwrap();
        assert_eq!(n, 102);
        assert_eq!(&buf[..6], &[0xff; 6]);
        assert!(buf[6..102].chunks(6).all(|c| c == mac));
        let e = d.power(&PowerTarget { name: "host-9".into(), id: "9".into() }, PowerAction::On).await.unwrap_err();
        assert!(e.to_string().contains("--wol-mac host-9=MAC"), "{e}");
        let e = d.power(&target(), PowerAction::Off).await.unwrap_err();
        assert!(e.to_string().contains("--power-cmd"), "{e}");
        assert!(parse_mac("52:54:00:ab:cd").is_err() && parse_mac("52:54:00:ab:cd:zz").is_err());
    }

    #[tokio::test]
    async fn no_driver_refuses_with_the_way_to_configure_one() {
        let e = NoDriver.power(&target(), PowerAction::Off).await.unwrap_err().to_string();
        assert!(e.contains("--power-driver") && e.contains("host-2"), "{e}");
    }
}
