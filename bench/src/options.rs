//! The `scaletest` command line and the parameters one run resolves from it.

use serde::{Deserialize, Serialize};

/// Drives seeded chats through three topologies and measures Postgres load.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "scaletest")]
pub struct Options {
    /// Small profile for a smoke run (40 chats x 4 turns, under 2 minutes on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Chats driven per mode [default: 600, quick 40].
    #[arg(long, value_name = "N")]
    pub chats: Option<u32>,
    /// Turns per chat [default: 10, quick 4].
    #[arg(long, value_name = "T")]
    pub turns: Option<u32>,
    /// Stream subscribers per chat [default: 2].
    #[arg(long, value_name = "S")]
    pub subscribers_per_chat: Option<u32>,
    /// coderd-sim replicas (and sidecars in the chatcache mode) [default: 2].
    #[arg(long, value_name = "R")]
    pub replicas: Option<u32>,
    /// Every K-th turn edits instead of sending; 0 never edits [default: 5].
    #[arg(long, value_name = "K")]
    pub edit_every: Option<u32>,
    /// Chats chatload drives at once [default: all, as in coderd's scaletest].
    #[arg(long, value_name = "C")]
    pub concurrency: Option<u32>,
    /// Text deltas the sim's worker streams per turn [default: 5].
    #[arg(long, value_name = "N")]
    pub turn_parts: Option<u32>,
    /// Pause between two deltas in the sim's worker [default: 20].
    #[arg(long, value_name = "MS")]
    pub part_delay_ms: Option<u32>,
    /// Only these modes, comma separated (baseline, coderd-cache, chatcache) [default: all].
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Keep the scaletest database instead of dropping it at the end.
    #[arg(long)]
    pub keep: bool,
    /// Do not run `cargo build` for coderd-sim, chatload and chatcache first.
    #[arg(long)]
    pub skip_build: bool,
    /// Only redraw the table and chart of an existing result file; runs nothing.
    #[arg(long, value_name = "RESULT_JSON")]
    pub replot: Option<std::path::PathBuf>,
}

/// Every mode the scaletest knows, in the order they run.
pub const ALL_MODES: [&str; 3] = ["baseline", "coderd-cache", "chatcache"];

/// The resolved parameters of one run; written to the result file as `params`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    /// `default` or `quick`.
    pub profile: String,
    pub chats: u32,
    pub turns: u32,
    pub subscribers_per_chat: u32,
    pub replicas: u32,
    /// 0 means no edits.
    pub edit_every: u32,
    pub reconnect_each_turn: bool,
    /// chatload `--concurrency`.
    pub concurrency: u32,
    /// coderd-sim `--turn-parts`.
    pub turn_parts: u32,
    /// coderd-sim `--part-delay-ms`.
    pub part_delay_ms: u32,
    /// Seed shape: users x chats_per_user = chats.
    pub users: u32,
    pub chats_per_user: u32,
    /// `chats x (turns - 1)`: the denominator of every per-turn figure.
    pub follow_up_turns: u64,
    /// How long chatload may run in one mode before it is killed.
    pub chatload_timeout_s: u64,
    /// How long the whole run may take.
    pub run_deadline_s: u64,
    pub modes: Vec<String>,
    /// How the modes share the database; see the bench README.
    pub seeding: String,
}

impl Params {
    pub fn resolve(options: &Options) -> Result<Params, String> {
        let quick = options.quick;
        let pick = |given: Option<u32>, normal: u32, small: u32| {
            given.unwrap_or(if quick { small } else { normal })
        };
        let chats = pick(options.chats, 600, 40);
        let turns = pick(options.turns, 10, 4);
        let subscribers_per_chat = pick(options.subscribers_per_chat, 2, 2);
        let replicas = pick(options.replicas, 2, 2);
        let edit_every = pick(options.edit_every, 5, 3);
        let concurrency = options.concurrency.unwrap_or(chats).clamp(1, chats.max(1));
        let turn_parts = pick(options.turn_parts, 5, 5);
        let part_delay_ms = pick(options.part_delay_ms, 20, 20);
        if chats == 0 || turns < 2 || subscribers_per_chat == 0 || replicas == 0 {
            return Err(
                "need --chats >= 1, --turns >= 2, --subscribers-per-chat >= 1 and \
                 --replicas >= 1"
                    .into(),
            );
        }
        if replicas > 8 {
            return Err("--replicas above 8 would exhaust Postgres' 100 connections".into());
        }

        let modes = if options.modes.is_empty() {
            ALL_MODES.iter().map(|m| m.to_string()).collect()
        } else {
            for mode in &options.modes {
                if !ALL_MODES.contains(&mode.as_str()) {
                    return Err(format!("unknown mode {mode:?}; known: {ALL_MODES:?}"));
                }
            }
            options.modes.clone()
        };

        // Ten chats per user when that divides evenly, else the largest divisor below ten.
        let chats_per_user = (1..=10).rev().find(|d| chats % d == 0).unwrap_or(1);
        let total_turns = u64::from(chats) * u64::from(turns);
        // A generous budget: 50 ms of wall time per turn plus a fixed minute, capped at 25 min.
        let chatload_timeout_s = (60 + total_turns / 20).min(25 * 60);
        let run_deadline_s = if quick { 10 * 60 } else { 60 * 60 };
        Ok(Params {
            profile: if quick { "quick" } else { "default" }.to_owned(),
            chats,
            turns,
            subscribers_per_chat,
            replicas,
            edit_every,
            reconnect_each_turn: true,
            concurrency,
            turn_parts,
            part_delay_ms,
            users: chats / chats_per_user,
            chats_per_user,
            follow_up_turns: u64::from(chats) * u64::from(turns - 1),
            chatload_timeout_s,
            run_deadline_s,
            modes,
            seeding: "fresh chats per mode: each mode seeds its own users and chats into the \
                      same database, so every mode drives identical, empty chats"
                .to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn quick_profile_is_small_and_divides_chats_evenly() {
        let options = Options::parse_from(["scaletest", "--quick"]);
        let params = Params::resolve(&options).unwrap();
        assert_eq!((params.chats, params.turns), (40, 4));
        assert_eq!(params.users * params.chats_per_user, 40);
        assert_eq!(params.follow_up_turns, 120);
    }

    #[test]
    fn default_profile_matches_coderds_scaletest() {
        let params = Params::resolve(&Options::parse_from(["scaletest"])).unwrap();
        assert_eq!((params.chats, params.turns, params.replicas), (600, 10, 2));
        assert_eq!(params.follow_up_turns, 5400);
        assert_eq!(params.modes.len(), 3);
        let odd = Options::parse_from(["scaletest", "--chats", "7"]);
        assert_eq!(Params::resolve(&odd).unwrap().chats_per_user, 7);
    }
}
