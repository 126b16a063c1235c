//! `drove vm console`: an interactive serial console through the manager.
//!
//! The terminal goes into raw mode (restored on every exit path by a
//! guard) so keys reach the guest as typed; Ctrl-] (0x1d, as in telnet and
//! virsh) leaves. Bytes flow both ways over one upgraded HTTP connection.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use drove_client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Ctrl-]: leaves the console.
const ESCAPE: u8 = 0x1d;

/// Puts the terminal back as it was.
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = rustix::stdio::stdin();
        let saved = rustix::termios::tcgetattr(stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(rustix::stdio::stdin(), rustix::termios::OptionalActions::Now, &self.0);
    }
}

pub async fn attach(c: &Client, guest: &str) -> Result<()> {
    let conn = c.console(guest).await?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if tty {
        eprint!("connected to the console of {guest}; press Ctrl-] to leave\r\n");
    }
    let _raw = if tty { RawMode::enter() } else { None };
    let (mut from_guest, mut to_guest) = tokio::io::split(conn);
    let output = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        loop {
            match from_guest.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            _ = async { while !output.is_finished() { tokio::time::sleep(Duration::from_millis(50)).await } } => {
                break;
            }
            r = stdin.read(&mut buf) => {
                let n = r.context("reading the terminal")?;
                if n == 0 {
                    // Scripted input ended: let the last answers arrive.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
                let chunk = &buf[..n];
                let (send, leave) = match chunk.iter().position(|&b| b == ESCAPE) {
                    Some(i) => (&chunk[..i], true),
                    None => (chunk, false),
                };
                to_guest.write_all(send).await.context("sending to the console")?;
                if leave {
                    break;
                }
            }
        }
    }
    output.abort();
    drop(_raw);
    if tty {
        eprintln!("\nleft the console of {guest}");
    }
    Ok(())
}
