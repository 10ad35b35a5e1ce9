//! A worker's function server started again after it dies (killed by the
//! OOM killer or a person, or crashed by a call), so that the calls after
//! it are forked again instead of each starting its own interpreter.
//!
//! The calls it held end as [`drover_protocol::messages::FUNCTION_SERVER_LOST`]
//! and the master runs them again, within each task's retry budget. A
//! server that keeps dying soon after it starts (a call that kills it every
//! time) is started again after a wait that doubles each time, up to a
//! minute; meanwhile calls run in their own interpreter.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{FunctionServer, CLIENT};

/// A server that dies sooner than this after its start counts as dying
/// soon: the next start waits.
const SOON: Duration = Duration::from_secs(10);

/// The longest wait before starting a server that keeps dying soon.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// What starting the worker's server again needs; set by
/// [`FunctionServer::start_for_worker`] only, so a server started
/// elsewhere (a test, the Python bindings) is never restarted.
static HOW: OnceLock<How> = OnceLock::new();

/// Set when the worker's own server is dropped: the worker is stopping,
/// and a server dying now is not started again.
static STOPPING: AtomicBool = AtomicBool::new(false);

struct How {
    workdir: PathBuf,
    python: String,
    state: Mutex<State>,
}

struct State {
    /// The server started in place of a dead one (the worker holds its
    /// first); dropped, so stopped, when the worker's own is.
    server: Option<FunctionServer>,
    /// When the current server started.
    started: Instant,
    /// How many servers in a row died soon after their start.
    soon_deaths: u32,
}

/// Records how the worker's server was started, so it can be again.
pub(super) fn remember(workdir: &Path, python: &str) {
    let _ = HOW.set(How {
        workdir: workdir.to_path_buf(),
        python: python.to_string(),
        state: Mutex::new(State {
            server: None,
            started: Instant::now(),
            soon_deaths: 0,
        }),
    });
}

/// The worker is stopping: no server is started again, and the one that
/// was is stopped.
pub(super) fn stop() {
    STOPPING.store(true, Ordering::Release);
    let replacement = HOW
        .get()
        .and_then(|h| h.state.lock().ok().and_then(|mut s| s.server.take()));
    drop(replacement);
}

/// How long to wait before the next start after `soon_deaths` servers in a
/// row died soon: none for the first, then 1 s, 2 s, 4 s ... up to a minute.
fn wait_after(soon_deaths: u32) -> Duration {
    match soon_deaths {
        0 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 1).min(6)).min(MAX_WAIT),
    }
}

/// Called on the dead server's reader thread once every call it held has
/// heard so: starts the worker's server again (after a wait if it keeps
/// dying soon) and makes it the one calls go to.
pub(super) fn after_death() {
    let Some(how) = HOW.get() else { return };
    if STOPPING.load(Ordering::Acquire) {
        return;
    }
    let (wait, dead) = {
        let Ok(mut s) = how.state.lock() else { return };
        s.soon_deaths = if s.started.elapsed() < SOON {
            s.soon_deaths + 1
        } else {
            0
        };
        (wait_after(s.soon_deaths), s.server.take())
    };
    // Its directory is the one the new server is made in: gone first.
    drop(dead);
    warn!(
        "the python function server died; starting a new one in {:.0?}",
        wait
    );
    std::thread::sleep(wait);
    if STOPPING.load(Ordering::Acquire) {
        return;
    }
    match FunctionServer::start(&how.workdir, &how.python) {
        Ok((server, client)) => {
            let Ok(mut s) = how.state.lock() else { return };
            // Checked under the lock `stop` takes: a server started as the
            // worker stops is dropped here, else there.
            if STOPPING.load(Ordering::Acquire) {
                return;
            }
            s.server = Some(server);
            s.started = Instant::now();
            if let Ok(mut c) = CLIENT.lock() {
                *c = Some(client);
            }
            info!("python function server started again");
        }
        Err(e) => warn!(
            "cannot start the python function server again ({e:#}); \
             python calls start their own interpreter"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_keeps_dying_soon_waits_longer_each_time() {
        let waits: Vec<u64> = (0..10).map(|n| wait_after(n).as_secs()).collect();
        assert_eq!(waits, [0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
