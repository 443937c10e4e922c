//! `coderd-sim seed`: users, their API keys and waiting chats, written out as the seed file
//! chatload reads (`{"users": [{"id", "token", "chats": [...]}]}`).

use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::api::DEFAULT_MODEL_CONFIG_ID;
use crate::db::{self, DbError};

/// Failures of a seed run: Postgres, or the output file.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("write seed file: {0}")]
    Io(#[from] std::io::Error),
}

/// How much to create.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    pub users: usize,
    pub chats_per_user: usize,
}

#[derive(Debug, Serialize)]
pub struct SeedFile {
    pub users: Vec<SeededUser>,
}

#[derive(Debug, Serialize)]
pub struct SeededUser {
    pub id: Uuid,
    /// `<10-char id>-<22-char secret>`, as clients present it.
    pub token: String,
    pub chats: Vec<Uuid>,
}

fn random_text(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Creates the users, keys (valid 30 days) and chats in one transaction and returns them.
pub async fn seed(database_url: &str, plan: &SeedPlan) -> Result<SeedFile, SeedError> {
    let mut client = db::connect(&db::config(database_url, "seed")?).await?;
    let tx = client.transaction().await?;
    let mut users = Vec::with_capacity(plan.users);
    for _ in 0..plan.users {
        let id = Uuid::new_v4();
        let username = format!("user-{}", &id.simple().to_string()[..12]);
        tx.execute(
            "INSERT INTO users (id, username) VALUES ($1, $2)",
            &[&id, &username],
        )
        .await?;

        let key_id = random_text(10);
        let secret = random_text(22);
        let hashed = Sha256::digest(secret.as_bytes()).to_vec();
        tx.execute(
            "INSERT INTO api_keys (id, hashed_secret, user_id, expires_at) \
             VALUES ($1, $2, $3, now() + interval '30 days')",
            &[&key_id, &hashed, &id],
        )
        .await?;

        let mut chats = Vec::with_capacity(plan.chats_per_user);
        for n in 0..plan.chats_per_user {
            let title = format!("chat {n}");
            let row = tx
                .query_one(
                    "INSERT INTO chats (owner_id, title, status, last_model_config_id) \
                     VALUES ($1, $2, 'waiting', $3) RETURNING id",
                    &[&id, &title, &DEFAULT_MODEL_CONFIG_ID],
                )
                .await?;
            chats.push(row.get(0));
        }
        users.push(SeededUser {
            id,
            token: format!("{key_id}-{secret}"),
            chats,
        });
    }
    tx.commit().await?;
    Ok(SeedFile { users })
}
