//! `archiver simulate`: realistic French fake data for development, demos and benchmarks.
//!
//! Seeding writes the reference collections (customers, couriers, restaurants and their menus)
//! and orders that follow the data model (`schema.md`), in bulk. Live mode then moves orders
//! through their statuses at a steady pace, the way the platform would, so that `watch` has
//! something to archive.
//!
//! Everything derives from one seed. Each customer, courier, restaurant and order number draws
//! from its own random stream keyed on `(seed, kind, index)`, which buys three things: a run is
//! reproducible byte for byte (ids included, since they are drawn from the stream rather than
//! from the clock), chunks of orders can be generated in parallel in any order, and a second run
//! into a non-empty collection, which continues the order numbers, makes new orders instead of
//! the same ones again.

mod data;
mod live;
mod seed;

pub use data::*;
pub use live::*;
pub use seed::*;

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use chrono::{NaiveDate, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::RetryPolicy;
use crate::db::{self};
use crate::error::UsageError;

/// What `archiver simulate` is asked to do (from the command line; defaults as there).
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// Orders to seed.
    pub count: u64,
    /// Seed of the generator (random when unset).
    pub seed: Option<u64>,
    /// Share of the seeded orders that are delivered.
    pub p_delivered: f64,
    /// Days the seeded orders span, ending at `end_date`.
    pub days: u32,
    /// The end of the seeded span (default: the start of today).
    pub end_date: Option<chrono::NaiveDate>,
    /// Drop the collections first.
    pub drop: bool,
    /// Keep delivering orders live afterwards.
    pub live: bool,
    /// Live orders per second.
    pub rate: f64,
    /// How long to deliver live (until stopped when unset).
    pub duration: Option<u64>,
}

impl Default for SimulateOptions {
    fn default() -> Self {
        SimulateOptions {
            count: 1000,
            seed: None,
            p_delivered: 0.4,
            days: 30,
            end_date: None,
            drop: false,
            live: false,
            rate: 10.0,
            duration: None,
        }
    }
}

/// The validated arguments, turned into options. No side effects: called before connecting.
fn options_from_args(
    args: &SimulateOptions,
    today: NaiveDate,
    seed: u64,
) -> Result<(SeedOptions, Option<LiveOptions>), UsageError> {
    if !(0.0..=1.0).contains(&args.p_delivered) {
        return Err(UsageError(format!("--p-delivered must be between 0 and 1, got {}", args.p_delivered)));
    }
    if !(args.rate.is_finite() && args.rate > 0.0) {
        return Err(UsageError(format!(
            "--rate must be a positive number of status changes per second, got {}",
            args.rate
        )));
    }
    if args.days == 0 {
        return Err(UsageError("--days must be at least 1".to_owned()));
    }
    // Default: up to the start of today, so that no seeded order lies in the future while the
    // same seed still gives the same data all day long.
    let end = args.end_date.unwrap_or(today);
    let span = DateSpan::days_before(end, args.days);
    let mut seed_options = SeedOptions::new(seed, args.count, args.p_delivered, span);
    seed_options.drop = args.drop;
    let live_options =
        args.live.then(|| LiveOptions { seed, rate: args.rate, duration: args.duration.map(Duration::from_secs) });
    Ok((seed_options, live_options))
}

/// Runs `archiver simulate`: validates, seeds, then in live mode keeps moving orders.
pub async fn run(config: &Config, args: &SimulateOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let chosen_seed = args.seed.unwrap_or_else(rand::random);
    let (seed_options, live_options) = options_from_args(args, Utc::now().date_naive(), chosen_seed)?;
    if args.seed.is_none() {
        tracing::info!(
            seed = chosen_seed,
            "no --seed given: picked one at random; pass it as --seed to reproduce this data"
        );
    }
    let policy = RetryPolicy::bounded(&config.retry);
    let dbs = tokio::select! {
        dbs = db::connect(config, &policy) => dbs?,
        _ = shutdown.cancelled() => bail!("interrupted before connecting"),
    };
    let (summary, refs) = seed_keeping_references(&dbs, config, &seed_options, &shutdown).await?;
    report_seed(config, &summary);
    if summary.interrupted {
        bail!(
            "interrupted after {} of {} orders; the ones written are complete, and a new run adds after them",
            summary.orders,
            seed_options.count
        );
    }
    if let Some(live_options) = live_options {
        let refs = Arc::try_unwrap(refs).unwrap_or_else(|shared| (*shared).clone());
        let summary = live_with_references(&dbs, config, &live_options, refs, &shutdown).await?;
        report_live(&summary);
    }
    Ok(())
}

fn report_seed(config: &Config, s: &SeedSummary) {
    let l = &config.lookups;
    let secs = s.elapsed.as_secs_f64();
    tracing::info!(
        seed = s.seed,
        dropped = s.dropped.len(),
        clients = s.clients,
        livreurs = s.livreurs,
        restaurants = s.restaurants,
        menu_entries = s.menu_entries,
        orders = s.orders,
        delivered = s.delivered,
        cancelled = s.cancelled,
        first_numero = %numero_commande(s.first_number),
        duration_ms = s.elapsed.as_millis() as u64,
        orders_per_sec = s.orders_per_sec().round() as u64,
        interrupted = s.interrupted,
        "seeding finished"
    );
    let numbers = if s.orders == 0 {
        String::new()
    } else {
        format!(", {}..{}", numero_commande(s.first_number), numero_commande(s.first_number + s.orders - 1))
    };
    println!(
        "simulate: inserted {} {} ({} delivered, {} cancelled{numbers}), {} {}, {} {}, {} {}, {} {} \
         in {secs:.2} s ({:.0} orders/s); seed {}{}",
        s.orders,
        config.orders.collection,
        s.delivered,
        s.cancelled,
        s.clients,
        l.client.collection,
        s.livreurs,
        l.livreur.collection,
        s.restaurants,
        l.restaurant.collection,
        s.menu_entries,
        l.menu.collection,
        s.orders_per_sec(),
        s.seed,
        if s.dropped.is_empty() { String::new() } else { format!("; dropped first: {}", s.dropped.join(", ")) },
    );
}

fn report_live(s: &LiveSummary) {
    let secs = s.elapsed.as_secs_f64();
    tracing::info!(
        orders_created = s.orders_created,
        status_changes = s.status_changes,
        delivered = s.delivered,
        cancelled = s.cancelled,
        elapsed_ms = s.elapsed.as_millis() as u64,
        changes_per_sec = (s.achieved_rate() * 10.0).round() / 10.0,
        "live simulation stopped"
    );
    println!(
        "simulate live: {} status changes ({} delivered, {} cancelled), {} orders created in {secs:.1} s \
         ({:.1} changes/s)",
        s.status_changes,
        s.delivered,
        s.cancelled,
        s.orders_created,
        s.achieved_rate()
    );
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mongodb::bson::oid::ObjectId;
    use mongodb::bson::Bson;

    use super::*;

    fn span() -> DateSpan {
        DateSpan::days_before(NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(), 30)
    }

    #[test]
    fn same_seed_same_dataset_and_another_seed_differs() {
        let config = Config::default();
        let a = generate_dataset(&config, 42, 300, 0.4, span());
        let b = generate_dataset(&config, 42, 300, 0.4, span());
        assert_eq!(a.orders, b.orders);
        assert_eq!(a.clients, b.clients);
        assert_eq!(a.menu, b.menu);
        let c = generate_dataset(&config, 43, 300, 0.4, span());
        assert_ne!(a.orders, c.orders);
        assert_ne!(a.clients, c.clients);
    }

    #[test]
    fn orders_follow_the_data_model() {
        let config = Config::default();
        let data = generate_dataset(&config, 7, 2000, 0.4, span());
        assert_eq!(data.orders.len(), 2000);
        assert_eq!(data.clients.len(), 400);
        let delivered = data.orders.iter().filter(|o| o.get_str("status").unwrap() == "livrée").count();
        assert_eq!(delivered as u64, data.delivered);
        assert!((660..=940).contains(&delivered), "{delivered}");
        let prices: BTreeMap<ObjectId, f64> =
            data.menu.iter().map(|m| (m.get_object_id("_id").unwrap(), m.get_f64("prix").unwrap())).collect();
        let (start, end) = (span().start.timestamp_millis(), span().end.timestamp_millis());
        for (i, order) in data.orders.iter().enumerate() {
            assert_eq!(order.get_str("numero_commande").unwrap(), format!("CMD-{:06}", i + 1));
            let placed = order.get_datetime("date_commande").unwrap().timestamp_millis();
            assert!((start..end).contains(&placed));
            let items = order.get_array("items").unwrap();
            assert!((1..=5).contains(&items.len()));
            let sum: f64 = items
                .iter()
                .map(|i| {
                    let i = i.as_document().unwrap();
                    prices[&i.get_object_id("menu_id").unwrap()] * f64::from(i.get_i32("quantite").unwrap())
                })
                .sum();
            assert!((order.get_f64("montant_total").unwrap() - sum).abs() < 0.005);
            let status = order.get_str("status").unwrap();
            assert_eq!(order.get("livreur_id") == Some(&Bson::Null), matches!(status, PENDING | PREPARING | CANCELLED));
        }
    }

    #[test]
    fn email_parts_are_ascii() {
        assert_eq!(email_part("Hélène"), "helene");
        assert_eq!(email_part("Le Bœuf d'Or"), "leboeufdor");
        assert_eq!(lowercase_first("Rue Voltaire"), "rue Voltaire");
    }

    #[test]
    fn invalid_arguments_are_usage_errors() {
        let today = NaiveDate::from_ymd_opt(2026, 3, 10).unwrap();
        let with = |change: fn(&mut SimulateOptions)| {
            let mut options = SimulateOptions::default();
            change(&mut options);
            options
        };
        for bad in [
            with(|o| o.p_delivered = 1.5),
            with(|o| o.p_delivered = -0.1),
            with(|o| o.rate = 0.0),
            with(|o| o.rate = -2.0),
            with(|o| o.p_delivered = f64::NAN),
            with(|o| o.days = 0),
        ] {
            assert!(options_from_args(&bad, today, 1).is_err(), "{bad:?}");
        }
        let (options, live) = options_from_args(&SimulateOptions::default(), today, 1).unwrap();
        // The default range ends at the start of today: no order lies in the future.
        assert_eq!(options.span.end.to_rfc3339(), "2026-03-10T00:00:00+00:00");
        assert!(live.is_none());
    }
}
