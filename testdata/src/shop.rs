//! The shop `orderly seed` writes through the command path: a catalogue with stock, orders of 1
//! to 5 lines from a few hundred customers paying mostly with `tok_ok` and sometimes
//! `tok_declined`, some cancelled by their customer, and shipments (some delivered) of the
//! orders the saga confirmed.
//!
//! Everything is drawn from one seeded generator ([`ShopDraws`]), in the order the seed asks:
//! every product, then every order, then a shipment for each confirmed order. The same seed and
//! shape draw the same shop, which is what lets a second `orderly seed` with the same seed find
//! its orders already placed. Sending them, retrying and counting stay with the seed
//! (`service/src/seed.rs`).

use std::collections::HashSet;

use orderly_domain::order::LineRequest;
use orderly_domain::values::{
    Address, AddressLine, Carrier, CountryCode, Currency, Money, PostalCode, ProductName, Quantity,
    Sku, TrackingNumber,
};
use orderly_event_schemas::SchemaError;

/// The shape of the shop.
#[derive(Debug, Clone, PartialEq)]
pub struct Shop {
    pub products: usize,
    pub customers: usize,
    pub orders: usize,
    /// Share of orders paid with `tok_declined`.
    pub declined_share: f64,
    /// Share of orders their customer cancels right after placing them.
    pub cancel_share: f64,
    /// Share of confirmed orders shipped, and of shipped orders delivered.
    pub ship_share: f64,
    pub deliver_share: f64,
}

/// A product to register.
#[derive(Debug, Clone, PartialEq)]
pub struct ProductDraw {
    pub sku: Sku,
    pub name: ProductName,
    pub price: Money,
    pub initial_stock: u32,
}

/// One order, drawn before anything is sent so the shop does not depend on timing.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderDraw {
    /// Its place in the draw: with the seed, what its idempotency key derives from.
    pub index: usize,
    pub customer: String,
    pub lines: Vec<LineRequest>,
    pub token: &'static str,
    pub address: Address,
    /// Whether its customer cancels it right after placing it.
    pub cancel: bool,
}

/// A shipment of a confirmed order.
#[derive(Debug, Clone, PartialEq)]
pub struct ShipmentDraw {
    pub carrier: Carrier,
    pub tracking: TrackingNumber,
    /// Whether it is marked delivered once shipped.
    pub deliver: bool,
}

const ADJECTIVES: [&str; 10] = [
    "Green", "Smoky", "Ceramic", "Linen", "Walnut", "Copper", "Wool", "Glass", "Oak", "Cotton",
];
const NOUNS: [&str; 8] = [
    "tea", "mug", "tray", "scarf", "bowl", "lamp", "notebook", "candle",
];
const FIRST_NAMES: [&str; 8] = [
    "Ada", "Bruno", "Chloé", "Dmitri", "Elif", "Femi", "Greta", "Hugo",
];
const STREETS: [&str; 5] = [
    "Main Street",
    "Rue de la Paix",
    "Hauptstraße",
    "Calle Mayor",
    "Via Roma",
];
/// (city, postal code, country)
const CITIES: [(&str, &str, &str); 5] = [
    ("Berlin", "10115", "DE"),
    ("Lyon", "69001", "FR"),
    ("Madrid", "28001", "ES"),
    ("Milano", "20121", "IT"),
    ("Amsterdam", "1011 AB", "NL"),
];
const CARRIERS: [&str; 4] = ["DHL", "UPS", "GLS", "DPD"];

/// Units of a scarce product: a few orders of it are cancelled out of stock, as in a shop.
const SCARCE_STOCK: u32 = 5;

/// The SKU of product `index`.
fn sku(index: usize) -> Result<Sku, SchemaError> {
    Sku::parse(format!("SEED-{index:04}"))
}

/// The shop's draws, from one generator seeded once.
pub struct ShopDraws {
    shop: Shop,
    rng: fastrand::Rng,
}

impl ShopDraws {
    pub fn new(shop: Shop, seed: u64) -> Self {
        Self {
            shop,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Product `index` (of `0..shop.products`), priced in `currency`. The last two of a
    /// catalogue of five or more are scarce; the others have enough stock for the most popular
    /// of them to serve every order.
    pub fn product(
        &mut self,
        index: usize,
        currency: Currency,
    ) -> Result<ProductDraw, SchemaError> {
        let products = self.shop.products;
        let scarce = index + 2 >= products && products > 4;
        let plenty = u32::try_from(self.shop.orders.saturating_mul(2) + 50)
            .unwrap_or(u32::MAX)
            .min(1_000_000_000);
        Ok(ProductDraw {
            sku: sku(index)?,
            name: ProductName::parse(format!(
                "{} {}",
                ADJECTIVES[index % ADJECTIVES.len()],
                NOUNS[(index / ADJECTIVES.len() + index) % NOUNS.len()]
            ))?,
            price: Money::new(i64::from(self.rng.u32(199..=9999)), currency)?,
            initial_stock: if scarce { SCARCE_STOCK } else { plenty },
        })
    }

    /// Order `index`: 1 to 5 distinct products, demand skewed towards the first ones, as shop
    /// sales are.
    pub fn order(&mut self, index: usize) -> Result<OrderDraw, SchemaError> {
        let products = self.shop.products.max(1);
        let rng = &mut self.rng;
        let count = rng.usize(1..=5).min(products);
        let mut picked = HashSet::new();
        let mut lines = Vec::with_capacity(count);
        while lines.len() < count {
            // Squaring skews demand towards the first products.
            let product = ((rng.f64().powi(2) * products as f64) as usize).min(products - 1);
            if !picked.insert(product) {
                continue;
            }
            let quantity = if rng.f64() < 0.7 { 1 } else { rng.u32(2..=4) };
            lines.push(LineRequest {
                sku: sku(product)?,
                quantity: Quantity::new(quantity)?,
            });
        }
        let (city, postal_code, country) = CITIES[rng.usize(..CITIES.len())];
        let address = Address {
            name: AddressLine::parse(FIRST_NAMES[rng.usize(..FIRST_NAMES.len())])?,
            line1: AddressLine::parse(format!(
                "{} {}",
                rng.u32(1..200),
                STREETS[rng.usize(..STREETS.len())]
            ))?,
            line2: None,
            city: AddressLine::parse(city)?,
            postal_code: PostalCode::parse(postal_code)?,
            country: CountryCode::parse(country)?,
        };
        Ok(OrderDraw {
            index,
            customer: format!("customer-{:04}", rng.usize(..self.shop.customers.max(1))),
            lines,
            token: if rng.f64() < self.shop.declined_share {
                "tok_declined"
            } else {
                "tok_ok"
            },
            address,
            cancel: rng.f64() < self.shop.cancel_share,
        })
    }

    /// Whether a confirmed order is shipped, and how.
    pub fn shipment(&mut self) -> Result<Option<ShipmentDraw>, SchemaError> {
        if self.rng.f64() >= self.shop.ship_share {
            return Ok(None);
        }
        let carrier = CARRIERS[self.rng.usize(..CARRIERS.len())];
        let tracking = self.rng.u32(..);
        Ok(Some(ShipmentDraw {
            carrier: Carrier::parse(carrier)?,
            tracking: TrackingNumber::parse(format!("{carrier}{tracking:010}"))?,
            deliver: self.rng.f64() < self.shop.deliver_share,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shop() -> Shop {
        Shop {
            products: 12,
            customers: 30,
            orders: 200,
            declined_share: 0.1,
            cancel_share: 0.1,
            ship_share: 0.7,
            deliver_share: 0.6,
        }
    }

    fn eur() -> Currency {
        Currency::parse("EUR").unwrap()
    }

    /// Products, then orders, then shipments, as the seed draws them.
    fn draw(seed: u64) -> (Vec<ProductDraw>, Vec<OrderDraw>, Vec<Option<ShipmentDraw>>) {
        let mut draws = ShopDraws::new(shop(), seed);
        let products = (0..12).map(|i| draws.product(i, eur()).unwrap()).collect();
        let orders = (0..200).map(|i| draws.order(i).unwrap()).collect();
        let shipments = (0..50).map(|_| draws.shipment().unwrap()).collect();
        (products, orders, shipments)
    }

    #[test]
    fn the_same_seed_draws_the_same_shop_and_another_seed_another() {
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3).1, draw(4).1);
    }

    #[test]
    fn orders_name_distinct_products_of_the_catalogue_and_demand_favours_the_first() {
        let (products, orders, _) = draw(5);
        let mut first_half = 0;
        for order in &orders {
            assert!((1..=5).contains(&order.lines.len()));
            let skus: HashSet<_> = order.lines.iter().map(|l| l.sku.clone()).collect();
            assert_eq!(skus.len(), order.lines.len(), "{order:?}");
            for line in &order.lines {
                let index = products.iter().position(|p| p.sku == line.sku);
                assert!(index.is_some(), "{:?} is not in the catalogue", line.sku);
                first_half += usize::from(index < Some(6));
            }
        }
        let lines: usize = orders.iter().map(|o| o.lines.len()).sum();
        // Squared draws put about 71 % of lines on the first half of the catalogue.
        assert!(first_half * 100 > lines * 60, "{first_half} of {lines}");
    }

    #[test]
    fn the_last_two_products_are_scarce_and_the_rest_can_serve_every_order() {
        let (products, _, _) = draw(1);
        let stock: Vec<u32> = products.iter().map(|p| p.initial_stock).collect();
        assert_eq!(&stock[10..], &[SCARCE_STOCK, SCARCE_STOCK]);
        assert!(stock[..10].iter().all(|&s| s == 450), "{stock:?}");
    }

    #[test]
    fn shares_are_drawn_near_what_the_shape_asks() {
        let mut draws = ShopDraws::new(
            Shop {
                orders: 4000,
                ..shop()
            },
            9,
        );
        let orders: Vec<OrderDraw> = (0..4000).map(|i| draws.order(i).unwrap()).collect();
        let declined = orders.iter().filter(|o| o.token == "tok_declined").count();
        let cancelled = orders.iter().filter(|o| o.cancel).count();
        assert!((300..500).contains(&declined), "{declined}");
        assert!((300..500).contains(&cancelled), "{cancelled}");
        let shipments: Vec<_> = (0..4000).map(|_| draws.shipment().unwrap()).collect();
        let shipped = shipments.iter().flatten().count();
        assert!((2600..3000).contains(&shipped), "{shipped}");
    }
}
