//! The leadership lease of a stream: one document per stream, taken when expired (or already
//! ours), renewed on a heartbeat, its epoch incremented by every takeover.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::Error;
use mongodb::options::{ReturnDocument, WriteConcern};
use mongodb::{Collection, Database};

use crate::config::Config;
use crate::db::is_duplicate_key;

fn now_bson() -> mongodb::bson::DateTime {
    mongodb::bson::DateTime::now()
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    leases: Collection<Document>,
    stream: String,
    holder: String,
    ttl: Duration,
    epoch: i64,
    previous_holder: Option<String>,
    renewed_at: Instant,
}

/// Who holds a lease, for standbys' logs and `health`.
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    /// The holder.
    pub holder: String,
    /// Its epoch.
    pub epoch: i64,
    /// When it expires unless renewed.
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// The lease collection, written with majority write concern.
    pub fn collection(db: &Database, config: &Config) -> Collection<Document> {
        db.collection_with_options(
            &config.coordination.lease_collection,
            mongodb::options::CollectionOptions::builder().write_concern(WriteConcern::majority()).build(),
        )
    }

    /// Takes the lease if it is free, expired or already ours.
    pub async fn try_acquire(
        leases: &Collection<Document>,
        stream: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, Error> {
        let now = now_bson();
        let expires = mongodb::bson::DateTime::from_millis(now.timestamp_millis() + ttl.as_millis() as i64);
        let before = leases.find_one(doc! { "_id": stream }).await?;
        let result = leases
            .find_one_and_update(
                doc! { "_id": stream, "$or": [{ "expires_at": { "$lt": now } }, { "holder": holder }] },
                doc! { "$set": { "holder": holder, "expires_at": expires, "acquired_at": now }, "$inc": { "epoch": 1_i64 } },
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await;
        match result {
            Ok(Some(lease)) => Ok(Some(Lease {
                leases: leases.clone(),
                stream: stream.to_owned(),
                holder: holder.to_owned(),
                ttl,
                epoch: lease
                    .get("epoch")
                    .and_then(Bson::as_i64)
                    .or_else(|| lease.get_i32("epoch").ok().map(i64::from))
                    .unwrap_or(1),
                previous_holder: before
                    .and_then(|b| b.get_str("holder").ok().map(str::to_owned))
                    .filter(|h| h != holder),
                renewed_at: Instant::now(),
            })),
            Ok(None) => Ok(None),
            Err(e) if is_duplicate_key(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Who holds the lease of `stream`, if anyone.
    pub async fn current(leases: &Collection<Document>, stream: &str) -> Result<Option<LeaseInfo>, Error> {
        Ok(leases.find_one(doc! { "_id": stream }).await?.map(|d| LeaseInfo {
            holder: d.get_str("holder").unwrap_or_default().to_owned(),
            epoch: d
                .get("epoch")
                .and_then(Bson::as_i64)
                .or_else(|| d.get_i32("epoch").ok().map(i64::from))
                .unwrap_or(0),
            expires_at: d.get_datetime("expires_at").ok().map(|t| t.to_chrono()).unwrap_or_default(),
        }))
    }

    /// Extends the lease. `Ok(false)`: it was taken over (or expired and taken).
    pub async fn renew(&mut self) -> Result<bool, Error> {
        let now = now_bson();
        let expires = mongodb::bson::DateTime::from_millis(now.timestamp_millis() + self.ttl.as_millis() as i64);
        let result = self
            .leases
            .update_one(
                doc! { "_id": &self.stream, "holder": &self.holder, "epoch": self.epoch },
                doc! { "$set": { "expires_at": expires } },
            )
            .await?;
        if result.matched_count == 1 {
            self.renewed_at = Instant::now();
        }
        Ok(result.matched_count == 1)
    }

    /// Whether the lease is surely still ours: renewed within `fraction` of its time to live.
    pub fn is_fresh(&self, fraction: f64) -> bool {
        self.renewed_at.elapsed() < self.ttl.mul_f64(fraction)
    }

    /// How much longer the lease stays [fresh](Lease::is_fresh) for `fraction` (zero once not).
    pub fn fresh_for(&self, fraction: f64) -> Duration {
        self.ttl.mul_f64(fraction).saturating_sub(self.renewed_at.elapsed())
    }

    /// Gives the lease up at once, so a standby need not wait for it to expire.
    pub async fn release(&self) {
        let released = self
            .leases
            .update_one(
                doc! { "_id": &self.stream, "holder": &self.holder, "epoch": self.epoch },
                doc! { "$set": { "expires_at": mongodb::bson::DateTime::from_millis(0) } },
            )
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %crate::redact::scrub(&e.to_string()), "could not release the lease; it will expire");
        }
    }

    /// The fencing epoch.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Who held it before, when this was a takeover.
    pub fn previous_holder(&self) -> Option<&str> {
        self.previous_holder.as_deref()
    }
}
