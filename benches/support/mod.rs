//! Helpers of the `pipeline` bench, kept out of its main file so that it reads as the list of
//! cases: repeated timing and summaries, the `archiver` process runner, driver-side workloads,
//! and the report.
//!
//! They live in a directory (not `benches/*.rs`) so that Cargo does not take them for benches.

pub mod load;
pub mod process;
pub mod report;
pub mod stats;
