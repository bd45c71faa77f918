//! `archiver`: archives delivered orders out of MongoDB, in real time (`watch`) or by date range
//! (`batch`), enriched with their references, exactly once.
//!
//! Layers, each using only the ones below it (a test, `tests/layering.rs`, keeps it so):
//!
//! - [`app`]: dispatch to a command, signals, and the one mapping of outcomes to exit codes;
//! - [`commands`]: `watch`, `batch`, `verify`, `health`, `simulate`;
//! - [`pipeline`]: the stages an order goes through: [`pipeline::scan`] (which orders),
//!   [`pipeline::lookup`] or [`pipeline::join`] (enrichment into the [`pipeline::document`]),
//!   [`pipeline::sink`] (the idempotent archive write, dead letters);
//! - [`checkpoint`] (where the stream resumes), [`coordination`] (lease, leadership,
//!   partitions), [`telemetry`] (metrics, probes, systemd): services that know nothing of the
//!   pipeline;
//! - [`db`] (connections, error classes, the one retry helper), [`cli`], [`logging`];
//! - [`config`]; then [`redact`] and [`error`], which use nothing.

pub mod app;
pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod config;
pub mod coordination;
pub mod db;
pub mod error;
pub mod logging;
pub mod pipeline;
pub mod redact;
pub mod telemetry;
