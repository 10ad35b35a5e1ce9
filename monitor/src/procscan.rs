//! Reading the few /proc files the sampler needs, with one reused buffer.
//!
//! Parsing goes through the `procfs` crate's parsers, but the files are read
//! here so that one sample costs one open/read/close per file and no
//! per-process directory handle.

use procfs::process::{Io, Stat};
use procfs::{FromBufRead, FromRead};
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;

/// What one `/proc/PID/stat` read tells about a process.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub starttime: u64,
    pub zombie: bool,
    /// utime + stime + cutime + cstime: the process and every child it has
    /// reaped, so summing live processes does not count a child twice.
    pub cpu_ticks: u64,
    pub vsize: u64,
    pub rss_bytes: u64,
}

pub(crate) struct ProcReader {
    buf: Vec<u8>,
    path: String,
    page_size: u64,
}

impl ProcReader {
    pub fn new() -> ProcReader {
        // SAFETY: sysconf has no preconditions.
        let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        ProcReader {
            buf: Vec::with_capacity(4096),
            path: String::with_capacity(32),
            page_size: if ps > 0 { ps as u64 } else { 4096 },
        }
    }

    fn read(&mut self, pid: i32, file: &str) -> Option<&[u8]> {
        self.path.clear();
        let _ = write!(self.path, "/proc/{pid}/{file}");
        self.buf.clear();
        let mut f = File::open(&self.path).ok()?;
        f.read_to_end(&mut self.buf).ok()?;
        Some(&self.buf)
    }

    pub fn stat(&mut self, pid: i32) -> Option<ProcStat> {
        let page = self.page_size;
        let s = Stat::from_read(self.read(pid, "stat")?).ok()?;
        let child = |v: i64| u64::try_from(v).unwrap_or(0);
        Some(ProcStat {
            pid: s.pid,
            ppid: s.ppid,
            pgrp: s.pgrp,
            session: s.session,
            starttime: s.starttime,
            zombie: s.state == 'Z' || s.state == 'X',
            cpu_ticks: s.utime + s.stime + child(s.cutime) + child(s.cstime),
            vsize: s.vsize,
            rss_bytes: s.rss.saturating_mul(page),
        })
    }

    /// `(rchar, wchar)`, including children the process has reaped.
    pub fn io(&mut self, pid: i32) -> Option<(u64, u64)> {
        let io = Io::from_buf_read(self.read(pid, "io")?).ok()?;
        Some((io.rchar, io.wchar))
    }

    /// A `Key:   N kB` line of a /proc file, in bytes.
    fn kb_field(&mut self, pid: i32, file: &str, key: &str) -> Option<u64> {
        let data = self.read(pid, file)?;
        let text = std::str::from_utf8(data).ok()?;
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        })
    }

    /// Swapped-out memory of the process, bytes.
    pub fn swap(&mut self, pid: i32) -> Option<u64> {
        self.kb_field(pid, "status", "VmSwap")
    }

    /// Proportional set size, bytes: each resident page divided by the number
    /// of processes mapping it. Costs a page-table walk, so only used to
    /// confirm a memory limit breach.
    pub fn pss(&mut self, pid: i32) -> Option<u64> {
        self.kb_field(pid, "smaps_rollup", "Pss")
    }
}

/// Every pid in /proc.
pub(crate) fn all_pids(out: &mut Vec<i32>) {
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                out.push(pid);
            }
        }
    }
}

/// Whether the system has any swap; when it has none, per-process swap is
/// zero and reading /proc/PID/status every sample would be wasted work.
pub(crate) fn swap_enabled() -> bool {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                let v = l.strip_prefix("SwapTotal:")?;
                v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
            })
        })
        .is_some_and(|kb| kb > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_self() {
        let mut r = ProcReader::new();
        let me = std::process::id() as i32;
        let s = r.stat(me).unwrap();
        assert_eq!(s.pid, me);
        assert!(s.rss_bytes > 0 && s.vsize >= s.rss_bytes);
        assert!(r.io(me).is_some());
        assert!(r.pss(me).unwrap() > 0);
        let mut pids = Vec::new();
        all_pids(&mut pids);
        assert!(pids.contains(&me));
    }
}
