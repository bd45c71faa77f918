//! Client-side enrichment: the archive documents of the `$lookup` pipeline ([`super::lookup`]),
//! joined in memory from four batched `_id $in` reads of the reference collections.
//!
//! Why: measured here, the server evaluates the four `$lookup`s and the shaping at a fraction of
//! the rate at which it serves indexed reads, so the pipeline — not `archiver` — capped both
//! `watch` and `batch`. The join produces the same documents (tested field for field against the
//! pipeline); where their semantics could differ (array-valued references, decimals, dotted
//! field names), the batch is handed back to the pipeline instead.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, RawArrayBuf, RawBson, RawBsonRef, RawDocument, RawDocumentBuf};
use mongodb::error::Error;
use mongodb::options::{CollectionOptions, ReadConcern};
use mongodb::{Collection, Database};

use super::document::{
    copied_fields, field, item_field, raw_document_with_capacity, references, source_digest_of, ArchiveSource, Check,
    Parts, ANOMALY_CHECKS,
};
use super::order_id::equality_key;
use crate::config::Config;

/// The maps of the join: keys are short and hashed several times per order, so a fast hash
/// (the one `hashbrown` uses) rather than the DoS-resistant default; the keys come from the
/// database, not from a network peer.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A key under which equal references meet, exactly when `$lookup` would match them: MongoDB
/// compares numbers by value across types (Int32, Int64, Double, Decimal128, `-0.0` and `0`),
/// and documents and arrays member by member.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum JoinKey {
    /// An integral number that an `i64` holds exactly, whatever its BSON type.
    Number(i64),
    /// Any other number (a fraction, beyond 64 bits, NaN, an infinity): its canonical
    /// [`equality_key`], which every numeric type spells alike.
    OtherNumber(Box<str>),
    ObjectId([u8; 12]),
    /// A string (or the deprecated symbol, which compares as one).
    String(Box<str>),
    /// Any other value, by its [`equality_key`] (type included, numbers inside by value).
    Other(String),
}

/// 2^63, the first double past `i64::MAX`.
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;

fn join_key(value: RawBsonRef<'_>) -> JoinKey {
    match value {
        RawBsonRef::Int32(n) => JoinKey::Number(i64::from(n)),
        RawBsonRef::Int64(n) => JoinKey::Number(n),
        // Every integral double in [-2^63, 2^63) is an exact i64.
        RawBsonRef::Double(d) if d.fract() == 0.0 && (-TWO_POW_63..TWO_POW_63).contains(&d) => {
            JoinKey::Number(d as i64)
        }
        RawBsonRef::Double(d) => number_key(equality_key(&Bson::Double(d))),
        RawBsonRef::Decimal128(d) => number_key(equality_key(&Bson::Decimal128(d))),
        RawBsonRef::ObjectId(id) => JoinKey::ObjectId(id.bytes()),
        RawBsonRef::String(s) | RawBsonRef::Symbol(s) => JoinKey::String(s.into()),
        other => JoinKey::Other(Bson::try_from(other).map(|v| equality_key(&v)).unwrap_or_default()),
    }
}

/// The key of a number given by its canonical [`equality_key`] (`n:0`, `n:-15e2`): `Number`
/// when it is an integer an `i64` holds, so that it meets the integers of the other types.
fn number_key(canonical: String) -> JoinKey {
    let integral = canonical.strip_prefix("n:").and_then(|number| {
        if number == "0" {
            return Some(0);
        }
        let (digits, exponent) = number.split_once('e')?;
        let exponent = u32::try_from(exponent.parse::<i64>().ok()?).ok()?;
        digits.parse::<i64>().ok()?.checked_mul(10_i64.checked_pow(exponent)?)
    });
    match integral {
        Some(n) => JoinKey::Number(n),
        None => JoinKey::OtherNumber(canonical.into()),
    }
}

/// The value of `key` in an order already checked to be readable ([`Joiner::needs_pipeline`]).
fn get<'a>(document: &'a RawDocument, key: &str) -> Option<RawBsonRef<'a>> {
    document.get(key).ok().flatten()
}

/// `value` unless it is missing or null.
fn set(value: Option<RawBsonRef<'_>>) -> Option<RawBsonRef<'_>> {
    value.filter(|v| !matches!(v, RawBsonRef::Null))
}

fn is_number(value: Option<RawBsonRef<'_>>) -> bool {
    matches!(
        value,
        Some(RawBsonRef::Int32(_) | RawBsonRef::Int64(_) | RawBsonRef::Double(_) | RawBsonRef::Decimal128(_))
    )
}

/// `$multiply` of two numbers, with the server's result types (no decimals: see `needs_pipeline`).
fn multiply(a: RawBsonRef<'_>, b: RawBsonRef<'_>) -> RawBson {
    let as_f64 = |v: RawBsonRef<'_>| match v {
        RawBsonRef::Int32(n) => f64::from(n),
        RawBsonRef::Int64(n) => n as f64,
        RawBsonRef::Double(d) => d,
        _ => f64::NAN,
    };
    let as_i64 = |v: RawBsonRef<'_>| match v {
        RawBsonRef::Int32(n) => Some(i64::from(n)),
        RawBsonRef::Int64(n) => Some(n),
        _ => None,
    };
    match (as_i64(a), as_i64(b)) {
        (Some(x), Some(y)) => match x.checked_mul(y) {
            Some(p) if matches!((a, b), (RawBsonRef::Int32(_), RawBsonRef::Int32(_))) && i32::try_from(p).is_ok() => {
                RawBson::Int32(p as i32)
            }
            Some(p) => RawBson::Int64(p),
            None => RawBson::Double(as_f64(a) * as_f64(b)),
        },
        _ => RawBson::Double(as_f64(a) * as_f64(b)),
    }
}

/// Which reference collection an entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Client,
    Livreur,
    Restaurant,
    Menu,
}

/// A reference as joined: for customers, couriers and restaurants, the shaped sub-document
/// (the configured fields, in order, null when missing); for menu entries, the entry as read.
/// `None`: there is no such reference.
type Entry = Option<Arc<RawDocumentBuf>>;

/// References already read by this joiner, when it keeps them (`batch`): each customer,
/// courier, restaurant and menu entry is then read once per run instead of once per chunk. At
/// most `capacity` entries; when full it starts over, so memory stays bounded whatever the
/// number of references.
#[derive(Debug)]
struct ReferenceCache {
    capacity: usize,
    entries: Mutex<HashMap<(Kind, JoinKey), Entry>>,
    /// Counts since they were last taken ([`Joiner::take_cache_stats`]).
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
}

/// How the reference cache has done since last asked: references found in it, references it
/// had to read, entries forgotten because their document changed, and its size now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReferenceCacheStats {
    /// References found in the cache (documents, or known misses).
    pub hits: u64,
    /// References read from the server.
    pub misses: u64,
    /// Entries forgotten because the stream said their document changed.
    pub invalidations: u64,
    /// Entries kept now.
    pub entries: u64,
}

impl ReferenceCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Kind, JoinKey), Entry>> {
        // A panic while holding the lock left a map of complete entries: still usable.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The reference collections, in the order the join reads them.
const KINDS: [Kind; 4] = [Kind::Client, Kind::Livreur, Kind::Restaurant, Kind::Menu];

/// The references of one kind read from the server, by key.
type Found = HashMap<JoinKey, Arc<RawDocumentBuf>>;

/// The references of one batch, by kind and key; found ones only.
type Refs = HashMap<(Kind, JoinKey), Arc<RawDocumentBuf>>;

/// The references a batch names, by key: one value for each (equal numbers of several types
/// meet under one key).
type Wanted<'a> = HashMap<JoinKey, RawBsonRef<'a>>;

/// The joiner, built once per archiver.
#[derive(Debug, Clone)]
pub struct Joiner {
    clients: Collection<RawDocumentBuf>,
    livreurs: Collection<RawDocumentBuf>,
    restaurants: Collection<RawDocumentBuf>,
    menus: Collection<RawDocumentBuf>,
    config: Config,
    source: ArchiveSource,
    cache: Option<Arc<ReferenceCache>>,
    /// The database of the reference collections.
    db: Database,
}

impl Joiner {
    /// The four reference collections, as read.
    #[cfg(test)]
    pub(crate) fn reference_collections(&self) -> [&Collection<RawDocumentBuf>; 4] {
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
            cache: None,
            db: source_db.clone(),
        })
    }

    /// The same joiner, keeping up to `capacity` references it has read for the batches that
    /// follow (0: none kept). For a run over a range (`batch`), "the references as of archiving"
    /// means as of the run: an edit of a reference during the run may show in the orders archived
    /// after it or not. `watch` keeps the cache exact with [`Joiner::forget`], fed by its stream.
    pub fn with_cache(mut self, capacity: usize) -> Self {
        self.cache = (capacity > 0).then(|| {
            Arc::new(ReferenceCache {
                capacity,
                entries: Mutex::new(HashMap::default()),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                invalidations: AtomicU64::new(0),
            })
        });
        if self.cache.is_some() {
            // What is kept is read at "majority": a value that a failover rolls back (and no
            // change event would ever retract) is never read, let alone kept.
            let majority = CollectionOptions::builder().read_concern(ReadConcern::majority()).build();
            let l = &self.config.lookups;
            let reread = |name: &str| self.db.collection_with_options(name, majority.clone());
            (self.clients, self.livreurs, self.restaurants, self.menus) = (
                reread(&l.client.collection),
                reread(&l.livreur.collection),
                reread(&l.restaurant.collection),
                reread(&l.menu.collection),
            );
        }
        self
    }

    /// The reference collections whose documents this joiner keeps; none without a cache.
    pub fn cached_collections(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.cache {
            Some(_) => KINDS.iter().map(|kind| self.collection(*kind).name().to_owned()).collect(),
            None => Vec::new(),
        };
        names.sort();
        names.dedup();
        names
    }

    /// Forgets what was read of the document `id` of `collection` (every document of it when
    /// `id` is `None`), so that it is read again when next named: it changed. A miss is
    /// forgotten too (the document was inserted).
    pub fn forget(&self, collection: &str, id: Option<&Bson>) {
        let Some(cache) = &self.cache else { return };
        let kinds: Vec<Kind> = KINDS.into_iter().filter(|kind| self.collection(*kind).name() == collection).collect();
        let mut cached = cache.lock();
        let before = cached.len();
        match id.map(|id| RawBson::try_from(id.clone())) {
            Some(Ok(id)) => {
                let key = join_key(id.as_raw_bson_ref());
                for kind in kinds {
                    cached.remove(&(kind, key.clone()));
                }
            }
            // No id, or one that does not convert: the whole collection.
            _ => cached.retain(|(kind, _), _| !kinds.contains(kind)),
        }
        cache.invalidations.fetch_add((before - cached.len()) as u64, Ordering::Relaxed);
    }

    /// Forgets every reference kept.
    pub fn forget_all(&self) {
        if let Some(cache) = &self.cache {
            let mut cached = cache.lock();
            cache.invalidations.fetch_add(cached.len() as u64, Ordering::Relaxed);
            cached.clear();
        }
    }

    /// The cache's counts since the last call (and its size now); `None` without a cache.
    pub fn take_cache_stats(&self) -> Option<ReferenceCacheStats> {
        let cache = self.cache.as_ref()?;
        Some(ReferenceCacheStats {
            hits: cache.hits.swap(0, Ordering::Relaxed),
            misses: cache.misses.swap(0, Ordering::Relaxed),
            invalidations: cache.invalidations.swap(0, Ordering::Relaxed),
            entries: cache.lock().len() as u64,
        })
    }

    fn collection(&self, kind: Kind) -> &Collection<RawDocumentBuf> {
        match kind {
            Kind::Client => &self.clients,
            Kind::Livreur => &self.livreurs,
            Kind::Restaurant => &self.restaurants,
            Kind::Menu => &self.menus,
        }
    }

    /// The fields read of a reference of `kind`, and whether the entry is shaped from them.
    fn fields(&self, kind: Kind) -> (Vec<&str>, bool) {
        let l = &self.config.lookups;
        let def = match kind {
            Kind::Client => &l.client,
            Kind::Livreur => &l.livreur,
            Kind::Restaurant => &l.restaurant,
            Kind::Menu => return (vec![l.menu.nom_field.as_str(), l.menu.prix_field.as_str()], false),
        };
        (def.fields.iter().map(String::as_str).collect(), true)
    }

    /// The fields of `order` the join uses, read in one pass; `None` when the order has a value
    /// whose `$lookup`/`$multiply` semantics the join does not reproduce exactly, or one it
    /// cannot read (the pipeline then reports it).
    fn view<'a>(&self, order: &'a RawDocument) -> Option<OrderView<'a>> {
        let f = &self.config.orders.fields;
        let l = &self.config.lookups;
        let copied = copied_fields(f).map(|(_, name)| name);
        let local = references(l).map(|(_, def)| def.local_field.as_str());
        let names: [&str; VIEWED] =
            ["_id", copied[0], copied[1], copied[2], copied[3], copied[4], local[0], local[1], local[2], &f.items];
        let values = scan(order, &names)?;
        let mut view = OrderView {
            bytes: order.as_bytes(),
            id: values[0],
            copied: [values[1], values[2], values[3], values[4], values[5]],
            references: [values[6], values[7], values[8]],
            items: None,
        };
        if view.references.iter().any(|r| matches!(r, Some(RawBsonRef::Array(_)))) {
            return None;
        }
        let total = copied_fields(f).iter().position(|(name, _)| *name == field::MONTANT_TOTAL);
        if matches!(total.and_then(|i| view.copied[i]), Some(RawBsonRef::Decimal128(_))) {
            return None;
        }
        if let Some(RawBsonRef::Array(list)) = values[9] {
            let mut items = Vec::new();
            for item in list {
                let item = match item.ok()? {
                    RawBsonRef::Document(item) => {
                        let [menu_id, quantite] = scan(item, &[&f.item_menu_id, &f.item_quantite])?;
                        if matches!(menu_id, Some(RawBsonRef::Array(_)))
                            || matches!(quantite, Some(RawBsonRef::Decimal128(_)))
                        {
                            return None;
                        }
                        Item { menu_id, quantite }
                    }
                    // Not a document: neither a menu entry nor a quantity.
                    _ => Item { menu_id: None, quantite: None },
                };
                items.push(item);
            }
            view.items = Some(items);
        }
        Some(view)
    }

    /// Reads the references of `kind` with these keys and values, all missing from the cache.
    async fn fetch(&self, kind: Kind, missing: &[(JoinKey, RawBsonRef<'_>)]) -> Result<Found, Error> {
        let mut found = Found::default();
        if missing.is_empty() {
            return Ok(found);
        }
        let (fields, shaped) = self.fields(kind);
        let mut projection = doc! {};
        for field in &fields {
            projection.insert(*field, 1);
        }
        // Every value read from the server converts.
        let ids: Vec<Bson> = missing.iter().filter_map(|(_, value)| Bson::try_from(*value).ok()).collect();
        let mut cursor = self.collection(kind).find(doc! { "_id": { "$in": ids } }).projection(projection).await?;
        while let Some(reference) = cursor.try_next().await? {
            let Some(key) = get(&reference, "_id").map(join_key) else { continue };
            let entry = if shaped { shape_reference(&reference, &fields) } else { reference };
            found.insert(key, Arc::new(entry));
        }
        Ok(found)
    }

    /// The archive documents of `orders` (as read from the server), or `None` when this batch
    /// needs the pipeline.
    pub async fn enrich(&self, orders: &[RawDocumentBuf]) -> Result<Option<Vec<RawDocumentBuf>>, Error> {
        let Some(views) = orders.iter().map(|o| self.view(o)).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let local = |i: usize| wanted(views.iter().map(|v| v.references[i]));
        let menu_ids = wanted(views.iter().flat_map(|v| v.items.iter().flatten()).map(|it| it.menu_id));
        let wanted = [local(0), local(1), local(2), menu_ids];
        // What the cache has goes straight into this batch's references; the rest is read.
        let mut refs = Refs::default();
        let mut missing: [Vec<(JoinKey, RawBsonRef<'_>)>; 4] = Default::default();
        match &self.cache {
            Some(cache) => {
                let cached = cache.lock();
                let mut hits = 0;
                for ((kind, wanted), missing) in KINDS.into_iter().zip(wanted).zip(&mut missing) {
                    for (key, value) in wanted {
                        let key = (kind, key);
                        match cached.get(&key) {
                            Some(Some(entry)) => {
                                hits += 1;
                                refs.insert(key, entry.clone());
                            }
                            Some(None) => hits += 1,
                            None => missing.push((key.1, value)),
                        }
                    }
                }
                cache.hits.fetch_add(hits, Ordering::Relaxed);
                cache.misses.fetch_add(missing.iter().map(Vec::len).sum::<usize>() as u64, Ordering::Relaxed);
            }
            None => {
                for (wanted, missing) in wanted.into_iter().zip(&mut missing) {
                    missing.extend(wanted);
                }
            }
        }
        let found = futures_util::try_join!(
            self.fetch(KINDS[0], &missing[0]),
            self.fetch(KINDS[1], &missing[1]),
            self.fetch(KINDS[2], &missing[2]),
            self.fetch(KINDS[3], &missing[3]),
        )?;
        let found = [found.0, found.1, found.2, found.3];
        if let Some(cache) = &self.cache {
            let mut cached = cache.lock();
            let added: usize = missing.iter().map(Vec::len).sum();
            if cached.len() + added > cache.capacity {
                cached.clear();
            }
            for ((kind, missing), found) in KINDS.into_iter().zip(&missing).zip(&found) {
                for (key, _) in missing {
                    cached.insert((kind, key.clone()), found.get(key).cloned());
                }
            }
        }
        for (kind, found) in KINDS.into_iter().zip(found) {
            refs.extend(found.into_iter().map(|(key, entry)| ((kind, key), entry)));
        }
        let prix = &self.config.lookups.menu.prix_field;
        let decimal_price = |((kind, _), m): (&(Kind, JoinKey), &Arc<RawDocumentBuf>)| {
            *kind == Kind::Menu && matches!(get(m, prix), Some(RawBsonRef::Decimal128(_)))
        };
        if refs.iter().any(decimal_price) {
            return Ok(None);
        }
        let now = mongodb::bson::DateTime::now();
        Ok(Some(views.iter().map(|v| self.shape(v, &refs, now)).collect()))
    }

    /// One archive document, field for field as the pipeline's `$project` and `$addFields`.
    fn shape(&self, order: &OrderView<'_>, refs: &Refs, now: mongodb::bson::DateTime) -> RawDocumentBuf {
        let menu = &self.config.lookups.menu;
        let found = |kind: Kind, value: Option<RawBsonRef<'_>>| {
            set(value).and_then(|v| refs.get(&(kind, join_key(v)))).map(|entry| entry.as_ref().as_ref())
        };
        let mut items = RawArrayBuf::new();
        let (mut menu_missing, mut qty_invalid) = (false, false);
        let null = RawBsonRef::Null;
        for it in order.items.iter().flatten() {
            let menu_ref = set(it.menu_id);
            let entry = found(Kind::Menu, menu_ref);
            menu_missing |= entry.is_none();
            qty_invalid |= !is_number(it.quantite);
            let price = entry.and_then(|m| get(m, &menu.prix_field));
            let sous_total = match (price, it.quantite) {
                (Some(p), Some(q)) if is_number(Some(p)) && is_number(Some(q)) => multiply(p, q),
                _ => RawBson::Null,
            };
            let mut item = raw_document_with_capacity(ITEM_BYTES);
            item.append_ref(item_field::MENU_ID, menu_ref.unwrap_or(null));
            item.append_ref(item_field::NOM, entry.and_then(|m| get(m, &menu.nom_field)).unwrap_or(null));
            item.append_ref(item_field::PRIX, price.unwrap_or(null));
            item.append_ref(item_field::QUANTITE, it.quantite.unwrap_or(null));
            item.append_ref(item_field::SOUS_TOTAL, sous_total.as_raw_bson_ref());
            items.push(item);
        }
        let kinds = [Kind::Client, Kind::Livreur, Kind::Restaurant];
        let digest = source_digest_of(order.bytes);
        let mut parts = Parts {
            id: order.id.unwrap_or(null),
            copied: order.copied.map(|v| v.unwrap_or(null)),
            references: [0, 1, 2].map(|i| found(kinds[i], order.references[i]).map_or(null, RawBsonRef::Document)),
            items,
            archived_at: now,
            source: self.source,
            anomalies: Vec::new(),
            source_digest: Some(&digest),
        };
        let named = |name: &str| {
            let i = references(&self.config.lookups).iter().position(|(n, _)| *n == name);
            i.is_some_and(|i| set(order.references[i]).is_some())
        };
        parts.anomalies = ANOMALY_CHECKS
            .iter()
            .filter(|(_, check)| match *check {
                Check::NotString(name) => !matches!(parts.get(name), RawBsonRef::String(_)),
                Check::NotDate(name) => !matches!(parts.get(name), RawBsonRef::DateTime(_)),
                Check::SetButNotNumber(name) => {
                    !matches!(parts.get(name), RawBsonRef::Null) && !is_number(Some(parts.get(name)))
                }
                Check::NotFound(name) => matches!(parts.get(name), RawBsonRef::Null),
                Check::NamedButNotFound(name) => matches!(parts.get(name), RawBsonRef::Null) && named(name),
                Check::ItemsNotArray => order.items.is_none(),
                Check::MenuEntryNotFound => menu_missing,
                Check::QuantityNotNumber => qty_invalid,
            })
            .map(|(anomaly, _)| *anomaly)
            .collect();
        parts.into_raw()
    }
}

/// Room for one shaped item (five names and values, a dish name) before its buffer grows.
const ITEM_BYTES: usize = 192;

/// How many fields of an order [`Joiner::view`] reads.
const VIEWED: usize = 10;

/// The fields of an order the join uses, borrowed from its BSON.
struct OrderView<'a> {
    /// The order as stored, for its digest.
    bytes: &'a [u8],
    id: Option<RawBsonRef<'a>>,
    /// The values of [`copied_fields`], in their order.
    copied: [Option<RawBsonRef<'a>>; 5],
    /// The order's own references, in the order of [`references`].
    references: [Option<RawBsonRef<'a>>; 3],
    /// `None` when `items` is missing or not an array.
    items: Option<Vec<Item<'a>>>,
}

/// What the join uses of one entry of `items`.
struct Item<'a> {
    menu_id: Option<RawBsonRef<'a>>,
    quantite: Option<RawBsonRef<'a>>,
}

/// The values of `names` in `document`, in one pass (the first of a repeated name); `None` when
/// an element cannot be read.
fn scan<'a, const N: usize>(document: &'a RawDocument, names: &[&str; N]) -> Option<[Option<RawBsonRef<'a>>; N]> {
    let mut values = [None; N];
    for element in document {
        let (key, value) = element.ok()?;
        for (slot, name) in values.iter_mut().zip(names) {
            if slot.is_none() && *name == key {
                *slot = Some(value);
            }
        }
    }
    Some(values)
}

/// The references named among `values` (missing and null ones left out).
fn wanted<'a>(values: impl Iterator<Item = Option<RawBsonRef<'a>>>) -> Wanted<'a> {
    let mut wanted = Wanted::default();
    for value in values.filter_map(set) {
        wanted.entry(join_key(value)).or_insert(value);
    }
    wanted
}

/// A customer, courier or restaurant as joined: `fields` in their order, null when missing
/// (as the pipeline's `$ifNull`), each once.
fn shape_reference(reference: &RawDocument, fields: &[&str]) -> RawDocumentBuf {
    let mut shaped = RawDocumentBuf::new();
    let mut seen = HashSet::with_capacity(fields.len());
    for field in fields.iter().filter(|f| seen.insert(**f)) {
        shaped.append_ref(*field, get(reference, field).unwrap_or(RawBsonRef::Null));
    }
    shaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiply_keeps_the_servers_result_types() {
        use RawBsonRef::{Double, Int32, Int64};
        assert_eq!(multiply(Int32(3), Int32(4)), RawBson::Int32(12));
        assert_eq!(multiply(Int32(i32::MAX), Int32(2)), RawBson::Int64(2 * i64::from(i32::MAX)));
        assert_eq!(multiply(Int64(3), Int32(4)), RawBson::Int64(12));
        assert_eq!(multiply(Double(12.5), Int32(2)), RawBson::Double(25.0));
    }

    #[test]
    fn numbers_join_by_value_across_types() {
        use RawBsonRef::{Double, Int32, Int64};
        assert_eq!(join_key(Int32(7)), join_key(Int64(7)));
        assert_eq!(join_key(Int32(7)), join_key(Double(7.0)));
        assert_ne!(join_key(Int32(7)), join_key(RawBsonRef::String("7")));
        assert_ne!(join_key(Double(7.5)), join_key(Double(7.0)));
        assert_eq!(join_key(Double(7.5)), join_key(Double(7.5)));
        // As `$lookup` compares them: decimals, doubles past 2^53, negative zero, NaN.
        let decimal = |text: &str| text.parse::<mongodb::bson::Decimal128>().unwrap();
        assert_eq!(join_key(Int32(7)), join_key(RawBsonRef::Decimal128(decimal("7"))));
        assert_eq!(join_key(Int32(7)), join_key(RawBsonRef::Decimal128(decimal("7.000"))));
        assert_eq!(join_key(Int32(-700)), join_key(RawBsonRef::Decimal128(decimal("-7E+2"))));
        assert_eq!(join_key(Double(7.5)), join_key(RawBsonRef::Decimal128(decimal("7.50"))));
        assert_ne!(join_key(Double(0.1)), join_key(RawBsonRef::Decimal128(decimal("0.1"))));
        assert_eq!(join_key(Int64(1 << 60)), join_key(Double((1_i64 << 60) as f64)));
        assert_eq!(join_key(Int64(i64::MIN)), join_key(Double(-TWO_POW_63)));
        assert_eq!(join_key(Double(1e20)), join_key(RawBsonRef::Decimal128(decimal("1E+20"))));
        assert_ne!(join_key(Double(1e20)), join_key(Int64(i64::MAX)));
        assert_eq!(join_key(Double(-0.0)), join_key(Int32(0)));
        assert_eq!(join_key(Double(-0.0)), join_key(RawBsonRef::Decimal128(decimal("-0.00"))));
        assert_eq!(join_key(Double(f64::NAN)), join_key(RawBsonRef::Decimal128(decimal("NaN"))));
        assert_ne!(join_key(RawBsonRef::Decimal128(decimal("7"))), join_key(RawBsonRef::String("7")));
        let one = doc! { "x": 1 };
        let one_long = doc! { "x": 1_i64 };
        let raw = |d: &mongodb::bson::Document| RawDocumentBuf::from_document(d).unwrap();
        let (one, one_long) = (raw(&one), raw(&one_long));
        assert_eq!(join_key(RawBsonRef::Document(&one)), join_key(RawBsonRef::Document(&one_long)));
        let id = mongodb::bson::oid::ObjectId::new();
        assert_eq!(join_key(RawBsonRef::ObjectId(id)), join_key(RawBsonRef::ObjectId(id)));
        assert_ne!(join_key(RawBsonRef::ObjectId(id)), join_key(RawBsonRef::String(&id.to_hex())));
    }
}
