//! Child processes of a test (the `orderly` binary serving, a saga runner to kill), with their
//! output kept in a file: a test asserts on what a process logged, and a failing test shows
//! the end of it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::BoxError;

/// A running child process. Dropping it kills it (SIGKILL); when the test is failing, the last
/// lines of its output are printed first. A test process that is itself killed with SIGKILL
/// leaves its children running (Ctrl-C reaches them too, through the process group).
pub struct Subprocess {
    name: String,
    child: Child,
    /// stdout and stderr, interleaved as written.
    log: PathBuf,
}

impl Subprocess {
    /// Starts `command` with stdin closed and stdout and stderr appended to a log file of its
    /// own; `name` tells the processes of one test apart in reports.
    pub fn spawn(name: &str, mut command: Command) -> Result<Self, BoxError> {
        let log = std::env::temp_dir().join(format!(
            "orderly-test-{name}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("could not start {name} ({command:?}): {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// How the process ended, or `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Kills the process with SIGKILL, as a crash or the OOM killer would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the process has written so far.
    pub fn output(&self) -> String {
        std::fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines it has written.
    pub fn tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for Subprocess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {} (pid {}, {}) ---\n{}",
                self.name,
                self.child.id(),
                self.log.display(),
                self.tail(60)
            );
            // Kept for a closer look.
            return;
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The last `lines` lines of the file at `path` (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
