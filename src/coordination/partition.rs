//! Partitions of the order ids, and the names that keep partitions apart (stream, instance).

use mongodb::bson::{doc, Bson, Document};

use crate::config::Config;

/// The partition (0..`partitions`) of the id at `id_path` (e.g. `$_id`), as an expression.
///
/// It is total: it evaluates for every id, because an error in it fails the whole change stream
/// (and resuming replays the same event) or the whole `batch`/`verify` query. So the id's string
/// form comes from `$convert` with `onError`/`onNull`, and is left-padded with `"00"` so that it
/// always has the two characters the key reads. Padding leaves the last two characters of any
/// longer string as they were: ObjectIds (and every other id the former `$toString` form
/// accepted with two or more characters) keep their partition.
///
/// Binary ids (UUIDs) have a string form only from MongoDB 8.0, and only when asked for one
/// with a `format`, which older servers refuse to parse: when every server connected to takes
/// it, a binary id is keyed by two characters of its base64 form (the last two carrying six
/// bits each, ahead of the padding and the partial last character), so that UUIDs spread like
/// ObjectIds. On older servers, and for ids without any string form (documents), partition 0.
pub fn partition_expr(id_path: &str, partitions: u32) -> Document {
    if crate::db::servers_convert_binary_to_string() {
        return doc! { "$cond": [
            { "$eq": [{ "$type": id_path }, "binData"] },
            binary_partition_expr(id_path, partitions),
            text_partition_expr(id_path, partitions),
        ] };
    }
    text_partition_expr(id_path, partitions)
}

/// The partition of a binary id, from its base64 form (see [`partition_expr`]).
fn binary_partition_expr(id_path: &str, partitions: u32) -> Document {
    const BASE64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let digit = |from_end: i32| -> Bson {
        Bson::Document(doc! { "$max": [0, { "$indexOfCP": [
            BASE64,
            { "$substrCP": ["$$id", { "$subtract": [{ "$strLenCP": "$$id" }, from_end] }, 1] },
        ] }] })
    };
    let base64 =
        doc! { "$convert": { "input": id_path, "to": "string", "format": "base64", "onError": "", "onNull": "" } };
    doc! { "$let": {
        // Padded in front, so that the key always has its three characters.
        "vars": { "id": { "$concat": ["AAA", { "$rtrim": { "input": base64, "chars": "=" } }] } },
        "in": { "$mod": [{ "$add": [{ "$multiply": [64, digit(3)] }, digit(2)] }, i64::from(partitions)] },
    } }
}

/// The partition of an id by the last two hex digits of its string form.
fn text_partition_expr(id_path: &str, partitions: u32) -> Document {
    let hex_digit = |from_end: i32| -> Bson {
        Bson::Document(doc! { "$max": [0, { "$indexOfCP": [
            "0123456789abcdef",
            { "$toLower": { "$substrCP": ["$$id", { "$subtract": [{ "$strLenCP": "$$id" }, from_end] }, 1] } },
        ] }] })
    };
    let id_text = doc! { "$convert": { "input": id_path, "to": "string", "onError": "", "onNull": "" } };
    doc! { "$let": {
        "vars": { "id": { "$concat": ["00", id_text] } },
        "in": { "$mod": [{ "$add": [{ "$multiply": [16, hex_digit(2)] }, hex_digit(1)] }, i64::from(partitions)] },
    } }
}

/// A query condition selecting this worker's partition, or `None` when not partitioned.
pub fn partition_filter(config: &Config, id_path: &str) -> Option<Document> {
    let c = &config.coordination;
    (c.partitions > 1).then(|| {
        doc! { "$expr": { "$eq": [partition_expr(id_path, c.partitions), i64::from(c.partition)] } }
    })
}

/// Adds this worker's partition condition to `filter`.
pub fn restrict_to_partition(config: &Config, mut filter: Document, id_path: &str) -> Document {
    if let Some(partition) = partition_filter(config, id_path) {
        filter = doc! { "$and": [filter, partition] };
    }
    filter
}

/// The stream name: what checkpoints and leases are keyed by.
///
/// Partitions always qualify the name, a configured `STREAM_NAME` included: each partition needs
/// its own checkpoint and its own lease. Sharing them would let one partition's checkpoint move
/// past events the others have not archived yet, and make one worker the only leader of all.
pub fn stream_name(config: &Config) -> String {
    let c = &config.coordination;
    let base = if c.stream_name.is_empty() { config.orders_namespace() } else { c.stream_name.clone() };
    if c.partitions > 1 {
        format!("{base}#{}of{}", c.partition, c.partitions)
    } else {
        base
    }
}

/// This process's name in the lease.
pub fn instance_id(config: &Config) -> String {
    if !config.coordination.instance_id.is_empty() {
        return config.coordination.instance_id.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{host}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_distinguish_partitions() {
        let mut config = Config::default();
        assert_eq!(stream_name(&config), "livraison.Commandes");
        config.coordination.partitions = 4;
        config.coordination.partition = 2;
        assert_eq!(stream_name(&config), "livraison.Commandes#2of4");
        config.coordination.stream_name = "eu".into();
        assert_eq!(stream_name(&config), "eu#2of4");
    }

    /// A configured name used to be taken as is: every partition shared one lease and one
    /// checkpoint.
    #[test]
    fn configured_stream_names_are_qualified_only_when_partitioned() {
        let mut config = Config::default();
        config.coordination.stream_name = "eu".into();
        assert_eq!(stream_name(&config), "eu", "unpartitioned names are unchanged");
        config.coordination.partitions = 3;
        let names: std::collections::HashSet<String> = (0..3)
            .map(|i| {
                config.coordination.partition = i;
                stream_name(&config)
            })
            .collect();
        assert_eq!(names, ["eu#0of3", "eu#1of3", "eu#2of3"].map(String::from).into());
    }

    #[test]
    fn partition_filter_only_when_partitioned() {
        let mut config = Config::default();
        assert!(partition_filter(&config, "$_id").is_none());
        config.coordination.partitions = 3;
        config.coordination.partition = 1;
        let text = format!("{:?}", partition_filter(&config, "$documentKey._id").unwrap());
        assert!(text.contains("$documentKey._id") && text.contains("$mod"), "{text}");
    }
}
