//! Reading the few /proc files the sampler needs.
//!
//! Parsing goes through the `procfs` crate's parsers; the files are read
//! here because the sampler's cost is almost all in the kernel's open and
//! close of /proc files (path walk, dentry and file allocation), not in
//! generating or parsing them. The sampler's reader therefore keeps each
//! watched process's `stat` and `io` open between samples and re-reads them
//! with `pread` at offset 0, which regenerates the content. A kept
//! descriptor is tied to the process it was opened for, not to the pid
//! number: once that process is reaped, reading it fails with ESRCH, so a
//! recycled pid is never read through a stale handle.

use procfs::process::{Io, Stat};
use procfs::{FromBufRead, FromRead};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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

/// The files of a process the sampler reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Stat,
    Statm,
    Io,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Stat => "stat",
            Which::Statm => "statm",
            Which::Io => "io",
        }
    }
}

/// The open `stat` of one process, and its `statm` and `io` once asked for.
struct Kept {
    stat: File,
    statm: Option<File>,
    io: Option<File>,
    /// The pass (full or close) that last used it; see [`ProcReader::end_pass`]
    /// and [`ProcReader::end_close_pass`].
    pass: u64,
}

pub(crate) struct ProcReader {
    buf: Vec<u8>,
    path: String,
    page_size: u64,
    kept: HashMap<i32, Kept>,
    /// How many descriptors this reader may keep open (0: none, every read
    /// opens and closes).
    budget: usize,
    open_fds: usize,
    /// Counts every pass, full or close.
    pass: u64,
    /// The last full pass.
    last_full: u64,
}

/// Reads the whole of a small /proc or cgroup file from offset 0 into
/// `buf` (cleared first). One `pread` suffices unless the file outgrows the
/// buffer, which then doubles.
pub(crate) fn pread_all(file: &File, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.capacity() < 4096 {
        buf.reserve(4096);
    }
    loop {
        let cap = buf.capacity();
        buf.resize(cap, 0);
        let mut len = 0;
        loop {
            let n = file.read_at(&mut buf[len..], len as u64)?;
            len += n;
            if n == 0 || len == buf.len() {
                break;
            }
        }
        if len < buf.len() {
            buf.truncate(len);
            return Ok(());
        }
        buf.clear();
        buf.reserve(cap * 2);
    }
}

/// [`pread_all`] for a file the kernel produces as one record
/// (`/proc/PID/stat`, `statm`, `io`, `status`, `smaps_rollup`;
/// `cgroup.events`, `cpu.stat`, `memory.*`): one read delivers all of it
/// when the buffer can hold it, so a short read is the end, and the second
/// read that would return 0 is skipped. That read was a tenth of the
/// system calls of a short task's whole life in the worker.
pub(crate) fn pread_record(file: &File, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.capacity() < 4096 {
        buf.reserve(4096);
    }
    let cap = buf.capacity();
    buf.resize(cap, 0);
    let n = file.read_at(buf, 0)?;
    if n < cap {
        buf.truncate(n);
        return Ok(());
    }
    pread_all(file, buf)
}

impl Kept {
    fn fds(&self) -> usize {
        1 + usize::from(self.statm.is_some()) + usize::from(self.io.is_some())
    }
}

impl ProcReader {
    /// A reader that opens and closes every file it reads: for one-off
    /// reads outside the sampler.
    pub fn new() -> ProcReader {
        ProcReader::keeping(0)
    }

    /// A reader that keeps up to `budget` descriptors open across samples.
    pub fn keeping(budget: usize) -> ProcReader {
        // SAFETY: sysconf has no preconditions.
        let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        ProcReader {
            buf: Vec::with_capacity(4096),
            path: String::with_capacity(32),
            page_size: if ps > 0 { ps as u64 } else { 4096 },
            kept: HashMap::new(),
            budget,
            open_fds: 0,
            pass: 0,
            last_full: 0,
        }
    }

    fn open(&mut self, pid: i32, file: &str) -> Option<File> {
        self.path.clear();
        let _ = write!(self.path, "/proc/{pid}/{file}");
        File::open(&self.path).ok()
    }

    fn read(&mut self, pid: i32, file: &str) -> Option<&[u8]> {
        let f = self.open(pid, file)?;
        // Not read_to_end, which first stats the file for its size (0 for
        // every /proc file anyway).
        pread_record(&f, &mut self.buf).ok()?;
        Some(&self.buf)
    }

    /// Reads one file of `pid` through a kept descriptor, opening and
    /// keeping one if the budget allows. A kept handle that fails belonged
    /// to a process now reaped; it is dropped and the pid opened afresh,
    /// since the number may already name a new process.
    fn read_kept(&mut self, pid: i32, which: Which) -> Option<&[u8]> {
        for _ in 0..2 {
            if !self.kept.contains_key(&pid) {
                if self.open_fds + 3 > self.budget {
                    return self.read(pid, which.name());
                }
                let stat = self.open(pid, "stat")?;
                self.open_fds += 1;
                let pass = self.pass;
                let kept = Kept {
                    stat,
                    statm: None,
                    io: None,
                    pass,
                };
                self.kept.insert(pid, kept);
            }
            let missing = self.kept.get(&pid).is_some_and(|k| match which {
                Which::Stat => false,
                Which::Statm => k.statm.is_none(),
                Which::Io => k.io.is_none(),
            });
            if missing {
                let f = self.open(pid, which.name())?;
                if let Some(k) = self.kept.get_mut(&pid) {
                    match which {
                        Which::Statm => k.statm = Some(f),
                        _ => k.io = Some(f),
                    }
                    self.open_fds += 1;
                }
            }
            let k = self.kept.get_mut(&pid)?;
            k.pass = self.pass;
            let file = match which {
                Which::Stat => Some(&k.stat),
                Which::Statm => k.statm.as_ref(),
                Which::Io => k.io.as_ref(),
            };
            if file.is_some_and(|f| pread_record(f, &mut self.buf).is_ok() && !self.buf.is_empty())
            {
                return Some(&self.buf);
            }
            self.forget(pid);
        }
        None
    }

    fn forget(&mut self, pid: i32) {
        if let Some(k) = self.kept.remove(&pid) {
            self.open_fds -= k.fds();
        }
    }

    /// After a full pass: closes the handles of processes it did not read
    /// (they are gone, or no longer watched).
    pub fn end_pass(&mut self) {
        let pass = self.pass;
        self.retain(|used| used == pass);
        self.last_full = pass;
        self.pass += 1;
    }

    /// After a close pass (the tasks near their limit, or just started):
    /// closes the handles it opened or used before that it did not use
    /// now, unless the last full pass used them. Without this, the handles
    /// of every short task seen by a close look stayed open until the
    /// second full pass after it (some 400 descriptors at W1's rate), and
    /// every task start copied and closed the whole descriptor table.
    pub fn end_close_pass(&mut self) {
        let (pass, full) = (self.pass, self.last_full);
        self.retain(|used| used == pass || used == full);
        self.pass += 1;
    }

    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        let mut closed = 0;
        self.kept.retain(|_, k| {
            let kept = keep(k.pass);
            if !kept {
                closed += k.fds();
            }
            kept
        });
        self.open_fds -= closed;
    }

    pub fn stat(&mut self, pid: i32) -> Option<ProcStat> {
        let page = self.page_size;
        let s = Stat::from_read(self.read_kept(pid, Which::Stat)?).ok()?;
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

    /// `(virtual, resident)` bytes from `statm`, which the kernel produces
    /// at a quarter of the cost of `stat`; `(0, 0)` for a zombie, which has
    /// no memory left. For processes whose identity and parent are already
    /// known from an earlier `stat`.
    pub fn statm(&mut self, pid: i32) -> Option<(u64, u64)> {
        let page = self.page_size;
        let data = self.read_kept(pid, Which::Statm)?;
        let text = std::str::from_utf8(data).ok()?;
        let mut fields = text.split_ascii_whitespace().map(|f| f.parse::<u64>().ok());
        let size = fields.next()??;
        let resident = fields.next()??;
        Some((size.saturating_mul(page), resident.saturating_mul(page)))
    }

    /// `(rchar, wchar)`, including children the process has reaped.
    pub fn io(&mut self, pid: i32) -> Option<(u64, u64)> {
        let io = Io::from_buf_read(self.read_kept(pid, Which::Io)?).ok()?;
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

/// The soft open-file limit the process started with, before
/// [`raise_fd_limit`] raised it; children get it back (see
/// `Monitor::spawn_with`), because some programs still use `select` and
/// break with descriptors above 1024.
pub(crate) fn original_fd_limit() -> Option<libc::rlimit> {
    raised_fd_limit().0
}

/// Raises the soft open-file limit to the hard one (at most 1<<20), once per
/// process, and returns how many descriptors the sampler may keep: half of
/// the soft limit, leaving the rest to the program embedding the monitor.
pub(crate) fn raise_fd_limit() -> usize {
    raised_fd_limit().1
}

fn raised_fd_limit() -> (Option<libc::rlimit>, usize) {
    static LIMIT: std::sync::OnceLock<(Option<libc::rlimit>, usize)> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return (None, 0);
        }
        let original = lim;
        let want = lim.rlim_max.min(1 << 20);
        if want > lim.rlim_cur {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: setrlimit with a soft limit within the hard one.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim = raised;
            }
        }
        let changed = lim.rlim_cur != original.rlim_cur;
        (changed.then_some(original), (lim.rlim_cur / 2) as usize)
    })
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

    fn kill_and_reap(mut child: std::process::Child) {
        child.kill().unwrap();
        child.wait().unwrap();
    }

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

    #[test]
    fn kept_handles_follow_the_process_not_the_pid() {
        let mut r = ProcReader::keeping(64);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let first = r.stat(pid).unwrap();
        assert!(r.statm(pid).unwrap().1 > 0);
        assert!(r.io(pid).is_some());
        assert_eq!(r.open_fds, 3);
        // Read again through the kept descriptors: same process.
        assert_eq!(r.stat(pid).unwrap().starttime, first.starttime);
        child.kill().unwrap();
        child.wait().unwrap();
        // Reaped: the kept handle fails and nothing under that pid is left.
        assert!(r.stat(pid).is_none());
        assert_eq!(r.open_fds, 0);
    }

    #[test]
    fn unused_handles_close_at_the_end_of_a_pass_and_the_budget_holds() {
        let me = std::process::id() as i32;
        let mut r = ProcReader::keeping(4);
        r.stat(me).unwrap();
        r.statm(me).unwrap();
        r.end_pass();
        assert_eq!(r.open_fds, 2, "used in the pass that ended: kept");
        r.end_pass();
        assert_eq!(r.open_fds, 0, "unused for a whole pass: closed");
        // A close look keeps what the last full pass read, and what it
        // read itself only until the next close look that does not.
        r.stat(me).unwrap();
        r.end_pass();
        r.end_close_pass();
        assert_eq!(r.open_fds, 1, "read by the last full pass: kept");
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        r.stat(pid).unwrap();
        r.end_close_pass();
        assert_eq!(r.open_fds, 2, "used in the close pass that ended: kept");
        r.end_close_pass();
        assert_eq!(
            r.open_fds, 1,
            "unused by a close pass and the full one: closed"
        );
        kill_and_reap(child);
        let mut uncached = ProcReader::new();
        assert!(uncached.stat(me).is_some() && uncached.io(me).is_some());
        assert_eq!(uncached.open_fds, 0, "a zero budget keeps nothing open");
    }
}
