//! Child processes: every one is registered so that it is killed when the run ends, whether it
//! ends normally, on an error, on a panic or on Ctrl-C. Also their peak RSS and CPU time.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{BenchError, Result};

/// Every live child by pid. A std `Mutex`: it is never held across an `.await`, and the signal
/// and panic paths must reach it without a runtime.
static CHILDREN: Mutex<Vec<(u32, String, Child)>> = Mutex::new(Vec::new());

/// A started child; the handle is the pid, the process itself lives in the registry.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub name: String,
    pub log: PathBuf,
}

/// Starts `command` with stdout and stderr in `log`; colours off so logs stay readable.
pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Proc> {
    let file = File::create(log).map_err(BenchError::io(format!("create {}", log.display())))?;
    let err = file
        .try_clone()
        .map_err(BenchError::io("clone log handle"))?;
    command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .env("NO_COLOR", "1");
    register(name, command, log)
}

/// Starts `command` with stderr piped to `on_line` (and copied into `log`), stdout into `log`.
pub fn spawn_watched(
    name: &str,
    mut command: Command,
    log: &Path,
    on_line: impl Fn(&str) + Send + 'static,
) -> Result<Proc> {
    let file = File::create(log).map_err(BenchError::io(format!("create {}", log.display())))?;
    let copy = file
        .try_clone()
        .map_err(BenchError::io("clone log handle"))?;
    command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1");
    let proc = register(name, command, log)?;
    let stderr = {
        let mut children = lock();
        let child = children.iter_mut().find(|(pid, ..)| *pid == proc.pid);
        child.and_then(|(_, _, c)| c.stderr.take())
    };
    if let Some(stderr) = stderr {
        std::thread::spawn(move || {
            let mut copy = copy;
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let _ = writeln!(copy, "{line}");
                on_line(&line);
            }
        });
    }
    Ok(proc)
}

fn register(name: &str, mut command: Command, log: &Path) -> Result<Proc> {
    let child = command
        .spawn()
        .map_err(BenchError::io(format!("start {name}")))?;
    let pid = child.id();
    lock().push((pid, name.to_owned(), child));
    Ok(Proc {
        pid,
        name: name.to_owned(),
        log: log.to_owned(),
    })
}

fn lock() -> std::sync::MutexGuard<'static, Vec<(u32, String, Child)>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The exit status when the child has exited (and forgets it), `None` while it runs.
pub fn try_wait(proc: &Proc) -> Result<Option<ExitStatus>> {
    let mut children = lock();
    let Some(at) = children.iter().position(|(pid, ..)| *pid == proc.pid) else {
        return Err(BenchError::Step(format!(
            "{} is not a known child",
            proc.name
        )));
    };
    let status = children[at]
        .2
        .try_wait()
        .map_err(BenchError::io(format!("wait for {}", proc.name)))?;
    if status.is_some() {
        children.remove(at);
    }
    Ok(status)
}

/// Asks the child to stop with SIGTERM, then kills it after `grace`.
pub async fn stop(proc: &Proc, grace: Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &proc.pid.to_string()])
        .stderr(Stdio::null())
        .status();
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        match try_wait(proc) {
            Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => return,
        }
    }
    kill(proc.pid);
}

fn kill(pid: u32) {
    let mut children = lock();
    if let Some(at) = children.iter().position(|(p, ..)| *p == pid) {
        let (_, _, mut child) = children.remove(at);
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Kills every child still registered. Safe to call from any thread, any number of times.
pub fn kill_all() {
    let mut children = lock();
    for (_, name, child) in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("scaletest: killing {name} (pid {})", child.id());
            let _ = child.kill();
        }
        let _ = child.wait();
    }
    children.clear();
}

/// Resource use of one process over its life so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Usage {
    pub name: String,
    /// `VmHWM`: the peak resident set size.
    pub peak_rss_bytes: u64,
    /// User plus system CPU time.
    pub cpu_seconds: f64,
}

/// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`; zeros when the process is gone.
pub fn usage(proc: &Proc) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{}/status", proc.pid)).unwrap_or_default();
    let peak_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", proc.pid)).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
            field(14).unwrap_or(0) + field(15).unwrap_or(0)
        })
        .unwrap_or(0);
    Usage {
        name: proc.name.clone(),
        peak_rss_bytes: peak_kib * 1024,
        cpu_seconds: ticks as f64 / clock_ticks() as f64,
    }
}

/// `sysconf(_SC_CLK_TCK)` via `getconf`, read once; Linux's usual 100 when that fails.
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_this_process_is_plausible() {
        let me = Proc {
            pid: std::process::id(),
            name: "self".into(),
            log: PathBuf::new(),
        };
        let usage = usage(&me);
        assert!(usage.peak_rss_bytes > 1024 * 1024, "{usage:?}");
        assert!(usage.cpu_seconds >= 0.0);
    }

    #[test]
    fn killed_children_are_forgotten() {
        let dir = std::env::temp_dir().join(format!("scaletest-procs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let proc = spawn("sleep", sleep, &dir.join("sleep.log")).unwrap();
        assert!(try_wait(&proc).unwrap().is_none());
        kill_all();
        assert!(try_wait(&proc).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
