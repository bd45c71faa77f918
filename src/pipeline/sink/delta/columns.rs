//! The table's columns of archive documents, built straight from their BSON values: one row per
//! document. A value that does not fit its column's type is null there; the `document` column
//! keeps the whole document as canonical Extended JSON, so that nothing is lost.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::NaiveDate;
use deltalake::arrow::array::{
    ArrayBuilder, ArrayRef, Date32Builder, Float64Builder, Int64Builder, ListArray, RecordBatch, StringBuilder,
    StructArray, TimestampMicrosecondBuilder,
};
use deltalake::arrow::buffer::{NullBuffer, OffsetBuffer};
use deltalake::arrow::datatypes::{DataType, FieldRef, SchemaRef};
use mongodb::bson::{Bson, RawBsonRef, RawDocument};

use super::date32;
use crate::pipeline::document::{field, item_field};

/// The columns of the rows added so far, in the table's schema.
pub(super) struct Columns {
    schema: SchemaRef,
    reference_fields: [Vec<String>; 3],
    id: StringBuilder,
    numero_commande: StringBuilder,
    status: StringBuilder,
    date_commande: TimestampMicrosecondBuilder,
    date_livraison: TimestampMicrosecondBuilder,
    montant_total: Float64Builder,
    references: [Reference; 3],
    items: Items,
    archived_at: TimestampMicrosecondBuilder,
    archive_source: StringBuilder,
    anomalies: Strings,
    source_digest: StringBuilder,
    purged_at: TimestampMicrosecondBuilder,
    document: StringBuilder,
    delivery_date: Date32Builder,
    rows: usize,
    /// The Extended JSON of the document being added.
    text: Vec<u8>,
}

/// A reference (customer, courier, restaurant): a struct of its copied fields, as text.
#[derive(Default)]
struct Reference {
    fields: Vec<StringBuilder>,
    valid: Vec<bool>,
}

/// The ordered items: a list of structs.
#[derive(Default)]
struct Items {
    offsets: Vec<i32>,
    menu_id: StringBuilder,
    nom: StringBuilder,
    prix: Float64Builder,
    quantite: Int64Builder,
    sous_total: Float64Builder,
    valid: Vec<bool>,
}

/// A list of strings.
#[derive(Default)]
struct Strings {
    offsets: Vec<i32>,
    values: StringBuilder,
}

fn timestamps() -> TimestampMicrosecondBuilder {
    TimestampMicrosecondBuilder::new().with_timezone("UTC")
}

impl Columns {
    /// No rows yet, for `schema` (the table's, of these reference fields).
    pub(super) fn new(schema: SchemaRef, reference_fields: [Vec<String>; 3]) -> Columns {
        let references = reference_fields.clone().map(|fields| Reference {
            fields: fields.iter().map(|_| StringBuilder::new()).collect(),
            valid: Vec::new(),
        });
        Columns {
            schema,
            reference_fields,
            id: StringBuilder::new(),
            numero_commande: StringBuilder::new(),
            status: StringBuilder::new(),
            date_commande: timestamps(),
            date_livraison: timestamps(),
            montant_total: Float64Builder::new(),
            references,
            items: Items { offsets: vec![0], ..Items::default() },
            archived_at: timestamps(),
            archive_source: StringBuilder::new(),
            anomalies: Strings { offsets: vec![0], ..Strings::default() },
            source_digest: StringBuilder::new(),
            purged_at: timestamps(),
            document: StringBuilder::new(),
            delivery_date: Date32Builder::new(),
            rows: 0,
            text: Vec::new(),
        }
    }

    /// Whether no row was added.
    pub(super) fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Adds the row of `document`: its order id as text, its delivery day, and whether it has
    /// anomalies. Its fields are found in one pass over it.
    pub(super) fn push(&mut self, document: &RawDocument) -> Result<Row, String> {
        let found = find(document, &TOP);
        let get = |key: &str| TOP.iter().position(|k| *k == key).and_then(|i| found[i]);
        let text = |key: &str| match get(key) {
            Some(RawBsonRef::String(s)) => Some(s),
            _ => None,
        };
        let time = |key: &str| match get(key) {
            Some(RawBsonRef::DateTime(t)) => Some(t.timestamp_millis().saturating_mul(1000)),
            _ => None,
        };
        let row = Row {
            id: id_text(get(field::ID))?,
            day: delivery_day(get(field::DATE_LIVRAISON), get(field::ARCHIVED_AT)),
            anomalies: matches!(get(field::ANOMALIES), Some(RawBsonRef::Array(a)) if !a.is_empty()),
        };
        self.id.append_value(&row.id);
        self.numero_commande.append_option(text(field::NUMERO_COMMANDE));
        self.status.append_option(text(field::STATUS));
        self.date_commande.append_option(time(field::DATE_COMMANDE));
        self.date_livraison.append_option(time(field::DATE_LIVRAISON));
        self.montant_total.append_option(get(field::MONTANT_TOTAL).and_then(as_double));
        for ((reference, names), key) in self.references.iter_mut().zip(&self.reference_fields).zip([
            field::CLIENT,
            field::LIVREUR,
            field::RESTAURANT,
        ]) {
            match get(key) {
                Some(RawBsonRef::Document(found)) => {
                    let mut values = vec![None; names.len()];
                    find_into(found, names, &mut values);
                    for (builder, value) in reference.fields.iter_mut().zip(values) {
                        builder.append_option(value.and_then(as_text));
                    }
                    reference.valid.push(true);
                }
                _ => {
                    reference.fields.iter_mut().for_each(StringBuilder::append_null);
                    reference.valid.push(false);
                }
            }
        }
        self.items.push(get(field::ITEMS));
        self.archived_at.append_option(time(field::ARCHIVED_AT));
        self.archive_source.append_option(text(field::ARCHIVE_SOURCE));
        if let Some(RawBsonRef::Array(names)) = get(field::ANOMALIES) {
            for name in names.into_iter().flatten() {
                if let RawBsonRef::String(name) = name {
                    self.anomalies.values.append_value(name);
                }
            }
        }
        self.anomalies.offsets.push(self.anomalies.values.len() as i32);
        self.source_digest.append_option(text(field::SOURCE_DIGEST));
        self.purged_at.append_option(time(field::PURGED_AT));
        self.text.clear();
        extjson(&mut self.text, RawBsonRef::Document(document), Mode::Canonical)
            .map_err(|e| format!("{}: {e}", row.id))?;
        self.document.append_value(std::str::from_utf8(&self.text).map_err(|e| e.to_string())?);
        self.delivery_date.append_value(date32(row.day));
        self.rows += 1;
        Ok(row)
    }

    /// The rows added, as a record batch of the table's schema; the builders start empty again.
    pub(super) fn finish(&mut self) -> Result<RecordBatch, String> {
        let schema = self.schema.clone();
        let child = |name: &str| -> Result<&DataType, String> {
            schema.field_with_name(name).map(|f| f.data_type()).map_err(|e| e.to_string())
        };
        let mut references = Vec::with_capacity(3);
        for (reference, name) in self.references.iter_mut().zip([field::CLIENT, field::LIVREUR, field::RESTAURANT]) {
            let DataType::Struct(fields) = child(name)? else { return Err(format!("{name} is not a struct")) };
            let columns: Vec<ArrayRef> =
                reference.fields.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef).collect();
            let valid = NullBuffer::from(std::mem::take(&mut reference.valid));
            references
                .push(Arc::new(StructArray::try_new(fields.clone(), columns, Some(valid)).map_err(|e| e.to_string())?)
                    as ArrayRef);
        }
        let items = self.items.finish(list_element(child(field::ITEMS)?)?)?;
        let anomalies = self.anomalies.finish(list_element(child(field::ANOMALIES)?)?)?;
        let [client, livreur, restaurant]: [ArrayRef; 3] =
            references.try_into().map_err(|_| "three references".to_owned())?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.id.finish()),
            Arc::new(self.numero_commande.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.date_commande.finish()),
            Arc::new(self.date_livraison.finish()),
            Arc::new(self.montant_total.finish()),
            client,
            livreur,
            restaurant,
            items,
            Arc::new(self.archived_at.finish()),
            Arc::new(self.archive_source.finish()),
            anomalies,
            Arc::new(self.source_digest.finish()),
            Arc::new(self.purged_at.finish()),
            Arc::new(self.document.finish()),
            Arc::new(self.delivery_date.finish()),
        ];
        self.rows = 0;
        RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
    }
}

/// The element field of a list column.
fn list_element(data_type: &DataType) -> Result<FieldRef, String> {
    match data_type {
        DataType::List(element) => Ok(element.clone()),
        other => Err(format!("a list column is {other}")),
    }
}

/// The top-level fields the columns read: those of an archive document, and the purge mark.
const TOP: [&str; field::ALL.len() + 1] = {
    let mut top = [field::PURGED_AT; field::ALL.len() + 1];
    let mut i = 0;
    while i < field::ALL.len() {
        top[i] = field::ALL[i];
        i += 1;
    }
    top
};

/// The fields of an ordered item the columns read.
const ITEM: [&str; 5] =
    [item_field::MENU_ID, item_field::NOM, item_field::PRIX, item_field::QUANTITE, item_field::SOUS_TOTAL];

/// The values of `keys` in `document`, in one pass over it (a lookup by key walks the document
/// from its start, and checks every key it passes): the first of a repeated key, as a lookup
/// finds it; none past an element that cannot be read.
fn find<'a, const N: usize>(document: &'a RawDocument, keys: &[&str; N]) -> [Option<RawBsonRef<'a>>; N] {
    let mut found = [None; N];
    find_into(document, keys, &mut found);
    found
}

/// [`find`] of keys known at run time, into `found` (as long as `keys`).
fn find_into<'a, K: AsRef<str>>(document: &'a RawDocument, keys: &[K], found: &mut [Option<RawBsonRef<'a>>]) {
    for element in document {
        let Ok((key, value)) = element else { break };
        if let Some(slot) = keys.iter().position(|k| k.as_ref() == key).map(|i| &mut found[i]) {
            slot.get_or_insert(value);
        }
    }
}

/// What [`Columns::push`] tells of the row it added.
pub(super) struct Row {
    /// The order id, as text ([`id_text`](crate::pipeline::order_id::id_text)); `null` for none.
    pub(super) id: String,
    /// The UTC day of delivery: of `date_livraison`, else of `archived_at`, else today.
    pub(super) day: NaiveDate,
    /// Whether its `anomalies` list is not empty.
    pub(super) anomalies: bool,
}

/// An order id as text, the common types without building a `Bson`.
fn id_text(id: Option<RawBsonRef<'_>>) -> Result<String, String> {
    match id {
        None => Ok("null".to_owned()),
        Some(RawBsonRef::ObjectId(oid)) => Ok(oid.to_hex()),
        Some(RawBsonRef::String(s)) => Ok(s.to_owned()),
        Some(other) => owned(other)
            .map(|id| crate::pipeline::order_id::id_text(&id))
            .ok_or_else(|| format!("an _id of type {:?} cannot be read", other.element_type())),
    }
}

/// The UTC day of delivery: of `date_livraison`, else of `archived_at`, else today.
pub(super) fn delivery_day(date_livraison: Option<RawBsonRef<'_>>, archived_at: Option<RawBsonRef<'_>>) -> NaiveDate {
    let date = |value| match value {
        Some(RawBsonRef::DateTime(t)) => Some(t.to_chrono()),
        _ => None,
    };
    date(date_livraison).or_else(|| date(archived_at)).unwrap_or_else(chrono::Utc::now).date_naive()
}

impl Items {
    /// Adds the items of one order: an item that is not a document is null; no array, no items.
    fn push(&mut self, items: Option<RawBsonRef<'_>>) {
        if let Some(RawBsonRef::Array(items)) = items {
            for item in items.into_iter().flatten() {
                let item = match item {
                    RawBsonRef::Document(item) => Some(item),
                    _ => None,
                };
                let found = item.map(|item| find(item, &ITEM)).unwrap_or([None; ITEM.len()]);
                let get = |key: &str| ITEM.iter().position(|k| *k == key).and_then(|i| found[i]);
                self.menu_id.append_option(get(item_field::MENU_ID).and_then(as_text));
                self.nom.append_option(match get(item_field::NOM) {
                    Some(RawBsonRef::String(s)) => Some(s),
                    _ => None,
                });
                self.prix.append_option(get(item_field::PRIX).and_then(as_double));
                self.quantite.append_option(get(item_field::QUANTITE).and_then(as_integer));
                self.sous_total.append_option(get(item_field::SOUS_TOTAL).and_then(as_double));
                self.valid.push(item.is_some());
            }
        }
        self.offsets.push(self.valid.len() as i32);
    }

    fn finish(&mut self, element: FieldRef) -> Result<ArrayRef, String> {
        let DataType::Struct(fields) = element.data_type() else { return Err("items are not structs".to_owned()) };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.menu_id.finish()),
            Arc::new(self.nom.finish()),
            Arc::new(self.prix.finish()),
            Arc::new(self.quantite.finish()),
            Arc::new(self.sous_total.finish()),
        ];
        let valid = NullBuffer::from(std::mem::take(&mut self.valid));
        let structs = StructArray::try_new(fields.clone(), columns, Some(valid)).map_err(|e| e.to_string())?;
        let offsets = OffsetBuffer::new(std::mem::replace(&mut self.offsets, vec![0]).into());
        Ok(Arc::new(ListArray::try_new(element, offsets, Arc::new(structs), None).map_err(|e| e.to_string())?))
    }
}

impl Strings {
    fn finish(&mut self, element: FieldRef) -> Result<ArrayRef, String> {
        let offsets = OffsetBuffer::new(std::mem::replace(&mut self.offsets, vec![0]).into());
        let values = Arc::new(self.values.finish());
        Ok(Arc::new(ListArray::try_new(element, offsets, values, None).map_err(|e| e.to_string())?))
    }
}

/// A value as the `Bson` it stands for (for the rare types written through `bson`).
fn owned(value: RawBsonRef<'_>) -> Option<Bson> {
    Bson::try_from(value.to_raw_bson()).ok()
}

/// A reference field as text: a string as it is, an object id as hex, anything else but null
/// as relaxed Extended JSON.
pub(super) fn as_text(value: RawBsonRef<'_>) -> Option<Cow<'_, str>> {
    match value {
        RawBsonRef::String(s) => Some(Cow::Borrowed(s)),
        RawBsonRef::Null => None,
        RawBsonRef::ObjectId(oid) => Some(Cow::Owned(oid.to_hex())),
        other => {
            let mut out = Vec::new();
            extjson(&mut out, other, Mode::Relaxed).ok()?;
            String::from_utf8(out).ok().map(Cow::Owned)
        }
    }
}

/// A finite number as a double; anything else none.
pub(super) fn as_double(value: RawBsonRef<'_>) -> Option<f64> {
    match value {
        RawBsonRef::Double(d) if d.is_finite() => Some(d),
        RawBsonRef::Int32(n) => Some(f64::from(n)),
        RawBsonRef::Int64(n) => Some(n as f64),
        RawBsonRef::Decimal128(d) => d.to_string().parse::<f64>().ok().filter(|d| d.is_finite()),
        _ => None,
    }
}

/// A whole number as a 64-bit integer; anything else (fractions included) none.
pub(super) fn as_integer(value: RawBsonRef<'_>) -> Option<i64> {
    match value {
        RawBsonRef::Int32(n) => Some(i64::from(n)),
        RawBsonRef::Int64(n) => Some(n),
        RawBsonRef::Double(d) if d.fract() == 0.0 && d.abs() < 9.0e15 => Some(d as i64),
        _ => None,
    }
}

/// The two forms of Extended JSON.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Mode {
    /// Every value typed (`{"$numberInt":"7"}`): the `document` column.
    Canonical,
    /// Numbers as JSON numbers, dates as ISO text where they can be: reference fields.
    Relaxed,
}

/// Appends `value` to `out` as Extended JSON, exactly as `Bson::into_canonical_extjson` (or
/// `into_relaxed_extjson`) writes it, without building the intermediate JSON values: the common
/// types are written here, the others through `bson`.
pub(super) fn extjson(out: &mut Vec<u8>, value: RawBsonRef<'_>, mode: Mode) -> Result<(), String> {
    use std::io::Write;
    let json = |out: &mut Vec<u8>, s: &str| serde_json::to_writer(out, s).map_err(|e| e.to_string());
    let canonical = mode == Mode::Canonical;
    match value {
        RawBsonRef::String(s) => json(out, s)?,
        RawBsonRef::Document(document) => {
            out.push(b'{');
            for (index, element) in document.into_iter().enumerate() {
                let (key, value) = element.map_err(|e| e.to_string())?;
                if index > 0 {
                    out.push(b',');
                }
                json(out, key)?;
                out.push(b':');
                extjson(out, value, mode)?;
            }
            out.push(b'}');
        }
        RawBsonRef::Array(array) => {
            out.push(b'[');
            for (index, value) in array.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                extjson(out, value.map_err(|e| e.to_string())?, mode)?;
            }
            out.push(b']');
        }
        RawBsonRef::Int32(n) if canonical => write!(out, r#"{{"$numberInt":"{n}"}}"#).map_err(|e| e.to_string())?,
        RawBsonRef::Int64(n) if canonical => write!(out, r#"{{"$numberLong":"{n}"}}"#).map_err(|e| e.to_string())?,
        RawBsonRef::Int32(n) => write!(out, "{n}").map_err(|e| e.to_string())?,
        RawBsonRef::Int64(n) => write!(out, "{n}").map_err(|e| e.to_string())?,
        RawBsonRef::Double(d) if canonical && d.is_normal() && d.fract() != 0.0 => {
            write!(out, r#"{{"$numberDouble":"{d}"}}"#).map_err(|e| e.to_string())?
        }
        RawBsonRef::Double(d) if canonical && d.is_normal() => {
            write!(out, r#"{{"$numberDouble":"{d}.0"}}"#).map_err(|e| e.to_string())?
        }
        RawBsonRef::DateTime(t) if canonical => {
            write!(out, r#"{{"$date":{{"$numberLong":"{}"}}}}"#, t.timestamp_millis()).map_err(|e| e.to_string())?
        }
        RawBsonRef::ObjectId(oid) => write!(out, r#"{{"$oid":"{}"}}"#, oid.to_hex()).map_err(|e| e.to_string())?,
        RawBsonRef::Boolean(b) => write!(out, "{b}").map_err(|e| e.to_string())?,
        RawBsonRef::Null => out.extend_from_slice(b"null"),
        other => {
            let value =
                owned(other).ok_or_else(|| format!("a value of type {:?} cannot be read", other.element_type()))?;
            let value = if canonical { value.into_canonical_extjson() } else { value.into_relaxed_extjson() };
            serde_json::to_writer(out, &value).map_err(|e| e.to_string())?
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::spec::BinarySubtype;
    use mongodb::bson::{doc, oid::ObjectId, Binary, Decimal128, RawDocumentBuf, Regex, Timestamp};

    /// Every BSON type, and the doubles whose text is special, nested in documents and arrays.
    fn every_type() -> mongodb::bson::Document {
        let doubles =
            [1.5, 2.0, -0.0, 0.0, 1e300, -3.25e-7, f64::MIN_POSITIVE / 4.0, f64::NAN, f64::INFINITY, -f64::INFINITY];
        doc! {
            "_id": ObjectId::new(), "s": "é \"quoted\" \\ \u{1}", "i": 7, "l": 1i64 << 40, "b": true, "n": Bson::Null,
            "d": mongodb::bson::DateTime::from_millis(-62_135_596_800_001),
            "d2": mongodb::bson::DateTime::from_millis(1_700_000_000_123),
            "doubles": doubles.iter().map(|d| Bson::Double(*d)).collect::<Vec<_>>(),
            "nested": { "a": [1, { "b": [[], {}] }], "dec": Decimal128::from_bytes([1; 16]) },
            "bin": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 255] },
            "re": Regex { pattern: "^a".into(), options: "i".into() },
            "ts": Timestamp { time: 1, increment: 2 }, "min": Bson::MinKey, "code": Bson::JavaScriptCode("f()".into()),
        }
    }

    #[test]
    fn the_document_column_is_exactly_what_bson_writes_as_canonical_extended_json() {
        let document = every_type();
        let raw = RawDocumentBuf::from_document(&document).unwrap();
        let mut out = Vec::new();
        extjson(&mut out, RawBsonRef::Document(&raw), Mode::Canonical).unwrap();
        let expected = Bson::Document(document).into_canonical_extjson().to_string();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn a_reference_field_is_exactly_what_bson_writes_as_relaxed_extended_json() {
        let document = every_type();
        let raw = RawDocumentBuf::from_document(&document).unwrap();
        let expected = Bson::Document(document).into_relaxed_extjson().to_string();
        assert_eq!(as_text(RawBsonRef::Document(&raw)).unwrap(), expected);
    }

    #[test]
    fn a_field_found_in_one_pass_is_the_one_a_lookup_finds() {
        let mut raw = RawDocumentBuf::new();
        raw.append("status", "livrée");
        raw.append("nom", "A");
        raw.append("status", "annulée");
        let found = find(&raw, &["nom", "status", "absent"]);
        assert_eq!(found[1], raw.get("status").unwrap());
        assert_eq!(found[1], Some(RawBsonRef::String("livrée")));
        assert_eq!(found[0], Some(RawBsonRef::String("A")));
        assert_eq!(found[2], None);
    }
}
