//! Property test: orders of odd shapes — missing and null fields, wrong types, Decimal128, Int64
//! and Double values, string and numeric ids, arrays where scalars are expected, duplicated menu
//! ids, unicode, long item lists — are enriched into the same archive documents by the
//! client-side join and by the server's `$lookup` pipeline, and neither fails on them.

mod common;

use std::sync::OnceLock;

use archiver::config::{Config, EnrichMode};
use archiver::pipeline::document::ArchiveSource;
use archiver::pipeline::join::Joiner;
use archiver::pipeline::sink::Archiver;
use common::TestEnv;
use mongodb::bson::{doc, oid::ObjectId, Bson, Decimal128, Document, RawDocumentBuf};
use proptest::prelude::*;

/// One runtime and one seeded database for every case.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    env: TestEnv,
    join: Archiver,
    joiner: Joiner,
    /// The join with a reference cache so small that it starts over within a case.
    cached: Joiner,
    lookup: Archiver,
}

fn decimal(text: &str) -> Bson {
    Bson::Decimal128(text.parse::<Decimal128>().unwrap())
}

/// The reference ids stored, of every type: the first three of the named ones, plus numbers
/// that other numeric types name (see [`client_ids`]).
fn stored(named: Vec<Bson>, extra: Vec<Bson>) -> Vec<Bson> {
    named.into_iter().take(3).chain(extra).collect()
}

/// Reference ids as orders name them: ids that exist, the same numbers in other types (which
/// `$lookup` matches: Decimal128, Int64 and Double against each other, doubles past 2^53,
/// negative zero, numbers inside documents), numeric strings (which it does not), and missing
/// ones.
fn client_ids() -> Vec<Bson> {
    vec![
        Bson::ObjectId(oid(1)),
        Bson::Int32(77),
        Bson::String("client-é".into()),
        Bson::ObjectId(oid(99)),
        Bson::Int32(7),
        Bson::Double(7.0),
        decimal("7.00"),
        Bson::String("7".into()),
        Bson::Document(doc! { "x": 1_i64 }),
    ]
}
fn stored_client_ids() -> Vec<Bson> {
    stored(client_ids(), vec![decimal("7"), Bson::Document(doc! { "x": 1 })])
}
fn restaurant_ids() -> Vec<Bson> {
    vec![
        Bson::ObjectId(oid(2)),
        Bson::Int64(5),
        Bson::String("resto".into()),
        Bson::Int32(404),
        Bson::Double((1_i64 << 60) as f64),
        decimal("1152921504606846976"),
        Bson::Double(1e20),
    ]
}
fn stored_restaurant_ids() -> Vec<Bson> {
    stored(restaurant_ids(), vec![Bson::Int64(1 << 60), decimal("1E+20")])
}
fn livreur_ids() -> Vec<Bson> {
    vec![
        Bson::ObjectId(oid(3)),
        Bson::String("liv-1".into()),
        Bson::Double(8.0),
        Bson::ObjectId(oid(98)),
        decimal("8.0"),
        Bson::Int64(8),
        Bson::Double(-0.0),
        Bson::String("0".into()),
    ]
}
fn stored_livreur_ids() -> Vec<Bson> {
    stored(livreur_ids(), vec![Bson::Int32(0)])
}
fn menu_ids() -> Vec<Bson> {
    vec![
        Bson::ObjectId(oid(4)),
        Bson::Int32(10),
        Bson::Int64(11),
        Bson::String("plat-ü".into()),
        Bson::Int32(12345),
        decimal("2.50"),
        Bson::Double(10.0),
    ]
}
fn stored_menu_ids() -> Vec<Bson> {
    // The first four: a priced menu entry each; then one whose id only a decimal names.
    menu_ids().into_iter().take(4).chain([Bson::Double(2.5)]).collect()
}

fn oid(n: u8) -> ObjectId {
    let mut bytes = [0x5a; 12];
    bytes[11] = n;
    ObjectId::from_bytes(bytes)
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (env, join, joiner, cached, lookup) = runtime.block_on(async {
            let env = TestEnv::new("enrichprops").await;
            let db = &env.db;
            let adresse = doc! { "rue": "1 place Bellecour", "ville": "Lyon", "code_postal": "69002" };
            let clients = stored_client_ids().into_iter().map(|id| {
                doc! { "_id": id, "nom": "Lefèvre", "prenom": "Zoé", "email": "zoe@example.fr", "adresse": adresse.clone() }
            });
            db.collection::<Document>("Client").insert_many(clients).await.unwrap();
            let restaurants = stored_restaurant_ids().into_iter().map(|id| {
                doc! { "_id": id, "nom": "Le Bouchon 🍷", "cuisine": "lyonnaise", "adresse": adresse.clone() }
            });
            db.collection::<Document>("Restaurants").insert_many(restaurants).await.unwrap();
            let livreurs = stored_livreur_ids().into_iter().map(|id| doc! { "_id": id, "nom": "Nguyen", "vehicule": "vélo" });
            db.collection::<Document>("Livreur").insert_many(livreurs).await.unwrap();
            let prices =
                [Bson::Double(12.5), Bson::Int32(7), Bson::Int64(3), Bson::String("9,90".into()), Bson::Double(4.0)];
            let menus = stored_menu_ids().into_iter().zip(prices).map(|(id, prix)| doc! { "_id": id, "nom": "Quenelle", "prix": prix });
            db.collection::<Document>("Menu").insert_many(menus).await.unwrap();

            let mut config = Config::default();
            config.mongodb.uri = archiver::redact::SecretUri::new(env.uri.clone());
            config.mongodb.database = env.db_name.clone();
            let dbs = archiver::db::connect(&config, &archiver::db::RetryPolicy::bounded(&config.retry)).await.unwrap();
            let join = Archiver::new(&config, &dbs, ArchiveSource::Batch);
            let joiner = Joiner::new(&config, &dbs.source, ArchiveSource::Batch).expect("the join applies");
            let cached = joiner.clone().with_cache(5);
            config.enrich.mode = EnrichMode::Lookup;
            let lookup = Archiver::new(&config, &dbs, ArchiveSource::Batch);
            (env, join, joiner, cached, lookup)
        });
        Fixture { runtime, env, join, joiner, cached, lookup }
    })
}

/// A value of any of the types an order field may wrongly hold.
fn odd_scalar() -> impl Strategy<Value = Bson> {
    prop_oneof![
        Just(Bson::Null),
        any::<i32>().prop_map(Bson::Int32),
        // Products that overflow 64 bits are left out: servers differ there (MongoDB multiplies the
        // doubles, SecantusDB rounds the exact product), and no order holds such a quantity.
        (-1_000_000_000_000i64..1_000_000_000_000).prop_map(Bson::Int64),
        (-1.0e6..1.0e6f64).prop_map(Bson::Double),
        "[a-zé€🍕 ]{0,12}".prop_map(Bson::String),
        any::<bool>().prop_map(Bson::Boolean),
        (0i64..100_000).prop_map(|n| Bson::Decimal128(n.to_string().parse::<Decimal128>().unwrap())),
        Just(Bson::Document(doc! { "x": 1 })),
    ]
}

/// A reference: one that exists, one that does not, or something else entirely.
fn reference(ids: Vec<Bson>) -> impl Strategy<Value = Option<Bson>> {
    prop_oneof![
        4 => proptest::sample::select(ids.clone()).prop_map(Some),
        1 => Just(None),
        1 => odd_scalar().prop_map(Some),
        1 => proptest::collection::vec(proptest::sample::select(ids), 0..3).prop_map(|v| Some(Bson::Array(v))),
    ]
    .boxed()
}

fn quantity() -> impl Strategy<Value = Option<Bson>> {
    prop_oneof![
        4 => (1i32..5).prop_map(|n| Some(Bson::Int32(n))),
        1 => (1i64..5).prop_map(|n| Some(Bson::Int64(n))),
        1 => (0.5f64..4.0).prop_map(|n| Some(Bson::Double(n))),
        1 => Just(None),
        1 => odd_scalar().prop_map(Some),
    ]
}

fn item() -> impl Strategy<Value = Bson> {
    prop_oneof![
        8 => (reference(menu_ids()), quantity()).prop_map(|(menu, quantite)| {
            let mut it = Document::new();
            if let Some(menu) = menu {
                it.insert("menu_id", menu);
            }
            if let Some(q) = quantite {
                it.insert("quantite", q);
            }
            Bson::Document(it)
        }),
        1 => odd_scalar(),
    ]
}

fn items() -> impl Strategy<Value = Option<Bson>> {
    prop_oneof![
        6 => proptest::collection::vec(item(), 0..8).prop_map(|v| Some(Bson::Array(v))),
        1 => proptest::collection::vec(item(), 150..300).prop_map(|v| Some(Bson::Array(v))),
        1 => Just(None),
        1 => odd_scalar().prop_map(Some),
    ]
}

fn order_id() -> impl Strategy<Value = Bson> {
    prop_oneof![
        3 => Just(()).prop_map(|_| Bson::ObjectId(ObjectId::new())),
        1 => "[a-z0-9é]{1,10}".prop_map(|s| Bson::String(format!("{s}-{}", ObjectId::new()))),
        1 => (1i64..i64::MAX / 2).prop_map(Bson::Int64),
    ]
}

fn order() -> impl Strategy<Value = Document> {
    (
        order_id(),
        reference(client_ids()),
        reference(restaurant_ids()),
        reference(livreur_ids()),
        items(),
        proptest::option::of(odd_scalar()),
        proptest::option::of(odd_scalar()),
        proptest::option::of(odd_scalar()),
    )
        .prop_map(|(id, client, restaurant, livreur, items, numero, montant, date)| {
            let mut o = doc! { "_id": id, "status": "livrée" };
            for (field, value) in [
                ("client_id", client),
                ("restaurant_id", restaurant),
                ("livreur_id", livreur),
                ("items", items),
                ("numero_commande", numero),
                ("montant_total", montant),
                ("date_commande", date.map(|_| Bson::DateTime(mongodb::bson::DateTime::now()))),
            ] {
                if let Some(value) = value {
                    o.insert(field, value);
                }
            }
            o
        })
}

/// The documents by id, without the time of archiving.
fn comparable(docs: Vec<RawDocumentBuf>) -> Vec<(String, Document)> {
    let mut keyed: Vec<(String, Document)> = docs
        .iter()
        .map(|d| {
            let mut d = d.to_document().expect("archive documents are valid BSON");
            d.remove("archived_at");
            (archiver::pipeline::order_id::equality_key(d.get("_id").unwrap_or(&Bson::Null)), d)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn join_and_lookup_enrich_odd_orders_alike(orders in proptest::collection::vec(order(), 1..12)) {
        let f = fixture();
        let ids: Vec<Bson> = orders.iter().map(|o| o.get("_id").unwrap().clone()).collect();
        let (archived, joined, cached, looked_up) = f.runtime.block_on(async {
            f.env.orders().insert_many(orders.clone()).await.unwrap();
            // What `watch` and `batch` do: the join where it applies, else the pipeline.
            let archived = f.join.enrich(&ids).await.expect("enrichment fails on these orders");
            // The join alone, on the orders it takes (arrays of references and decimals go to
            // the pipeline), batched together so shared and duplicated references meet.
            let mut joinable = Vec::new();
            for o in &orders {
                let o = RawDocumentBuf::from_document(o).unwrap();
                if f.joiner.enrich(std::slice::from_ref(&o)).await.unwrap().is_some() {
                    joinable.push(o);
                }
            }
            let joined = f.joiner.enrich(&joinable).await.unwrap().expect("each order joins, so all do");
            // The cached join, twice: from what it read, then from what it kept.
            let mut cached = Vec::new();
            for _ in 0..2 {
                cached.push(f.cached.enrich(&joinable).await.unwrap().expect("each order joins, so all do"));
            }
            let looked_up = f.lookup.enrich(&ids).await.expect("the pipeline fails on these orders");
            f.env.orders().delete_many(doc! { "_id": { "$in": &ids } }).await.unwrap();
            (archived, joined, cached, looked_up)
        });
        prop_assert_eq!(archived.len(), orders.len());
        let looked_up = comparable(looked_up);
        prop_assert_eq!(&comparable(archived), &looked_up, "join-or-pipeline (left) and $lookup (right) differ");
        let joined = comparable(joined);
        for (key, joined) in &joined {
            let (_, expected) = looked_up.iter().find(|(k, _)| k == key).expect("the same ids");
            prop_assert_eq!(joined, expected, "join (left) and $lookup (right) differ");
        }
        for run in cached {
            prop_assert_eq!(&comparable(run), &joined, "cached join (left) and join (right) differ");
        }
    }
}
