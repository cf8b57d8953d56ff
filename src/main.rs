//! `orderly`: the command line. Parses arguments and settings, then hands over to the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
// GraphQL answers are built from many small allocations; mimalloc serves them markedly
// faster than the system allocator under concurrent load (measured in BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use orderly_graphql::Role;
use orderly_projections::{DeadLetterPolicy, RebuildOptions, RunnerOptions};
use orderly_service::app::{self, Part};
use orderly_service::command_side::{ParkedOf, SettledElsewhere};
use orderly_service::seed::SeedOptions;
use orderly_service::settings::Settings;
use orderly_service::{command_side, read_side, run, telemetry};
use uuid::Uuid;

/// Orderly, an event-sourced order engine.
///
/// Settings come from built-in defaults, then the file given by --config, then ORDERLY_*
/// environment variables (ORDERLY_DATABASE_URL, ORDERLY_EVENT_STORE, ORDERLY_HTTP_ADDR,
/// ORDERLY_LOG_FORMAT, ORDERLY_JWT_SECRET, ...; the README's settings table lists them all).
#[derive(Parser)]
#[command(name = "orderly", version)]
struct Cli {
    /// A TOML settings file; its keys are the settings' names in lowercase (database_url, ...).
    #[arg(long, global = true, env = "ORDERLY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database migrations, then run everything in one process until SIGINT or
    /// SIGTERM: HTTP on ORDERLY_HTTP_ADDR (POST /graphql with the queries and mutations,
    /// subscriptions over WebSocket and GraphiQL on GET /graphql, the operator console on
    /// /console, /healthz, /readyz, /metrics), the projection runners and the saga runner.
    Serve,
    /// Apply the database migrations and exit. Refuses (as every command that applies them
    /// at start does) when the event log was copied in from a cluster that had handed out more
    /// transaction ids than this one: see --rebase-log.
    Migrate {
        /// After a logical restore of the log into another PostgreSQL cluster (pg_dump and
        /// pg_restore, logical replication): move the log's clock past its newest event, so
        /// that new events sort after the copied ones. Stop every other orderly process first.
        #[arg(long)]
        rebase_log: bool,
    },
    /// The fulfilment saga runner, its outbox worker and the outbox's dead letters.
    Saga {
        #[command(subcommand)]
        command: SagaCommand,
    },
    /// Apply the migrations, then serve only the command API (POST /graphql with the
    /// mutations, GraphiQL on GET /graphql, /healthz, /readyz, /metrics); the saga and
    /// projection runners run elsewhere (`orderly saga run`, `orderly projections run`).
    #[command(name = "command-api")]
    WriteApi,
    /// Apply the migrations, then serve only the read API (POST /graphql with the queries and
    /// the operator's mutations, subscriptions over WebSocket on /graphql, GraphiQL, the
    /// operator console on /console, /healthz, /readyz, /metrics), following the projection runners of
    /// other processes (`orderly projections run`).
    #[command(name = "read-api")]
    ReadApi,
    /// Print the GraphQL schema `orderly serve` serves (SDL), for clients and code generators.
    Schema,
    /// Print a bearer token signed with the configured key (ORDERLY_JWT_SECRET for HS256,
    /// ORDERLY_JWT_PRIVATE_KEY for RS256), with ORDERLY_JWT_ISSUER/AUDIENCE when set.
    Token {
        /// The subject: a customer id or user id.
        #[arg(long)]
        sub: String,
        /// A role: customer, warehouse or admin; repeat for several.
        #[arg(long = "role", required = true, value_parser = parse_role)]
        roles: Vec<Role>,
        /// How long the token is valid: 90s, 30m, 12h, 7d (a bare number is seconds).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Print a link that opens the operator console at /console signed in as an admin, with
    /// a short-lived token in the link's fragment (which browsers never send to a server).
    ConsoleLink {
        /// The admin's user id, recorded as the actor of what they do.
        #[arg(long, default_value = "admin")]
        sub: String,
        /// How long the link signs in for: 90s, 30m, 12h (a bare number is seconds).
        #[arg(long, default_value = "15m", value_parser = parse_ttl)]
        ttl: Duration,
        /// The server as the browser reaches it; default: http:// and ORDERLY_HTTP_ADDR.
        #[arg(long)]
        base: Option<String>,
    },
    /// Read models: status, rebuilds, runners on their own.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Events that projections could not apply.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Write a realistic workload through the command path, for demos and benchmarks:
    /// products with stock, orders of 1-5 lines from a few hundred customers (some paid with
    /// tok_declined, some cancelled by their customer), then some of the confirmed orders
    /// shipped and delivered. Runs a saga runner in this process (sharing the saga's lanes
    /// with any other that runs) so orders get confirmed. A command that fails transiently (a
    /// database restart) is sent again with backoff, for up to a minute.
    Seed(SeedArgs),
    /// The event log itself.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
}

/// The flags of `orderly seed`.
#[derive(Args)]
struct SeedArgs {
    /// Orders to place.
    #[arg(long, default_value_t = 1000)]
    orders: usize,
    /// Products to register (SKUs SEED-0000, SEED-0001, ...; existing ones are kept).
    #[arg(long, default_value_t = 40)]
    products: usize,
    /// Distinct customers placing the orders.
    #[arg(long, default_value_t = 300)]
    customers: usize,
    /// Seeds the generator; the same seed writes the same workload and places no order
    /// twice (default: a random one, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Commands in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

impl SeedArgs {
    /// The workload these flags ask for; a random seed when none is given.
    fn options(self) -> SeedOptions {
        SeedOptions {
            orders: self.orders,
            products: self.products,
            customers: self.customers,
            seed: self.seed.unwrap_or_else(|| fastrand::u64(..)),
            concurrency: self.concurrency,
            ..SeedOptions::default()
        }
    }
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// State, checkpoint, lag and dead letters of each projection (orders, products), and
    /// whether readers of the log wait behind an open transaction (and whose).
    Status,
    /// Replay the log into shadow tables while the live ones keep serving, verify, and swap
    /// them in atomically. Resumes an interrupted rebuild of the same projection (unless
    /// --fresh); one whose copy failed its checks starts over.
    Rebuild(RebuildArgs),
    /// Run projection runners until SIGINT or SIGTERM, with /healthz, /readyz and /metrics on
    /// ORDERLY_HTTP_ADDR (no GraphQL). Several processes may run the same projection: one is
    /// active, the others stand by.
    Run(RunArgs),
}

/// The arguments of `orderly projections rebuild`.
#[derive(Args)]
struct RebuildArgs {
    /// The projection: orders or products.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    name: Option<String>,
    /// Rebuild every projection in one pass over the log; each is then verified and
    /// swapped in on its own.
    #[arg(long)]
    all: bool,
    /// Events read and applied per transaction; memory grows with it.
    #[arg(long, default_value_t = RebuildOptions::DEFAULT_BATCH_SIZE)]
    batch_size: usize,
    /// Start from the start of the log, dropping the copy an interrupted rebuild left
    /// instead of resuming it. Use it after deploying a fix to the projection's handlers or
    /// a migration of its tables: a copy made before them must not be swapped in.
    #[arg(long)]
    fresh: bool,
}

impl RebuildArgs {
    /// The rebuild these flags ask for.
    fn options(&self) -> RebuildOptions {
        RebuildOptions {
            batch_size: self.batch_size,
            fresh: self.fresh,
            ..RebuildOptions::default()
        }
    }
}

/// The arguments of `orderly projections run`.
#[derive(Args)]
struct RunArgs {
    /// Projections to run (default: all).
    names: Vec<String>,
    /// Most events applied per transaction.
    #[arg(long, default_value_t = 1000, env = "ORDERLY_PROJECTION_BATCH_SIZE")]
    batch_size: usize,
    /// Stop at an event a handler cannot apply, instead of parking it and going on.
    #[arg(long)]
    stop_on_error: bool,
}

impl RunArgs {
    /// The runners' options these flags ask for.
    fn options(&self) -> RunnerOptions {
        RunnerOptions {
            batch_size: self.batch_size,
            policy: if self.stop_on_error {
                DeadLetterPolicy::Stop
            } else {
                DeadLetterPolicy::SkipAndPark
            },
            ..RunnerOptions::default()
        }
    }
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Dead letters waiting for an operator (with --all, resolved ones too).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Apply one parked event again; resolved when it applies. One whose stream has later
    /// events in the read model already cannot apply (it says so): rebuild the projection.
    /// Nothing is applied while a rebuild's copy exists (its swap would drop the retry) or
    /// while the live runner has not reached the event before it in its stream (a rebuild
    /// parked it).
    Retry { id: i64 },
    /// Mark one parked event resolved without applying it.
    Skip { id: i64 },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print the log from the start (or --from), then follow new events until Ctrl-C.
    Tail {
        /// Only this stream, e.g. order-<uuid>.
        #[arg(long)]
        stream: Option<String>,
        /// Only streams of this category, e.g. order, product, payment.
        #[arg(long)]
        category: Option<String>,
        /// Start after this position token (32 hex digits, as in consistency tokens).
        #[arg(long)]
        from: Option<String>,
        /// One JSON object per line, shaped like the GraphQL EventRecord.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SagaCommand {
    /// Apply the migrations, then follow the log and drive orders to confirmation or
    /// cancellation until SIGINT or SIGTERM, with /healthz, /readyz and /metrics on
    /// ORDERLY_HTTP_ADDR. Several processes may run: they share the saga's 16 lanes (each
    /// order belongs to one), and a stopped or dead process's lanes move to the others.
    Run,
    /// Each lane's owner, fencing generation and checkpoint, how far behind the log it is,
    /// how many events are parked, and how many deadlines are overdue (with the oldest order).
    Status,
    /// Events a saga step failed on for good, set aside so their lane could go on.
    Parked {
        #[command(subcommand)]
        command: ParkedCommand,
    },
    /// Gateway calls and notifications the outbox worker could not deliver.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
}

#[derive(Subcommand)]
enum ParkedCommand {
    /// Parked events with their errors, oldest first.
    List,
    /// Feed one parked event, or every one of an order, to the order's saga again (the lane
    /// that owns it does, within seconds, in log order); each is parked again with the new
    /// error if it still fails.
    Retry(ParkedTarget),
    /// Drop one parked event, or every one of an order: the saga never feeds them again (the
    /// order's stock and payment deadlines still read the reservations and the payment, and a
    /// parked placement, cancel or shipment is still acted on: the saga kept it when it
    /// parked it). Once the order is cancelled or shipped, the products and the payment are
    /// read again, a stock deadline later and then less and less often, until its saga
    /// settles, so a skipped reservation answer, release, shipment, refund, decline or failure
    /// is made up for too. A charge the saga has not seen is refused (once its order is
    /// cancelled, nothing else would refund it): retry it. Refused while a retry of them is
    /// under way in a running saga process.
    Skip(ParkedTarget),
}

/// The parked events `saga parked retry` and `skip` act on: one by its id, or an order's.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct ParkedTarget {
    /// The parked event, as `saga parked list` names it.
    event_id: Option<Uuid>,
    /// Every parked event of this order instead (its saga instance).
    #[arg(long, value_name = "ORDER_ID")]
    order: Option<Uuid>,
}

impl ParkedTarget {
    fn which(&self) -> anyhow::Result<ParkedOf> {
        match (self.event_id, self.order) {
            (_, Some(order_id)) => Ok(ParkedOf::Order(order_id)),
            (Some(event_id), None) => Ok(ParkedOf::Event(event_id)),
            (None, None) => anyhow::bail!("name a parked event, or an order with --order"),
        }
    }
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Dead-lettered messages waiting for an operator (with --all, pending and skipped ones
    /// too).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Put one dead-lettered message back in line with fresh attempts; a running saga runner
    /// delivers it.
    Retry { id: Uuid },
    /// Mark one dead-lettered message as not to be delivered. A refund or a resolution is
    /// refused (money would stay taken, or unknown, and its order's saga open) unless what
    /// was found outside Orderly is recorded with --refunded-elsewhere or --not-charged.
    Skip {
        id: Uuid,
        /// A refund made outside Orderly (at the provider, by hand): record it in the
        /// payment's stream, so the order's saga settles, then skip the message.
        #[arg(long, conflicts_with = "not_charged")]
        refunded_elsewhere: bool,
        /// A resolution, the provider found to hold no charge for the order: record its last
        /// charge attempt failed if it has no outcome, so the order's saga settles, then skip.
        #[arg(long)]
        not_charged: bool,
    },
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text).ok_or_else(|| format!("{text:?} is not one of customer, warehouse, admin"))
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |at| text.split_at(at));
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30m"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?}; use s, m, h or d")),
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref()).context("invalid settings")?;
    let otlp = settings
        .telemetry
        .otlp_endpoint
        .as_ref()
        .map(|url| url.expose());
    let telemetry = telemetry::init(settings.telemetry.log_format, otlp)
        .context("cannot set up trace export (ORDERLY_OTLP_ENDPOINT)")?;
    tracing::debug!(?settings, "settings");
    let ran = run(cli.command, &settings).await;
    // Sends the spans still buffered; it blocks, so off the runtime's workers.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    ran
}

async fn run(command: Command, settings: &Settings) -> anyhow::Result<()> {
    match command {
        Command::Migrate { rebase_log } => run::migrate(settings, rebase_log).await?,
        Command::Serve => run::serve(settings).await?,
        Command::WriteApi => run::serve_part(settings, Part::Commands).await?,
        Command::ReadApi => run::serve_part(settings, Part::Reads).await?,
        Command::Schema => print!("{}", app::served_sdl(settings)?),
        Command::Saga { command } => saga(command, settings).await?,
        Command::Token { sub, roles, ttl } => run::print_token(settings, &sub, &roles, ttl)?,
        Command::ConsoleLink { sub, ttl, base } => {
            run::print_console_link(settings, &sub, ttl, base)?;
        }
        Command::Projections { command } => projections(command, settings).await?,
        Command::Dlq { command } => dlq(command, settings).await?,
        Command::Seed(args) => run::seed(settings, &args.options()).await?,
        Command::Events {
            command:
                EventsCommand::Tail {
                    stream,
                    category,
                    from,
                    json,
                },
        } => run::tail_events(settings, stream, category, from, json).await?,
    }
    Ok(())
}

/// `orderly saga ...`.
async fn saga(command: SagaCommand, settings: &Settings) -> anyhow::Result<()> {
    let pg_config = || app::pg_config(settings);
    match command {
        SagaCommand::Run => run::run_saga(settings).await,
        SagaCommand::Status => command_side::print_saga_status(&pg_config()?).await,
        SagaCommand::Parked { command } => match command {
            ParkedCommand::List => command_side::print_parked(&pg_config()?).await,
            ParkedCommand::Retry(target) => {
                command_side::retry_parked(&pg_config()?, target.which()?).await
            }
            ParkedCommand::Skip(target) => {
                command_side::skip_parked(&pg_config()?, target.which()?).await
            }
        },
        SagaCommand::Outbox { command } => match command {
            OutboxCommand::List { all } => command_side::print_outbox(&pg_config()?, all).await,
            OutboxCommand::Retry { id } => command_side::retry_outbox(&pg_config()?, id).await,
            OutboxCommand::Skip {
                id,
                refunded_elsewhere,
                not_charged,
            } => {
                let settled = match (refunded_elsewhere, not_charged) {
                    (true, _) => SettledElsewhere::Refunded,
                    (false, true) => SettledElsewhere::NotCharged,
                    (false, false) => return command_side::skip_outbox(&pg_config()?, id).await,
                };
                let store = app::event_store(settings)?;
                command_side::skip_settled_elsewhere(&pg_config()?, store, id, settled).await
            }
        },
    }
}

/// `orderly projections ...`.
async fn projections(command: ProjectionsCommand, settings: &Settings) -> anyhow::Result<()> {
    // Before the match, so that each of them (status too) refuses settings that name no
    // usable event store.
    let pg_config = app::pg_config(settings)?;
    let store = app::event_store(settings)?;
    match command {
        ProjectionsCommand::Status => read_side::print_status(&pg_config).await,
        ProjectionsCommand::Rebuild(args) => {
            run::rebuild_projections(&pg_config, store, args.name.as_slice(), &args.options()).await
        }
        ProjectionsCommand::Run(args) => {
            run::run_projections(settings, pg_config, store, &args.names, args.options()).await
        }
    }
}

/// `orderly dlq ...`.
async fn dlq(command: DlqCommand, settings: &Settings) -> anyhow::Result<()> {
    let pg_config = app::pg_config(settings)?;
    match command {
        DlqCommand::List { all } => read_side::print_dead_letters(&pg_config, all).await,
        DlqCommand::Retry { id } => {
            let store = app::event_store(settings)?;
            read_side::retry_dead_letter(&pg_config, store.as_ref(), id).await
        }
        DlqCommand::Skip { id } => read_side::skip_dead_letter(&pg_config, id).await,
    }
}
