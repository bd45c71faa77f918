//! Coordination of several `archiver` processes through MongoDB itself: the leadership lease
//! with its fencing epoch ([`lease`], [`leadership`]) and partitions of the order ids
//! ([`partition`]). It knows nothing of the pipeline nor of how checkpoints are stored.
//!
//! - **Lease** (`archiver_leases`, one document per stream): `{holder, epoch, expires_at}`. It is
//!   taken when expired (or already ours) and renewed on a heartbeat, with majority write concern.
//!   Each takeover increments `epoch`, which fences the shared checkpoint store.
//! - **Partitions**: an order belongs to partition `h(_id) mod N`, where `h` reads the last two
//!   hex digits of the id's string form (the ObjectId counter: uniform). Every id, of any type,
//!   maps to exactly one partition, in the change stream filter and in `batch` alike.

pub mod leadership;
pub mod lease;
pub mod partition;

pub use lease::{Lease, LeaseInfo};
pub use partition::{instance_id, partition_filter, restrict_to_partition, stream_name};
