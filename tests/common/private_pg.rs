//! A throwaway Postgres 15 cluster owned by one test, so that the test may stop and start a
//! real server without touching the shared one on 127.0.0.1:5432.
//!
//! The cluster lives in a fresh directory under the temp dir (data, unix socket and log), listens
//! only on 127.0.0.1 on a free port, trusts every local connection and is sized small. initdb and
//! postgres refuse to run as root: when the tests run as root, every binary runs as the
//! `postgres` user through `runuser`, and the directory is handed to that user first.
//! Dropping the handle stops the server and removes the directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::Scratch;

pub struct PrivatePg {
    /// Owns everything: `data/`, the unix socket and `server.log`.
    dir: PathBuf,
    bin: PathBuf,
    as_postgres_user: bool,
    pub addr: SocketAddr,
}

impl PrivatePg {
    /// Creates the cluster (initdb) without starting it.
    pub fn new() -> Self {
        Self::with_settings("")
    }

    /// Creates the cluster with extra `postgresql.conf` lines (preloaded libraries, logging).
    pub fn with_settings(extra: &str) -> Self {
        let bin = bin_dir();
        let as_postgres_user = euid() == Some(0);
        let dir = std::env::temp_dir().join(format!("chatcache-pg-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).expect("create cluster dir");
        let pg = Self {
            dir,
            bin,
            as_postgres_user,
            addr: private_port(),
        };
        if as_postgres_user {
            let status = Command::new("chown")
                .args(["postgres:", pg.dir.to_str().unwrap()])
                .status()
                .expect("run chown");
            assert!(status.success(), "chown postgres {}", pg.dir.display());
        }
        let data = pg.data();
        let out = pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", describe(&out));
        let settings = format!(
            "\n# chatcache tests: a small private server\n\
             listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             max_connections = 40\n\
             shared_buffers = 16MB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n{extra}\n",
            pg.addr.port(),
            pg.dir.display()
        );
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .expect("write postgresql.conf");
        pg
    }

    /// Creates and starts a cluster.
    pub fn started() -> Self {
        let pg = Self::new();
        pg.start();
        pg
    }

    /// `pg_ctl start -w`: returns once the server accepts connections.
    pub fn start(&self) {
        let (data, log) = (self.data(), self.dir.join("server.log"));
        let out = self.run(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-t",
                "60",
                "-s",
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            describe(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// `pg_ctl stop -m fast -w`: clients are disconnected, returns once the server is gone.
    pub fn stop(&self) {
        let out = self.pg_ctl_stop();
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            describe(&out)
        );
    }

    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// Whether the postmaster runs (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        let data = self.data();
        self.run("pg_ctl", &["status", "-D", data.to_str().unwrap()])
            .status
            .success()
    }

    /// The server's log (`pg_ctl -l`): everything it wrote since the cluster was created.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// `postgres://postgres@127.0.0.1:PORT`, without a database.
    pub fn server(&self) -> String {
        format!("postgres://postgres@{}", self.addr)
    }

    pub fn url(&self, dbname: &str) -> String {
        format!("{}/{dbname}", self.server())
    }

    /// A scratch database with coderd's schema on this server.
    pub async fn scratch(&self) -> Scratch {
        Scratch::on(&self.server()).await
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_ctl_stop(&self) -> Output {
        let data = self.data();
        let args = ["stop", "-w", "-t", "60", "-s", "-m", "fast", "-D"];
        let mut args: Vec<&str> = args.to_vec();
        args.push(data.to_str().unwrap());
        self.run("pg_ctl", &args)
    }

    /// Runs one of the server's binaries, as `postgres` when we are root.
    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let tool = self.bin.join(tool);
        let mut cmd = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&tool);
            c
        } else {
            Command::new(&tool)
        };
        // A working directory the postgres user can enter.
        cmd.args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", tool.display()))
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.pg_ctl_stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback port below the kernel's ephemeral range (32768 and up), so that no
/// `bind(0)` elsewhere (other tests use [`super::free_addr`]) takes it while the server is
/// stopped and a restart can listen on it again.
fn private_port() -> SocketAddr {
    for _ in 0..200 {
        let port = 20_000 + rand::random::<u16>() % 10_000;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port in 20000..30000");
}

/// Where initdb, pg_ctl and postgres live: Postgres 15's directory, else `pg_config --bindir`.
fn bin_dir() -> PathBuf {
    let v15 = Path::new("/usr/lib/postgresql/15/bin");
    if v15.join("initdb").exists() {
        return v15.to_path_buf();
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("Postgres 15 server binaries not found (no pg_config)");
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        dir.join("initdb").exists(),
        "no initdb in {} (pg_config --bindir)",
        dir.display()
    );
    dir
}

/// The effective user id, from `/proc/self/status` (`Uid: real effective saved fs`).
fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
