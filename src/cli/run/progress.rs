//! The progress of `drover run`: a bar on a terminal, a line every few
//! seconds otherwise, with tasks running, workers connected, and a line
//! whenever a worker joins or is lost. Workers are counted by polling the
//! master, so one that joins and leaves between two polls goes unseen.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use drover_master::{Manager, Stats};

/// How often the master is asked for its counts; each ask is a round trip
/// to its engine, so not once per finished task.
const POLL: Duration = Duration::from_millis(500);
/// Most worker events kept to be named on the next joined/lost line.
const MAX_NAMED: usize = 8;
/// How often a progress line is printed when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);
/// How often the bar's status words are remade.
const BAR_EVERY: Duration = Duration::from_millis(200);

enum View {
    Bar(indicatif::ProgressBar),
    Lines { last: Instant },
}

/// Progress display plus what it learned about workers.
pub struct Progress {
    view: View,
    total: u64,
    running: u64,
    /// Workers connected at the last poll; `None` before the first.
    workers: Option<u64>,
    /// Say when a worker joins (remote workers), not only when one is lost.
    announce_joins: bool,
    last_poll: Option<Instant>,
    /// Workers that went away during the run.
    pub workers_lost: u64,
    /// The master's next event number (see `Manager::events_since`).
    events_seen: u64,
    /// Worker events not yet named on a line, in words (at most
    /// [`MAX_NAMED`]), to say who joined or left.
    worker_events: Vec<String>,
    /// When the bar's status words were last made.
    last_status: Instant,
    /// The failed count they showed.
    failed_shown: u64,
}

impl Progress {
    /// A bar when stderr is a terminal, lines otherwise.
    pub fn new(total: u64, announce_joins: bool) -> Progress {
        let view = if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} ({rate}, eta {eta}) {msg}",
            ) {
                bar.set_style(style.with_key(
                    "rate",
                    |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.1}/s", s.per_sec());
                    },
                ));
            }
            View::Bar(bar)
        } else {
            View::Lines {
                last: Instant::now(),
            }
        };
        Progress {
            view,
            total,
            running: 0,
            workers: None,
            announce_joins,
            last_poll: None,
            workers_lost: 0,
            events_seen: 0,
            worker_events: Vec::new(),
            last_status: Instant::now(),
            failed_shown: 0,
        }
    }

    /// Asks the master for its counts when the last ask is old enough.
    pub fn poll(&mut self, manager: &Manager) {
        if self.last_poll.is_some_and(|t| t.elapsed() < POLL) {
            return;
        }
        self.last_poll = Some(Instant::now());
        // Counts first: a loss they show is already among the events asked
        // for next, so the line can name the worker.
        let stats = manager.stats();
        let (next, events) = manager.events_since(self.events_seen);
        self.events_seen = next;
        self.worker_events.extend(
            events
                .iter()
                .filter(|e| e.kind.starts_with("worker"))
                .map(|e| format!("{} {} {} ({})", e.kind, e.host, e.addr, e.detail)),
        );
        let extra = self.worker_events.len().saturating_sub(MAX_NAMED);
        self.worker_events.drain(..extra);
        self.observe(&stats);
    }

    fn observe(&mut self, stats: &Stats) {
        self.running = stats.tasks_running;
        let now = stats.workers_connected;
        if let Some(before) = self.workers {
            if now < before {
                self.workers_lost += before - now;
                let who = self.who("worker lost");
                self.event(&format!(
                    "{} lost ({now} connected){who}",
                    plural(before - now, "worker")
                ));
            } else if now > before && self.announce_joins {
                let who = self.who("worker joined");
                self.event(&format!(
                    "{} joined ({now} connected){who}",
                    plural(now - before, "worker")
                ));
            }
            if now != before {
                // Each worker is named once, on the line of its change.
                self.worker_events.clear();
            }
        } else if now > 0 && self.announce_joins {
            self.event(&format!("{} connected", plural(now, "worker")));
        }
        self.workers = Some(now);
    }

    /// ": " and the workers of the unnamed `kind` events, separated by
    /// "; "; empty when the master named none.
    fn who(&self, kind: &str) -> String {
        let named: Vec<&str> = self
            .worker_events
            .iter()
            .filter_map(|e| e.strip_prefix(kind))
            .map(str::trim_start)
            .collect();
        if named.is_empty() {
            String::new()
        } else {
            format!(": {}", named.join("; "))
        }
    }

    /// Prints a line above the bar (or as a line of its own).
    fn event(&self, what: &str) {
        match &self.view {
            View::Bar(bar) => bar.println(format!("drover: {what}")),
            View::Lines { .. } => eprintln!("drover: {what}"),
        }
    }

    fn status(&self, failed: u64, all_finished: bool) -> String {
        let mut parts = Vec::new();
        // Counts polled before the last task ended would be stale then.
        if !all_finished {
            parts.push(format!("{} running", self.running));
            if let Some(w) = self.workers {
                parts.push(plural(w, "worker"));
            }
        }
        if failed > 0 {
            parts.push(format!("{failed} failed"));
        }
        if parts.is_empty() {
            return "none failed".into();
        }
        parts.join(", ")
    }

    /// Shows how many tasks have finished. Called once per result, so
    /// the status words are only made when they are shown: every
    /// [`LINE_EVERY`] as a line, or every [`BAR_EVERY`] on the bar (which
    /// draws its position at its own rate).
    pub fn update(&mut self, done: u64, failed: u64) {
        let all_finished = done + failed == self.total;
        // The failed count shows at once on the bar: it is what the user
        // watches for.
        let news = failed != self.failed_shown && matches!(self.view, View::Bar(_));
        let (last, every) = match &mut self.view {
            View::Bar(bar) => {
                bar.set_position(done + failed);
                (&mut self.last_status, BAR_EVERY)
            }
            View::Lines { last } => (last, LINE_EVERY),
        };
        if !(all_finished || news || last.elapsed() >= every) {
            return;
        }
        *last = Instant::now();
        self.failed_shown = failed;
        let status = self.status(failed, all_finished);
        match &self.view {
            View::Bar(bar) => bar.set_message(status),
            View::Lines { .. } => eprintln!(
                "drover: {}/{} finished ({status})",
                done + failed,
                self.total
            ),
        }
    }

    /// Clears the bar when the run finished; leaves it on its own line when
    /// it was interrupted, so the user sees where it stopped.
    pub fn finish(&self, interrupted: bool) {
        if let View::Bar(bar) = &self.view {
            if interrupted {
                bar.abandon();
            } else {
                bar.finish_and_clear();
            }
        }
    }
}

/// "1 worker", "2 workers".
pub(crate) fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_worker_is_counted_and_shown() {
        let mut p = Progress::new(10, false);
        let mut stats = Stats {
            workers_connected: 2,
            tasks_running: 3,
            ..Default::default()
        };
        p.observe(&stats);
        assert_eq!(p.status(0, false), "3 running, 2 workers");
        stats.workers_connected = 1;
        p.worker_events = vec!["worker lost vm 127.0.0.1:5 (connection closed)".into()];
        assert_eq!(p.who("worker lost"), ": vm 127.0.0.1:5 (connection closed)");
        assert_eq!(p.who("worker joined"), "");
        p.observe(&stats);
        assert_eq!(p.workers_lost, 1);
        assert_eq!(p.status(4, false), "3 running, 1 worker, 4 failed");
        assert_eq!(p.status(4, true), "4 failed");
    }
}
