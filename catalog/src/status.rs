//! `drover status`: the masters a catalog knows, as a table or JSON.

use std::fmt::Write as _;

use crate::report::{now_unix, MasterReport};

/// Environment variable naming the catalog (`HOST:PORT`) when `--catalog` is
/// not given.
pub const CATALOG_ENV: &str = "DROVER_CATALOG";

/// Catalog used when neither `--catalog` nor `DROVER_CATALOG` is given.
pub const DEFAULT_CATALOG: &str = "localhost:9097";

/// Widest the project column gets before names are cut.
const PROJECT_WIDTH: usize = 32;
/// Widest the host column gets before names are cut.
const HOST_WIDTH: usize = 24;

/// What `drover status` asks the catalog and how it prints the answer.
#[derive(Debug, Clone, Default)]
pub struct StatusQuery {
    /// Catalog to ask, HOST:PORT [default: $DROVER_CATALOG, else localhost:9097].
    pub catalog: Option<String>,
    /// Only masters whose project matches this regex.
    pub project: Option<String>,
    /// Print the reports as JSON instead of a table.
    pub json: bool,
    /// Which view of the masters to print.
    pub view: View,
}

/// The views of `drover status`, after work_queue_status' `-W`, `-T`, `-A`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum View {
    /// One line per master: its counts.
    #[default]
    Masters,
    /// One line per connected worker of each master.
    Workers,
    /// Tasks by category and state, then the running tasks.
    Tasks,
    /// Each size of waiting task and the workers able to run it.
    Able,
}

/// The catalog `--catalog` names, else `$DROVER_CATALOG`, else the default;
/// shared with other commands that take `--catalog`.
pub fn catalog_address(explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| std::env::var(CATALOG_ENV).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| DEFAULT_CATALOG.to_string())
}

/// Prints the masters the catalog knows; returns the exit code.
pub fn run(args: StatusQuery) -> anyhow::Result<i32> {
    let catalog = catalog_address(args.catalog.as_deref());
    if let Some(p) = &args.project {
        crate::client::check_project_regex(p)?;
    }
    let masters = crate::client::query(&catalog, args.project.as_deref())?;
    print!("{}", render(&masters, args.view, args.json, now_unix())?);
    Ok(0)
}

/// `masters` in `view`, as a table or as JSON.
pub fn render(
    masters: &[MasterReport],
    view: View,
    json: bool,
    now: u64,
) -> anyhow::Result<String> {
    if json {
        let v = match view {
            View::Masters => serde_json::to_value(masters)?,
            View::Workers => per_master(masters, |m| serde_json::json!({ "workers": m.workers })),
            View::Tasks => per_master(
                masters,
                |m| serde_json::json!({ "categories": m.categories, "running": m.running }),
            ),
            View::Able => per_master(masters, |m| serde_json::json!({ "able": able(m) })),
        };
        return Ok(serde_json::to_string_pretty(&v)? + "\n");
    }
    Ok(match view {
        View::Masters => format_table(masters, now),
        View::Workers => format_workers(masters),
        View::Tasks => format_tasks(masters),
        View::Able => format_able(masters),
    })
}

/// A JSON array of one object per master: its project and address, and
/// the fields `part` gives.
fn per_master(
    masters: &[MasterReport],
    part: impl Fn(&MasterReport) -> serde_json::Value,
) -> serde_json::Value {
    masters
        .iter()
        .map(|m| {
            let mut v = serde_json::json!({ "project": m.project, "address": m.address() });
            if let (Some(o), serde_json::Value::Object(p)) = (v.as_object_mut(), part(m)) {
                o.extend(p);
            }
            v
        })
        .collect()
}

/// How many of `m`'s workers could run a task of each waiting shape:
/// the shape, the tasks waiting for it and the workers big enough.
#[derive(serde::Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Able {
    /// The size each task asks for, in words.
    pub needs: String,
    /// Tasks of this size waiting.
    pub waiting: u64,
    /// Addresses (else host names) of the connected workers it fits on,
    /// by what they offer (not what is free now).
    pub workers: Vec<String>,
    /// Connected workers in all (of those the report lists).
    pub of: usize,
}

/// See [`Able`].
pub fn able(m: &MasterReport) -> Vec<Able> {
    m.waiting_shapes
        .iter()
        .map(|s| {
            let workers = m
                .workers
                .iter()
                .filter(|w| {
                    s.whole_worker
                        || (w.cores >= s.cores
                            && (s.memory_mb == 0 || w.memory_mb >= s.memory_mb)
                            && (s.disk_mb == 0 || w.disk_mb == 0 || w.disk_mb >= s.disk_mb)
                            && w.gpus >= s.gpus)
                })
                .map(|w| {
                    if w.addr.is_empty() {
                        w.host.clone()
                    } else {
                        w.addr.clone()
                    }
                })
                .collect();
            Able {
                needs: shape_words(s),
                waiting: s.count,
                workers,
                of: m.workers.len(),
            }
        })
        .collect()
}

fn shape_words(s: &crate::ShapeCount) -> String {
    if s.whole_worker {
        return "a whole worker".into();
    }
    let mut parts = vec![format!(
        "{} core{}",
        s.cores,
        if s.cores == 1 { "" } else { "s" }
    )];
    if s.memory_mb > 0 {
        parts.push(format!("{} MB memory", s.memory_mb));
    }
    if s.disk_mb > 0 {
        parts.push(format!("{} MB disk", s.disk_mb));
    }
    if s.gpus > 0 {
        parts.push(format!(
            "{} GPU{}",
            s.gpus,
            if s.gpus == 1 { "" } else { "s" }
        ));
    }
    parts.join(", ")
}

fn master_name(m: &MasterReport) -> String {
    let mut s = format!(
        "{}@{}",
        cut(&terminal_safe(&m.project), PROJECT_WIDTH),
        m.address()
    );
    if m.stopped {
        s.push_str(" (stopped)");
    }
    s
}

/// One line per worker of each master, like `work_queue_status -W`.
pub fn format_workers(masters: &[MasterReport]) -> String {
    let rows = masters.iter().flat_map(|m| {
        m.workers.iter().map(move |w| {
            vec![
                master_name(m),
                cut(&terminal_safe(&w.host), HOST_WIDTH),
                terminal_safe(&w.addr),
                format!("{}/{}", w.cores_inuse, w.cores),
                format!("{} MB", w.memory_mb),
                w.running.to_string(),
                w.tasks_ended.to_string(),
                age(w.connected_secs).trim_end_matches(" ago").to_string(),
            ]
        })
    });
    table(
        &[
            "MASTER",
            "HOST",
            "ADDRESS",
            "CORES",
            "MEMORY",
            "RUNNING",
            "ENDED",
            "CONNECTED",
        ],
        3,
        rows.collect(),
    )
}

/// Tasks by category and state, then the running tasks with their worker
/// and age, like `work_queue_status -T`.
pub fn format_tasks(masters: &[MasterReport]) -> String {
    let cats = masters.iter().flat_map(|m| {
        let dash = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
        m.categories.iter().map(move |c| {
            vec![
                master_name(m),
                cut(&terminal_safe(&c.name), PROJECT_WIDTH),
                dash(c.waiting),
                dash(c.running),
                dash(c.done),
                dash(c.failed),
                terminal_safe(c.allocation.as_deref().unwrap_or("-")),
            ]
        })
    });
    let mut out = table(
        &[
            "MASTER", "CATEGORY", "WAITING", "RUNNING", "DONE", "FAILED", "SIZING",
        ],
        2,
        cats.collect(),
    );
    let running: Vec<Vec<String>> = masters
        .iter()
        .flat_map(|m| {
            m.running.iter().map(move |t| {
                vec![
                    master_name(m),
                    t.id.to_string(),
                    terminal_safe(t.tag.as_deref().unwrap_or("-")),
                    cut(&terminal_safe(&t.category), PROJECT_WIDTH),
                    terminal_safe(&t.addr),
                    t.cores.to_string(),
                    age(t.age_secs).trim_end_matches(" ago").to_string(),
                ]
            })
        })
        .collect();
    if !running.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &[
                "MASTER",
                "TASK",
                "TAG",
                "CATEGORY",
                "WORKER",
                "CORES",
                "RUNNING FOR",
            ],
            1,
            running,
        ));
    }
    out
}

/// Each size of waiting task and the workers that could run it, like
/// `work_queue_status -A`; a size no worker fits says so.
pub fn format_able(masters: &[MasterReport]) -> String {
    let rows = masters.iter().flat_map(|m| {
        able(m).into_iter().map(move |a| {
            let fit = if a.of == 0 {
                "no worker connected".to_string()
            } else if a.workers.is_empty() {
                format!("none of {} (fits no worker)", a.of)
            } else {
                format!("{} of {}: {}", a.workers.len(), a.of, a.workers.join(", "))
            };
            vec![master_name(m), a.needs, a.waiting.to_string(), fit]
        })
    });
    table(
        &["MASTER", "EACH TASK NEEDS", "WAITING", "WORKERS ABLE"],
        2,
        rows.collect(),
    )
}

/// A fixed-width table: the first `text_columns` columns align left, the
/// rest right, except the last, which is free text.
fn table(headers: &[&str], text_columns: usize, rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let last = headers.len() - 1;
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            let pad = " ".repeat(w.saturating_sub(cell.chars().count()));
            if i < text_columns || i == last {
                let _ = write!(l, "{cell}{pad}");
            } else {
                let _ = write!(l, "{pad}{cell}");
            }
            if i < last {
                l.push_str("  ");
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The waiting count, with those that fit no connected worker named: a
/// task that can never start must not pass for one still in line.
fn waiting_cell(m: &MasterReport) -> String {
    if m.tasks_fit_no_worker == 0 {
        m.tasks_waiting.to_string()
    } else {
        format!(
            "{} ({} fit no worker)",
            m.tasks_waiting, m.tasks_fit_no_worker
        )
    }
}

/// Renders masters as a fixed-width table in the spirit of
/// `work_queue_status`.
pub fn format_table(masters: &[MasterReport], now: u64) -> String {
    let headers = [
        "PROJECT", "HOST", "PORT", "WAITING", "RUNNING", "COMPLETE", "FAILED", "WORKERS", "CORES",
        "PROGRESS", "UPDATED",
    ];
    let rows: Vec<[String; 11]> = masters
        .iter()
        .map(|m| {
            let mut project = cut(&terminal_safe(&m.project), PROJECT_WIDTH);
            if m.stopped {
                project.push_str(" (stopped)");
            }
            [
                project,
                cut(&terminal_safe(&m.host), HOST_WIDTH),
                m.port.to_string(),
                waiting_cell(m),
                m.tasks_running.to_string(),
                m.tasks_done.to_string(),
                m.tasks_failed.to_string(),
                format!("{}/{}", m.workers_busy, m.workers_connected),
                format!("{}/{}", m.cores_inuse, m.cores_total),
                format!("{:.0}%", m.progress() * 100.0),
                age(now.saturating_sub(m.last_update)),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            let pad = w.saturating_sub(cell.chars().count());
            // Text columns align left, numbers right, like work_queue_status.
            if i < 2 {
                let _ = write!(l, "{cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(l, "{}{cell}", " ".repeat(pad));
            }
            if i + 1 < cells.len() {
                l.push_str("  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Replaces control characters so a hostile project name cannot move the
/// cursor, recolor or retitle the user's terminal.
fn terminal_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn age(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shape() {
        let mut m = MasterReport::new_master("genome", "node1.example.org", 9123);
        m.tasks_waiting = 5;
        m.tasks_running = 3;
        m.tasks_done = 12;
        m.workers_connected = 4;
        m.workers_busy = 3;
        m.last_update = 100;
        let mut evil = MasterReport::new_master("\x1b]0;pwned\x07<script>", "h", 1);
        evil.last_update = 40;
        evil.stopped = true;
        let t = format_table(&[m, evil], 100);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("PROJECT"));
        assert!(lines[1].starts_with("genome"));
        assert!(lines[1].contains("node1.example.org"));
        assert!(lines[1].contains("9123"));
        assert!(lines[1].contains("3/4"));
        assert!(lines[1].contains("60%"));
        assert!(lines[1].ends_with("0s ago"));
        assert!(!t.contains('\x1b') && !t.contains('\x07'));
        assert!(lines[2].contains("?]0;pwned?<script> (stopped)"));
        assert!(lines[2].ends_with("1m ago"));
    }

    #[test]
    fn waiting_names_the_tasks_that_fit_no_worker() {
        let mut m = MasterReport::new_master("genome", "h", 1);
        m.tasks_waiting = 7;
        assert!(!format_table(std::slice::from_ref(&m), 0).contains("fit no worker"));
        m.tasks_fit_no_worker = 2;
        assert!(format_table(&[m], 0).contains("7 (2 fit no worker)"));
    }

    #[test]
    fn long_names_are_cut() {
        let m = MasterReport::new_master(&"x".repeat(100), "h", 1);
        let t = format_table(&[m], 0);
        assert!(t.contains(&format!("{}…", "x".repeat(PROJECT_WIDTH - 1))));
    }

    #[test]
    fn explicit_catalog_wins() {
        assert_eq!(catalog_address(Some("a:1")), "a:1");
    }
}
