//! The processes of one mode: R coderd-sim replicas on loopback ports, and in the chatcache
//! mode one sidecar in front of each.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::http::Http;
use crate::options::Params;
use crate::procs::{self, Proc};
use crate::{BenchError, Result};

/// How long a replica or sidecar may take to answer its readiness probe.
const READY_BUDGET: Duration = Duration::from_secs(30);

/// Where the workspace's release binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub coderd_sim: PathBuf,
    pub chatload: PathBuf,
    pub chatcache: PathBuf,
}

impl Binaries {
    /// The binaries next to the running `scaletest` (same target directory and profile).
    pub fn beside_self() -> Result<Binaries> {
        let me = std::env::current_exe().map_err(BenchError::io("find own executable"))?;
        let dir = me
            .parent()
            .ok_or_else(|| BenchError::Step("own executable has no directory".into()))?;
        Ok(Binaries {
            coderd_sim: dir.join("coderd-sim"),
            chatload: dir.join("chatload"),
            chatcache: dir.join("chatcache"),
        })
    }
}

/// How a mode is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wiring {
    /// coderd's #23218 cache in the replicas.
    pub stream_cache: bool,
    /// A chatcache sidecar in front of each replica.
    pub sidecars: bool,
}

/// One coderd-sim replica.
#[derive(Debug, Clone)]
pub struct Replica {
    pub name: String,
    /// `http://127.0.0.1:port`.
    pub base: String,
    pub proc: Proc,
}

/// One chatcache sidecar.
#[derive(Debug, Clone)]
pub struct Sidecar {
    pub base: String,
    pub admin: String,
    pub proc: Proc,
}

/// The running processes of a mode.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    pub replicas: Vec<Replica>,
    pub sidecars: Vec<Sidecar>,
}

impl Topology {
    /// Starts everything and waits until each process answers.
    pub async fn start(
        wiring: Wiring,
        params: &Params,
        bins: &Binaries,
        dir: &Path,
        db: &str,
        mode: &str,
    ) -> Result<Topology> {
        let http = Http::default();
        let mut topology = Topology::default();

        // Ports first, so every replica can be told where its peers are.
        let ports: Vec<u16> = (0..params.replicas)
            .map(|_| free_port())
            .collect::<Result<_>>()?;
        let names: Vec<String> = (1..=params.replicas).map(|i| format!("r{i}")).collect();
        for (i, name) in names.iter().enumerate() {
            let peers: Vec<String> = names
                .iter()
                .zip(&ports)
                .filter(|(other, _)| *other != name)
                .map(|(other, port)| format!("{other}=127.0.0.1:{port}"))
                .collect();
            let mut command = Command::new(&bins.coderd_sim);
            command.args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", ports[i]),
                "--database-url",
                &crate::postgres::url(db),
                "--replica",
                name,
                "--stream-cache",
                if wiring.stream_cache { "on" } else { "off" },
                "--turn-parts",
                &params.turn_parts.to_string(),
                "--part-delay-ms",
                &params.part_delay_ms.to_string(),
            ]);
            if !peers.is_empty() {
                command.args(["--peers", &peers.join(",")]);
            }
            let log = dir.join(format!("{mode}-coderd-sim-{name}.log"));
            let proc = procs::spawn(&format!("coderd-sim/{name}"), command, &log)?;
            topology.replicas.push(Replica {
                name: name.clone(),
                base: format!("http://127.0.0.1:{}", ports[i]),
                proc,
            });
        }
        for replica in &topology.replicas {
            http.wait_ready(&format!("{}/metrics", replica.base), READY_BUDGET)
                .await?;
        }

        // Then one sidecar per replica, configured through a TOML file in the run directory.
        if wiring.sidecars {
            for replica in &topology.replicas {
                let (listen, admin) = (free_port()?, free_port()?);
                let config = dir.join(format!("{mode}-chatcache-{}.toml", replica.name));
                let toml = format!(
                    "listen_addr = \"127.0.0.1:{listen}\"\nadmin_addr = \"127.0.0.1:{admin}\"\n\
                     upstream_url = \"{}\"\ndatabase_url = \"{}\"\nlog_level = \"info\"\n\
                     shutdown_grace_ms = 1000\n",
                    replica.base,
                    crate::postgres::url(db)
                );
                std::fs::write(&config, toml).map_err(BenchError::io("write chatcache config"))?;
                let mut command = Command::new(&bins.chatcache);
                command.arg("--config").arg(&config);
                let log = dir.join(format!("{mode}-chatcache-{}.log", replica.name));
                let name = format!("chatcache/{}", replica.name);
                let proc = procs::spawn(&name, command, &log)?;
                topology.sidecars.push(Sidecar {
                    base: format!("http://127.0.0.1:{listen}"),
                    admin: format!("http://127.0.0.1:{admin}"),
                    proc,
                });
            }
            for sidecar in &topology.sidecars {
                http.wait_ready(&format!("{}/ready", sidecar.admin), READY_BUDGET)
                    .await?;
            }
        }
        Ok(topology)
    }

    /// What chatload connects to: the sidecars when there are any, else the replicas.
    pub fn targets(&self) -> Vec<String> {
        if self.sidecars.is_empty() {
            self.replicas.iter().map(|r| r.base.clone()).collect()
        } else {
            self.sidecars.iter().map(|s| s.base.clone()).collect()
        }
    }

    /// Every process of the topology.
    pub fn procs(&self) -> Vec<&Proc> {
        let replicas = self.replicas.iter().map(|r| &r.proc);
        replicas
            .chain(self.sidecars.iter().map(|s| &s.proc))
            .collect()
    }

    /// Stops sidecars first (so they do not see their upstream vanish), then replicas.
    pub async fn stop(&self) {
        for sidecar in &self.sidecars {
            procs::stop(&sidecar.proc, Duration::from_secs(3)).await;
        }
        for replica in &self.replicas {
            procs::stop(&replica.proc, Duration::from_secs(3)).await;
        }
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16> {
    let socket = TcpListener::bind("127.0.0.1:0").map_err(BenchError::io("find a free port"))?;
    let port = socket
        .local_addr()
        .map_err(BenchError::io("read a bound port"))?
        .port();
    Ok(port)
}
