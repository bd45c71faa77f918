//! The enrichment: one aggregation that joins each delivered order with its customer, courier,
//! restaurant and menu items (`$lookup`) and shapes the archive document of the data model,
//! naming in `anomalies` whatever could not be enriched.
//!
//! The same stages serve `watch` (orders selected by `_id`) and `batch` (selected by date, then
//! either streamed to the client or written by `$merge`), so every path produces identical
//! documents. The stages never fail on malformed orders: every type is checked before use.

use mongodb::bson::{doc, Bson, Document};

use crate::config::Config;

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

/// Temporary fields of the pipeline, removed before the document leaves it.
const TMP_CLIENT: &str = "__archiver_client";
const TMP_LIVREUR: &str = "__archiver_livreur";
const TMP_RESTAURANT: &str = "__archiver_restaurant";
const TMP_MENU: &str = "__archiver_menu";
const TMP_MENU_IDS: &str = "__archiver_menu_ids";
const TMP_LIVREUR_REF: &str = "__archiver_livreur_ref";
const TMP_MENU_MISSING: &str = "__archiver_menu_missing";
const TMP_QTY_INVALID: &str = "__archiver_qty_invalid";

fn field(name: &str) -> String {
    format!("${name}")
}

/// `{$in: [{$type: expr}, [numeric types]]}`, portable to servers without `$isNumber`.
fn is_number(expr: impl Into<Bson>) -> Document {
    doc! { "$in": [{ "$type": expr.into() }, ["double", "int", "long", "decimal"]] }
}

fn type_is(expr: impl Into<Bson>, bson_type: &str) -> Document {
    doc! { "$eq": [{ "$type": expr.into() }, bson_type] }
}

/// `expr`, or `null` when missing: archive documents always have every field.
fn or_null(expr: impl Into<Bson>) -> Document {
    doc! { "$ifNull": [expr.into(), Bson::Null] }
}

/// The first joined document shaped into `{field: value|null, …}`, or `null` if none matched.
fn joined_subdocument(tmp: &str, fields: &[String]) -> Document {
    let mut shape = Document::new();
    for f in fields {
        shape.insert(f.clone(), or_null(format!("$$ref.{f}")));
    }
    doc! {
        "$let": {
            "vars": { "ref": { "$arrayElemAt": [field(tmp), 0] } },
            "in": { "$cond": [type_is("$$ref", "object"), shape, Bson::Null] },
        }
    }
}

fn lookup_stage(from: &str, local_field: &str, tmp: &str) -> Document {
    doc! { "$lookup": { "from": from, "localField": local_field, "foreignField": "_id", "as": tmp } }
}

/// The stages that turn orders into archive documents. They expect orders on input, in any
/// number, and emit one archive document per order, keeping `_id`.
pub fn enrichment_stages(config: &Config, source: ArchiveSource) -> Vec<Document> {
    let f = &config.orders.fields;
    let l = &config.lookups;
    let items = field(&f.items);
    let menu_ref = format!("$$it.{}", f.item_menu_id);
    let qty = format!("$$it.{}", f.item_quantite);
    let price = format!("$$menu.{}", l.menu.prix_field);
    let items_array = doc! { "$cond": [{ "$isArray": &items }, &items, []] };
    let items_array_for_ids = items_array.clone();

    let item_shape = doc! {
        "$let": {
            "vars": { "menu": { "$arrayElemAt": [
                { "$filter": {
                    "input": field(TMP_MENU),
                    "as": "m",
                    "cond": { "$eq": ["$$m._id", &menu_ref] },
                } },
                0,
            ] } },
            "in": {
                "menu_id": or_null(&menu_ref),
                "nom": or_null(format!("$$menu.{}", l.menu.nom_field)),
                "prix": or_null(&price),
                "quantite": or_null(&qty),
                "sous_total": { "$cond": [
                    { "$and": [is_number(&price), is_number(&qty)] },
                    { "$multiply": [&price, &qty] },
                    Bson::Null,
                ] },
            },
        }
    };

    let shape = doc! {
        "$project": {
            "_id": 1,
            "numero_commande": or_null(field(&f.numero_commande)),
            "status": or_null(field(&f.status)),
            "date_commande": or_null(field(&f.date_commande)),
            "date_livraison": or_null(field(&f.date_livraison)),
            "montant_total": or_null(field(&f.montant_total)),
            "client": joined_subdocument(TMP_CLIENT, &l.client.fields),
            "livreur": joined_subdocument(TMP_LIVREUR, &l.livreur.fields),
            "restaurant": joined_subdocument(TMP_RESTAURANT, &l.restaurant.fields),
            "items": { "$map": { "input": items_array.clone(), "as": "it", "in": item_shape } },
            "archived_at": "$$NOW",
            "archive_source": { "$literal": source.as_str() },
            TMP_LIVREUR_REF: { "$ifNull": [field(&l.livreur.local_field), Bson::Null] },
            TMP_MENU_MISSING: { "$anyElementTrue": [{ "$map": {
                "input": items_array.clone(),
                "as": "it",
                "in": { "$not": [{ "$in": [&menu_ref, { "$map": {
                    "input": field(TMP_MENU), "as": "m", "in": "$$m._id",
                } }] }] },
            } }] },
            TMP_QTY_INVALID: { "$anyElementTrue": [{ "$map": {
                "input": items_array,
                "as": "it",
                "in": { "$not": [is_number(&qty)] },
            } }] },
            "__archiver_items_ok": { "$isArray": &items },
        }
    };

    let flag = |cond: Document, name: &str| -> Bson { Bson::Document(doc! { "$cond": [cond, [name], []] }) };
    let anomalies = doc! {
        "$addFields": {
            "anomalies": { "$concatArrays": [
                flag(doc! { "$ne": [{ "$type": "$numero_commande" }, "string"] }, anomaly::NUMERO_COMMANDE_INVALIDE),
                flag(doc! { "$ne": [{ "$type": "$date_commande" }, "date"] }, anomaly::DATE_COMMANDE_INVALIDE),
                flag(doc! { "$and": [
                    { "$ne": ["$montant_total", Bson::Null] },
                    { "$not": [is_number("$montant_total")] },
                ] }, anomaly::MONTANT_TOTAL_INVALIDE),
                flag(doc! { "$eq": ["$client", Bson::Null] }, anomaly::CLIENT_INTROUVABLE),
                flag(doc! { "$and": [
                    { "$eq": ["$livreur", Bson::Null] },
                    { "$ne": [field(TMP_LIVREUR_REF), Bson::Null] },
                ] }, anomaly::LIVREUR_INTROUVABLE),
                flag(doc! { "$eq": ["$restaurant", Bson::Null] }, anomaly::RESTAURANT_INTROUVABLE),
                flag(doc! { "$not": ["$__archiver_items_ok"] }, anomaly::ITEMS_INVALIDES),
                flag(doc! { "$eq": [field(TMP_MENU_MISSING), true] }, anomaly::MENU_INTROUVABLE),
                flag(doc! { "$eq": [field(TMP_QTY_INVALID), true] }, anomaly::QUANTITE_INVALIDE),
            ] }
        }
    };
    let cleanup = doc! { "$project": {
        TMP_LIVREUR_REF: 0, TMP_MENU_MISSING: 0, TMP_QTY_INVALID: 0, "__archiver_items_ok": 0,
    } };

    // The menu ids are gathered with `$map` rather than the path `items.menu_id`: the path form
    // is not resolved through arrays by every MongoDB-compatible server.
    let menu_ids = doc! { "$addFields": { TMP_MENU_IDS: { "$map": {
        "input": items_array_for_ids, "as": "it", "in": &menu_ref,
    } } } };

    vec![
        lookup_stage(&l.client.collection, &l.client.local_field, TMP_CLIENT),
        lookup_stage(&l.livreur.collection, &l.livreur.local_field, TMP_LIVREUR),
        lookup_stage(&l.restaurant.collection, &l.restaurant.local_field, TMP_RESTAURANT),
        menu_ids,
        lookup_stage(&l.menu.collection, TMP_MENU_IDS, TMP_MENU),
        shape,
        anomalies,
        cleanup,
    ]
}

/// The archive document for an order that vanished before it could be enriched: never drop a
/// delivered order silently, even when all that is left of it is its id.
pub fn vanished_order_document(id: Bson, delivered_status: &str, source: ArchiveSource) -> Document {
    doc! {
        "_id": id,
        "numero_commande": Bson::Null,
        "status": delivered_status,
        "date_commande": Bson::Null,
        "date_livraison": Bson::Null,
        "montant_total": Bson::Null,
        "client": Bson::Null,
        "livreur": Bson::Null,
        "restaurant": Bson::Null,
        "items": [],
        "archived_at": mongodb::bson::DateTime::now(),
        "archive_source": source.as_str(),
        "anomalies": [anomaly::COMMANDE_INTROUVABLE],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_use_configured_names() {
        let mut config = Config::default();
        config.lookups.client.collection = "Customers".into();
        config.orders.fields.items = "lignes".into();
        config.orders.fields.item_menu_id = "plat".into();
        let stages = enrichment_stages(&config, ArchiveSource::Batch);
        let text = format!("{stages:?}");
        assert!(text.contains("\"Customers\""));
        assert!(text.contains("\"$$it.plat\""));
        assert!(text.contains("\"batch\""));
        assert!(!text.contains("\"items.menu_id\""));
    }

    #[test]
    fn archive_fields_are_those_of_the_data_model() {
        let stages = enrichment_stages(&Config::default(), ArchiveSource::Watch);
        let shape = stages[5].get_document("$project").unwrap();
        let public: Vec<&str> = shape.keys().map(String::as_str).filter(|k| !k.starts_with("__")).collect();
        assert_eq!(
            public,
            [
                "_id",
                "numero_commande",
                "status",
                "date_commande",
                "date_livraison",
                "montant_total",
                "client",
                "livreur",
                "restaurant",
                "items",
                "archived_at",
                "archive_source"
            ]
        );
    }

    #[test]
    fn vanished_order_is_flagged() {
        let d = vanished_order_document(Bson::Int32(7), "livrée", ArchiveSource::Watch);
        assert_eq!(d.get_array("anomalies").unwrap(), &vec![Bson::from("commande_introuvable")]);
        assert_eq!(d.get_str("archive_source").unwrap(), "watch");
    }
}
