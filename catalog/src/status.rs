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
    if args.json {
        println!("{}", serde_json::to_string_pretty(&masters)?);
    } else {
        print!("{}", format_table(&masters, now_unix()));
    }
    Ok(0)
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
                m.tasks_waiting.to_string(),
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
