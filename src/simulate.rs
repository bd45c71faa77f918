//! `archiver simulate`: realistic French fake data for development, demos and benchmarks.
//!
//! Seeding writes the reference collections (customers, couriers, restaurants and their menus)
//! and orders that follow the data model (`schema.md`), in bulk. Live mode then moves orders
//! through their statuses at a steady pace, the way the platform would, so that `watch` has
//! something to archive.
//!
//! Everything derives from one seed. Each customer, courier, restaurant and order number draws
//! from its own random stream keyed on `(seed, kind, index)`, which buys three things: a run is
//! reproducible byte for byte (ids included, since they are drawn from the stream rather than
//! from the clock), chunks of orders can be generated in parallel in any order, and a second run
//! into a non-empty collection, which continues the order numbers, makes new orders instead of
//! the same ones again.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use fake::faker::address::fr_fr::StreetName;
use fake::faker::internet::fr_fr::FreeEmailProvider;
use fake::faker::name::fr_fr::{FirstName, LastName};
use fake::faker::phone_number::fr_fr::{CellNumber, PhoneNumber};
use fake::Fake;
use futures_util::{stream, StreamExt, TryStreamExt};
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::Collection;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::cli::SimulateArgs;
use crate::config::{Config, OrderFields, RetrySettings};
use crate::db::{self, error_code, is_transient, Databases};
use crate::exit::UsageError;
use crate::redact::scrub;

/// Status of an order just placed.
pub const PENDING: &str = "en_attente";
/// Status of an order the restaurant is preparing.
pub const PREPARING: &str = "en_preparation";
/// Status of an order a courier is bringing.
pub const ON_THE_WAY: &str = "en_livraison";
/// Status of a cancelled order. (The delivered status comes from the configuration.)
pub const CANCELLED: &str = "annulée";
/// Field of a menu entry naming its restaurant. The data model fixes it; no setting renames it.
pub const MENU_RESTAURANT_FIELD: &str = "restaurant_id";

/// Orders generated and inserted together by default.
pub const DEFAULT_CHUNK_SIZE: usize = 10_000;
/// Chunks in flight at once by default: enough to keep the server busy while the next chunk is
/// generated, few enough to bound memory to a few chunks.
pub const DEFAULT_CONCURRENCY: usize = 4;

/// Live mode always creates an order when fewer than this many are in flight, so the flow
/// never dries up, even on an empty database.
const MIN_IN_FLIGHT: usize = 10;
/// Live mode loads at most this many in-flight orders at start: a demo needs no more, and a huge
/// backlog would only cost memory.
const MAX_LOADED_IN_FLIGHT: i64 = 100_000;
/// Live mode ticks at most this often.
const MAX_TICKS_PER_SEC: f64 = 100.0;
/// How often live mode logs its progress.
const LIVE_PROGRESS_EVERY: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Order stages
// ---------------------------------------------------------------------------------------------

/// Where an order is in its life: `en_attente` → `en_preparation` → `en_livraison` → delivered,
/// or cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `en_attente`: placed, no courier yet.
    Pending,
    /// `en_preparation`: the restaurant is cooking.
    Preparing,
    /// `en_livraison`: a courier has it.
    OnTheWay,
    /// The configured delivered status (`livrée` by default).
    Delivered,
    /// `annulée`.
    Cancelled,
}

impl Stage {
    /// The status value stored for this stage.
    pub fn status(self, delivered_status: &str) -> &str {
        match self {
            Stage::Pending => PENDING,
            Stage::Preparing => PREPARING,
            Stage::OnTheWay => ON_THE_WAY,
            Stage::Delivered => delivered_status,
            Stage::Cancelled => CANCELLED,
        }
    }

    /// The stage of a stored status, if it is one of the in-flight ones.
    fn in_flight(status: &str) -> Option<Stage> {
        match status {
            PENDING => Some(Stage::Pending),
            PREPARING => Some(Stage::Preparing),
            ON_THE_WAY => Some(Stage::OnTheWay),
            _ => None,
        }
    }

    /// Whether a courier is assigned at this stage.
    fn has_courier(self) -> bool {
        matches!(self, Stage::OnTheWay | Stage::Delivered)
    }

    /// The next stage in live mode: mostly forward, sometimes cancelled before a courier leaves.
    fn next(self, rng: &mut StdRng) -> Stage {
        match self {
            Stage::Pending if rng.random_bool(0.05) => Stage::Cancelled,
            Stage::Pending => Stage::Preparing,
            Stage::Preparing if rng.random_bool(0.03) => Stage::Cancelled,
            Stage::Preparing => Stage::OnTheWay,
            Stage::OnTheWay | Stage::Delivered => Stage::Delivered,
            Stage::Cancelled => Stage::Cancelled,
        }
    }

    /// The stage of a seeded order that is not delivered: a small share cancelled, the rest
    /// spread over the in-flight stages.
    fn not_delivered(rng: &mut StdRng) -> Stage {
        match rng.random_range(0..10u8) {
            0 => Stage::Cancelled,
            1..=3 => Stage::Pending,
            4..=6 => Stage::Preparing,
            _ => Stage::OnTheWay,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness
// ---------------------------------------------------------------------------------------------

/// The independent random streams of one seed.
#[derive(Debug, Clone, Copy)]
enum Stream {
    Clients = 1,
    Livreurs = 2,
    Restaurants = 3,
    Orders = 4,
    Live = 5,
}

/// The random stream of one entity. The ChaCha key is the triple itself, so distinct triples
/// give independent streams, with no hashing step where two of them could collide.
fn stream_rng(seed: u64, stream: Stream, index: u64) -> StdRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(stream as u64).to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    StdRng::from_seed(key)
}

/// An ObjectId drawn from `rng`: the timestamp of `at` (so ids sort by date, as real ones do)
/// and 8 random bytes. `ObjectId::new()` would make every run different.
fn object_id(rng: &mut StdRng, at: DateTime<Utc>) -> ObjectId {
    let secs = at.timestamp().clamp(0, i64::from(u32::MAX)) as u32;
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&secs.to_be_bytes());
    rng.fill(&mut bytes[4..]);
    ObjectId::from_bytes(bytes)
}

fn bson_date(at: DateTime<Utc>) -> Bson {
    Bson::DateTime(mongodb::bson::DateTime::from_millis(at.timestamp_millis()))
}

// ---------------------------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------------------------

/// The span order dates are drawn from: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateSpan {
    /// First instant (inclusive).
    pub start: DateTime<Utc>,
    /// End (exclusive).
    pub end: DateTime<Utc>,
}

/// Lunch and dinner rushes, in seconds of the UTC day: 12:00–14:30 and 18:30–22:00 in Paris
/// (UTC+1). Most orders fall there, as on a real platform.
const LUNCH: Range<i64> = 11 * 3600..13 * 3600 + 1800;
const DINNER: Range<i64> = 17 * 3600 + 1800..21 * 3600;

impl DateSpan {
    /// The `days` days before midnight (UTC) at the start of `end`.
    pub fn days_before(end: NaiveDate, days: u32) -> DateSpan {
        let end = end.and_time(NaiveTime::MIN).and_utc();
        DateSpan { start: end - chrono::Duration::days(i64::from(days)), end }
    }

    /// An order date: a day of the span, at a time drawn mostly from the meal rushes.
    fn pick(&self, rng: &mut StdRng) -> DateTime<Utc> {
        let total_ms = (self.end - self.start).num_milliseconds().max(1);
        let whole_days = total_ms / 86_400_000;
        if whole_days >= 1 {
            let day = rng.random_range(0..whole_days);
            let window = match rng.random_range(0..100u8) {
                0..40 => LUNCH,
                40..85 => DINNER,
                _ => 0..86_400,
            };
            let second = rng.random_range(window);
            let ms = day * 86_400_000 + second * 1000 + rng.random_range(0..1000);
            if ms < total_ms {
                return self.start + chrono::Duration::milliseconds(ms);
            }
        }
        // A span shorter than a day, or a draw past a partial last day.
        self.start + chrono::Duration::milliseconds(rng.random_range(0..total_ms))
    }
}

// ---------------------------------------------------------------------------------------------
// French reference data the `fake` crate lacks
// ---------------------------------------------------------------------------------------------

/// Dish categories, with the price range of each (in cents).
#[derive(Debug, Clone, Copy)]
enum Category {
    Entree,
    Plat,
    Dessert,
    Boisson,
}

impl Category {
    fn label(self) -> &'static str {
        match self {
            Category::Entree => "entrée",
            Category::Plat => "plat",
            Category::Dessert => "dessert",
            Category::Boisson => "boisson",
        }
    }

    /// A menu price: whole euros in the category's range, ending in .00, .50 or .90.
    fn price_cents(self, rng: &mut StdRng) -> i64 {
        let euros = match self {
            Category::Entree => 5..12,
            Category::Plat => 10..24,
            Category::Dessert => 4..9,
            Category::Boisson => 2..5,
        };
        rng.random_range(euros) * 100 + *[0, 50, 90].choose(rng).expect("non-empty")
    }
}

use Category::{Boisson, Dessert, Entree, Plat};

/// A cuisine: its name, restaurant name patterns (`{nom}` and `{prenom}` are filled from the
/// `fake` French names) and dishes.
struct Cuisine {
    name: &'static str,
    restaurant_names: &'static [&'static str],
    dishes: &'static [(&'static str, Category)],
}

/// Drinks every restaurant may serve, on top of its cuisine's dishes.
const DRINKS: &[(&str, Category)] = &[
    ("Eau minérale", Boisson),
    ("Eau pétillante", Boisson),
    ("Limonade artisanale", Boisson),
    ("Jus d'orange pressé", Boisson),
    ("Thé glacé maison", Boisson),
    ("Coca-Cola", Boisson),
];

const CUISINES: &[Cuisine] = &[
    Cuisine {
        name: "française",
        restaurant_names: &["Chez {prenom}", "Le Bistrot de {prenom}", "Brasserie {nom}", "La Table de {prenom}"],
        dishes: &[
            ("Soupe à l'oignon", Entree),
            ("Œufs mayonnaise", Entree),
            ("Salade de chèvre chaud", Entree),
            ("Terrine de campagne", Entree),
            ("Bœuf bourguignon", Plat),
            ("Blanquette de veau", Plat),
            ("Coq au vin", Plat),
            ("Confit de canard", Plat),
            ("Steak frites", Plat),
            ("Quiche lorraine", Plat),
            ("Crème brûlée", Dessert),
            ("Tarte Tatin", Dessert),
            ("Mousse au chocolat", Dessert),
        ],
    },
    Cuisine {
        name: "italienne",
        restaurant_names: &["Trattoria {nom}", "Pizzeria da {prenom}", "Mamma {prenom}", "Il Forno di {prenom}"],
        dishes: &[
            ("Bruschetta", Entree),
            ("Burrata", Entree),
            ("Pizza margherita", Plat),
            ("Pizza quatre fromages", Plat),
            ("Pizza reine", Plat),
            ("Lasagnes", Plat),
            ("Spaghetti carbonara", Plat),
            ("Risotto aux champignons", Plat),
            ("Penne all'arrabbiata", Plat),
            ("Tiramisu", Dessert),
            ("Panna cotta", Dessert),
        ],
    },
    Cuisine {
        name: "japonaise",
        restaurant_names: &["Sushi {nom}", "Sakura", "Osaka Ramen", "Kyoto {nom}"],
        dishes: &[
            ("Soupe miso", Entree),
            ("Edamame", Entree),
            ("Gyoza", Entree),
            ("Plateau de sushis", Plat),
            ("California rolls", Plat),
            ("Sashimi de saumon", Plat),
            ("Chirashi", Plat),
            ("Ramen tonkotsu", Plat),
            ("Yakitori", Plat),
            ("Mochi glacé", Dessert),
        ],
    },
    Cuisine {
        name: "chinoise",
        restaurant_names: &["Le Palais de Jade", "Dragon d'Or", "Le Lotus {nom}", "Wok {prenom}"],
        dishes: &[
            ("Nems au porc", Entree),
            ("Raviolis vapeur", Entree),
            ("Porc au caramel", Plat),
            ("Poulet aux noix de cajou", Plat),
            ("Canard laqué", Plat),
            ("Riz cantonais", Plat),
            ("Nouilles sautées", Plat),
            ("Bœuf aux oignons", Plat),
            ("Perles de coco", Dessert),
            ("Beignets de banane", Dessert),
        ],
    },
    Cuisine {
        name: "indienne",
        restaurant_names: &["Taj Mahal", "Le Maharaja", "Bombay {nom}", "Namaste {prenom}"],
        dishes: &[
            ("Samoussas", Entree),
            ("Pakoras", Entree),
            ("Poulet tikka masala", Plat),
            ("Butter chicken", Plat),
            ("Agneau korma", Plat),
            ("Biryani", Plat),
            ("Dal de lentilles", Plat),
            ("Naan au fromage", Plat),
            ("Lassi à la mangue", Dessert),
            ("Gulab jamun", Dessert),
        ],
    },
    Cuisine {
        name: "libanaise",
        restaurant_names: &["Le Cèdre", "Beyrouth {nom}", "Chez {prenom} le Libanais", "Byblos"],
        dishes: &[
            ("Houmous", Entree),
            ("Taboulé", Entree),
            ("Moutabal", Entree),
            ("Falafels", Plat),
            ("Chawarma poulet", Plat),
            ("Kefta", Plat),
            ("Assiette mixte", Plat),
            ("Fatayer aux épinards", Plat),
            ("Baklava", Dessert),
            ("Mouhalabieh", Dessert),
        ],
    },
    Cuisine {
        name: "marocaine",
        restaurant_names: &["Le Riad", "Marrakech {nom}", "Dar {prenom}", "L'Atlas"],
        dishes: &[
            ("Harira", Entree),
            ("Briouates", Entree),
            ("Couscous royal", Plat),
            ("Tajine de poulet aux citrons", Plat),
            ("Tajine d'agneau aux pruneaux", Plat),
            ("Pastilla", Plat),
            ("Méchoui", Plat),
            ("Cornes de gazelle", Dessert),
            ("Thé à la menthe", Boisson),
        ],
    },
    Cuisine {
        name: "vietnamienne",
        restaurant_names: &["Saïgon {nom}", "Le Petit Hanoï", "Phở {prenom}", "Le Mékong"],
        dishes: &[
            ("Rouleaux de printemps", Entree),
            ("Nems au poulet", Entree),
            ("Phở au bœuf", Plat),
            ("Bò bún", Plat),
            ("Bánh mì", Plat),
            ("Riz au porc grillé", Plat),
            ("Bánh xèo", Plat),
            ("Chè aux haricots", Dessert),
            ("Perles de coco", Dessert),
        ],
    },
    Cuisine {
        name: "burgers",
        restaurant_names: &["Big {prenom}", "Burger {nom}", "Le Comptoir à Burgers", "Smash {prenom}"],
        dishes: &[
            ("Frites maison", Entree),
            ("Onion rings", Entree),
            ("Cheeseburger", Plat),
            ("Burger au bacon", Plat),
            ("Burger végétarien", Plat),
            ("Burger au chèvre", Plat),
            ("Cookie", Dessert),
            ("Milkshake vanille", Dessert),
            ("Brownie", Dessert),
        ],
    },
];

/// Towns with their real postcodes. `fake`'s French locale has no town list (its `CityName` is
/// a surname) and draws postcodes at random, so an address would not hold together.
const CITIES: &[(&str, &[&str])] = &[
    (
        "Paris",
        &[
            "75001", "75003", "75005", "75008", "75010", "75011", "75012", "75013", "75014", "75015", "75016", "75017",
            "75018", "75019", "75020",
        ],
    ),
    ("Lyon", &["69001", "69002", "69003", "69004", "69005", "69006", "69007", "69008", "69009"]),
    ("Marseille", &["13001", "13002", "13004", "13005", "13006", "13008", "13009", "13013"]),
    ("Toulouse", &["31000", "31100", "31200", "31300", "31400", "31500"]),
    ("Nice", &["06000", "06100", "06200", "06300"]),
    ("Nantes", &["44000", "44100", "44200", "44300"]),
    ("Strasbourg", &["67000", "67100", "67200"]),
    ("Montpellier", &["34000", "34070", "34080", "34090"]),
    ("Bordeaux", &["33000", "33100", "33200", "33300", "33800"]),
    ("Lille", &["59000", "59160", "59260", "59800"]),
    ("Rennes", &["35000", "35200", "35700"]),
    ("Grenoble", &["38000", "38100"]),
];

const VEHICLES: &[&str] = &["vélo", "vélo électrique", "scooter", "moto", "voiture"];

fn address(rng: &mut StdRng) -> Document {
    let (ville, codes) = CITIES.choose(rng).expect("non-empty");
    let code_postal = codes.choose(rng).expect("non-empty");
    let street: String = StreetName().fake_with_rng(rng);
    let numero = rng.random_range(1..=180u32);
    doc! { "rue": format!("{numero} {}", lowercase_first(&street)), "ville": *ville, "code_postal": *code_postal }
}

/// "Rue Voltaire" → "rue Voltaire", as French addresses are written.
fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The ASCII form of a name for an e-mail address: accents dropped, spaces and apostrophes gone.
fn email_part(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.to_lowercase().chars() {
        match c {
            'à' | 'â' | 'ä' | 'á' | 'ã' => out.push('a'),
            'é' | 'è' | 'ê' | 'ë' => out.push('e'),
            'î' | 'ï' | 'í' => out.push('i'),
            'ô' | 'ö' | 'ó' => out.push('o'),
            'ù' | 'û' | 'ü' | 'ú' => out.push('u'),
            'ç' => out.push('c'),
            'ÿ' => out.push('y'),
            'ñ' => out.push('n'),
            'œ' => out.push_str("oe"),
            'æ' => out.push_str("ae"),
            '-' => out.push('-'),
            c if c.is_ascii_alphanumeric() => out.push(c),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// References and the generator
// ---------------------------------------------------------------------------------------------

/// A menu entry as orders need it.
#[derive(Debug, Clone, PartialEq)]
pub struct Dish {
    /// `Menu._id`.
    pub id: ObjectId,
    /// Unit price.
    pub prix: f64,
}

/// A restaurant and the dishes an order from it may contain.
#[derive(Debug, Clone, PartialEq)]
pub struct RestaurantMenu {
    /// `Restaurants._id`.
    pub id: ObjectId,
    /// Its menu entries, sorted by id.
    pub dishes: Vec<Dish>,
}

/// What orders point to. Every list is sorted by id, so orders drawn against references just
/// generated and against the same references read back from the database are the same.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct References {
    /// `Client._id`s.
    pub clients: Vec<ObjectId>,
    /// `Livreur._id`s.
    pub livreurs: Vec<ObjectId>,
    /// Restaurants that have at least one priced menu entry.
    pub restaurants: Vec<RestaurantMenu>,
}

impl References {
    /// Whether orders can be made: a customer, a courier and a restaurant with a dish.
    pub fn is_usable(&self) -> bool {
        !self.clients.is_empty() && !self.livreurs.is_empty() && !self.restaurants.is_empty()
    }

    fn sort(&mut self) {
        self.clients.sort();
        self.livreurs.sort();
        self.restaurants.sort_by_key(|r| r.id);
        for restaurant in &mut self.restaurants {
            restaurant.dishes.sort_by_key(|d| d.id);
        }
    }
}

/// How many references a dataset of `count` orders gets: about five orders per customer, fifty
/// per restaurant and twenty per courier, with floors so small datasets still vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReferenceSizes {
    /// Customers.
    pub clients: u64,
    /// Couriers.
    pub livreurs: u64,
    /// Restaurants (each with 5–15 menu entries).
    pub restaurants: u64,
}

impl ReferenceSizes {
    /// The sizes for `count` orders.
    pub fn for_orders(count: u64) -> ReferenceSizes {
        ReferenceSizes { clients: (count / 5).max(10), livreurs: (count / 20).max(5), restaurants: (count / 50).max(5) }
    }
}

/// Generated restaurants, their menu entries, and the same as references for orders.
#[derive(Debug, Clone, Default)]
pub struct GeneratedRestaurants {
    /// `Restaurants` documents.
    pub restaurants: Vec<Document>,
    /// `Menu` documents.
    pub menu: Vec<Document>,
    /// The same restaurants and dishes, as orders use them.
    pub menus: Vec<RestaurantMenu>,
}

/// Generated orders and what they are.
#[derive(Debug, Clone, Default)]
pub struct OrderBatch {
    /// `Commandes` documents.
    pub documents: Vec<Document>,
    /// How many are delivered.
    pub delivered: u64,
    /// How many are cancelled.
    pub cancelled: u64,
}

/// A whole dataset, generated without writing anything (for benchmarks and tests).
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// `Client` documents.
    pub clients: Vec<Document>,
    /// `Livreur` documents.
    pub livreurs: Vec<Document>,
    /// `Restaurants` documents.
    pub restaurants: Vec<Document>,
    /// `Menu` documents.
    pub menu: Vec<Document>,
    /// `Commandes` documents, numbered from `CMD-000001`.
    pub orders: Vec<Document>,
    /// Delivered orders among them.
    pub delivered: u64,
    /// Cancelled orders among them.
    pub cancelled: u64,
}

/// Generates documents from a seed, with the field names of a configuration. Pure: it never
/// touches the database, so benchmarks can use it alone.
#[derive(Debug, Clone)]
pub struct Generator {
    seed: u64,
    fields: OrderFields,
    client_field: String,
    livreur_field: String,
    restaurant_field: String,
    menu_nom_field: String,
    menu_prix_field: String,
    delivered_status: String,
}

/// The order number as stored: `CMD-000042`.
pub fn numero_commande(number: u64) -> String {
    format!("CMD-{number:06}")
}

impl Generator {
    /// A generator for `seed`, naming fields as `config` does.
    pub fn new(config: &Config, seed: u64) -> Generator {
        Generator {
            seed,
            fields: config.orders.fields.clone(),
            client_field: config.lookups.client.local_field.clone(),
            livreur_field: config.lookups.livreur.local_field.clone(),
            restaurant_field: config.lookups.restaurant.local_field.clone(),
            menu_nom_field: config.lookups.menu.nom_field.clone(),
            menu_prix_field: config.lookups.menu.prix_field.clone(),
            delivered_status: config.orders.delivered_status.clone(),
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// When a reference was created: some time in the year before the first order, so reference
    /// ids sort before order ids as they would on a real platform.
    fn registered_at(rng: &mut StdRng, span: DateSpan) -> DateTime<Utc> {
        span.start - chrono::Duration::seconds(rng.random_range(0..365 * 86_400))
    }

    /// `Client` documents number `0..n`.
    pub fn clients(&self, n: u64, span: DateSpan) -> Vec<Document> {
        (0..n)
            .map(|i| {
                let mut rng = stream_rng(self.seed, Stream::Clients, i);
                let registered = Self::registered_at(&mut rng, span);
                let id = object_id(&mut rng, registered);
                let prenom: String = FirstName().fake_with_rng(&mut rng);
                let nom: String = LastName().fake_with_rng(&mut rng);
                let provider: String = FreeEmailProvider().fake_with_rng(&mut rng);
                let suffix = if rng.random_bool(0.5) { rng.random_range(1..100u32).to_string() } else { String::new() };
                let email = format!("{}.{}{suffix}@{provider}", email_part(&prenom), email_part(&nom));
                // Customers order from their mobile; a few gave a landline.
                let telephone: String = if rng.random_bool(0.85) {
                    CellNumber().fake_with_rng(&mut rng)
                } else {
                    PhoneNumber().fake_with_rng(&mut rng)
                };
                doc! {
                    "_id": id, "nom": nom, "prenom": prenom, "email": email,
                    "telephone": telephone, "adresse": address(&mut rng),
                }
            })
            .collect()
    }

    /// `Livreur` documents number `0..n`.
    pub fn livreurs(&self, n: u64, span: DateSpan) -> Vec<Document> {
        (0..n)
            .map(|i| {
                let mut rng = stream_rng(self.seed, Stream::Livreurs, i);
                let registered = Self::registered_at(&mut rng, span);
                let id = object_id(&mut rng, registered);
                let prenom: String = FirstName().fake_with_rng(&mut rng);
                let nom: String = LastName().fake_with_rng(&mut rng);
                let telephone: String = CellNumber().fake_with_rng(&mut rng);
                let vehicule = *VEHICLES.choose(&mut rng).expect("non-empty");
                doc! { "_id": id, "nom": nom, "prenom": prenom, "telephone": telephone, "vehicule": vehicule }
            })
            .collect()
    }

    /// Restaurants number `0..n`, each with 5–15 menu entries from its cuisine and drinks.
    pub fn restaurants(&self, n: u64, span: DateSpan) -> GeneratedRestaurants {
        let mut out = GeneratedRestaurants::default();
        for i in 0..n {
            let mut rng = stream_rng(self.seed, Stream::Restaurants, i);
            let opened = Self::registered_at(&mut rng, span);
            let id = object_id(&mut rng, opened);
            let cuisine = CUISINES.choose(&mut rng).expect("non-empty");
            let pattern = cuisine.restaurant_names.choose(&mut rng).expect("non-empty");
            let prenom: String = FirstName().fake_with_rng(&mut rng);
            let nom_famille: String = LastName().fake_with_rng(&mut rng);
            let nom = pattern.replace("{prenom}", &prenom).replace("{nom}", &nom_famille);
            out.restaurants.push(doc! {
                "_id": id, "nom": nom, "cuisine": cuisine.name, "adresse": address(&mut rng),
            });
            let offer: Vec<(&str, Category)> = cuisine.dishes.iter().chain(DRINKS).copied().collect();
            let entries = rng.random_range(5..=15usize);
            let mut dishes = Vec::with_capacity(entries);
            for (dish_nom, category) in offer.sample(&mut rng, entries).copied().collect::<Vec<_>>() {
                let dish_id = object_id(&mut rng, opened);
                let prix = category.price_cents(&mut rng) as f64 / 100.0;
                let mut entry = doc! { "_id": dish_id, MENU_RESTAURANT_FIELD: id };
                entry.insert(self.menu_nom_field.clone(), dish_nom);
                entry.insert(self.menu_prix_field.clone(), prix);
                entry.insert("categorie", category.label());
                out.menu.push(entry);
                dishes.push(Dish { id: dish_id, prix });
            }
            out.menus.push(RestaurantMenu { id, dishes });
        }
        out
    }

    /// Order number `number` of a seeded dataset: delivered with probability `p_delivered`,
    /// placed within `span`. Returns it with its stage.
    ///
    /// # Panics
    /// If `p_delivered` is outside `[0, 1]` or `refs` is not usable.
    pub fn order(&self, refs: &References, number: u64, p_delivered: f64, span: DateSpan) -> (Document, Stage) {
        let mut rng = stream_rng(self.seed, Stream::Orders, number);
        let stage = if rng.random_bool(p_delivered) { Stage::Delivered } else { Stage::not_delivered(&mut rng) };
        let placed_at = span.pick(&mut rng);
        (self.order_document(&mut rng, refs, number, stage, placed_at), stage)
    }

    /// Orders numbered `numbers` (see [`Generator::order`]).
    pub fn orders(&self, refs: &References, numbers: Range<u64>, p_delivered: f64, span: DateSpan) -> OrderBatch {
        let mut batch = OrderBatch { documents: Vec::with_capacity(numbers.clone().count()), ..Default::default() };
        for number in numbers {
            let (document, stage) = self.order(refs, number, p_delivered, span);
            match stage {
                Stage::Delivered => batch.delivered += 1,
                Stage::Cancelled => batch.cancelled += 1,
                _ => {}
            }
            batch.documents.push(document);
        }
        batch
    }

    /// One order document at `stage`, placed at `placed_at`, drawing everything from `rng`.
    fn order_document(
        &self,
        rng: &mut StdRng,
        refs: &References,
        number: u64,
        stage: Stage,
        placed_at: DateTime<Utc>,
    ) -> Document {
        let f = &self.fields;
        let id = object_id(rng, placed_at);
        let client = *refs.clients.choose(rng).expect("references are usable");
        let restaurant = refs.restaurants.choose(rng).expect("references are usable");
        // Most baskets are small: 1–2 dishes often, 5 rarely.
        let wanted = match rng.random_range(0..100u8) {
            0..30 => 1,
            30..60 => 2,
            60..80 => 3,
            80..92 => 4,
            _ => 5,
        };
        let mut items = Vec::with_capacity(wanted);
        let mut total = 0.0;
        for dish in restaurant.dishes.sample(rng, wanted).collect::<Vec<_>>() {
            let quantite: i32 = match rng.random_range(0..100u8) {
                0..75 => 1,
                75..93 => 2,
                _ => 3,
            };
            total += dish.prix * f64::from(quantite);
            let mut item = Document::new();
            item.insert(f.item_menu_id.clone(), dish.id);
            item.insert(f.item_quantite.clone(), quantite);
            items.push(Bson::Document(item));
        }
        // Round to the cent, as a till would: binary sums of prices leave 31.000000000000004.
        let montant_total = (total * 100.0).round() / 100.0;
        let livreur = if stage.has_courier() {
            Bson::ObjectId(*refs.livreurs.choose(rng).expect("references are usable"))
        } else {
            Bson::Null
        };
        let delivered_at = if stage == Stage::Delivered {
            bson_date(placed_at + chrono::Duration::seconds(rng.random_range(20 * 60..70 * 60)))
        } else {
            Bson::Null
        };
        let mut order = doc! { "_id": id };
        order.insert(f.numero_commande.clone(), numero_commande(number));
        order.insert(self.client_field.clone(), client);
        order.insert(self.restaurant_field.clone(), restaurant.id);
        order.insert(self.livreur_field.clone(), livreur);
        order.insert(f.items.clone(), items);
        order.insert(f.status.clone(), stage.status(&self.delivered_status));
        order.insert(f.date_commande.clone(), bson_date(placed_at));
        order.insert(f.date_livraison.clone(), delivered_at);
        order.insert(f.montant_total.clone(), montant_total);
        order
    }
}

/// The ObjectIds of `docs`, sorted.
fn ids_of(docs: &[Document]) -> Vec<ObjectId> {
    let mut ids: Vec<ObjectId> = docs.iter().filter_map(|d| d.get_object_id("_id").ok()).collect();
    ids.sort();
    ids
}

/// A whole dataset for `count` orders numbered from 1, as seeding an empty database with the
/// same arguments would write it.
///
/// # Panics
/// If `p_delivered` is outside `[0, 1]`.
pub fn generate_dataset(config: &Config, seed: u64, count: u64, p_delivered: f64, span: DateSpan) -> Dataset {
    let generator = Generator::new(config, seed);
    let sizes = ReferenceSizes::for_orders(count);
    let clients = generator.clients(sizes.clients, span);
    let livreurs = generator.livreurs(sizes.livreurs, span);
    let restaurants = generator.restaurants(sizes.restaurants, span);
    let mut refs =
        References { clients: ids_of(&clients), livreurs: ids_of(&livreurs), restaurants: restaurants.menus };
    refs.sort();
    let orders = generator.orders(&refs, 1..count + 1, p_delivered, span);
    Dataset {
        clients,
        livreurs,
        restaurants: restaurants.restaurants,
        menu: restaurants.menu,
        orders: orders.documents,
        delivered: orders.delivered,
        cancelled: orders.cancelled,
    }
}

// ---------------------------------------------------------------------------------------------
// Seeding the database
// ---------------------------------------------------------------------------------------------

/// What [`seed`] does.
#[derive(Debug, Clone)]
pub struct SeedOptions {
    /// The seed.
    pub seed: u64,
    /// Orders to add (0: only the reference collections, when missing).
    pub count: u64,
    /// Fraction of them already delivered, in `[0, 1]`.
    pub p_delivered: f64,
    /// Where their dates fall.
    pub span: DateSpan,
    /// Drop the simulated collections first.
    pub drop: bool,
    /// Orders generated and inserted together.
    pub chunk_size: usize,
    /// Chunks in flight at once.
    pub concurrency: usize,
}

impl SeedOptions {
    /// Options with the default chunking and no drop.
    pub fn new(seed: u64, count: u64, p_delivered: f64, span: DateSpan) -> SeedOptions {
        SeedOptions {
            seed,
            count,
            p_delivered,
            span,
            drop: false,
            chunk_size: DEFAULT_CHUNK_SIZE,
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

/// What [`seed`] did.
#[derive(Debug, Clone, Default)]
pub struct SeedSummary {
    /// The seed used.
    pub seed: u64,
    /// `database.collection` of every collection dropped first.
    pub dropped: Vec<String>,
    /// Customers inserted (0 when existing ones were reused).
    pub clients: u64,
    /// Couriers inserted.
    pub livreurs: u64,
    /// Restaurants inserted.
    pub restaurants: u64,
    /// Menu entries inserted.
    pub menu_entries: u64,
    /// Orders inserted.
    pub orders: u64,
    /// Delivered orders among them.
    pub delivered: u64,
    /// Cancelled orders among them.
    pub cancelled: u64,
    /// Number of the first order of this run (the ones before were there already).
    pub first_number: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Stopped by the shutdown token before all orders were written.
    pub interrupted: bool,
}

impl SeedSummary {
    /// Orders inserted per second of the whole run.
    pub fn orders_per_sec(&self) -> f64 {
        self.orders as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn collection(dbs: &Databases, name: &str) -> Collection<Document> {
    dbs.source.collection(name)
}

/// Seeds the database: drops first if asked, creates the reference collections that are empty
/// (reusing those that are not), then inserts `count` orders numbered after the highest existing
/// one, in chunks written concurrently. Stops launching chunks when `shutdown` fires; the
/// chunks in flight complete.
pub async fn seed(
    dbs: &Databases,
    config: &Config,
    options: &SeedOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<SeedSummary> {
    Ok(seed_keeping_references(dbs, config, options, shutdown).await?.0)
}

/// [`seed`], also returning the references, which live mode then needs not read again.
async fn seed_keeping_references(
    dbs: &Databases,
    config: &Config,
    options: &SeedOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<(SeedSummary, Arc<References>)> {
    if !(0.0..=1.0).contains(&options.p_delivered) {
        return Err(UsageError(format!("p_delivered must be between 0 and 1, got {}", options.p_delivered)).into());
    }
    let started = Instant::now();
    let mut summary = SeedSummary { seed: options.seed, ..Default::default() };
    if options.drop {
        summary.dropped = drop_simulated(dbs, config).await?;
    }
    let generator = Generator::new(config, options.seed);
    let refs = ensure_references(dbs, config, &generator, options, &mut summary).await?;

    let orders = collection(dbs, &config.orders.collection);
    let first = next_order_number(&orders, config).await?;
    summary.first_number = first;
    let end = first + options.count;
    let refs = Arc::new(refs);
    if options.count == 0 {
        summary.elapsed = started.elapsed();
        return Ok((summary, refs));
    }
    tracing::info!(seed = options.seed, orders = options.count, first_numero = %numero_commande(first),
        p_delivered = options.p_delivered, date_from = %options.span.start, date_to = %options.span.end,
        "seeding orders");

    let generator = Arc::new(generator);
    let chunk_refs = refs.clone();
    let chunk_size = options.chunk_size.max(1);
    let chunks = (first..end).step_by(chunk_size).map(|start| start..(start + chunk_size as u64).min(end));
    let (p_delivered, span) = (options.p_delivered, options.span);
    let written = stream::iter(chunks)
        .take_until(shutdown.cancelled())
        .map(|numbers| {
            let (generator, refs, orders) = (generator.clone(), chunk_refs.clone(), orders.clone());
            let retry = config.retry.clone();
            async move {
                // Generation is CPU work: off the async threads, so inserts keep flowing.
                let batch = tokio::task::spawn_blocking(move || generator.orders(&refs, numbers, p_delivered, span))
                    .await
                    .context("generating orders")?;
                insert_documents(&orders, &batch.documents, &retry).await?;
                anyhow::Ok(batch)
            }
        })
        .buffer_unordered(options.concurrency.max(1));
    let mut written = std::pin::pin!(written);
    let mut last_progress = Instant::now();
    while let Some(batch) = written.next().await {
        let batch = batch?;
        summary.orders += batch.documents.len() as u64;
        summary.delivered += batch.delivered;
        summary.cancelled += batch.cancelled;
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            tracing::info!(done = summary.orders, total = options.count, "seeding progress");
        }
    }
    summary.interrupted = summary.orders < options.count;
    summary.elapsed = started.elapsed();
    Ok((summary, refs))
}

/// Drops the orders, the four reference collections, the archive and its dead letters: all
/// the simulation writes or leads to, and nothing else.
async fn drop_simulated(dbs: &Databases, config: &Config) -> anyhow::Result<Vec<String>> {
    let l = &config.lookups;
    let source = [
        &config.orders.collection,
        &l.client.collection,
        &l.livreur.collection,
        &l.restaurant.collection,
        &l.menu.collection,
    ];
    let archive = [&config.archive.collection, &config.archive.errors_collection];
    let targets =
        source.iter().map(|name| (&dbs.source, *name)).chain(archive.iter().map(|name| (&dbs.archive, *name)));
    let mut dropped = Vec::new();
    for (database, name) in targets {
        let namespace = format!("{}.{}", database.name(), name);
        if dropped.contains(&namespace) {
            continue;
        }
        database.collection::<Document>(name).drop().await.with_context(|| format!("dropping {namespace}"))?;
        tracing::info!(database = database.name(), collection = %name, "collection dropped (--drop)");
        dropped.push(namespace);
    }
    Ok(dropped)
}

/// Loads the references, generates and inserts those missing, and returns them all.
async fn ensure_references(
    dbs: &Databases,
    config: &Config,
    generator: &Generator,
    options: &SeedOptions,
    summary: &mut SeedSummary,
) -> anyhow::Result<References> {
    let mut refs = load_references(dbs, config).await?;
    let sizes = ReferenceSizes::for_orders(options.count);
    let l = &config.lookups;
    let insert = |name: &str, docs: Vec<Document>| {
        let target = collection(dbs, name);
        let retry = config.retry.clone();
        let (chunk_size, concurrency) = (options.chunk_size.max(1), options.concurrency.max(1));
        async move {
            let chunks: Vec<Vec<Document>> = docs.chunks(chunk_size).map(<[Document]>::to_vec).collect();
            stream::iter(chunks)
                .map(|chunk| {
                    let (target, retry) = (target.clone(), retry.clone());
                    async move { insert_documents(&target, &chunk, &retry).await }
                })
                .buffer_unordered(concurrency)
                .try_collect::<Vec<()>>()
                .await
        }
    };
    if refs.clients.is_empty() {
        let docs = generator.clients(sizes.clients, options.span);
        refs.clients = ids_of(&docs);
        summary.clients = docs.len() as u64;
        insert(&l.client.collection, docs).await?;
    } else {
        tracing::info!(collection = %l.client.collection, existing = refs.clients.len(), "reusing existing customers");
    }
    if refs.livreurs.is_empty() {
        let docs = generator.livreurs(sizes.livreurs, options.span);
        refs.livreurs = ids_of(&docs);
        summary.livreurs = docs.len() as u64;
        insert(&l.livreur.collection, docs).await?;
    } else {
        tracing::info!(collection = %l.livreur.collection, existing = refs.livreurs.len(), "reusing existing couriers");
    }
    if refs.restaurants.is_empty() {
        // Also when restaurants exist but none has a priced menu entry: orders need dishes.
        let generated = generator.restaurants(sizes.restaurants, options.span);
        summary.restaurants = generated.restaurants.len() as u64;
        summary.menu_entries = generated.menu.len() as u64;
        refs.restaurants = generated.menus;
        insert(&l.restaurant.collection, generated.restaurants).await?;
        insert(&l.menu.collection, generated.menu).await?;
    } else {
        tracing::info!(collection = %l.restaurant.collection, existing = refs.restaurants.len(),
            "reusing existing restaurants and menus");
    }
    refs.sort();
    Ok(refs)
}

/// Reads the references already in the database, sorted by id. Documents whose `_id` is not an
/// ObjectId, and menu entries without a numeric price, are left out.
pub async fn load_references(dbs: &Databases, config: &Config) -> anyhow::Result<References> {
    let l = &config.lookups;
    async fn ids(target: Collection<Document>) -> anyhow::Result<Vec<ObjectId>> {
        let docs: Vec<Document> = target
            .find(doc! {})
            .projection(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await
            .with_context(|| format!("reading {}", target.name()))?;
        Ok(ids_of(&docs))
    }
    let clients = ids(collection(dbs, &l.client.collection)).await?;
    let livreurs = ids(collection(dbs, &l.livreur.collection)).await?;
    let restaurant_ids = ids(collection(dbs, &l.restaurant.collection)).await?;

    let menu = collection(dbs, &l.menu.collection);
    let prix_field = &l.menu.prix_field;
    let entries: Vec<Document> = menu
        .find(doc! {})
        .projection(doc! { "_id": 1, MENU_RESTAURANT_FIELD: 1, prix_field.clone(): 1 })
        .await?
        .try_collect()
        .await
        .with_context(|| format!("reading {}", menu.name()))?;
    let mut dishes: BTreeMap<ObjectId, Vec<Dish>> = BTreeMap::new();
    for entry in entries {
        let (Ok(id), Ok(restaurant)) = (entry.get_object_id("_id"), entry.get_object_id(MENU_RESTAURANT_FIELD)) else {
            continue;
        };
        let prix = match entry.get(prix_field) {
            Some(Bson::Double(p)) => *p,
            Some(Bson::Int32(p)) => f64::from(*p),
            Some(Bson::Int64(p)) => *p as f64,
            _ => continue,
        };
        dishes.entry(restaurant).or_default().push(Dish { id, prix });
    }
    let restaurants = restaurant_ids
        .into_iter()
        .filter_map(|id| dishes.remove(&id).map(|dishes| RestaurantMenu { id, dishes }))
        .collect();
    let mut refs = References { clients, livreurs, restaurants };
    refs.sort();
    Ok(refs)
}

/// One more than the highest `CMD-NNNNNN` number in the orders, or 1.
///
/// Numbers are compared as numbers, not strings: past 999999 they grow a digit, and
/// "CMD-1000000" sorts before "CMD-999999". So the highest string is taken per length and the
/// longest that parses wins. A string range selects the numbers rather than a `$regex`, which
/// some servers (SecantusDB) evaluate very slowly, and which no index would serve.
pub async fn next_order_number(orders: &Collection<Document>, config: &Config) -> anyhow::Result<u64> {
    let field = &config.orders.fields.numero_commande;
    let pipeline = vec![
        doc! { "$match": { field.clone(): { "$gte": "CMD-", "$lt": "CMD." } } },
        doc! { "$group": {
            "_id": { "$strLenCP": format!("${field}") },
            "highest": { "$max": format!("${field}") },
        } },
    ];
    let groups: Vec<Document> =
        orders.aggregate(pipeline).await?.try_collect().await.context("finding the highest order number")?;
    let highest = groups
        .iter()
        .filter_map(|group| group.get_str("highest").ok()?.strip_prefix("CMD-")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    Ok(highest + 1)
}

/// Inserts `docs` unordered, retrying transient errors with the configured backoff.
async fn insert_documents(
    target: &Collection<Document>,
    docs: &[Document],
    retry: &RetrySettings,
) -> anyhow::Result<()> {
    if docs.is_empty() {
        return Ok(());
    }
    let mut delays = db::backoff(retry);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match target.insert_many(docs).ordered(false).await {
            Ok(_) => return Ok(()),
            // The failed attempt wrote part of the chunk before failing; those documents are
            // ours (same ids), and an unordered insert wrote the rest around them.
            Err(e) if attempt > 1 && only_duplicate_keys(&e) => return Ok(()),
            Err(e) if is_transient(&e) => {
                let Some(delay) = delays.next() else {
                    return Err(e).with_context(|| {
                        format!("inserting into {} (gave up after {attempt} attempts)", target.name())
                    });
                };
                tracing::warn!(collection = target.name(), attempt, retry_in_ms = delay.as_millis() as u64,
                    error = %scrub(&e.to_string()), "transient error; retrying the chunk");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e).with_context(|| format!("inserting into {}", target.name())),
        }
    }
}

fn only_duplicate_keys(err: &mongodb::error::Error) -> bool {
    match err.kind.as_ref() {
        mongodb::error::ErrorKind::InsertMany(e) => {
            e.write_concern_error.is_none()
                && e.write_errors.as_ref().is_some_and(|w| w.iter().all(|w| w.code == DUPLICATE_KEY))
        }
        _ => error_code(err) == Some(DUPLICATE_KEY),
    }
}

/// Server code of a duplicate key.
const DUPLICATE_KEY: i32 = 11000;

// ---------------------------------------------------------------------------------------------
// Live mode
// ---------------------------------------------------------------------------------------------

/// What [`live`] does.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// The seed of the choices (which order moves, what new orders contain). Timing comes from
    /// the clock, so a live run is not reproducible; the seed only keeps new ids apart.
    pub seed: u64,
    /// Status changes per second, about.
    pub rate: f64,
    /// Stop after this long; `None` runs until `shutdown`.
    pub duration: Option<Duration>,
}

/// What [`live`] did.
#[derive(Debug, Clone, Default)]
pub struct LiveSummary {
    /// New orders inserted (`en_attente`).
    pub orders_created: u64,
    /// Status updates applied.
    pub status_changes: u64,
    /// Of which deliveries.
    pub delivered: u64,
    /// Of which cancellations.
    pub cancelled: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl LiveSummary {
    /// Status changes per second actually achieved.
    pub fn achieved_rate(&self) -> f64 {
        self.status_changes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// An order live mode will move on.
#[derive(Debug, Clone)]
struct InFlight {
    id: Bson,
    stage: Stage,
    livreur: Option<Bson>,
    placed_at: DateTime<Utc>,
}

/// Live mode's state between ticks.
struct LiveRun<'a> {
    config: &'a Config,
    orders: Collection<Document>,
    generator: Generator,
    refs: References,
    queue: Vec<InFlight>,
    rng: StdRng,
    next_number: u64,
    summary: LiveSummary,
}

/// Moves orders through their statuses at about `rate` changes per second, creating orders so
/// the flow never dries up, until `shutdown` fires or `duration` has passed. A change in flight
/// always completes before it stops.
pub async fn live(
    dbs: &Databases,
    config: &Config,
    options: &LiveOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<LiveSummary> {
    if !(options.rate.is_finite() && options.rate > 0.0) {
        return Err(UsageError(format!("rate must be a positive number, got {}", options.rate)).into());
    }
    let refs = load_references(dbs, config).await?;
    live_with_references(dbs, config, options, refs, shutdown).await
}

/// [`live`] with the references already read.
async fn live_with_references(
    dbs: &Databases,
    config: &Config,
    options: &LiveOptions,
    refs: References,
    shutdown: &CancellationToken,
) -> anyhow::Result<LiveSummary> {
    if !refs.is_usable() {
        bail!(
            "live mode needs customers, couriers and restaurants with a menu; seed them first \
             (archiver simulate --count 0)"
        );
    }
    let orders = collection(dbs, &config.orders.collection);
    let queue = load_in_flight(&orders, config).await?;
    let next_number = next_order_number(&orders, config).await?;
    let mut run = LiveRun {
        config,
        orders,
        generator: Generator::new(config, options.seed),
        refs,
        queue,
        // Keyed on the first number it will create, so two live runs with one seed differ.
        rng: stream_rng(options.seed, Stream::Live, next_number),
        next_number,
        summary: LiveSummary::default(),
    };
    tracing::info!(rate = options.rate, duration_s = options.duration.map(|d| d.as_secs()),
        in_flight = run.queue.len(), next_numero = %numero_commande(next_number), "live simulation starting");

    let started = Instant::now();
    // The timer has millisecond resolution, so past MAX_TICKS_PER_SEC a tick makes several
    // changes (a fractional share carried over) rather than ticking faster.
    let (period, changes_per_tick) = if options.rate <= MAX_TICKS_PER_SEC {
        // Capped at a day: a Duration cannot hold the inverse of a vanishingly small rate.
        ((1.0 / options.rate).min(86_400.0), 1.0)
    } else {
        (1.0 / MAX_TICKS_PER_SEC, options.rate / MAX_TICKS_PER_SEC)
    };
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(period));
    // After a stall (a slow server, an election) go on at the set pace rather than bursting to
    // catch up: the achieved rate in the summary tells the truth either way.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut change_budget = 0.0;
    let stop_at = options.duration.map(|d| tokio::time::Instant::now() + d);
    let deadline = async move {
        match stop_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut last_progress = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = &mut deadline => break,
            _ = ticks.tick() => {}
        }
        change_budget += changes_per_tick;
        let changes = change_budget.floor();
        change_budget -= changes;
        run.tick(changes as usize).await?;
        if last_progress.elapsed() >= LIVE_PROGRESS_EVERY {
            last_progress = Instant::now();
            let s = &run.summary;
            tracing::info!(
                status_changes = s.status_changes,
                delivered = s.delivered,
                cancelled = s.cancelled,
                orders_created = s.orders_created,
                in_flight = run.queue.len(),
                "live progress"
            );
        }
    }
    run.summary.elapsed = started.elapsed();
    Ok(run.summary)
}

/// The orders not yet delivered or cancelled, up to [`MAX_LOADED_IN_FLIGHT`].
async fn load_in_flight(orders: &Collection<Document>, config: &Config) -> anyhow::Result<Vec<InFlight>> {
    let f = &config.orders.fields;
    let livreur_field = &config.lookups.livreur.local_field;
    let docs: Vec<Document> = orders
        .find(doc! { f.status.clone(): { "$in": [PENDING, PREPARING, ON_THE_WAY] } })
        .projection(doc! { "_id": 1, f.status.clone(): 1, livreur_field.clone(): 1, f.date_commande.clone(): 1 })
        .limit(MAX_LOADED_IN_FLIGHT)
        .await?
        .try_collect()
        .await
        .context("reading the orders in flight")?;
    Ok(docs
        .into_iter()
        .filter_map(|d| {
            let stage = Stage::in_flight(d.get_str(&f.status).ok()?)?;
            let placed_at = d
                .get_datetime(&f.date_commande)
                .ok()
                .and_then(|t| DateTime::from_timestamp_millis(t.timestamp_millis()))
                .unwrap_or(DateTime::UNIX_EPOCH);
            let livreur = d.get(livreur_field).filter(|b| !matches!(b, Bson::Null)).cloned();
            Some(InFlight { id: d.get("_id")?.clone(), stage, livreur, placed_at })
        })
        .collect())
}

/// A status change about to be written.
struct PlannedChange {
    order: InFlight,
    next: Stage,
    filter: Document,
    update: Document,
}

impl LiveRun<'_> {
    /// `changes` status changes, written together, and some new orders first. Together because
    /// one at a time a round trip each would cap the rate near the inverse of the latency; the
    /// orders of one tick are distinct, so their updates do not race.
    async fn tick(&mut self, changes: usize) -> anyhow::Result<()> {
        self.create_orders(changes).await?;
        let planned: Vec<PlannedChange> = (0..changes.min(self.queue.len())).map(|_| self.plan_change()).collect();
        let orders = &self.orders;
        let results = futures_util::future::join_all(
            planned.iter().map(|p| async move { orders.update_one(p.filter.clone(), p.update.clone()).await }),
        )
        .await;
        for (change, result) in planned.into_iter().zip(results) {
            let PlannedChange { order, next, .. } = change;
            match result {
                Ok(result) if result.matched_count == 0 => {
                    tracing::debug!(order_id = %order.id, "order changed or removed meanwhile; no longer moved");
                }
                Ok(_) => {
                    self.summary.status_changes += 1;
                    match next {
                        Stage::Delivered => self.summary.delivered += 1,
                        Stage::Cancelled => self.summary.cancelled += 1,
                        _ => self.queue.push(InFlight { stage: next, ..order }),
                    }
                }
                Err(e) if is_transient(&e) => {
                    tracing::warn!(order_id = %order.id, error = %scrub(&e.to_string()),
                        "transient error moving an order; will try again");
                    self.queue.push(order);
                }
                Err(e) => return Err(e).context("updating an order's status"),
            }
        }
        Ok(())
    }

    /// New orders for a tick of `changes` changes. They arrive at about a third of the change
    /// rate: an order takes about three changes to finish, so the number in flight stays level.
    async fn create_orders(&mut self, changes: usize) -> anyhow::Result<()> {
        let now = Utc::now();
        let mut created = Vec::new();
        for _ in 0..changes {
            if self.queue.len() + created.len() < MIN_IN_FLIGHT || self.rng.random_bool(1.0 / 3.0) {
                let number = self.next_number;
                self.next_number += 1;
                created.push(self.generator.order_document(&mut self.rng, &self.refs, number, Stage::Pending, now));
            }
        }
        if created.is_empty() {
            return Ok(());
        }
        match self.orders.insert_many(&created).ordered(false).await {
            Ok(_) => {
                self.summary.orders_created += created.len() as u64;
                self.queue.extend(created.iter().map(|order| InFlight {
                    id: order.get("_id").cloned().unwrap_or(Bson::Null),
                    stage: Stage::Pending,
                    livreur: None,
                    placed_at: now,
                }));
                Ok(())
            }
            Err(e) if is_transient(&e) => {
                // Their numbers are skipped: a gap is harmless, a duplicate would not be.
                tracing::warn!(orders = created.len(), error = %scrub(&e.to_string()),
                    "transient error creating orders; going on");
                Ok(())
            }
            Err(e) => Err(e).context("creating orders"),
        }
    }

    /// Takes a random in-flight order out of the queue and decides its next step.
    fn plan_change(&mut self) -> PlannedChange {
        let picked = self.rng.random_range(0..self.queue.len());
        let mut order = self.queue.swap_remove(picked);
        let f = &self.config.orders.fields;
        let delivered_status = &self.config.orders.delivered_status;
        let next = order.stage.next(&mut self.rng);
        let mut set = Document::new();
        set.insert(f.status.clone(), next.status(delivered_status));
        if next.has_courier() {
            let livreur = order.livreur.take().unwrap_or_else(|| {
                Bson::ObjectId(*self.refs.livreurs.choose(&mut self.rng).expect("references are usable"))
            });
            set.insert(self.config.lookups.livreur.local_field.clone(), livreur.clone());
            order.livreur = Some(livreur);
        }
        if next == Stage::Delivered {
            // Never before the order date, even for orders seeded later today than now.
            set.insert(f.date_livraison.clone(), bson_date(Utc::now().max(order.placed_at)));
        }
        // Matching the current status too: if someone else moved the order meanwhile, leave it.
        let filter = doc! { "_id": order.id.clone(), f.status.clone(): order.stage.status(delivered_status) };
        PlannedChange { order, next, filter, update: doc! { "$set": set } }
    }
}

// ---------------------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------------------

/// The validated arguments, turned into options. No side effects: called before connecting.
fn options_from_args(
    args: &SimulateArgs,
    today: NaiveDate,
    seed: u64,
) -> Result<(SeedOptions, Option<LiveOptions>), UsageError> {
    if !(0.0..=1.0).contains(&args.p_delivered) {
        return Err(UsageError(format!("--p-delivered must be between 0 and 1, got {}", args.p_delivered)));
    }
    if !(args.rate.is_finite() && args.rate > 0.0) {
        return Err(UsageError(format!(
            "--rate must be a positive number of status changes per second, got {}",
            args.rate
        )));
    }
    if args.days == 0 {
        return Err(UsageError("--days must be at least 1".to_owned()));
    }
    // Default: up to the start of today, so that no seeded order lies in the future while the
    // same seed still gives the same data all day long.
    let end = args.end_date.unwrap_or(today);
    let span = DateSpan::days_before(end, args.days);
    let mut seed_options = SeedOptions::new(seed, args.count, args.p_delivered, span);
    seed_options.drop = args.drop;
    let live_options =
        args.live.then(|| LiveOptions { seed, rate: args.rate, duration: args.duration.map(Duration::from_secs) });
    Ok((seed_options, live_options))
}

/// Runs `archiver simulate`: validates, seeds, then in live mode keeps moving orders.
pub async fn run(config: &Config, args: &SimulateArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let chosen_seed = args.seed.unwrap_or_else(rand::random);
    let (seed_options, live_options) = options_from_args(args, Utc::now().date_naive(), chosen_seed)?;
    if args.seed.is_none() {
        tracing::info!(
            seed = chosen_seed,
            "no --seed given: picked one at random; pass it as --seed to reproduce this data"
        );
    }
    let dbs = tokio::select! {
        dbs = db::connect(config) => dbs?,
        _ = shutdown.cancelled() => bail!("interrupted before connecting"),
    };
    let (summary, refs) = seed_keeping_references(&dbs, config, &seed_options, &shutdown).await?;
    report_seed(config, &summary);
    if summary.interrupted {
        bail!(
            "interrupted after {} of {} orders; the ones written are complete, and a new run adds after them",
            summary.orders,
            seed_options.count
        );
    }
    if let Some(live_options) = live_options {
        let refs = Arc::try_unwrap(refs).unwrap_or_else(|shared| (*shared).clone());
        let summary = live_with_references(&dbs, config, &live_options, refs, &shutdown).await?;
        report_live(&summary);
    }
    Ok(())
}

fn report_seed(config: &Config, s: &SeedSummary) {
    let l = &config.lookups;
    let secs = s.elapsed.as_secs_f64();
    tracing::info!(
        seed = s.seed,
        dropped = s.dropped.len(),
        clients = s.clients,
        livreurs = s.livreurs,
        restaurants = s.restaurants,
        menu_entries = s.menu_entries,
        orders = s.orders,
        delivered = s.delivered,
        cancelled = s.cancelled,
        first_numero = %numero_commande(s.first_number),
        duration_ms = s.elapsed.as_millis() as u64,
        orders_per_sec = s.orders_per_sec().round() as u64,
        interrupted = s.interrupted,
        "seeding finished"
    );
    let numbers = if s.orders == 0 {
        String::new()
    } else {
        format!(", {}..{}", numero_commande(s.first_number), numero_commande(s.first_number + s.orders - 1))
    };
    println!(
        "simulate: inserted {} {} ({} delivered, {} cancelled{numbers}), {} {}, {} {}, {} {}, {} {} \
         in {secs:.2} s ({:.0} orders/s); seed {}{}",
        s.orders,
        config.orders.collection,
        s.delivered,
        s.cancelled,
        s.clients,
        l.client.collection,
        s.livreurs,
        l.livreur.collection,
        s.restaurants,
        l.restaurant.collection,
        s.menu_entries,
        l.menu.collection,
        s.orders_per_sec(),
        s.seed,
        if s.dropped.is_empty() { String::new() } else { format!("; dropped first: {}", s.dropped.join(", ")) },
    );
}

fn report_live(s: &LiveSummary) {
    let secs = s.elapsed.as_secs_f64();
    tracing::info!(
        orders_created = s.orders_created,
        status_changes = s.status_changes,
        delivered = s.delivered,
        cancelled = s.cancelled,
        elapsed_ms = s.elapsed.as_millis() as u64,
        changes_per_sec = (s.achieved_rate() * 10.0).round() / 10.0,
        "live simulation stopped"
    );
    println!(
        "simulate live: {} status changes ({} delivered, {} cancelled), {} orders created in {secs:.1} s \
         ({:.1} changes/s)",
        s.status_changes,
        s.delivered,
        s.cancelled,
        s.orders_created,
        s.achieved_rate()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span() -> DateSpan {
        DateSpan::days_before(NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(), 30)
    }

    #[test]
    fn same_seed_same_dataset_and_another_seed_differs() {
        let config = Config::default();
        let a = generate_dataset(&config, 42, 300, 0.4, span());
        let b = generate_dataset(&config, 42, 300, 0.4, span());
        assert_eq!(a.orders, b.orders);
        assert_eq!(a.clients, b.clients);
        assert_eq!(a.menu, b.menu);
        let c = generate_dataset(&config, 43, 300, 0.4, span());
        assert_ne!(a.orders, c.orders);
        assert_ne!(a.clients, c.clients);
    }

    #[test]
    fn orders_follow_the_data_model() {
        let config = Config::default();
        let data = generate_dataset(&config, 7, 2000, 0.4, span());
        assert_eq!(data.orders.len(), 2000);
        assert_eq!(data.clients.len(), 400);
        let delivered = data.orders.iter().filter(|o| o.get_str("status").unwrap() == "livrée").count();
        assert_eq!(delivered as u64, data.delivered);
        assert!((660..=940).contains(&delivered), "{delivered}");
        let prices: BTreeMap<ObjectId, f64> =
            data.menu.iter().map(|m| (m.get_object_id("_id").unwrap(), m.get_f64("prix").unwrap())).collect();
        let (start, end) = (span().start.timestamp_millis(), span().end.timestamp_millis());
        for (i, order) in data.orders.iter().enumerate() {
            assert_eq!(order.get_str("numero_commande").unwrap(), format!("CMD-{:06}", i + 1));
            let placed = order.get_datetime("date_commande").unwrap().timestamp_millis();
            assert!((start..end).contains(&placed));
            let items = order.get_array("items").unwrap();
            assert!((1..=5).contains(&items.len()));
            let sum: f64 = items
                .iter()
                .map(|i| {
                    let i = i.as_document().unwrap();
                    prices[&i.get_object_id("menu_id").unwrap()] * f64::from(i.get_i32("quantite").unwrap())
                })
                .sum();
            assert!((order.get_f64("montant_total").unwrap() - sum).abs() < 0.005);
            let status = order.get_str("status").unwrap();
            assert_eq!(order.get("livreur_id") == Some(&Bson::Null), matches!(status, PENDING | PREPARING | CANCELLED));
        }
    }

    #[test]
    fn email_parts_are_ascii() {
        assert_eq!(email_part("Hélène"), "helene");
        assert_eq!(email_part("Le Bœuf d'Or"), "leboeufdor");
        assert_eq!(lowercase_first("Rue Voltaire"), "rue Voltaire");
    }

    #[test]
    fn invalid_arguments_are_usage_errors() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["archiver", "simulate"];
            argv.extend_from_slice(extra);
            match crate::cli::Cli::parse_from(argv).command {
                crate::cli::Command::Simulate(args) => args,
                _ => unreachable!(),
            }
        };
        let today = NaiveDate::from_ymd_opt(2026, 3, 10).unwrap();
        for bad in [
            &["--p-delivered", "1.5"][..],
            &["--p-delivered=-0.1"],
            &["--rate", "0"],
            &["--rate=-2"],
            &["--p-delivered", "NaN"],
            &["--days", "0"],
        ] {
            assert!(options_from_args(&parse(bad), today, 1).is_err(), "{bad:?}");
        }
        let (options, live) = options_from_args(&parse(&[]), today, 1).unwrap();
        // The default range ends at the start of today: no order lies in the future.
        assert_eq!(options.span.end.to_rfc3339(), "2026-03-10T00:00:00+00:00");
        assert!(live.is_none());
    }
}
