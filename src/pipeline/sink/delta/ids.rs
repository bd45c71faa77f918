//! What the Delta writer knows of the order ids in its table, to leave out the orders already
//! there: the data files of the loaded version with the bounds of their `_id` column (from the
//! statistics of their log entries), and the ids of some files, the latest used, up to a bound.
//! An order is looked for only in the files of its day whose bounds hold its id; a file's ids
//! are read from the store when it is such a candidate and they are not in memory. Orders come
//! in nearly increasing `_id` order (an ObjectId starts with its time): files written before
//! rarely bound a new id, and the ids held stay few whatever the day's volume.

use std::collections::HashMap;

use chrono::NaiveDate;

/// An order id as the `_id` column holds it, as the writer keeps it in memory, by the hundreds
/// of thousands: the 24 lowercase hexadecimal digits of an ObjectId (the id of nearly every
/// order) in its 12 bytes, any other text as it is. Two ids are the same key exactly when they
/// are the same text. (A `String` of an ObjectId took about 65 bytes in a set, this 25.)
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum OrderKey {
    ObjectId([u8; 12]),
    Other(Box<str>),
}

impl OrderKey {
    pub(super) fn new(id: &str) -> OrderKey {
        let lower_hex = id.len() == 24 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match mongodb::bson::oid::ObjectId::parse_str(id) {
            Ok(oid) if lower_hex => OrderKey::ObjectId(oid.bytes()),
            _ => OrderKey::Other(id.into()),
        }
    }

    /// The id as the `_id` column holds it.
    pub(super) fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            OrderKey::ObjectId(bytes) => mongodb::bson::oid::ObjectId::from_bytes(*bytes).to_hex().into(),
            OrderKey::Other(text) => std::borrow::Cow::Borrowed(text),
        }
    }
}

/// A set of order ids, sorted: 12 bytes an ObjectId (a hash set took some 40).
#[derive(Debug, Default)]
pub(super) struct SortedIds {
    object_ids: Vec<[u8; 12]>,
    others: Vec<Box<str>>,
}

impl SortedIds {
    pub(super) fn new(keys: impl IntoIterator<Item = OrderKey>) -> SortedIds {
        let mut ids = SortedIds::default();
        for key in keys {
            match key {
                OrderKey::ObjectId(bytes) => ids.object_ids.push(bytes),
                OrderKey::Other(text) => ids.others.push(text),
            }
        }
        SortedIds::new_sorted(ids)
    }

    /// `ids`, sorted, each once.
    fn new_sorted(mut ids: SortedIds) -> SortedIds {
        ids.object_ids.sort_unstable();
        ids.object_ids.dedup();
        ids.others.sort_unstable();
        ids.others.dedup();
        ids.object_ids.shrink_to_fit();
        ids.others.shrink_to_fit();
        ids
    }

    pub(super) fn contains(&self, key: &OrderKey) -> bool {
        match key {
            OrderKey::ObjectId(bytes) => self.object_ids.binary_search(bytes).is_ok(),
            OrderKey::Other(text) => self.others.binary_search(text).is_ok(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.object_ids.len() + self.others.len()
    }
}

/// A data file of a table version: its path, its day, and the least and greatest ids of its
/// `_id` column, when its log entry gives them (a file without them may hold any id).
#[derive(Debug)]
pub(super) struct DataFile {
    pub(super) path: String,
    pub(super) day: NaiveDate,
    bounds: Option<(Box<str>, Box<str>)>,
}

impl DataFile {
    /// `stats` is the file's log entry statistics (JSON), as Delta writes them.
    pub(super) fn new(path: String, day: NaiveDate, stats: Option<&str>) -> DataFile {
        DataFile { path, day, bounds: stats.and_then(id_bounds) }
    }
}

/// The bounds of the `_id` column in a log entry's statistics. Writers may shorten a long
/// string's bounds, always to a lower minimum and a higher maximum, and compare strings as
/// bytes, as `str` does: the bounds still hold every id of the file.
fn id_bounds(stats: &str) -> Option<(Box<str>, Box<str>)> {
    #[derive(serde::Deserialize)]
    struct Stats {
        #[serde(rename = "minValues")]
        min: Option<Id>,
        #[serde(rename = "maxValues")]
        max: Option<Id>,
    }
    #[derive(serde::Deserialize)]
    struct Id {
        #[serde(rename = "_id")]
        id: Option<Box<str>>,
    }
    let stats: Stats = serde_json::from_str(stats).ok()?;
    Some((stats.min?.id?, stats.max?.id?))
}

/// The data files of a table version, with, for each day, its files that have bounds in the
/// order of their least ids, each with the greatest id among it and those before it: the files
/// that may hold an id are found without going through the day's others.
#[derive(Debug, Default)]
pub(super) struct Listing {
    pub(super) files: Vec<DataFile>,
    days: HashMap<NaiveDate, DayFiles>,
    /// The days all of whose files have bounds, with their least and greatest ids, in the order
    /// of their least ids, each with the greatest id among it and those before it.
    spans: Vec<DaySpan>,
    /// The days with a file without bounds.
    unbounded_days: Vec<NaiveDate>,
}

#[derive(Debug)]
struct DaySpan {
    day: NaiveDate,
    least: Box<str>,
    greatest: Box<str>,
    reach: Box<str>,
}

#[derive(Debug, Default)]
struct DayFiles {
    /// Files with bounds, by least id, and the greatest id up to each.
    bounded: Vec<(usize, usize)>,
    /// Files without bounds.
    unbounded: Vec<usize>,
}

impl Listing {
    pub(super) fn new(files: Vec<DataFile>) -> Listing {
        let mut days: HashMap<NaiveDate, DayFiles> = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            let day = days.entry(file.day).or_default();
            match file.bounds {
                Some(_) => day.bounded.push((i, i)),
                None => day.unbounded.push(i),
            }
        }
        let bounds = |i: usize| files[i].bounds.as_ref().expect("a bounded file");
        for day in days.values_mut() {
            day.bounded.sort_unstable_by(|a, b| bounds(a.0).0.cmp(&bounds(b.0).0));
            let mut greatest: Option<usize> = None;
            for entry in &mut day.bounded {
                if greatest.is_none_or(|g| bounds(entry.0).1 > bounds(g).1) {
                    greatest = Some(entry.0);
                }
                entry.1 = greatest.expect("set just before");
            }
        }
        let mut unbounded_days = Vec::new();
        let mut spans = Vec::new();
        for (day, of_day) in &days {
            match (of_day.unbounded.is_empty(), of_day.bounded.first(), of_day.bounded.last()) {
                (true, Some(first), Some(last)) => spans.push(DaySpan {
                    day: *day,
                    least: bounds(first.0).0.clone(),
                    greatest: bounds(last.1).1.clone(),
                    reach: Box::default(),
                }),
                _ => unbounded_days.push(*day),
            }
        }
        spans.sort_unstable_by(|a, b| a.least.cmp(&b.least));
        let mut reach: Option<Box<str>> = None;
        for span in &mut spans {
            if reach.as_ref().is_none_or(|r| span.greatest > *r) {
                reach = Some(span.greatest.clone());
            }
            span.reach = reach.clone().expect("set just before");
        }
        Listing { files, days, spans, unbounded_days }
    }

    /// The days that have files that may hold `id`: those with a file without bounds, and
    /// those whose files' bounds, together, hold it.
    pub(super) fn days_of<'a>(&'a self, id: &'a str) -> impl Iterator<Item = NaiveDate> + 'a {
        let end = self.spans.partition_point(|span| *span.least <= *id);
        let bounded = self.spans[..end]
            .iter()
            .rev()
            .take_while(move |span| *span.reach >= *id)
            .filter(move |span| *span.greatest >= *id)
            .map(|span| span.day);
        self.unbounded_days.iter().copied().chain(bounded)
    }

    pub(super) fn len(&self) -> usize {
        self.files.len()
    }

    /// The files (by position) of `day`.
    pub(super) fn files_of(&self, day: NaiveDate) -> impl Iterator<Item = usize> + '_ {
        self.days
            .get(&day)
            .into_iter()
            .flat_map(|day| day.unbounded.iter().chain(day.bounded.iter().map(|(i, _)| i)))
            .copied()
    }

    /// The files (by position) of `day` that may hold `id`.
    pub(super) fn candidates<'a>(&'a self, day: NaiveDate, id: &'a str) -> impl Iterator<Item = usize> + 'a {
        let day = self.days.get(&day);
        let unbounded = day.into_iter().flat_map(|day| day.unbounded.iter().copied());
        let bounds = |i: usize| self.files[i].bounds.as_ref().expect("a bounded file");
        let bounded = day.into_iter().flat_map(move |day| {
            // Those whose least id is not above it, from the last, while some before may reach it.
            let end = day.bounded.partition_point(|(i, _)| *bounds(*i).0 <= *id);
            day.bounded[..end]
                .iter()
                .rev()
                .take_while(move |(_, greatest)| *bounds(*greatest).1 >= *id)
                .filter(move |(i, _)| *bounds(*i).1 >= *id)
                .map(|(i, _)| *i)
        });
        unbounded.chain(bounded)
    }
}

/// Sets of ids a day holds at most before they are merged into fewer (each looked up in turn
/// when the whole day's ids are in memory).
pub(super) const RUNS_PER_DAY: usize = 8;

/// The ids of data files, by day, the latest used kept up to a number of ids. Each set ("run")
/// holds the ids of one or more files of one day: one file read, the rows this writer committed
/// to the files of a day, or runs merged. When every file of a day is held, an id is looked up
/// in the day's few runs, whatever its files; else in the runs of the files that may hold it.
#[derive(Debug, Default)]
pub(super) struct IdCache {
    runs: HashMap<u64, Run>,
    by_file: HashMap<String, u64>,
    by_day: HashMap<NaiveDate, Vec<u64>>,
    held: usize,
    clock: u64,
    /// Days all of whose files of the listing `full_of` (a version) are held; cleared when the
    /// listing changes or runs are forgotten.
    full: std::collections::HashSet<NaiveDate>,
    full_of: Option<Option<u64>>,
    /// The most ids held at once.
    #[cfg(test)]
    peak: usize,
}

#[derive(Debug)]
struct Run {
    ids: SortedIds,
    files: Vec<String>,
    day: NaiveDate,
    used: u64,
}

impl IdCache {
    /// Keeps `ids` as those of `files` (together), of `day`.
    pub(super) fn insert(&mut self, day: NaiveDate, files: Vec<String>, ids: SortedIds) {
        self.clock += 1;
        let key = self.clock;
        for file in &files {
            self.forget_file(file);
            self.by_file.insert(file.clone(), key);
        }
        self.held += ids.len();
        #[cfg(test)]
        {
            self.peak = self.peak.max(self.held);
        }
        self.by_day.entry(day).or_default().push(key);
        self.runs.insert(key, Run { ids, files, day, used: key });
    }

    /// Forgets the run holding `file`'s ids, with its other files (read again when needed):
    /// a run's ids cannot be told apart by file.
    fn forget_file(&mut self, file: &str) {
        if let Some(key) = self.by_file.get(file) {
            self.forget_run(*key);
        }
    }

    fn forget_run(&mut self, key: u64) {
        let Some(run) = self.runs.remove(&key) else { return };
        self.held -= run.ids.len();
        for file in &run.files {
            self.by_file.remove(file);
        }
        if let Some(keys) = self.by_day.get_mut(&run.day) {
            keys.retain(|k| *k != key);
            if keys.is_empty() {
                self.by_day.remove(&run.day);
            }
        }
        self.full.clear();
    }

    /// Forgets the files for which `keep` is false (files no longer in the table).
    pub(super) fn keep_files(&mut self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self.by_file.keys().filter(|file| !keep(file)).cloned().collect();
        for file in gone {
            self.forget_file(&file);
        }
    }

    pub(super) fn holds(&self, file: &str) -> bool {
        self.by_file.contains_key(file)
    }

    /// Whether every file of `day` in `listing` is held.
    pub(super) fn holds_day(&mut self, listing: &Listing, version: Option<u64>, day: NaiveDate) -> bool {
        if self.full_of != Some(version) {
            self.full.clear();
            self.full_of = Some(version);
        }
        if self.full.contains(&day) {
            return true;
        }
        let full = listing.files_of(day).all(|i| self.holds(&listing.files[i].path));
        if full {
            self.full.insert(day);
        }
        full
    }

    /// Whether the ids of `file`, which must be held, include `key`; marks them used.
    pub(super) fn file_has(&mut self, file: &str, key: &OrderKey) -> bool {
        let Some(run) = self.by_file.get(file) else { return false };
        self.clock += 1;
        let run = self.runs.get_mut(run).expect("each file's run is held");
        run.used = self.clock;
        run.ids.contains(key)
    }

    /// Whether some file of `day` held includes `key`; marks the day's runs used.
    pub(super) fn day_has(&mut self, day: NaiveDate, key: &OrderKey) -> bool {
        self.clock += 1;
        let Some(keys) = self.by_day.get(&day) else { return false };
        let mut found = false;
        for key_of_run in keys {
            let run = self.runs.get_mut(key_of_run).expect("each day's run is held");
            run.used = self.clock;
            found = found || run.ids.contains(key);
        }
        found
    }

    /// Merges the smallest runs of `day` while it has more than [`RUNS_PER_DAY`], into runs of
    /// at most `largest` ids.
    pub(super) fn merge_runs(&mut self, day: NaiveDate, largest: usize) {
        loop {
            let Some(keys) = self.by_day.get(&day) else { return };
            if keys.len() <= RUNS_PER_DAY {
                return;
            }
            let mut by_size: Vec<(usize, u64)> = keys.iter().map(|k| (self.runs[k].ids.len(), *k)).collect();
            by_size.sort_unstable();
            let mut merged = 0;
            let mut taken = Vec::new();
            for (size, key) in by_size {
                if !taken.is_empty() && merged + size > largest {
                    break;
                }
                merged += size;
                taken.push(key);
            }
            if taken.len() < 2 {
                return;
            }
            let mut files = Vec::new();
            let mut ids = SortedIds::default();
            for key in taken {
                let run = self.runs.remove(&key).expect("a run of the day");
                self.held -= run.ids.len();
                files.extend(run.files);
                ids.object_ids.extend(run.ids.object_ids);
                ids.others.extend(run.ids.others);
                self.by_day.get_mut(&day).expect("the day's runs").retain(|k| *k != key);
            }
            let ids = SortedIds::new_sorted(ids);
            self.clock += 1;
            let key = self.clock;
            for file in &files {
                self.by_file.insert(file.clone(), key);
            }
            self.held += ids.len();
            self.by_day.get_mut(&day).expect("the day's runs").push(key);
            self.runs.insert(key, Run { ids, files, day, used: key });
        }
    }

    /// Forgets the runs used least recently until at most `limit` ids are held.
    pub(super) fn shrink_to(&mut self, limit: usize) {
        if self.held <= limit {
            return;
        }
        let mut by_use: Vec<(u64, u64)> = self.runs.iter().map(|(key, run)| (run.used, *key)).collect();
        by_use.sort_unstable();
        for (_, key) in by_use {
            if self.held <= limit {
                break;
            }
            self.forget_run(key);
        }
    }

    /// The number of ids held.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.held
    }

    /// The most ids held at once.
    #[cfg(test)]
    pub(super) fn peak(&self) -> usize {
        self.peak
    }

    /// The files whose ids are held.
    #[cfg(test)]
    pub(super) fn files(&self) -> std::collections::HashSet<&str> {
        self.by_file.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Ids are kept compactly, and two ids are one key exactly when they are one text.
    #[test]
    fn order_keys_are_equal_exactly_when_their_texts_are() {
        let hex = mongodb::bson::oid::ObjectId::new().to_hex();
        let texts = [
            hex.clone(),
            hex.to_uppercase(),
            format!("{hex}0"),
            hex[..23].to_owned(),
            "zzzzzzzzzzzzzzzzzzzzzzzz".to_owned(),
            "CMD-000042".to_owned(),
            String::new(),
        ];
        assert!(matches!(OrderKey::new(&hex), OrderKey::ObjectId(_)));
        for (i, a) in texts.iter().enumerate() {
            assert_eq!(OrderKey::new(a).text(), a.as_str(), "kept as it is");
            for (j, b) in texts.iter().enumerate() {
                assert_eq!(OrderKey::new(a) == OrderKey::new(b), i == j, "{a:?} and {b:?}");
            }
        }
        assert_eq!(std::mem::size_of::<OrderKey>(), 24);
    }

    fn day(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 3, d).unwrap()
    }

    fn stats(min: &str, max: &str) -> String {
        format!(r#"{{"numRecords":2,"minValues":{{"_id":"{min}","status":"livrée"}},"maxValues":{{"_id":"{max}"}}}}"#)
    }

    /// A file is a candidate for an id exactly when it is of the id's day and its bounds hold
    /// the id, or it has no bounds.
    #[test]
    fn the_files_that_may_hold_an_id_are_those_of_its_day_whose_bounds_hold_it() {
        let ranges = [("b", "d"), ("a", "k"), ("c", "c"), ("e", "g"), ("f", "h"), ("m", "p"), ("q", "z")];
        let mut files: Vec<DataFile> = ranges
            .iter()
            .enumerate()
            .map(|(i, (min, max))| DataFile::new(format!("f{i}"), day(1), Some(&stats(min, max))))
            .collect();
        files.push(DataFile::new("no-stats".into(), day(1), None));
        files.push(DataFile::new("no-id".into(), day(1), Some(r#"{"numRecords":1,"minValues":{},"maxValues":{}}"#)));
        files.push(DataFile::new("other-day".into(), day(2), Some(&stats("a", "z"))));
        let listing = Listing::new(files);
        for id in ["", "a", "b", "c", "cz", "d", "f", "gg", "h", "l", "m", "o", "p", "q", "z", "zz"] {
            let mut found: Vec<&str> = listing.candidates(day(1), id).map(|i| listing.files[i].path.as_str()).collect();
            found.sort_unstable();
            let mut expected: Vec<String> = ranges
                .iter()
                .enumerate()
                .filter(|(_, (min, max))| *min <= id && id <= *max)
                .map(|(i, _)| format!("f{i}"))
                .chain(["no-id".to_owned(), "no-stats".to_owned()])
                .collect();
            expected.sort_unstable();
            assert_eq!(found, expected, "id {id:?}");
        }
        assert_eq!(listing.candidates(day(3), "c").count(), 0, "no file of that day");
    }

    /// The days looked in for an id are those with a file without bounds, and those the least
    /// and greatest ids of whose files hold the id: every day with a file that may hold it.
    #[test]
    fn the_days_that_may_hold_an_id_are_those_whose_files_bounds_hold_it() {
        let ranges = [(1, "b", "d"), (1, "f", "g"), (2, "a", "c"), (3, "e", "e"), (4, "h", "k"), (5, "c", "z")];
        let mut files: Vec<DataFile> = ranges
            .iter()
            .enumerate()
            .map(|(i, (d, min, max))| DataFile::new(format!("f{i}"), day(*d), Some(&stats(min, max))))
            .collect();
        files.push(DataFile::new("no-stats".into(), day(6), None));
        files.push(DataFile::new("with-no-stats".into(), day(4), None));
        let listing = Listing::new(files);
        let span = |d: u32| {
            let of_day = ranges.iter().filter(|(day, _, _)| *day == d);
            let least = of_day.clone().map(|(_, min, _)| *min).min().unwrap();
            (least, of_day.map(|(_, _, max)| *max).max().unwrap())
        };
        for id in ["", "a", "b", "c", "d", "dd", "e", "f", "h", "j", "k", "y", "z", "zz"] {
            let mut found: Vec<NaiveDate> = listing.days_of(id).collect();
            found.sort_unstable();
            let mut expected: Vec<NaiveDate> = [1, 2, 3, 5]
                .into_iter()
                .filter(|d| span(*d).0 <= id && id <= span(*d).1)
                .chain([4, 6])
                .map(day)
                .collect();
            expected.sort_unstable();
            assert_eq!(found, expected, "id {id:?}");
            for d in 1..=6 {
                if listing.candidates(day(d), id).next().is_some() {
                    assert!(found.contains(&day(d)), "id {id:?}: day {d} has a file that may hold it");
                }
            }
        }
    }

    /// The runs used least recently are forgotten first, a run shared by files with all of them.
    #[test]
    fn the_id_cache_keeps_the_runs_used_last_up_to_its_limit() {
        let keys = |ids: &[&str]| SortedIds::new(ids.iter().map(|id| OrderKey::new(id)));
        let mut cache = IdCache::default();
        cache.insert(day(1), vec!["a1".into(), "a2".into()], keys(&["1", "2", "3"]));
        cache.insert(day(1), vec!["b".into()], keys(&["4", "5"]));
        cache.insert(day(2), vec!["c".into()], keys(&["6"]));
        assert_eq!(cache.held(), 6);
        assert!(cache.file_has("a2", &OrderKey::new("2")));
        assert!(!cache.file_has("a2", &OrderKey::new("4")));
        cache.shrink_to(4);
        assert_eq!(cache.files(), HashSet::from(["a1", "a2", "c"]), "b used least recently");
        assert_eq!(cache.held(), 4);
        assert!(!cache.day_has(day(1), &OrderKey::new("4")), "forgotten with b");
        cache.insert(day(1), vec!["a1".into()], keys(&["7"]));
        assert_eq!(cache.files(), HashSet::from(["a1", "c"]), "a1 read again: its run, shared with a2, forgotten");
        assert_eq!(cache.held(), 2);
        assert!(cache.day_has(day(1), &OrderKey::new("7")) && !cache.day_has(day(1), &OrderKey::new("2")));
        cache.insert(day(2), vec!["d1".into(), "d2".into()], keys(&["8", "9"]));
        cache.keep_files(|file| file != "d2");
        assert_eq!(cache.files(), HashSet::from(["a1", "c"]), "d2 left the table: its ids may be gone with it");
        assert!(!cache.day_has(day(2), &OrderKey::new("8")) && !cache.day_has(day(2), &OrderKey::new("9")));
        assert_eq!(cache.held(), 2);
        cache.shrink_to(0);
        assert_eq!((cache.held(), cache.files().len()), (0, 0));
    }

    /// A day of many runs has them merged into few, up to a size, and knows whether every file
    /// of a listing's day is held.
    #[test]
    fn a_days_runs_are_merged_and_its_files_known_held() {
        let mut cache = IdCache::default();
        let files: Vec<DataFile> = (0..20)
            .map(|i| DataFile::new(format!("f{i}"), day(1), Some(&stats(&format!("{i:02}"), &format!("{i:02}")))))
            .collect();
        let listing = Listing::new(files);
        for i in 0..19 {
            assert!(!cache.holds_day(&listing, Some(1), day(1)), "f19 not held");
            cache.insert(day(1), vec![format!("f{i}")], SortedIds::new([OrderKey::new(&format!("{i:02}"))]));
        }
        cache.merge_runs(day(1), 5);
        let runs = cache.by_day[&day(1)].len();
        assert!(runs <= RUNS_PER_DAY, "{runs} runs");
        assert!(cache.runs.values().all(|run| run.ids.len() <= 5));
        assert_eq!(cache.held(), 19);
        cache.insert(day(1), vec!["f19".into()], SortedIds::new([OrderKey::new("19")]));
        assert!(cache.holds_day(&listing, Some(1), day(1)));
        for i in 0..20 {
            assert!(cache.day_has(day(1), &OrderKey::new(&format!("{i:02}"))), "{i}");
            assert!(cache.file_has(&format!("f{i}"), &OrderKey::new(&format!("{i:02}"))), "{i}");
        }
        assert!(!cache.day_has(day(1), &OrderKey::new("20")));
        cache.shrink_to(10);
        assert!(!cache.holds_day(&listing, Some(1), day(1)), "runs forgotten");
    }
}
