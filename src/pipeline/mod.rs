//! The pipeline an order goes through, stage by stage: [`scan`] selects the orders (date ranges,
//! delivered orders, chunked concurrent scans), [`lookup`] (on the server) or [`join`] (in the
//! client) enriches them into the [`document`] of the archive, and [`sink`] writes it
//! idempotently, dead-lettering what cannot be written. [`order_id`] says when two ids are the
//! same order. The pipeline knows nothing of the commands that drive it.

pub mod document;
pub mod join;
pub mod lookup;
pub mod order_id;
pub mod scan;
pub mod sink;
