//! The commands: each drives the layers below (pipeline, checkpoint, coordination, telemetry)
//! and never another command.

pub mod batch;
pub mod config;
pub mod health;
pub mod purge;
pub mod simulate;
pub mod verify;
pub mod watch;
