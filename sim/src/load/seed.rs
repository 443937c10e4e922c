//! The seed file `coderd-sim seed` writes: users, their session tokens and their chats.

use serde::Deserialize;
use uuid::Uuid;

/// Why the seed file is unusable (the caller's fault).
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot read seed file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("seed file {path} is not valid seed JSON: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("seed file {0} holds no chats")]
    Empty(String),
}

/// The whole file: `{"users":[{"id":..., "token":"...", "chats":[...]}]}`.
#[derive(Debug, Deserialize)]
pub struct Seed {
    pub users: Vec<SeedUser>,
}

/// One user; every chat is driven with its owner's token.
#[derive(Debug, Deserialize)]
pub struct SeedUser {
    pub id: Uuid,
    pub token: String,
    pub chats: Vec<Uuid>,
}

/// A chat to drive, with the token that may write to it and read its stream.
#[derive(Debug, Clone)]
pub struct SeededChat {
    /// Position in the seed file; spreads subscribers and turns over the targets.
    pub index: usize,
    pub chat_id: Uuid,
    pub owner_token: String,
}

impl Seed {
    /// Reads and parses the seed file.
    pub fn load(path: &str) -> Result<Self, SeedError> {
        let text = std::fs::read_to_string(path).map_err(|source| SeedError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| SeedError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Every chat in file order, limited to the first `limit` when given.
    pub fn chats(&self, limit: Option<usize>) -> Vec<SeededChat> {
        self.users
            .iter()
            .flat_map(|user| user.chats.iter().map(move |chat| (user, *chat)))
            .take(limit.unwrap_or(usize::MAX))
            .enumerate()
            .map(|(index, (user, chat_id))| SeededChat {
                index,
                chat_id,
                owner_token: user.token.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chats_follow_file_order_and_limit() {
        let seed: Seed = serde_json::from_str(
            r#"{"users":[
                {"id":"00000000-0000-4000-8000-000000000001","token":"a-x",
                 "chats":["00000000-0000-4000-8000-00000000000a","00000000-0000-4000-8000-00000000000b"]},
                {"id":"00000000-0000-4000-8000-000000000002","token":"b-y",
                 "chats":["00000000-0000-4000-8000-00000000000c"]}]}"#,
        )
        .unwrap();

        let all = seed.chats(None);
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].owner_token, "b-y");
        assert_eq!(all[2].index, 2);

        let two = seed.chats(Some(2));
        assert_eq!(two.len(), 2);
        assert!(two.iter().all(|chat| chat.owner_token == "a-x"));
    }
}
