//! # Layout
//!
//! Helpers shared by the test suites of every crate. [`TestDb`] gives each test its own
//! PostgreSQL database, cloned from a template that was migrated once, and drops it afterwards,
//! so tests run in parallel (also one process per test, as under cargo-nextest) without seeing
//! each other's data.
//!
//! The server is the one `ORDERLY_TEST_DATABASE_URL` names (a URL whose database is used only
//! to create and drop others), else `ORDERLY_DATABASE_URL`'s server, else
//! `postgres://postgres@127.0.0.1:5432/postgres`.
//!
//! A test that restarts, crashes or stalls PostgreSQL must not do it to that shared server:
//! [`cluster::PrivateCluster`] starts a cluster of the test's own. [`process::Subprocess`] runs
//! a child process (the `orderly` binary, say) with its output in a file.

pub mod cluster;
pub mod process;

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database that exists for one test. Dropping it drops the database.
pub struct TestDb {
    name: String,
    url: String,
    config: Config,
    admin_url: String,
}

impl TestDb {
    /// Creates a fresh database from the template `key`, first building the template with
    /// `migrate` (handed the template database's URL) if no template for this `fingerprint`
    /// exists yet. `fingerprint` must change
    /// whenever the migrations do (e.g. a digest of their checksums), so a stale template is
    /// never reused.
    pub async fn create<F, Fut>(key: &str, fingerprint: &str, migrate: F) -> Result<Self, BoxError>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<(), BoxError>>,
    {
        let admin_url = admin_url();
        let admin = connect(&admin_url).await?;
        let template = format!("orderly_tpl_{}_{:016x}", sanitize(key), digest(fingerprint));
        ensure_template(&admin, &admin_url, &template, migrate).await?;
        let name = format!("orderly_test_{}", uuid::Uuid::new_v4().simple());
        let create = format!("create database \"{name}\" template \"{template}\"");
        // Another process may be copying the same template at this instant; PostgreSQL then
        // refuses with "object in use" for a moment.
        let mut attempts = 0;
        loop {
            match admin.batch_execute(&create).await {
                Ok(()) => break,
                Err(e)
                    if attempts < 50
                        && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let url = database_url(&admin_url, &name)?;
        let config = url.parse()?;
        Ok(Self {
            name,
            url,
            config,
            admin_url,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL for this database, as `ORDERLY_DATABASE_URL` would hold it.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A new connection to this database, driven in the background.
    pub async fn connect(&self) -> Result<Client, BoxError> {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = self.admin_url.clone();
        // Drop runs outside any async context we could await in, so the clean-up gets a
        // runtime of its own on a thread of its own.
        let outcome = std::thread::spawn(move || -> Result<(), BoxError> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let admin = connect(&admin_url).await?;
                admin
                    .batch_execute(&format!("drop database if exists \"{name}\" with (force)"))
                    .await?;
                Ok(())
            })
        })
        .join();
        if let Ok(Err(error)) = outcome {
            eprintln!("could not drop test database {}: {error}", self.name);
        }
    }
}

fn admin_url() -> String {
    if let Ok(url) = std::env::var("ORDERLY_TEST_DATABASE_URL") {
        return url;
    }
    if let Ok(url) = std::env::var("ORDERLY_DATABASE_URL")
        && let Ok(admin) = database_url(&url, "postgres")
    {
        return admin;
    }
    DEFAULT_ADMIN_URL.to_owned()
}

/// `base` with its database name replaced by `name`.
fn database_url(base: &str, name: &str) -> Result<String, BoxError> {
    let mut url = url::Url::parse(base).map_err(|e| {
        format!("test database URL {base:?} is not a URL ({e}); use postgres://user@host:port/db")
    })?;
    url.set_path(&format!("/{name}"));
    Ok(url.into())
}

/// A new connection to `url`, driven in the background.
pub async fn connect(url: &str) -> Result<Client, BoxError> {
    let (client, connection) = url.parse::<Config>()?.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Builds the template once per fingerprint, under an advisory lock so that concurrent test
/// processes wait for one builder instead of racing it.
async fn ensure_template<F, Fut>(
    admin: &Client,
    admin_url: &str,
    template: &str,
    migrate: F,
) -> Result<(), BoxError>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<(), BoxError>>,
{
    let lock_key = digest(template) as i64;
    admin
        .execute("select pg_advisory_lock($1)", &[&lock_key])
        .await?;
    let built = async {
        let row = admin
            .query_opt(
                "select datistemplate from pg_database where datname = $1",
                &[&template],
            )
            .await?;
        // A template is marked as such only after its migrations succeeded; anything else
        // with its name is the wreck of an interrupted build.
        if row.as_ref().is_some_and(|r| r.get::<_, bool>(0)) {
            return Ok(());
        }
        if row.is_some() {
            admin
                .batch_execute(&format!("drop database \"{template}\" with (force)"))
                .await?;
        }
        admin
            .batch_execute(&format!("create database \"{template}\""))
            .await?;
        migrate(database_url(admin_url, template)?).await?;
        admin
            .batch_execute(&format!("alter database \"{template}\" is_template true"))
            .await?;
        Ok::<(), BoxError>(())
    }
    .await;
    admin
        .execute("select pg_advisory_unlock($1)", &[&lock_key])
        .await?;
    built
}

fn digest(s: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    s.hash(&mut hasher);
    hasher.finish()
}

fn sanitize(key: &str) -> String {
    key.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(20)
        .collect::<String>()
        .to_lowercase()
}
