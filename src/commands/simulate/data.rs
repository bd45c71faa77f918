//! The generator: customers, couriers, restaurants with their menus, and orders, each drawn
//! from its own random stream so that a seed reproduces a dataset byte for byte.

use std::ops::Range;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use fake::faker::address::fr_fr::StreetName;
use fake::faker::internet::fr_fr::FreeEmailProvider;
use fake::faker::name::fr_fr::{FirstName, LastName};
use fake::faker::phone_number::fr_fr::{CellNumber, PhoneNumber};
use fake::Fake;
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};

use crate::config::{Config, OrderFields};

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
pub(super) const MIN_IN_FLIGHT: usize = 10;
/// Live mode loads at most this many in-flight orders at start: a demo needs no more, and a huge
/// backlog would only cost memory.
pub(super) const MAX_LOADED_IN_FLIGHT: i64 = 100_000;
/// Live mode ticks at most this often.
pub(super) const MAX_TICKS_PER_SEC: f64 = 100.0;
/// How often live mode logs its progress.
pub(super) const LIVE_PROGRESS_EVERY: Duration = Duration::from_secs(10);

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
    pub(super) fn in_flight(status: &str) -> Option<Stage> {
        match status {
            PENDING => Some(Stage::Pending),
            PREPARING => Some(Stage::Preparing),
            ON_THE_WAY => Some(Stage::OnTheWay),
            _ => None,
        }
    }

    /// Whether a courier is assigned at this stage.
    pub(super) fn has_courier(self) -> bool {
        matches!(self, Stage::OnTheWay | Stage::Delivered)
    }

    /// The next stage in live mode: mostly forward, sometimes cancelled before a courier leaves.
    pub(super) fn next(self, rng: &mut StdRng) -> Stage {
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
    pub(super) fn not_delivered(rng: &mut StdRng) -> Stage {
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
pub(super) enum Stream {
    Clients = 1,
    Livreurs = 2,
    Restaurants = 3,
    Orders = 4,
    Live = 5,
}

/// The random stream of one entity. The ChaCha key is the triple itself, so distinct triples
/// give independent streams, with no hashing step where two of them could collide.
pub(super) fn stream_rng(seed: u64, stream: Stream, index: u64) -> StdRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(stream as u64).to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    StdRng::from_seed(key)
}

/// An ObjectId drawn from `rng`: the timestamp of `at` (so ids sort by date, as real ones do)
/// and 8 random bytes. `ObjectId::new()` would make every run different.
pub(super) fn object_id(rng: &mut StdRng, at: DateTime<Utc>) -> ObjectId {
    let secs = at.timestamp().clamp(0, i64::from(u32::MAX)) as u32;
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&secs.to_be_bytes());
    rng.fill(&mut bytes[4..]);
    ObjectId::from_bytes(bytes)
}

pub(super) fn bson_date(at: DateTime<Utc>) -> Bson {
    Bson::DateTime(mongodb::bson::DateTime::from_chrono(at))
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
pub(super) const LUNCH: Range<i64> = 11 * 3600..13 * 3600 + 1800;
pub(super) const DINNER: Range<i64> = 17 * 3600 + 1800..21 * 3600;

impl DateSpan {
    /// The `days` days before midnight (UTC) at the start of `end`.
    pub fn days_before(end: NaiveDate, days: u32) -> DateSpan {
        let end = end.and_time(NaiveTime::MIN).and_utc();
        DateSpan { start: end - chrono::Duration::days(i64::from(days)), end }
    }

    /// An order date: a day of the span, at a time drawn mostly from the meal rushes.
    pub(super) fn pick(&self, rng: &mut StdRng) -> DateTime<Utc> {
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
pub(super) enum Category {
    Entree,
    Plat,
    Dessert,
    Boisson,
}

impl Category {
    pub(super) fn label(self) -> &'static str {
        match self {
            Category::Entree => "entrée",
            Category::Plat => "plat",
            Category::Dessert => "dessert",
            Category::Boisson => "boisson",
        }
    }

    /// A menu price: whole euros in the category's range, ending in .00, .50 or .90.
    pub(super) fn price_cents(self, rng: &mut StdRng) -> i64 {
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
pub(super) struct Cuisine {
    name: &'static str,
    restaurant_names: &'static [&'static str],
    dishes: &'static [(&'static str, Category)],
}

/// Drinks every restaurant may serve, on top of its cuisine's dishes.
pub(super) const DRINKS: &[(&str, Category)] = &[
    ("Eau minérale", Boisson),
    ("Eau pétillante", Boisson),
    ("Limonade artisanale", Boisson),
    ("Jus d'orange pressé", Boisson),
    ("Thé glacé maison", Boisson),
    ("Coca-Cola", Boisson),
];

pub(super) const CUISINES: &[Cuisine] = &[
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
pub(super) const CITIES: &[(&str, &[&str])] = &[
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

pub(super) const VEHICLES: &[&str] = &["vélo", "vélo électrique", "scooter", "moto", "voiture"];

pub(super) fn address(rng: &mut StdRng) -> Document {
    let (ville, codes) = CITIES.choose(rng).expect("non-empty");
    let code_postal = codes.choose(rng).expect("non-empty");
    let street: String = StreetName().fake_with_rng(rng);
    let numero = rng.random_range(1..=180u32);
    doc! { "rue": format!("{numero} {}", lowercase_first(&street)), "ville": *ville, "code_postal": *code_postal }
}

/// "Rue Voltaire" → "rue Voltaire", as French addresses are written.
pub(super) fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The ASCII form of a name for an e-mail address: accents dropped, spaces and apostrophes gone.
pub(super) fn email_part(name: &str) -> String {
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

    pub(super) fn sort(&mut self) {
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
    pub(super) fn registered_at(rng: &mut StdRng, span: DateSpan) -> DateTime<Utc> {
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
    pub(super) fn order_document(
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
pub(super) fn ids_of(docs: &[Document]) -> Vec<ObjectId> {
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
