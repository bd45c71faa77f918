//! Client-side enrichment: the archive documents of the `$lookup` pipeline ([`super::lookup`]),
//! joined in memory from four batched `_id $in` reads of the reference collections.
//!
//! Why: measured here, the server evaluates the four `$lookup`s and the shaping at a fraction of
//! the rate at which it serves indexed reads, so the pipeline — not `archiver` — capped both
//! `watch` and `batch`. The join produces the same documents (tested field for field against the
//! pipeline); where their semantics could differ (array-valued references, decimals, dotted
//! field names), the batch is handed back to the pipeline instead.

use std::collections::HashMap;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::Error;
use mongodb::{Collection, Database};

use super::document::{
    copied_fields, item_field, references, source_digest, ArchiveSource, Check, Parts, ANOMALY_CHECKS,
};
use crate::config::{Config, LookupDef};

/// A key under which equal references meet: MongoDB compares numbers by value across types.
fn join_key(value: &Bson) -> String {
    match value {
        Bson::Int32(n) => format!("n:{n}"),
        Bson::Int64(n) => format!("n:{n}"),
        Bson::Double(d) if d.fract() == 0.0 && d.abs() < 9.0e15 => format!("n:{}", *d as i64),
        other => format!("{other:?}"),
    }
}

fn is_number(value: Option<&Bson>) -> bool {
    matches!(value, Some(Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_)))
}

/// `value`, with missing and null both as null, as `$ifNull: [x, null]` does.
fn or_null(value: Option<&Bson>) -> Bson {
    value.cloned().unwrap_or(Bson::Null)
}

/// `$multiply` of two numbers, with the server's result types (no decimals: see `needs_pipeline`).
fn multiply(a: &Bson, b: &Bson) -> Bson {
    let as_f64 = |v: &Bson| match v {
        Bson::Int32(n) => *n as f64,
        Bson::Int64(n) => *n as f64,
        Bson::Double(d) => *d,
        _ => f64::NAN,
    };
    let as_i64 = |v: &Bson| match v {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        _ => None,
    };
    match (as_i64(a), as_i64(b)) {
        (Some(x), Some(y)) => match x.checked_mul(y) {
            Some(p) if matches!((a, b), (Bson::Int32(_), Bson::Int32(_))) && i32::try_from(p).is_ok() => {
                Bson::Int32(p as i32)
            }
            Some(p) => Bson::Int64(p),
            None => Bson::Double(as_f64(a) * as_f64(b)),
        },
        _ => Bson::Double(as_f64(a) * as_f64(b)),
    }
}

/// The joiner, built once per archiver.
#[derive(Debug, Clone)]
pub struct Joiner {
    clients: Collection<Document>,
    livreurs: Collection<Document>,
    restaurants: Collection<Document>,
    menus: Collection<Document>,
    config: Config,
    source: ArchiveSource,
}

/// The reference documents of one batch, by join key.
type Refs = HashMap<String, Document>;

impl Joiner {
    /// The four reference collections, as read.
    #[cfg(test)]
    pub(crate) fn reference_collections(&self) -> [&Collection<Document>; 4] {
        [&self.clients, &self.livreurs, &self.restaurants, &self.menus]
    }

    /// A joiner, or `None` when the configuration needs the pipeline (dotted field names, whose
    /// path semantics through arrays only the server reproduces).
    pub fn new(config: &Config, source_db: &Database, source: ArchiveSource) -> Option<Self> {
        let f = &config.orders.fields;
        let l = &config.lookups;
        let names = [
            &f.numero_commande,
            &f.status,
            &f.date_commande,
            &f.date_livraison,
            &f.montant_total,
            &f.items,
            &f.item_menu_id,
            &f.item_quantite,
            &l.client.local_field,
            &l.livreur.local_field,
            &l.restaurant.local_field,
            &l.menu.nom_field,
            &l.menu.prix_field,
        ];
        let dotted = names.iter().any(|n| n.contains('.'))
            || [&l.client, &l.livreur, &l.restaurant].iter().any(|d| d.fields.iter().any(|x| x.contains('.')));
        if dotted {
            return None;
        }
        Some(Joiner {
            clients: source_db.collection(&l.client.collection),
            livreurs: source_db.collection(&l.livreur.collection),
            restaurants: source_db.collection(&l.restaurant.collection),
            menus: source_db.collection(&l.menu.collection),
            config: config.clone(),
            source,
        })
    }

    /// Whether an order has a value whose `$lookup`/`$multiply` semantics the join does not
    /// reproduce exactly.
    fn needs_pipeline(&self, order: &Document) -> bool {
        let f = &self.config.orders.fields;
        let l = &self.config.lookups;
        let refs = [&l.client.local_field, &l.livreur.local_field, &l.restaurant.local_field];
        if refs.iter().any(|r| matches!(order.get(r.as_str()), Some(Bson::Array(_)))) {
            return true;
        }
        if matches!(order.get(&f.montant_total), Some(Bson::Decimal128(_))) {
            return true;
        }
        let Some(Bson::Array(items)) = order.get(&f.items) else { return false };
        items.iter().any(|it| match it {
            Bson::Document(it) => {
                matches!(it.get(&f.item_menu_id), Some(Bson::Array(_)))
                    || matches!(it.get(&f.item_quantite), Some(Bson::Decimal128(_)))
            }
            _ => false,
        })
    }

    async fn fetch(collection: &Collection<Document>, ids: Vec<Bson>, fields: &[String]) -> Result<Refs, Error> {
        if ids.is_empty() {
            return Ok(Refs::new());
        }
        let mut projection = doc! {};
        for f in fields {
            projection.insert(f.clone(), 1);
        }
        let docs: Vec<Document> =
            collection.find(doc! { "_id": { "$in": ids } }).projection(projection).await?.try_collect().await?;
        Ok(docs.into_iter().filter_map(|d| Some((join_key(d.get("_id")?), d))).collect())
    }

    /// The archive documents of `orders`, or `None` when this batch needs the pipeline.
    pub async fn enrich(&self, orders: &[Document]) -> Result<Option<Vec<Document>>, Error> {
        if orders.iter().any(|o| self.needs_pipeline(o)) {
            return Ok(None);
        }
        let f = &self.config.orders.fields;
        let l = &self.config.lookups;
        let wanted = |local: &str| -> Vec<Bson> {
            let mut seen = std::collections::HashSet::new();
            orders
                .iter()
                .filter_map(|o| o.get(local))
                .filter(|v| !matches!(v, Bson::Null))
                .filter(|v| seen.insert(join_key(v)))
                .cloned()
                .collect()
        };
        let mut seen = std::collections::HashSet::new();
        let menu_ids: Vec<Bson> = orders
            .iter()
            .filter_map(|o| o.get_array(&f.items).ok())
            .flatten()
            .filter_map(|it| it.as_document().and_then(|it| it.get(&f.item_menu_id)))
            .filter(|v| !matches!(v, Bson::Null) && seen.insert(join_key(v)))
            .cloned()
            .collect();
        let menu_fields = [l.menu.nom_field.clone(), l.menu.prix_field.clone()];
        let (clients, livreurs, restaurants, menus) = futures_util::try_join!(
            Self::fetch(&self.clients, wanted(&l.client.local_field), &l.client.fields),
            Self::fetch(&self.livreurs, wanted(&l.livreur.local_field), &l.livreur.fields),
            Self::fetch(&self.restaurants, wanted(&l.restaurant.local_field), &l.restaurant.fields),
            Self::fetch(&self.menus, menu_ids, &menu_fields),
        )?;
        if menus.values().any(|m| matches!(m.get(&l.menu.prix_field), Some(Bson::Decimal128(_)))) {
            return Ok(None);
        }
        let now = mongodb::bson::DateTime::now();
        Ok(Some(orders.iter().map(|o| self.shape(o, &clients, &livreurs, &restaurants, &menus, now)).collect()))
    }

    /// One archive document, field for field as the pipeline's `$project` and `$addFields`.
    fn shape(
        &self,
        order: &Document,
        clients: &Refs,
        livreurs: &Refs,
        restaurants: &Refs,
        menus: &Refs,
        now: mongodb::bson::DateTime,
    ) -> Document {
        let f = &self.config.orders.fields;
        let l = &self.config.lookups;
        let joined = |refs: &Refs, def: &LookupDef| -> Bson {
            let found =
                order.get(&def.local_field).filter(|v| !matches!(v, Bson::Null)).and_then(|v| refs.get(&join_key(v)));
            match found {
                Some(d) => {
                    let mut shaped = Document::new();
                    for field in &def.fields {
                        shaped.insert(field.clone(), or_null(d.get(field)));
                    }
                    Bson::Document(shaped)
                }
                None => Bson::Null,
            }
        };
        let (items, items_ok, menu_missing, qty_invalid) = match order.get(&f.items) {
            Some(Bson::Array(items)) => {
                let mut shaped = Vec::with_capacity(items.len());
                let (mut menu_missing, mut qty_invalid) = (false, false);
                for it in items {
                    let it = it.as_document();
                    let menu_ref = it.and_then(|it| it.get(&f.item_menu_id)).filter(|v| !matches!(v, Bson::Null));
                    let qty = it.and_then(|it| it.get(&f.item_quantite));
                    let menu = menu_ref.and_then(|r| menus.get(&join_key(r)));
                    menu_missing |= menu.is_none();
                    qty_invalid |= !is_number(qty);
                    let price = menu.and_then(|m| m.get(&l.menu.prix_field));
                    let sous_total = match (price, qty) {
                        (Some(p), Some(q)) if is_number(Some(p)) && is_number(Some(q)) => multiply(p, q),
                        _ => Bson::Null,
                    };
                    shaped.push(Bson::Document(doc! {
                        item_field::MENU_ID: or_null(menu_ref),
                        item_field::NOM: or_null(menu.and_then(|m| m.get(&l.menu.nom_field))),
                        item_field::PRIX: or_null(price),
                        item_field::QUANTITE: or_null(qty),
                        item_field::SOUS_TOTAL: sous_total,
                    }));
                }
                (shaped, true, menu_missing, qty_invalid)
            }
            _ => (Vec::new(), false, false, false),
        };
        let refs = [clients, livreurs, restaurants];
        let mut parts = Parts {
            id: or_null(order.get("_id")),
            copied: copied_fields(f).map(|(_, order_field)| or_null(order.get(order_field))),
            references: [0, 1, 2].map(|i| joined(refs[i], references(l)[i].1)),
            items,
            archived_at: now,
            source: self.source,
            anomalies: Vec::new(),
            source_digest: Bson::String(source_digest(order)),
        };
        let named = |name: &str| {
            let def = references(l).into_iter().find(|(n, _)| *n == name).map(|(_, def)| def);
            def.and_then(|def| order.get(&def.local_field)).is_some_and(|v| !matches!(v, Bson::Null))
        };
        parts.anomalies = ANOMALY_CHECKS
            .iter()
            .filter(|(_, check)| match *check {
                Check::NotString(name) => !matches!(parts.get(name), Bson::String(_)),
                Check::NotDate(name) => !matches!(parts.get(name), Bson::DateTime(_)),
                Check::SetButNotNumber(name) => {
                    !matches!(parts.get(name), Bson::Null) && !is_number(Some(parts.get(name)))
                }
                Check::NotFound(name) => matches!(parts.get(name), Bson::Null),
                Check::NamedButNotFound(name) => matches!(parts.get(name), Bson::Null) && named(name),
                Check::ItemsNotArray => !items_ok,
                Check::MenuEntryNotFound => menu_missing,
                Check::QuantityNotNumber => qty_invalid,
            })
            .map(|(anomaly, _)| Bson::from(*anomaly))
            .collect();
        parts.into_document()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiply_keeps_the_servers_result_types() {
        assert_eq!(multiply(&Bson::Int32(3), &Bson::Int32(4)), Bson::Int32(12));
        assert_eq!(multiply(&Bson::Int32(i32::MAX), &Bson::Int32(2)), Bson::Int64(2 * i64::from(i32::MAX)));
        assert_eq!(multiply(&Bson::Int64(3), &Bson::Int32(4)), Bson::Int64(12));
        assert_eq!(multiply(&Bson::Double(12.5), &Bson::Int32(2)), Bson::Double(25.0));
    }

    #[test]
    fn numbers_join_by_value_across_types() {
        assert_eq!(join_key(&Bson::Int32(7)), join_key(&Bson::Int64(7)));
        assert_eq!(join_key(&Bson::Int32(7)), join_key(&Bson::Double(7.0)));
        assert_ne!(join_key(&Bson::Int32(7)), join_key(&Bson::String("7".into())));
    }
}
