//! Child processes that cannot outlive the harness.
//!
//! Each child runs in its own process group, under `setpriv --pdeathsig KILL` where available (so a
//! test binary killed with SIGKILL still takes its children with it), with stdout and stderr in a log
//! file. Dropping a [`Process`] sends SIGTERM to the whole group, waits a little, then SIGKILLs it.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A harness process has exited: no retry brings it back, so [`wait_for`] stops at this error.
#[derive(Debug)]
pub struct Exited {
    name: String,
    log: PathBuf,
    tail: String,
}

impl std::fmt::Display for Exited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exited; last lines of {}:\n{}",
            self.name,
            self.log.display(),
            self.tail
        )
    }
}

impl std::error::Error for Exited {}

/// A running child process (and its process group), stopped on drop.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `program args…` with its output in `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(String, String)],
        log: &Path,
    ) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = match setpriv() {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.arg("--pdeathsig").arg("KILL").arg("--").arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        tracing::debug!(name, pid = child.id(), log = %log.display(), "started");
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Whether the process has exited (it may not be reaped yet: a zombie counts as exited).
    pub fn exited(&self) -> bool {
        let Some(pid) = self.pid() else { return true };
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised command name: "pid (comm) S ...".
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => true,
        }
    }

    /// Fails with [`Exited`] (and the log tail) if the process has exited.
    pub fn check_running(&self) -> Result<()> {
        if self.exited() {
            return Err(Exited {
                name: self.name.clone(),
                log: self.log.clone(),
                tail: self.log_tail(30),
            }
            .into());
        }
        Ok(())
    }

    /// Sends `signal` to the process group without waiting.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        if let Some(pid) = self.pid() {
            killpg(Pid::from_raw(pid as i32), signal).with_context(|| format!("signalling {}", self.name))?;
        }
        Ok(())
    }

    /// SIGTERM to the group, up to `grace` for it to exit, then SIGKILL. Idempotent.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = Pid::from_raw(child.id() as i32);
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The leader may be gone while others in its group linger (e.g. an Erlang VM's helpers).
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = child.wait();
        tracing::debug!(name = %self.name, "stopped");
    }

    /// SIGKILL to the group at once (a crash, not a shutdown).
    pub fn kill(&mut self) {
        self.stop(Duration::ZERO);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

fn setpriv() -> Option<&'static Path> {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    SETPRIV
        .get_or_init(|| {
            ["/usr/bin/setpriv", "/bin/setpriv"]
                .iter()
                .map(PathBuf::from)
                .find(|p| {
                    // Older util-linux has setpriv without --pdeathsig.
                    Command::new(p)
                        .args(["--pdeathsig", "KILL", "--", "true"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                })
        })
        .as_deref()
}

/// The last `lines` lines of a file ("" when unreadable). When a crash's first line (Go's
/// `fatal error:` or `panic:`, Rust's `panicked at`) lies above those lines, as it does when a Go program
/// dies with every goroutine's stack, that line and the two after it come first, then `…`.
pub fn tail(path: &Path, lines: usize) -> String {
    tail_of(&std::fs::read_to_string(path).unwrap_or_default(), lines)
}

fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let crash = all[..start]
        .iter()
        .position(|l| l.starts_with("fatal error:") || l.starts_with("panic:") || l.contains("panicked at"));
    match crash {
        Some(i) => {
            let head_end = (i + 3).min(start);
            let mut out = all[i..head_end].to_vec();
            if head_end < start {
                out.push("…");
            }
            out.extend(&all[start..]);
            out.join("\n")
        }
        None => all[start..].join("\n"),
    }
}

/// A free TCP port on 127.0.0.1 for a server the harness starts.
///
/// Picked at random *below* the kernel's ephemeral range: a port the OS hands out for `bind(0)` comes from
/// the same range as the source ports of outgoing connections, so between our check and the server's own
/// bind a client socket (a worker's HTTP or AMQP connection) can take it (seen: RabbitMQ failing with
/// `dist_port_already_used`). Ports handed out in this process are never handed out twice.
pub fn free_port() -> Result<u16> {
    use rand::Rng;
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u16, ephemeral_start.saturating_sub(1));
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    if hi > lo + 1000 {
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let port = rng.random_range(lo..=hi);
            if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed_out.insert(port);
                return Ok(port);
            }
        }
    }
    // No room below the ephemeral range: let the OS pick.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    handed_out.insert(port);
    Ok(port)
}

/// Polls `f` every `every` until it returns `Ok(Some(v))`, or fails with its last error after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, every: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) if e.chain().any(|c| c.is::<Exited>()) => {
                return Err(e.context(format!("waiting for {what}")));
            }
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_stops_when_the_process_has_exited() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("gone.log");
        let gone = Process::spawn(
            "gone",
            Path::new("/bin/sh"),
            &["-c".into(), "echo bye".into()],
            &[],
            &log,
        )
        .unwrap();
        let started = Instant::now();
        let err = wait_for(
            "never",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                let running = gone.check_running();
                async move {
                    running?;
                    Ok(None::<()>)
                }
            },
        )
        .await
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited {:?}",
            started.elapsed()
        );
        let msg = format!("{err:#}");
        assert!(msg.starts_with("waiting for never: gone exited"), "{msg}");
        assert!(msg.contains("bye"), "{msg}");
    }

    #[tokio::test]
    async fn other_errors_are_retried_until_the_deadline() {
        let mut calls = 0;
        let err = wait_for(
            "a flake",
            Duration::from_millis(300),
            Duration::from_millis(50),
            || {
                calls += 1;
                async { Err::<Option<()>, _>(anyhow::anyhow!("not yet")) }
            },
        )
        .await
        .unwrap_err();
        assert!(calls > 2, "{calls} calls");
        assert!(format!("{err:#}").contains("timed out after 300ms waiting for a flake: not yet"));
    }

    #[test]
    fn a_crash_header_above_the_tail_is_kept() {
        let mut log = vec![
            "starting",
            "fatal error: concurrent map writes",
            "",
            "goroutine 7 [running]:",
        ];
        let frames: Vec<String> = (0..30).map(|i| format!("frame {i}")).collect();
        log.extend(frames.iter().map(String::as_str));
        let text = log.join("\n");
        assert_eq!(
            tail_of(&text, 2),
            "fatal error: concurrent map writes\n\ngoroutine 7 [running]:\n…\nframe 28\nframe 29"
        );
    }

    #[test]
    fn without_a_crash_the_tail_is_the_last_lines() {
        assert_eq!(tail_of("a\nb\nc\nd", 2), "c\nd");
        assert_eq!(tail_of("a\nb", 5), "a\nb");
        // A crash inside the window is shown once, where it is.
        assert_eq!(tail_of("a\npanic: x\nb", 2), "panic: x\nb");
    }
}
