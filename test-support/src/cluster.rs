//! A PostgreSQL cluster of one test's own, for tests that restart, crash or stall the server:
//! doing that to the shared server would fail every other test that runs meanwhile.
//!
//! Cost, measured on a 2-core build machine: `initdb` about 0.5 s (`--no-sync`), a start or a
//! stop about 0.1-0.3 s, so [`PrivateCluster::create`] takes about a second and a restart well
//! under one. `fsync` and `full_page_writes` are off: an immediate stop is still a faithful
//! crash of PostgreSQL, whose recovery replays the WAL from the OS's page cache, which only a
//! crash of the machine would lose. `synchronous_commit` stays on: without it a crash loses
//! commits already acknowledged (the WAL still in PostgreSQL's buffers), which no production
//! setting of Orderly allows, and the crash tests would chase losses that cannot happen.
//! A cluster can get a synchronous hot standby of its own, by `pg_basebackup`, to fail over to
//! ([`PrivateCluster::synchronous_standby`], [`PrivateCluster::promote`]).
//!
//! PostgreSQL refuses to run as root, and tests run as root in CI: as root, every PostgreSQL
//! program runs as the `postgres` OS user (`runuser`, else `su`); as anyone else, as that user.
//! The binaries are the newest under `/usr/lib/postgresql/*/bin` (Debian's layout, the one
//! `deploy/local/ensure-postgres.sh` installs).

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tokio_postgres::Client;

use crate::BoxError;

/// Where the data directories go, each named `orderly-pg-<test process id>-<random>`.
const DIR_PREFIX: &str = "orderly-pg-";

/// Ports are tried this often before creating a cluster gives up.
const PORT_ATTEMPTS: usize = 5;

/// Longest `pg_ctl` waits for a start or a stop, in seconds.
const PG_CTL_WAIT_SECS: &str = "60";

/// A running PostgreSQL cluster in a temporary directory, on a port of its own on 127.0.0.1,
/// user `postgres` without a password. Dropping it stops it (immediately) and deletes it.
pub struct PrivateCluster {
    ctl: Ctl,
}

impl PrivateCluster {
    /// Runs `initdb` into a new directory and starts the cluster on a free port, with
    /// `max_connections = 200`. Fails with a message that says what to install when no
    /// PostgreSQL server binaries are found.
    pub async fn create() -> Result<Self, BoxError> {
        tokio::task::spawn_blocking(Ctl::create).await?
    }

    /// The `postgres` database, as `ORDERLY_DATABASE_URL` would hold it. The cluster belongs to
    /// one test, so the test may use that database itself.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// A URL for database `name` on this cluster.
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.ctl.port)
    }

    pub fn port(&self) -> u16 {
        self.ctl.port
    }

    /// A new connection to the `postgres` database, driven in the background.
    pub async fn connect(&self) -> Result<Client, BoxError> {
        crate::connect(&self.url()).await
    }

    /// Starts the cluster again after a stop; returns once it accepts connections.
    pub async fn start(&self) -> Result<(), BoxError> {
        self.blocking(|ctl| ctl.start()).await
    }

    /// Kills the server the way a crash would (`pg_ctl stop -m immediate`): sessions are cut
    /// without a shutdown checkpoint, and the next start runs crash recovery.
    pub async fn stop_immediate(&self) -> Result<(), BoxError> {
        self.blocking(|ctl| ctl.stop("immediate")).await
    }

    /// A clean restart (`-m fast`): sessions are ended with SQLSTATE 57P01 (admin shutdown),
    /// open transactions roll back, a checkpoint is written.
    pub async fn restart_fast(&self) -> Result<(), BoxError> {
        self.blocking(|ctl| ctl.stop("fast").and_then(|()| ctl.start()))
            .await
    }

    /// A crash and a start: [`Self::stop_immediate`], then [`Self::start`].
    pub async fn restart_immediate(&self) -> Result<(), BoxError> {
        self.blocking(|ctl| ctl.stop("immediate").and_then(|()| ctl.start()))
            .await
    }

    /// A synchronous hot standby of this cluster on a port of its own, streaming its WAL from
    /// a base backup taken now: from the time this returns, this cluster's commits return only
    /// once the standby has flushed them (`synchronous_standby_names = '*'`), so a failover to
    /// it loses no acknowledged commit. (The setting is written after the backup, so the
    /// standby, once promoted, does not wait for a standby of its own.)
    pub async fn synchronous_standby(&self) -> Result<PrivateCluster, BoxError> {
        let primary = self.ctl.clone();
        let standby = tokio::task::spawn_blocking(move || Ctl::create_standby(&primary)).await??;
        let client = self.connect().await?;
        // Two statements: ALTER SYSTEM refuses to run in the implicit transaction of a
        // multi-statement query.
        client
            .batch_execute("alter system set synchronous_standby_names = '*'")
            .await?;
        client.batch_execute("select pg_reload_conf()").await?;
        for _ in 0..600 {
            let synchronous: bool = client
                .query_one(
                    "select count(*) > 0 from pg_stat_replication \
                     where state = 'streaming' and sync_state = 'sync'",
                    &[],
                )
                .await?
                .get(0);
            if synchronous {
                return Ok(standby);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Err(format!(
            "the standby on port {} did not become synchronous within 30 s:\n{}",
            standby.port(),
            standby.log_tail(20)
        )
        .into())
    }

    /// Promotes a standby made by [`Self::synchronous_standby`] to a primary that takes writes
    /// (`pg_ctl promote`); returns once it does.
    pub async fn promote(&self) -> Result<(), BoxError> {
        self.blocking(|ctl| {
            let mut command = ctl.pg_ctl();
            command.args(["-w", "-t", PG_CTL_WAIT_SECS, "promote"]);
            expect_success("pg_ctl promote", run(&mut command)?)
        })
        .await
    }

    /// A client program of the same PostgreSQL version as the server (`pg_dump`,
    /// `pg_restore`, `psql`), to run as any user.
    pub fn program(&self, name: &str) -> PathBuf {
        self.ctl.bindir.join(name)
    }

    /// The last `lines` lines of the server's log, for a failing test's report.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::tail(&self.ctl.log_path(), lines)
    }

    /// `pg_ctl` blocks for up to a second; off the runtime's workers, so the clients a test
    /// runs meanwhile keep going.
    async fn blocking<F>(&self, f: F) -> Result<(), BoxError>
    where
        F: FnOnce(&Ctl) -> Result<(), BoxError> + Send + 'static,
    {
        let ctl = self.ctl.clone();
        tokio::task::spawn_blocking(move || f(&ctl)).await?
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of the private PostgreSQL cluster's log ({}) ---\n{}",
                self.ctl.log_path().display(),
                self.log_tail(40)
            );
        }
        let _ = self.ctl.stop("immediate");
        if let Err(error) = std::fs::remove_dir_all(&self.ctl.dir) {
            eprintln!(
                "could not remove the private cluster in {}: {error}",
                self.ctl.dir.display()
            );
        }
    }
}

/// What running `pg_ctl` on one cluster takes; cheap to clone into a blocking task.
#[derive(Clone)]
struct Ctl {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Run the programs as the `postgres` OS user (we are root), else as ourselves.
    as_postgres: bool,
}

impl Ctl {
    fn create() -> Result<PrivateCluster, BoxError> {
        let bindir = server_bindir()?;
        let as_postgres = running_as_root()?;
        if as_postgres
            && !run(Command::new("id").args(["-u", "postgres"]))?
                .status
                .success()
        {
            return Err(
                "the postgres OS user does not exist (the postgresql package creates \
                        it); PostgreSQL refuses to run as root"
                    .into(),
            );
        }
        reap_orphans(&bindir, as_postgres);
        let ctl = Ctl {
            bindir,
            dir: new_dir(),
            port: 0,
            as_postgres,
        };
        // From here on the directory exists: dropping the cluster removes it on any failure.
        ctl.initdb()?;
        ctl.start_on_a_free_port()
    }

    /// A copy of `primary` by `pg_basebackup`, set up to follow it (`-R`), and started.
    fn create_standby(primary: &Ctl) -> Result<PrivateCluster, BoxError> {
        let ctl = Ctl {
            dir: new_dir(),
            port: 0,
            ..primary.clone()
        };
        let mut command = ctl.pg_command(&ctl.bindir.join("pg_basebackup"));
        command
            .arg("-D")
            .arg(&ctl.dir)
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "-c",
                "fast",
                "--no-sync",
            ]);
        let output = run(&mut command)?;
        if !output.status.success() {
            // Nothing to stop yet; whatever the backup wrote goes.
            let _ = std::fs::remove_dir_all(&ctl.dir);
            return Err(expect_success("pg_basebackup", output).unwrap_err());
        }
        ctl.start_on_a_free_port()
    }

    /// Writes the settings for a free port and starts there, trying another port when the
    /// one chosen was taken meanwhile; on failure the directory goes.
    fn start_on_a_free_port(mut self) -> Result<PrivateCluster, BoxError> {
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            self.port = free_port()?;
            self.write_settings()?;
            // So that `port_was_taken` reads this attempt's complaints only.
            let _ = std::fs::remove_file(self.log_path());
            match self.start() {
                Ok(()) => return Ok(PrivateCluster { ctl: self }),
                // Another test may have taken the port between our probe and the start.
                Err(error) if self.port_was_taken() => last_error = Some(error),
                Err(error) => {
                    drop(PrivateCluster { ctl: self });
                    return Err(error);
                }
            }
        }
        drop(PrivateCluster { ctl: self });
        Err(last_error.unwrap_or_else(|| "no free port for the private cluster".into()))
    }

    fn initdb(&self) -> Result<(), BoxError> {
        let initdb = self.bindir.join("initdb");
        let mut command = self.pg_command(&initdb);
        command
            .arg("-D")
            .arg(&self.dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            // Nothing of a test's cluster has to survive a crash of the machine.
            .arg("--no-sync");
        expect_success("initdb", run(&mut command)?)
    }

    /// Appended to `postgresql.conf`, where the last setting of a name wins; a retry on
    /// another port appends again.
    fn write_settings(&self) -> Result<(), BoxError> {
        let settings = format!(
            "\n# A private test cluster (orderly-test-support).\n\
             listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = ''\n\
             max_connections = 200\n\
             shared_buffers = 32MB\n\
             fsync = off\n\
             full_page_writes = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             timezone = 'UTC'\n",
            self.port
        );
        // As root we may append to the postgres user's file; its owner stays postgres.
        std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("postgresql.conf"))?
            .write_all(settings.as_bytes())?;
        Ok(())
    }

    fn start(&self) -> Result<(), BoxError> {
        let mut command = self.pg_ctl();
        command
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", PG_CTL_WAIT_SECS, "start"]);
        let output = run(&mut command)?;
        expect_success("pg_ctl start", output).map_err(|error| {
            format!(
                "{error}\nlast lines of {}:\n{}",
                self.log_path().display(),
                crate::process::tail(&self.log_path(), 20)
            )
            .into()
        })
    }

    fn stop(&self, mode: &str) -> Result<(), BoxError> {
        let mut command = self.pg_ctl();
        command.args(["-m", mode, "-w", "-t", PG_CTL_WAIT_SECS, "stop"]);
        expect_success("pg_ctl stop", run(&mut command)?)
    }

    fn port_was_taken(&self) -> bool {
        std::fs::read_to_string(self.log_path())
            .is_ok_and(|log| log.contains("could not bind") || log.contains("already in use"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn pg_ctl(&self) -> Command {
        let mut command = self.pg_command(&self.bindir.join("pg_ctl"));
        command.arg("-D").arg(&self.dir);
        command
    }

    fn pg_command(&self, program: &Path) -> Command {
        pg_command(program, self.as_postgres)
    }
}

/// A new data directory's path, `orderly-pg-<test process id>-<random>` in the temporary
/// directory (the process id lets [`reap_orphans`] find the clusters of dead test processes).
fn new_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "{DIR_PREFIX}{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ))
}

/// `program` as the `postgres` OS user when `as_postgres`, from `/` (which that user can
/// read, unlike perhaps the test's working directory).
fn pg_command(program: &Path, as_postgres: bool) -> Command {
    let mut command = if !as_postgres {
        Command::new(program)
    } else if Path::new("/usr/sbin/runuser").exists() || Path::new("/sbin/runuser").exists() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        // `su` passes the words after the user to the shell: `sh -c 'exec "$0" "$@"' program
        // args...` keeps every argument one word, with no quoting of our own.
        let mut command = Command::new("su");
        command
            .args(["postgres", "-s", "/bin/sh", "-c", "exec \"$0\" \"$@\""])
            .arg(program);
        command
    };
    command.current_dir("/");
    command
}

fn running_as_root() -> Result<bool, BoxError> {
    // The owner of /proc/self is the process's effective user.
    Ok(std::fs::metadata("/proc/self")?.uid() == 0)
}

/// The newest `/usr/lib/postgresql/<major>/bin` with the server programs.
fn server_bindir() -> Result<PathBuf, BoxError> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bindir = entry.path().join("bin");
            ["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|program| bindir.join(program).is_file())
                .then_some((major, bindir))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bindir)| bindir).ok_or_else(|| {
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) under \
         /usr/lib/postgresql/*/bin: this test starts a private cluster of its own; install \
         them (`apt-get install postgresql`, which `bash deploy/local/test.sh` does)"
            .into()
    })
}

/// Stops and deletes the clusters of test processes that died without dropping theirs
/// (killed by a timeout, say); best effort, since another user may own them.
fn reap_orphans(bindir: &Path, as_postgres: bool) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        let mut stop = pg_command(&bindir.join("pg_ctl"), as_postgres);
        stop.arg("-D")
            .arg(&dir)
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = run(&mut stop);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A port on 127.0.0.1 that nothing listens on now, chosen below the kernel's ephemeral range,
/// so that no client socket and no `bind(0)` of a concurrent test is handed it while the
/// cluster is down between a stop and a start.
pub fn free_port() -> Result<u16, BoxError> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 20_000.min(ephemeral_start.saturating_sub(1_000));
    for _ in 0..100 {
        let port = low + (rand_u32() % u32::from(ephemeral_start - low)) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(format!("no free port on 127.0.0.1 between {low} and {ephemeral_start}").into())
}

fn rand_u32() -> u32 {
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn run(command: &mut Command) -> Result<Output, BoxError> {
    command
        .output()
        .map_err(|e| format!("could not run {command:?}: {e}").into())
}

fn expect_success(what: &str, output: Output) -> Result<(), BoxError> {
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_private_cluster_keeps_committed_rows_through_a_crash_and_is_gone_once_dropped() {
        let cluster = PrivateCluster::create().await.expect("a private cluster");
        let dir = cluster.ctl.dir.clone();
        let client = cluster.connect().await.expect("a connection");
        client
            .batch_execute("create table t (n int); insert into t values (1)")
            .await
            .expect("a row written");
        cluster
            .restart_immediate()
            .await
            .expect("crashed and started");
        assert!(client.is_closed() || client.simple_query("select 1").await.is_err());
        cluster.restart_fast().await.expect("restarted");
        let client = cluster
            .connect()
            .await
            .expect("a connection after the restarts");
        let n: i32 = client
            .query_one("select n from t", &[])
            .await
            .expect("the row")
            .get(0);
        assert_eq!(n, 1);
        drop(client);
        drop(cluster);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    #[tokio::test]
    async fn a_synchronous_standby_holds_every_acknowledged_commit_and_takes_writes_once_promoted()
    {
        let primary = PrivateCluster::create().await.expect("a private cluster");
        let standby = primary.synchronous_standby().await.expect("a standby");
        let client = primary.connect().await.expect("a connection");
        client
            .batch_execute("create table t (n int)")
            .await
            .expect("a table");
        for n in 0..50 {
            client
                .execute("insert into t values ($1)", &[&n])
                .await
                .expect("a row written");
        }
        primary.stop_immediate().await.expect("the primary crashed");
        let read_only = standby
            .connect()
            .await
            .expect("a connection to the standby");
        assert!(
            read_only
                .batch_execute("insert into t values (-1)")
                .await
                .is_err(),
            "a standby took a write before its promotion"
        );
        standby.promote().await.expect("promoted");
        let client = standby.connect().await.expect("a connection");
        client
            .batch_execute("insert into t values (50)")
            .await
            .expect("a write after the promotion");
        let count: i64 = client
            .query_one("select count(*) from t", &[])
            .await
            .expect("the rows")
            .get(0);
        assert_eq!(count, 51, "every acknowledged row and the new one");
    }
}
