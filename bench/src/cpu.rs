//! CPU time the measured processes spent, from `/proc`: what a scenario's work cost, which
//! moves far less than its rates when other programs share the machine.

use std::time::Duration;

use procfs::process::{Process, all_processes};

/// User plus system time of process `pid` so far, all its threads; `None` once it is gone.
pub fn of_process(pid: u32) -> Option<Duration> {
    let stat = Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()?;
    Some(ticks(stat.utime + stat.stime))
}

/// The same for this program.
pub fn of_this_program() -> Option<Duration> {
    let stat = Process::myself().ok()?.stat().ok()?;
    Some(ticks(stat.utime + stat.stime))
}

/// A PostgreSQL server running on this machine.
pub struct Postgres {
    postmaster: i32,
}

impl Postgres {
    /// The server of the backend whose pid is `backend` (`select pg_backend_pid()`), when
    /// that process is a PostgreSQL backend on this machine; `None` for a server elsewhere.
    pub fn of_backend(backend: i32) -> Option<Self> {
        let stat = Process::new(backend).ok()?.stat().ok()?;
        (stat.comm == "postgres").then_some(Self {
            postmaster: stat.ppid,
        })
    }

    /// CPU time the whole server has spent so far: the postmaster, every process it runs
    /// (backends, WAL writer, checkpointer, autovacuum), and those it has reaped since it
    /// started (`cutime`, `cstime`), so a connection that closes in between still counts.
    pub fn cpu(&self) -> Option<Duration> {
        let postmaster = Process::new(self.postmaster).ok()?.stat().ok()?;
        let reaped = u64::try_from(postmaster.cutime + postmaster.cstime).unwrap_or(0);
        let mut total = postmaster.utime + postmaster.stime + reaped;
        for process in all_processes().ok()?.flatten() {
            // Processes come and go while the list is read: skip those gone meanwhile.
            if let Ok(stat) = process.stat()
                && stat.ppid == self.postmaster
            {
                total += stat.utime + stat.stime;
            }
        }
        Some(ticks(total))
    }
}

fn ticks(count: u64) -> Duration {
    Duration::from_secs_f64(count as f64 / procfs::ticks_per_second() as f64)
}
