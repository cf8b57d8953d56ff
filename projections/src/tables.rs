//! The read-model tables' names and columns, in one place: the projections insert rows with
//! them, the read API selects them back, and a test holds them to the migrated schema
//! (`tests/postgres.rs`, `every_table_here_has_the_columns_of_the_migrated_one`).
//!
//! A table's columns are listed in the order its rows are written and read: statements built
//! from a [`Table`] take and return them in that order, and readers find a column's place with
//! [`Table::index`] (at compile time, in a `const` block), never by counting.

/// One column and the type its values are sent and read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    /// As written in a cast (`$1::bigint[]`): `uuid`, `text`, `bigint`, `int`, `timestamptz`,
    /// `date` or `tsvector`.
    pub sql_type: &'static str,
}

/// A read-model table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    pub columns: &'static [Column],
}

const fn column(name: &'static str, sql_type: &'static str) -> Column {
    Column { name, sql_type }
}

/// Where `name` is in `names`. Meant for `const` blocks, where a missing name stops the build.
pub const fn position(names: &[&str], name: &str) -> usize {
    let mut i = 0;
    while i < names.len() {
        if same(names[i], name) {
            return i;
        }
        i += 1;
    }
    panic!("no such name in the list");
}

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

impl Table {
    /// Where `name` is among the columns. Meant for `const` blocks, where a name the table does
    /// not have stops the build.
    pub const fn index(&self, name: &str) -> usize {
        let mut i = 0;
        while i < self.columns.len() {
            if same(self.columns[i].name, name) {
                return i;
            }
            i += 1;
        }
        panic!("no such column in this read-model table");
    }

    /// `a, b, c`, or with an alias `o.a, o.b, o.c`.
    pub fn select_list(&self, alias: Option<&str>) -> String {
        let prefix = alias.map(|a| format!("{a}.")).unwrap_or_default();
        self.columns
            .iter()
            .map(|c| format!("{prefix}{}", c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `insert into t (a, b) select * from unnest($1::uuid[], $2::text[])`: one row per array
    /// element, the arrays in column order.
    pub fn insert_from_arrays(&self) -> String {
        let arrays = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::{}[]", i + 1, c.sql_type))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "insert into {} ({}) select * from unnest({arrays})",
            self.name,
            self.select_list(None)
        )
    }
}

/// One row per order, as placed and as it moved on.
pub const ORDERS: Table = Table {
    name: "orders",
    columns: &[
        column("order_id", "uuid"),
        column("customer_id", "text"),
        column("total_minor", "bigint"),
        column("currency", "text"),
        column("ship_name", "text"),
        column("ship_line1", "text"),
        column("ship_line2", "text"),
        column("ship_city", "text"),
        column("ship_postal_code", "text"),
        column("ship_country", "text"),
        column("placed_at", "timestamptz"),
        // From here on the columns an order's later events change.
        column("status", "text"),
        column("updated_at", "timestamptz"),
        column("cancellation_reason", "text"),
        column("carrier", "text"),
        column("tracking_number", "text"),
        column("shipped_at", "timestamptz"),
        column("delivered_at", "timestamptz"),
        column("version", "bigint"),
    ],
};

/// An order's search document (product names, SKUs, customer and address).
pub const ORDER_SEARCH: Table = Table {
    name: "order_search",
    columns: &[
        column("order_id", "uuid"),
        column("search_document", "tsvector"),
    ],
};

pub const ORDER_LINES: Table = Table {
    name: "order_lines",
    columns: &[
        column("order_id", "uuid"),
        column("line_no", "int"),
        column("sku", "text"),
        column("name", "text"),
        column("quantity", "int"),
        column("unit_price_minor", "bigint"),
        column("line_total_minor", "bigint"),
        column("currency", "text"),
    ],
};

/// One row per status change; `version` is the order-stream version of the event behind it.
pub const ORDER_STATUS_HISTORY: Table = Table {
    name: "order_status_history",
    columns: &[
        column("order_id", "uuid"),
        column("version", "bigint"),
        column("status", "text"),
        column("at", "timestamptz"),
        column("reason", "text"),
    ],
};

/// The latest word on an order's payment; `version` is the payment stream's.
pub const ORDER_PAYMENTS: Table = Table {
    name: "order_payments",
    columns: &[
        column("order_id", "uuid"),
        column("status", "text"),
        column("amount_minor", "bigint"),
        column("currency", "text"),
        column("attempts", "int"),
        column("failure_reason", "text"),
        column("version", "bigint"),
    ],
};

pub const CUSTOMERS: Table = Table {
    name: "customers",
    columns: &[
        column("customer_id", "text"),
        column("order_count", "int"),
        column("last_order_at", "timestamptz"),
    ],
};

pub const CUSTOMER_LIFETIME_VALUES: Table = Table {
    name: "customer_lifetime_values",
    columns: &[
        column("customer_id", "text"),
        column("currency", "text"),
        column("amount_minor", "bigint"),
    ],
};

pub const DAILY_SALES: Table = Table {
    name: "daily_sales",
    columns: &[
        column("date", "date"),
        column("currency", "text"),
        column("orders", "int"),
        column("cancelled", "int"),
        column("revenue_minor", "bigint"),
    ],
};

/// One row per product; `available` is always `on_hand - reserved` (a check says so).
pub const PRODUCTS: Table = Table {
    name: "products",
    columns: &[
        column("sku", "text"),
        column("name", "text"),
        column("description", "text"),
        column("price_minor", "bigint"),
        column("currency", "text"),
        column("on_hand", "int"),
        column("reserved", "int"),
        column("available", "int"),
        column("version", "bigint"),
    ],
};

/// Every read-model table, as the projections own them.
pub const ALL: &[Table] = &[
    ORDERS,
    ORDER_SEARCH,
    ORDER_LINES,
    ORDER_STATUS_HISTORY,
    ORDER_PAYMENTS,
    CUSTOMERS,
    CUSTOMER_LIFETIME_VALUES,
    DAILY_SALES,
    PRODUCTS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_is_found_where_it_is_listed() {
        assert_eq!(const { ORDERS.index("order_id") }, 0);
        assert_eq!(const { ORDERS.index("status") }, 11);
        assert_eq!(const { PRODUCTS.index("version") }, 8);
    }

    #[test]
    fn statements_name_the_columns_in_order_with_an_array_each() {
        assert_eq!(
            CUSTOMERS.insert_from_arrays(),
            "insert into customers (customer_id, order_count, last_order_at) \
             select * from unnest($1::text[], $2::int[], $3::timestamptz[])"
        );
        assert_eq!(
            DAILY_SALES.select_list(Some("d")),
            "d.date, d.currency, d.orders, d.cancelled, d.revenue_minor"
        );
    }

    #[test]
    fn the_projections_own_every_table_once() {
        let mut owned: Vec<&str> = crate::ProjectionName::ALL
            .iter()
            .flat_map(|p| p.tables().iter().copied())
            .collect();
        let mut listed: Vec<&str> = ALL.iter().map(|t| t.name).collect();
        owned.sort_unstable();
        listed.sort_unstable();
        assert_eq!(owned, listed);
    }

    #[test]
    fn no_table_lists_a_column_twice() {
        for table in ALL {
            let mut names: Vec<_> = table.columns.iter().map(|c| c.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), table.columns.len(), "{}", table.name);
        }
    }
}
