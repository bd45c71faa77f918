//! The archive document: its fields, the anomalies it may name, the source it records, and the
//! shape of an order that vanished before it could be enriched. Defined once here; the two
//! enrichers ([`super::lookup`], [`super::join`]) build it from these definitions.

use mongodb::bson::{Bson, Document, RawArrayBuf, RawBson, RawBsonRef, RawDocumentBuf};

use crate::config::{LookupDef, Lookups, OrderFields};

/// Which command archived a document (`archive_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveSource {
    /// `archiver watch`.
    Watch,
    /// `archiver batch` (and gap-fills).
    Batch,
}

impl ArchiveSource {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveSource::Watch => "watch",
            ArchiveSource::Batch => "batch",
        }
    }
}

/// Anomaly names written into `anomalies`.
pub mod anomaly {
    /// No customer with the order's `client_id`.
    pub const CLIENT_INTROUVABLE: &str = "client_introuvable";
    /// A courier id is set but no such courier exists.
    pub const LIVREUR_INTROUVABLE: &str = "livreur_introuvable";
    /// No restaurant with the order's `restaurant_id`.
    pub const RESTAURANT_INTROUVABLE: &str = "restaurant_introuvable";
    /// At least one item's menu entry does not exist.
    pub const MENU_INTROUVABLE: &str = "menu_introuvable";
    /// `numero_commande` missing or not a string.
    pub const NUMERO_COMMANDE_INVALIDE: &str = "numero_commande_invalide";
    /// `items` missing or not an array.
    pub const ITEMS_INVALIDES: &str = "items_invalides";
    /// An item's quantity is missing or not a number.
    pub const QUANTITE_INVALIDE: &str = "quantite_invalide";
    /// `date_commande` missing or not a date.
    pub const DATE_COMMANDE_INVALIDE: &str = "date_commande_invalide";
    /// `montant_total` present but not a number.
    pub const MONTANT_TOTAL_INVALIDE: &str = "montant_total_invalide";
    /// The order was deleted before it could be enriched; only its id is known.
    pub const COMMANDE_INTROUVABLE: &str = "commande_introuvable";
}

/// The archive document's fields, by their stored names.
pub mod field {
    /// The order's `_id`, unchanged: what makes every write idempotent.
    pub const ID: &str = "_id";
    /// Copied from the order.
    pub const NUMERO_COMMANDE: &str = "numero_commande";
    /// Copied from the order.
    pub const STATUS: &str = "status";
    /// Copied from the order.
    pub const DATE_COMMANDE: &str = "date_commande";
    /// Copied from the order.
    pub const DATE_LIVRAISON: &str = "date_livraison";
    /// Copied from the order.
    pub const MONTANT_TOTAL: &str = "montant_total";
    /// The customer, or null when not found.
    pub const CLIENT: &str = "client";
    /// The courier, or null when not set or not found.
    pub const LIVREUR: &str = "livreur";
    /// The restaurant, or null when not found.
    pub const RESTAURANT: &str = "restaurant";
    /// The items, each with its menu entry.
    pub const ITEMS: &str = "items";
    /// When the document was written.
    pub const ARCHIVED_AT: &str = "archived_at";
    /// Which command wrote it ([`super::ArchiveSource`]).
    pub const ARCHIVE_SOURCE: &str = "archive_source";
    /// What could not be enriched ([`super::anomaly`]).
    pub const ANOMALIES: &str = "anomalies";
    /// A digest of the order as archived ([`super::source_digest`]): what `purge` checks the
    /// order against before it deletes it.
    pub const SOURCE_DIGEST: &str = "source_digest";
    /// Set by `purge` when it deletes the order from the source: the archive copy is then the
    /// only one, and not an orphan. Not part of a document as written ([`ALL`]).
    pub const PURGED_AT: &str = "purged_at";
    /// Every field, in stored order.
    pub const ALL: [&str; 14] = [
        ID,
        NUMERO_COMMANDE,
        STATUS,
        DATE_COMMANDE,
        DATE_LIVRAISON,
        MONTANT_TOTAL,
        CLIENT,
        LIVREUR,
        RESTAURANT,
        ITEMS,
        ARCHIVED_AT,
        ARCHIVE_SOURCE,
        ANOMALIES,
        SOURCE_DIGEST,
    ];
}

/// The fields of one entry of `items`, by their stored names.
pub mod item_field {
    /// The item's menu reference, as in the order.
    pub const MENU_ID: &str = "menu_id";
    /// The menu entry's name.
    pub const NOM: &str = "nom";
    /// The menu entry's price.
    pub const PRIX: &str = "prix";
    /// The quantity, as in the order.
    pub const QUANTITE: &str = "quantite";
    /// `prix × quantite` when both are numbers, else null.
    pub const SOUS_TOTAL: &str = "sous_total";
}

/// The fields copied from the order, in stored order.
const COPIED: [&str; 5] =
    [field::NUMERO_COMMANDE, field::STATUS, field::DATE_COMMANDE, field::DATE_LIVRAISON, field::MONTANT_TOTAL];

/// The joined references, in stored order.
const JOINED: [&str; 3] = [field::CLIENT, field::LIVREUR, field::RESTAURANT];

/// The order fields copied as they are, in stored order: (archive field, the order's field).
pub fn copied_fields(f: &OrderFields) -> [(&'static str, &str); 5] {
    let sources = [&f.numero_commande, &f.status, &f.date_commande, &f.date_livraison, &f.montant_total];
    [0, 1, 2, 3, 4].map(|i| (COPIED[i], sources[i].as_str()))
}

/// The joined references, in stored order: (archive field, how it is found).
pub fn references(l: &Lookups) -> [(&'static str, &LookupDef); 3] {
    let defs = [&l.client, &l.livreur, &l.restaurant];
    [0, 1, 2].map(|i| (JOINED[i], defs[i]))
}

/// What an anomaly checks; each enricher evaluates it its own way (an expression on the server,
/// a test in the client), on the fields of the archive document being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The field is not a string.
    NotString(&'static str),
    /// The field is not a date.
    NotDate(&'static str),
    /// The field is set (not null) but not a number.
    SetButNotNumber(&'static str),
    /// The reference was not found.
    NotFound(&'static str),
    /// The reference was not found although the order names one (an unassigned courier is not
    /// an anomaly).
    NamedButNotFound(&'static str),
    /// The order's items are not an array.
    ItemsNotArray,
    /// An item's menu entry was not found.
    MenuEntryNotFound,
    /// An item's quantity is not a number.
    QuantityNotNumber,
}

/// The anomalies and their checks, in the order they are listed in `anomalies`.
pub const ANOMALY_CHECKS: [(&str, Check); 9] = [
    (anomaly::NUMERO_COMMANDE_INVALIDE, Check::NotString(field::NUMERO_COMMANDE)),
    (anomaly::DATE_COMMANDE_INVALIDE, Check::NotDate(field::DATE_COMMANDE)),
    (anomaly::MONTANT_TOTAL_INVALIDE, Check::SetButNotNumber(field::MONTANT_TOTAL)),
    (anomaly::CLIENT_INTROUVABLE, Check::NotFound(field::CLIENT)),
    (anomaly::LIVREUR_INTROUVABLE, Check::NamedButNotFound(field::LIVREUR)),
    (anomaly::RESTAURANT_INTROUVABLE, Check::NotFound(field::RESTAURANT)),
    (anomaly::ITEMS_INVALIDES, Check::ItemsNotArray),
    (anomaly::MENU_INTROUVABLE, Check::MenuEntryNotFound),
    (anomaly::QUANTITE_INVALIDE, Check::QuantityNotNumber),
];

/// The values of one archive document, put in stored order by [`Parts::into_raw`]: what the
/// client-side join and the vanished-order shape build (the server pipeline builds the same
/// fields from [`copied_fields`], [`references`] and [`ANOMALY_CHECKS`]). Values are borrowed
/// from the order and the references as read: the document is written straight into BSON.
#[derive(Debug, Clone)]
pub struct Parts<'a> {
    /// The order's `_id`.
    pub id: RawBsonRef<'a>,
    /// The values of [`copied_fields`], in their order (null when missing).
    pub copied: [RawBsonRef<'a>; 5],
    /// The values of [`references`], in their order (null when not found).
    pub references: [RawBsonRef<'a>; 3],
    /// The shaped items.
    pub items: RawArrayBuf,
    /// When the document is written.
    pub archived_at: mongodb::bson::DateTime,
    /// Which command writes it.
    pub source: ArchiveSource,
    /// The names of the anomalies found.
    pub anomalies: Vec<&'static str>,
    /// [`source_digest`] of the order (`None` for a vanished order: null).
    pub source_digest: Option<&'a str>,
}

impl<'a> Parts<'a> {
    /// The value of a copied or referenced field, by its archive name (null for any other).
    pub fn get(&self, name: &str) -> RawBsonRef<'a> {
        if let Some(i) = COPIED.iter().position(|n| *n == name) {
            return self.copied[i];
        }
        match JOINED.iter().position(|n| *n == name) {
            Some(i) => self.references[i],
            None => RawBsonRef::Null,
        }
    }

    /// The archive document, as BSON.
    pub fn into_raw(self) -> RawDocumentBuf {
        // Sized once for what is known to go in, and the names and small values on top: the
        // buffer would otherwise be copied several times as it grows.
        let references: usize =
            self.references.iter().map(|r| if let RawBsonRef::Document(d) = r { d.as_bytes().len() } else { 0 }).sum();
        let mut document = raw_document_with_capacity(512 + references + self.items.as_bytes().len());
        document.append_ref(field::ID, self.id);
        for (name, value) in COPIED.into_iter().zip(self.copied) {
            document.append_ref(name, value);
        }
        for (name, value) in JOINED.into_iter().zip(self.references) {
            document.append_ref(name, value);
        }
        document.append_ref(field::ITEMS, &self.items);
        document.append_ref(field::ARCHIVED_AT, RawBsonRef::DateTime(self.archived_at));
        document.append_ref(field::ARCHIVE_SOURCE, self.source.as_str());
        let mut anomalies = RawArrayBuf::new();
        for name in self.anomalies {
            anomalies.push(name);
        }
        document.append_ref(field::ANOMALIES, &anomalies);
        document.append_ref(field::SOURCE_DIGEST, self.source_digest.map_or(RawBsonRef::Null, RawBsonRef::String));
        document
    }
}

/// An empty BSON document whose buffer holds `capacity` bytes before it grows.
pub fn raw_document_with_capacity(capacity: usize) -> RawDocumentBuf {
    let mut bytes = Vec::with_capacity(capacity.max(5));
    // The empty document: its length (5, little-endian) and the terminating zero.
    bytes.extend_from_slice(&[5, 0, 0, 0, 0]);
    RawDocumentBuf::from_bytes(bytes).unwrap_or_default()
}

/// The archive document for an order that vanished before it could be enriched: never drop a
/// delivered order silently, even when all that is left of it is its id.
pub fn vanished_order_document(id: &Bson, delivered_status: &str, source: ArchiveSource) -> RawDocumentBuf {
    // Every `_id` read from the server converts; anything else is archived under a null id
    // and refused by the archive, which dead-letters it.
    let id = RawBson::try_from(id.clone()).unwrap_or(RawBson::Null);
    let null = RawBsonRef::Null;
    Parts {
        id: id.as_raw_bson_ref(),
        copied: [null, RawBsonRef::String(delivered_status), null, null, null],
        references: [null; 3],
        items: RawArrayBuf::new(),
        archived_at: mongodb::bson::DateTime::now(),
        source,
        anomalies: vec![anomaly::COMMANDE_INTROUVABLE],
        source_digest: None,
    }
    .into_raw()
}

/// A digest of an order as stored: SHA-256 of its BSON bytes (field order and types included),
/// as `sha256:<hex>`. Stored in the archive document when it is written, it lets `purge` tell
/// an order unchanged since it was archived from one edited since, without storing the order
/// twice.
pub fn source_digest(order: &Document) -> String {
    // Serializing a document read from the server gives back its stored bytes; a document that
    // cannot be serialized (never the case for one read from the server) gets a digest that
    // matches nothing.
    source_digest_of(&mongodb::bson::to_vec(order).unwrap_or_default())
}

/// [`source_digest`] of an order's BSON bytes, as read from the server.
pub fn source_digest_of(order: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hash = Sha256::digest(order);
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for byte in hash {
        text.push(char::from(HEX[usize::from(byte >> 4)]));
        text.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_presized_document_is_an_empty_document() {
        let mut d = raw_document_with_capacity(1000);
        assert_eq!(d.as_bytes(), RawDocumentBuf::new().as_bytes());
        d.append("a", 1);
        assert_eq!(d.to_document().unwrap(), mongodb::bson::doc! { "a": 1 });
    }

    #[test]
    fn the_stored_order_is_the_declared_one() {
        let d = vanished_order_document(&Bson::Int32(7), "livrée", ArchiveSource::Batch).to_document().unwrap();
        assert_eq!(d.keys().map(String::as_str).collect::<Vec<_>>(), field::ALL);
        let f = OrderFields::default();
        let copied: Vec<&str> = copied_fields(&f).iter().map(|(name, _)| *name).collect();
        assert_eq!(copied, field::ALL[1..6]);
        let l = Lookups::default();
        let joined: Vec<&str> = references(&l).iter().map(|(name, _)| *name).collect();
        assert_eq!(joined, field::ALL[6..9]);
    }

    #[test]
    fn the_digest_follows_every_byte_of_the_order() {
        let order = mongodb::bson::doc! { "_id": 1, "status": "livrée", "montant_total": 12.5 };
        let digest = source_digest(&order);
        assert!(digest.starts_with("sha256:") && digest.len() == 7 + 64, "{digest}");
        assert_eq!(digest, source_digest(&order.clone()));
        let edited = mongodb::bson::doc! { "_id": 1, "status": "livrée", "montant_total": 12.6 };
        assert_ne!(digest, source_digest(&edited));
        // The same value under another type is another order as stored.
        let retyped = mongodb::bson::doc! { "_id": 1_i64, "status": "livrée", "montant_total": 12.5 };
        assert_ne!(digest, source_digest(&retyped));
        // The digest of the bytes as read is the digest of the document they parse into, and
        // the one of SHA-256 written in hex.
        let bytes = mongodb::bson::to_vec(&order).unwrap();
        assert_eq!(source_digest_of(&bytes), digest);
        assert_eq!(
            source_digest_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "SHA-256 of nothing"
        );
    }

    #[test]
    fn vanished_order_is_flagged() {
        let d = vanished_order_document(&Bson::Int32(7), "livrée", ArchiveSource::Watch).to_document().unwrap();
        assert_eq!(d.get_i32("_id").unwrap(), 7);
        assert_eq!(d.get("source_digest"), Some(&Bson::Null));
        assert_eq!(d.get_array("anomalies").unwrap(), &vec![Bson::from("commande_introuvable")]);
        assert_eq!(d.get_str("archive_source").unwrap(), "watch");
    }
}
