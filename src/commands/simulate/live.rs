//! Live mode: orders moved through their statuses at a steady pace, the way the platform would.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::Collection;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::RngExt;
use tokio_util::sync::CancellationToken;

use super::data::*;
use super::seed::*;
use crate::config::Config;
use crate::db::{is_transient, Databases};
use crate::error::UsageError;
use crate::redact::scrub;

/// What [`live`] does.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// The seed of the choices (which order moves, what new orders contain). Timing comes from
    /// the clock, so a live run is not reproducible; the seed only keeps new ids apart.
    pub seed: u64,
    /// Status changes per second, about.
    pub rate: f64,
    /// Stop after this long; `None` runs until `shutdown`.
    pub duration: Option<Duration>,
}

/// What [`live`] did.
#[derive(Debug, Clone, Default)]
pub struct LiveSummary {
    /// New orders inserted (`en_attente`).
    pub orders_created: u64,
    /// Status updates applied.
    pub status_changes: u64,
    /// Of which deliveries.
    pub delivered: u64,
    /// Of which cancellations.
    pub cancelled: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl LiveSummary {
    /// Status changes per second actually achieved.
    pub fn achieved_rate(&self) -> f64 {
        self.status_changes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// An order live mode will move on.
#[derive(Debug, Clone)]
pub(super) struct InFlight {
    id: Bson,
    stage: Stage,
    livreur: Option<Bson>,
    placed_at: DateTime<Utc>,
}

/// Live mode's state between ticks.
pub(super) struct LiveRun<'a> {
    config: &'a Config,
    orders: Collection<Document>,
    generator: Generator,
    refs: References,
    queue: Vec<InFlight>,
    rng: StdRng,
    next_number: u64,
    summary: LiveSummary,
}

/// Moves orders through their statuses at about `rate` changes per second, creating orders so
/// the flow never dries up, until `shutdown` fires or `duration` has passed. A change in flight
/// always completes before it stops.
pub async fn live(
    dbs: &Databases,
    config: &Config,
    options: &LiveOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<LiveSummary> {
    if !(options.rate.is_finite() && options.rate > 0.0) {
        return Err(UsageError(format!("rate must be a positive number, got {}", options.rate)).into());
    }
    let refs = load_references(dbs, config).await?;
    live_with_references(dbs, config, options, refs, shutdown).await
}

/// [`live`] with the references already read.
pub(super) async fn live_with_references(
    dbs: &Databases,
    config: &Config,
    options: &LiveOptions,
    refs: References,
    shutdown: &CancellationToken,
) -> anyhow::Result<LiveSummary> {
    if !refs.is_usable() {
        bail!(
            "live mode needs customers, couriers and restaurants with a menu; seed them first \
             (archiver simulate --count 0)"
        );
    }
    let orders = collection(dbs, &config.orders.collection);
    let queue = load_in_flight(&orders, config).await?;
    let next_number = next_order_number(&orders, config).await?;
    let mut run = LiveRun {
        config,
        orders,
        generator: Generator::new(config, options.seed),
        refs,
        queue,
        // Keyed on the first number it will create, so two live runs with one seed differ.
        rng: stream_rng(options.seed, Stream::Live, next_number),
        next_number,
        summary: LiveSummary::default(),
    };
    tracing::info!(rate = options.rate, duration_s = options.duration.map(|d| d.as_secs()),
        in_flight = run.queue.len(), next_numero = %numero_commande(next_number), "live simulation starting");

    let started = Instant::now();
    // The timer has millisecond resolution, so past MAX_TICKS_PER_SEC a tick makes several
    // changes (a fractional share carried over) rather than ticking faster.
    let (period, changes_per_tick) = if options.rate <= MAX_TICKS_PER_SEC {
        // Capped at a day: a Duration cannot hold the inverse of a vanishingly small rate.
        ((1.0 / options.rate).min(86_400.0), 1.0)
    } else {
        (1.0 / MAX_TICKS_PER_SEC, options.rate / MAX_TICKS_PER_SEC)
    };
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(period));
    // After a stall (a slow server, an election) go on at the set pace rather than bursting to
    // catch up: the achieved rate in the summary tells the truth either way.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut change_budget = 0.0;
    let stop_at = options.duration.map(|d| tokio::time::Instant::now() + d);
    let deadline = async move {
        match stop_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut last_progress = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = &mut deadline => break,
            _ = ticks.tick() => {}
        }
        change_budget += changes_per_tick;
        let changes = change_budget.floor();
        change_budget -= changes;
        run.tick(changes as usize).await?;
        if last_progress.elapsed() >= LIVE_PROGRESS_EVERY {
            last_progress = Instant::now();
            let s = &run.summary;
            tracing::info!(
                status_changes = s.status_changes,
                delivered = s.delivered,
                cancelled = s.cancelled,
                orders_created = s.orders_created,
                in_flight = run.queue.len(),
                "live progress"
            );
        }
    }
    run.summary.elapsed = started.elapsed();
    Ok(run.summary)
}

/// The orders not yet delivered or cancelled, up to [`MAX_LOADED_IN_FLIGHT`].
pub(super) async fn load_in_flight(orders: &Collection<Document>, config: &Config) -> anyhow::Result<Vec<InFlight>> {
    let f = &config.orders.fields;
    let livreur_field = &config.lookups.livreur.local_field;
    let docs: Vec<Document> = orders
        .find(doc! { f.status.clone(): { "$in": [PENDING, PREPARING, ON_THE_WAY] } })
        .projection(doc! { "_id": 1, f.status.clone(): 1, livreur_field.clone(): 1, f.date_commande.clone(): 1 })
        .limit(MAX_LOADED_IN_FLIGHT)
        .await?
        .try_collect()
        .await
        .context("reading the orders in flight")?;
    Ok(docs
        .into_iter()
        .filter_map(|d| {
            let stage = Stage::in_flight(d.get_str(&f.status).ok()?)?;
            let placed_at =
                d.get_datetime(&f.date_commande).ok().map(|t| t.to_chrono()).unwrap_or(DateTime::UNIX_EPOCH);
            let livreur = d.get(livreur_field).filter(|b| !matches!(b, Bson::Null)).cloned();
            Some(InFlight { id: d.get("_id")?.clone(), stage, livreur, placed_at })
        })
        .collect())
}

/// A status change about to be written.
pub(super) struct PlannedChange {
    order: InFlight,
    next: Stage,
    filter: Document,
    update: Document,
}

impl LiveRun<'_> {
    /// `changes` status changes, written together, and some new orders first. Together because
    /// one at a time a round trip each would cap the rate near the inverse of the latency; the
    /// orders of one tick are distinct, so their updates do not race.
    pub(super) async fn tick(&mut self, changes: usize) -> anyhow::Result<()> {
        self.create_orders(changes).await?;
        let planned: Vec<PlannedChange> = (0..changes.min(self.queue.len())).map(|_| self.plan_change()).collect();
        let orders = &self.orders;
        let results = futures_util::future::join_all(
            planned.iter().map(|p| async move { orders.update_one(p.filter.clone(), p.update.clone()).await }),
        )
        .await;
        for (change, result) in planned.into_iter().zip(results) {
            let PlannedChange { order, next, .. } = change;
            match result {
                Ok(result) if result.matched_count == 0 => {
                    tracing::debug!(order_id = %order.id, "order changed or removed meanwhile; no longer moved");
                }
                Ok(_) => {
                    self.summary.status_changes += 1;
                    match next {
                        Stage::Delivered => self.summary.delivered += 1,
                        Stage::Cancelled => self.summary.cancelled += 1,
                        _ => self.queue.push(InFlight { stage: next, ..order }),
                    }
                }
                Err(e) if is_transient(&e) => {
                    tracing::warn!(order_id = %order.id, error = %scrub(&e.to_string()),
                        "transient error moving an order; will try again");
                    self.queue.push(order);
                }
                Err(e) => return Err(e).context("updating an order's status"),
            }
        }
        Ok(())
    }

    /// New orders for a tick of `changes` changes. They arrive at about a third of the change
    /// rate: an order takes about three changes to finish, so the number in flight stays level.
    pub(super) async fn create_orders(&mut self, changes: usize) -> anyhow::Result<()> {
        let now = Utc::now();
        let mut created = Vec::new();
        for _ in 0..changes {
            if self.queue.len() + created.len() < MIN_IN_FLIGHT || self.rng.random_bool(1.0 / 3.0) {
                let number = self.next_number;
                self.next_number += 1;
                created.push(self.generator.order_document(&mut self.rng, &self.refs, number, Stage::Pending, now));
            }
        }
        if created.is_empty() {
            return Ok(());
        }
        match self.orders.insert_many(&created).ordered(false).await {
            Ok(_) => {
                self.summary.orders_created += created.len() as u64;
                self.queue.extend(created.iter().map(|order| InFlight {
                    id: order.get("_id").cloned().unwrap_or(Bson::Null),
                    stage: Stage::Pending,
                    livreur: None,
                    placed_at: now,
                }));
                Ok(())
            }
            Err(e) if is_transient(&e) => {
                // Their numbers are skipped: a gap is harmless, a duplicate would not be.
                tracing::warn!(orders = created.len(), error = %scrub(&e.to_string()),
                    "transient error creating orders; going on");
                Ok(())
            }
            Err(e) => Err(e).context("creating orders"),
        }
    }

    /// Takes a random in-flight order out of the queue and decides its next step.
    pub(super) fn plan_change(&mut self) -> PlannedChange {
        let picked = self.rng.random_range(0..self.queue.len());
        let mut order = self.queue.swap_remove(picked);
        let f = &self.config.orders.fields;
        let delivered_status = &self.config.orders.delivered_status;
        let next = order.stage.next(&mut self.rng);
        let mut set = Document::new();
        set.insert(f.status.clone(), next.status(delivered_status));
        if next.has_courier() {
            let livreur = order.livreur.take().unwrap_or_else(|| {
                Bson::ObjectId(*self.refs.livreurs.choose(&mut self.rng).expect("references are usable"))
            });
            set.insert(self.config.lookups.livreur.local_field.clone(), livreur.clone());
            order.livreur = Some(livreur);
        }
        if next == Stage::Delivered {
            // Never before the order date, even for orders seeded later today than now.
            set.insert(f.date_livraison.clone(), bson_date(Utc::now().max(order.placed_at)));
        }
        // Matching the current status too: if someone else moved the order meanwhile, leave it.
        let filter = doc! { "_id": order.id.clone(), f.status.clone(): order.stage.status(delivered_status) };
        PlannedChange { order, next, filter, update: doc! { "$set": set } }
    }
}
