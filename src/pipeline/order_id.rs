//! Comparing order ids the way MongoDB does.
//!
//! `Bson` has no `Hash`, so sets of ids are kept as strings. The key must be equal exactly when
//! MongoDB considers the ids equal: numbers compare by value whatever their type (`{_id: 1}`,
//! `{_id: NumberLong(1)}` and `{_id: 1.0}` collide on the unique `_id` index, and `$in` with one
//! finds the others), inside embedded documents and arrays too. A key that kept the type would
//! report an order archived under another numeric type as both missing and orphaned.

use std::collections::HashSet;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::Error;
use mongodb::Collection;

/// A key for `id` under MongoDB's equality: numerically equal ids of any numeric type (Int32,
/// Int64, Double, Decimal128) share a key, as do documents and arrays whose members do; any
/// other value keeps its type in the key (a string `"1"` is not the number 1).
pub fn equality_key(id: &Bson) -> String {
    let mut key = String::new();
    push_key(&mut key, id);
    key
}

/// The ids among `ids` that `collection` holds in a document matching `filter`, as
/// [`equality_key`]s: the one question "which of these orders are already archived" (or, for
/// `verify`, still delivered in the source). One query: callers pass chunks of ids.
pub async fn present_among(
    collection: &Collection<Document>,
    ids: &[Bson],
    filter: Document,
) -> Result<HashSet<String>, Error> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let mut filter = filter;
    filter.insert("_id", doc! { "$in": ids });
    let found: Vec<Document> = collection.find(filter).projection(doc! { "_id": 1 }).await?.try_collect().await?;
    Ok(found.iter().filter_map(|d| d.get("_id")).map(equality_key).collect())
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_key(key: &mut String, value: &Bson) {
    use std::fmt::Write;
    match value {
        Bson::Int32(n) => push_number(key, &n.to_string()),
        Bson::Int64(n) => push_number(key, &n.to_string()),
        Bson::Double(d) => push_double(key, *d),
        Bson::Decimal128(d) => push_number(key, &d.to_string()),
        // The deprecated symbol type compares as a string.
        Bson::Symbol(s) => {
            let _ = write!(key, "{:?}", Bson::String(s.clone()));
        }
        Bson::Document(doc) => {
            key.push('{');
            for (name, member) in doc {
                let _ = write!(key, "{name:?}:");
                push_key(key, member);
                key.push(',');
            }
            key.push('}');
        }
        Bson::Array(items) => {
            key.push('[');
            for item in items {
                push_key(key, item);
                key.push(',');
            }
            key.push(']');
        }
        // The most common id: its type and hex digits, written without the formatter.
        Bson::ObjectId(id) => {
            key.push_str("oid:");
            for byte in id.bytes() {
                key.push(char::from(HEX[usize::from(byte >> 4)]));
                key.push(char::from(HEX[usize::from(byte & 0xf)]));
            }
        }
        // Other types compare within their own type only: the debug form keeps the type.
        other => {
            let _ = write!(key, "{other:?}");
        }
    }
}

fn push_double(key: &mut String, d: f64) {
    if d.is_finite() {
        // The exact decimal value of the double (every finite double has a finite decimal
        // expansion, at most 1074 digits after the point), so that only an equal number of
        // another type gets the same key: 0.5 equals Decimal128 0.5, 0.1 does not equal
        // Decimal128 0.1 (the double is not exactly a tenth), as in MongoDB.
        let exact = if d.fract() == 0.0 { format!("{d:.0}") } else { format!("{d:.1074}") };
        push_number(key, &exact);
    } else if d.is_nan() {
        push_number(key, "NaN");
    } else {
        push_number(key, if d > 0.0 { "Infinity" } else { "-Infinity" });
    }
}

/// Appends the canonical form of the decimal number `text` (`-12.50`, `1.05E+3`, `NaN`,
/// `-Infinity`): sign, significant digits without leading or trailing zeros, and the power of
/// ten, so that every spelling of one value gives one key.
fn push_number(key: &mut String, text: &str) {
    key.push_str("n:");
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], unsigned[at + 1..].parse::<i64>().ok()),
        None => (unsigned, Some(0)),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let Some(exponent) = exponent.filter(|_| digits_only(whole) && digits_only(fraction) && !mantissa.is_empty())
    else {
        // NaN and the infinities: every numeric type spells them the same way here.
        let special = unsigned.to_ascii_lowercase();
        if special != "nan" && negative {
            key.push('-');
        }
        key.push_str(&special);
        return;
    };
    let digits: String = format!("{whole}{fraction}");
    let mut exponent = exponent - fraction.len() as i64;
    let significant = digits.trim_start_matches('0');
    let trimmed = significant.trim_end_matches('0');
    exponent += (significant.len() - trimmed.len()) as i64;
    if trimmed.is_empty() {
        // Zero, whatever its sign or exponent.
        key.push('0');
        return;
    }
    if negative {
        key.push('-');
    }
    use std::fmt::Write;
    let _ = write!(key, "{trimmed}e{exponent}");
}

/// The order id as text, for people and for the `_id` column of a Delta table: an ObjectId's
/// hex digits, a string as it is, anything else as its relaxed Extended JSON.
pub fn id_text(id: &Bson) -> String {
    match id {
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::String(s) => s.clone(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, oid::ObjectId, Decimal128};

    fn decimal(text: &str) -> Bson {
        Bson::Decimal128(text.parse::<Decimal128>().unwrap())
    }

    #[test]
    fn numerically_equal_ids_share_a_key() {
        let one =
            [Bson::Int32(1), Bson::Int64(1), Bson::Double(1.0), decimal("1"), decimal("1.000"), decimal("0.1E+1")];
        for id in &one {
            assert_eq!(equality_key(id), equality_key(&one[0]), "{id:?}");
        }
        let zero =
            [Bson::Int32(0), Bson::Int64(0), Bson::Double(0.0), Bson::Double(-0.0), decimal("-0"), decimal("0E-5")];
        for id in &zero {
            assert_eq!(equality_key(id), equality_key(&zero[0]), "{id:?}");
        }
        assert_eq!(equality_key(&Bson::Double(-2.5)), equality_key(&decimal("-2.50")));
        assert_eq!(equality_key(&Bson::Double(1e20)), equality_key(&decimal("1E+20")));
        assert_eq!(equality_key(&Bson::Int64(i64::MIN)), equality_key(&Bson::Double(-9_223_372_036_854_775_808.0)));
        assert_eq!(equality_key(&Bson::Double(f64::NAN)), equality_key(&decimal("NaN")));
        assert_eq!(equality_key(&Bson::Double(f64::NEG_INFINITY)), equality_key(&decimal("-Infinity")));
    }

    #[test]
    fn different_values_and_types_keep_distinct_keys() {
        let distinct = [
            Bson::Int32(1),
            Bson::Int32(-1),
            Bson::Int32(10),
            Bson::Double(1.5),
            Bson::Double(f64::INFINITY),
            Bson::Double(f64::NEG_INFINITY),
            Bson::Double(f64::NAN),
            // 2^53 + 1 has no double of its own: comparisons are exact, not through a double.
            Bson::Int64(9_007_199_254_740_993),
            Bson::Double(9_007_199_254_740_992.0),
            // The double nearest a tenth is not a tenth.
            Bson::Double(0.1),
            decimal("0.1"),
            Bson::String("1".into()),
            Bson::Boolean(true),
            Bson::ObjectId(ObjectId::parse_str("65f000000000000000000001").unwrap()),
            Bson::Null,
            Bson::Document(doc! { "x": 1 }),
            Bson::Document(doc! { "x": 2 }),
            Bson::Document(doc! { "y": 1 }),
            Bson::Array(vec![Bson::Int32(1)]),
            Bson::Array(vec![Bson::Int32(1), Bson::Int32(1)]),
        ];
        let keys: std::collections::HashSet<String> = distinct.iter().map(equality_key).collect();
        assert_eq!(keys.len(), distinct.len(), "{keys:#?}");
    }

    #[test]
    fn members_of_documents_and_arrays_compare_numerically() {
        assert_eq!(
            equality_key(&Bson::Document(doc! { "x": 1, "y": [2.0] })),
            equality_key(&Bson::Document(doc! { "x": 1_i64, "y": [2] }))
        );
        assert_ne!(
            equality_key(&Bson::Document(doc! { "x": 1, "y": 2 })),
            equality_key(&Bson::Document(doc! { "y": 2, "x": 1 })),
            "field order matters"
        );
        assert_eq!(equality_key(&Bson::Symbol("a".into())), equality_key(&Bson::String("a".into())));
    }
}
