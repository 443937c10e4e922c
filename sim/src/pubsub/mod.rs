//! Postgres pubsub, shaped like coderd's `PGPubsub` and `BatchingPubsub`.
//!
//! * [`listener`]: one dedicated LISTEN connection per process, LISTEN reference-counted per
//!   channel, reconnect with backoff; a reconnect or a full subscriber queue ends in
//!   [`Dropped`].
//! * [`publisher`]: notifies leave through a 50 ms batcher, one transaction per batch on its
//!   own connection. Each replica batches separately, so notifies of different replicas can
//!   arrive in another order than the commits they announce — on purpose.

pub mod listener;
pub mod publisher;

/// The text of coderd's `pubsub.ErrDroppedMessages`: this subscriber may have missed
/// notifications (its queue overflowed or the LISTEN connection was replaced).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("dropped messages")]
pub struct Dropped;

/// What a subscription yields: a payload, or the news that some were lost.
pub type Delivery = Result<String, Dropped>;
