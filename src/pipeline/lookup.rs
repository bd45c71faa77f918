//! The enrichment on the server: one aggregation that joins each delivered order with its
//! customer, courier, restaurant and menu items (`$lookup`) and shapes the archive document
//! ([`super::document`]), naming in `anomalies` whatever could not be enriched.
//!
//! The same stages serve `watch` (orders selected by `_id`) and `batch` (selected by date, then
//! either streamed to the client or written by `$merge`), so every path produces identical
//! documents. The stages never fail on malformed orders: every type is checked before use.

use mongodb::bson::{doc, Bson, Document};

use super::document::{self, copied_fields, item_field, references, ArchiveSource, Check, ANOMALY_CHECKS};
use crate::config::Config;

/// Temporary fields of the pipeline, removed before the document leaves it.
const TMP_MENU: &str = "__archiver_menu";
const TMP_MENU_IDS: &str = "__archiver_menu_ids";
const TMP_MENU_MISSING: &str = "__archiver_menu_missing";
const TMP_QTY_INVALID: &str = "__archiver_qty_invalid";
const TMP_ITEMS_OK: &str = "__archiver_items_ok";

/// The order as stored, passed through the stages so that the client can compute its
/// [`document::source_digest`] (no server operator computes a digest, on every supported
/// version). [`finish`] replaces it; a pipeline that writes on the server drops it.
pub const ORDER_AS_STORED: &str = "__archiver_order";

/// Completes a document of the stages on the client: the order as stored becomes its digest.
pub fn finish(document: &mut Document) {
    let digest = match document.remove(ORDER_AS_STORED) {
        Some(Bson::Document(order)) => Bson::String(document::source_digest(&order)),
        _ => Bson::Null,
    };
    document.insert(document::field::SOURCE_DIGEST, digest);
}

/// Where the references of archive field `name` are joined.
fn joined_into(name: &str) -> String {
    format!("__archiver_{name}")
}

/// The order's own reference for archive field `name` (set or not).
fn named_ref(name: &str) -> String {
    format!("__archiver_{name}_ref")
}

/// The condition of `check` on the document being shaped, as an expression.
fn check_expr(check: Check) -> Document {
    match check {
        Check::NotString(f) => doc! { "$ne": [{ "$type": field(f) }, "string"] },
        Check::NotDate(f) => doc! { "$ne": [{ "$type": field(f) }, "date"] },
        Check::SetButNotNumber(f) => {
            doc! { "$and": [{ "$ne": [field(f), Bson::Null] }, { "$not": [is_number(field(f))] }] }
        }
        Check::NotFound(f) => doc! { "$eq": [field(f), Bson::Null] },
        Check::NamedButNotFound(f) => {
            doc! { "$and": [{ "$eq": [field(f), Bson::Null] }, { "$ne": [field(&named_ref(f)), Bson::Null] }] }
        }
        Check::ItemsNotArray => doc! { "$not": [field(TMP_ITEMS_OK)] },
        Check::MenuEntryNotFound => doc! { "$eq": [field(TMP_MENU_MISSING), true] },
        Check::QuantityNotNumber => doc! { "$eq": [field(TMP_QTY_INVALID), true] },
    }
}

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
                item_field::MENU_ID: or_null(&menu_ref),
                item_field::NOM: or_null(format!("$$menu.{}", l.menu.nom_field)),
                item_field::PRIX: or_null(&price),
                item_field::QUANTITE: or_null(&qty),
                item_field::SOUS_TOTAL: { "$cond": [
                    { "$and": [is_number(&price), is_number(&qty)] },
                    { "$multiply": [&price, &qty] },
                    Bson::Null,
                ] },
            },
        }
    };

    let mut shape = doc! { document::field::ID: 1 };
    for (name, order_field) in copied_fields(f) {
        shape.insert(name, or_null(field(order_field)));
    }
    for (name, def) in references(l) {
        shape.insert(name, joined_subdocument(&joined_into(name), &def.fields));
    }
    shape.insert(
        document::field::ITEMS,
        doc! { "$map": { "input": items_array.clone(), "as": "it", "in": item_shape } },
    );
    shape.insert(document::field::ARCHIVED_AT, "$$NOW");
    shape.insert(document::field::ARCHIVE_SOURCE, doc! { "$literal": source.as_str() });
    shape.insert(ORDER_AS_STORED, 1);
    // What the anomaly checks read besides the document's own fields.
    let mut temporary = vec![TMP_MENU_MISSING.to_owned(), TMP_QTY_INVALID.to_owned(), TMP_ITEMS_OK.to_owned()];
    for (name, def) in references(l) {
        if ANOMALY_CHECKS.iter().any(|(_, check)| *check == Check::NamedButNotFound(name)) {
            shape.insert(named_ref(name), doc! { "$ifNull": [field(&def.local_field), Bson::Null] });
            temporary.push(named_ref(name));
        }
    }
    shape.insert(
        TMP_MENU_MISSING,
        doc! { "$anyElementTrue": [{ "$map": {
            "input": items_array.clone(),
            "as": "it",
            "in": { "$not": [{ "$in": [&menu_ref, { "$map": {
                "input": field(TMP_MENU), "as": "m", "in": "$$m._id",
            } }] }] },
        } }] },
    );
    shape.insert(
        TMP_QTY_INVALID,
        doc! { "$anyElementTrue": [{ "$map": {
            "input": items_array,
            "as": "it",
            "in": { "$not": [is_number(&qty)] },
        } }] },
    );
    shape.insert(TMP_ITEMS_OK, doc! { "$isArray": &items });
    let shape = doc! { "$project": shape };

    let anomalies: Vec<Bson> = ANOMALY_CHECKS
        .iter()
        .map(|(name, check)| Bson::Document(doc! { "$cond": [check_expr(*check), [*name], []] }))
        .collect();
    let anomalies = doc! { "$addFields": { document::field::ANOMALIES: { "$concatArrays": anomalies } } };
    let cleanup: Document = temporary.into_iter().map(|t| (t, Bson::Int32(0))).collect();
    let cleanup = doc! { "$project": cleanup };

    // The menu ids are gathered with `$map` rather than the path `items.menu_id`: the path form
    // is not resolved through arrays by every MongoDB-compatible server.
    let menu_ids = doc! { "$addFields": { TMP_MENU_IDS: { "$map": {
        "input": items_array_for_ids, "as": "it", "in": &menu_ref,
    } } } };

    // The order as stored, before any stage adds to it.
    let mut stages = vec![doc! { "$addFields": { ORDER_AS_STORED: "$$ROOT" } }];
    stages.extend(
        references(l).iter().map(|(name, def)| lookup_stage(&def.collection, &def.local_field, &joined_into(name))),
    );
    stages.extend([menu_ids, lookup_stage(&l.menu.collection, TMP_MENU_IDS, TMP_MENU), shape, anomalies, cleanup]);
    stages
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
        let shape = stages[6].get_document("$project").unwrap();
        let public: Vec<&str> = shape.keys().map(String::as_str).filter(|k| !k.starts_with("__")).collect();
        // The single definition, in its order; the anomalies are added by the next stage and
        // the digest by the client.
        let defined = &document::field::ALL;
        assert_eq!(public, defined[..defined.len() - 2]);
        assert_eq!(defined[defined.len() - 2..], [document::field::ANOMALIES, document::field::SOURCE_DIGEST]);
    }
}
