//! `archiver`: archives delivered orders out of MongoDB, in real time (`watch`) or by date range
//! (`batch`), enriched with their references, exactly once.
//!
//! The data flows through the modules in this order: [`config`] → [`watch`] (change stream,
//! batches) → [`enrich`] (the `$lookup` pipeline) → [`archive`] (idempotent writes) →
//! [`checkpoint`] (the resume token file).

pub mod archive;
pub mod batch;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod coordination;
pub mod db;
pub mod enrich;
pub mod exit;
pub mod health;
pub mod join;
pub mod logging;
pub mod order_id;
pub mod redact;
pub mod simulate;
pub mod verify;
pub mod watch;
