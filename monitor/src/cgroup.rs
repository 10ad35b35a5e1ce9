//! cgroup v2 groups: one parent per [`crate::Monitor`], one child per task.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::procscan::{pread_all, pread_record};
use std::thread;
use std::time::{Duration, Instant};

/// The monitor's own group, under which each task gets a child.
#[derive(Debug)]
pub(crate) struct CgroupBase {
    dir: PathBuf,
    memory: bool,
    /// Empty task groups kept for reuse (see [`CgroupBase::release`]).
    idle: Mutex<Vec<IdleGroup>>,
    /// Kills every task of this monitor if its process dies.
    _guard: Option<Guard>,
}

/// A small process, forked when the monitor starts, that kills every task
/// group under the monitor's group (`cgroup.kill` of the parent reaches all
/// of them) as soon as the monitor's process is gone, however it went:
/// a worker killed with SIGKILL must not leave its tasks running, or a
/// task requeued elsewhere would run twice at once. It waits for the end
/// of a pipe whose only writer is the monitor's process.
#[derive(Debug)]
struct Guard {
    pid: i32,
    writer: Option<std::os::fd::OwnedFd>,
}

impl Guard {
    fn start(kill_path: &Path) -> io::Result<Guard> {
        use std::os::fd::FromRawFd;
        let kill_path = CString::new(kill_path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let devnull = c"/dev/null";
        let name = c"drover-guard";
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors; close-on-exec so that no
        // task inherits the writing end and keeps the guard waiting.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut reader, writer) = (fds[0], fds[1]);
        if reader < 3 {
            // The child points 0-2 at /dev/null; keep the pipe clear of them.
            // SAFETY: duplicating a descriptor we own, then closing the old one.
            unsafe {
                let moved = libc::fcntl(reader, libc::F_DUPFD_CLOEXEC, 3);
                libc::close(reader);
                reader = moved;
            }
        }
        // SAFETY: the child makes only async-signal-safe system calls on
        // data prepared above, then exits; it never returns from this block.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe {
                libc::prctl(libc::PR_SET_NAME, name.as_ptr());
                // The guard outlives nothing but the pipe: the terminal's
                // ^C or a TERM to the process group is for the monitor.
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                    libc::signal(sig, libc::SIG_IGN);
                }
                // Hold nothing of the monitor's process: no socket or pipe
                // may stay open because the guard still has it.
                let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
                for std_fd in 0..3 {
                    libc::dup2(null, std_fd);
                }
                let keep = reader as libc::c_uint;
                libc::syscall(libc::SYS_close_range, 3u32, keep - 1, 0u32);
                libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0u32);
                let mut byte = 0u8;
                loop {
                    let n = libc::read(reader, (&mut byte as *mut u8).cast(), 1);
                    if n == 1 {
                        // The monitor finished in order: its tasks are its own
                        // business (and other monitors may share the group).
                        libc::_exit(0);
                    }
                    if n == 0 || *libc::__errno_location() != libc::EINTR {
                        break;
                    }
                }
                let fd = libc::open(kill_path.as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, b"1".as_ptr().cast(), 1);
                }
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the reading end; adopting the writer.
        unsafe { libc::close(reader) };
        let writer = unsafe { std::os::fd::OwnedFd::from_raw_fd(writer) };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Guard {
            pid,
            writer: Some(writer),
        })
    }
}

impl Drop for Guard {
    /// A byte tells the guard the monitor ended in order (only the pipe's
    /// end without one means the process died); it is reaped here so that
    /// a long-lived program that makes many monitors keeps no zombies.
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            // SAFETY: writing one byte to our own pipe.
            unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&w), b"q".as_ptr().cast(), 1) };
        }
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
    }
}

/// How many empty task groups are kept for reuse.
const IDLE_GROUPS: usize = 64;

/// An empty task group kept for reuse, with what a task opens in it still
/// open: each open walks the whole cgroupfs path, and a short task's
/// bookkeeping opened four such files.
#[derive(Debug)]
struct IdleGroup {
    dir: PathBuf,
    dir_fd: Option<OwnedFd>,
    procs: KeptFile,
    events: KeptFile,
    cpu_stat: KeptFile,
}

impl IdleGroup {
    /// A new group's files, opened when first read.
    fn new(dir: PathBuf) -> IdleGroup {
        IdleGroup {
            dir_fd: None,
            procs: KeptFile::new(dir.join("cgroup.procs")),
            events: KeptFile::new(dir.join("cgroup.events")),
            cpu_stat: KeptFile::new(dir.join("cpu.stat")),
            dir,
        }
    }
}

/// One task's group.
#[derive(Debug)]
pub(crate) struct TaskGroup {
    pub dir: PathBuf,
    /// The directory itself, for `CLONE_INTO_CGROUP`; kept with the group
    /// when it is reused.
    dir_fd: Mutex<Option<OwnedFd>>,
    /// Path of `cgroup.procs`, prepared before fork because the child may
    /// not allocate between fork and exec.
    pub procs_path: CString,
    pub memory: bool,
    /// `usage_usec` of `cpu.stat` when the group was handed out: a reused
    /// group's counter runs on from its earlier tasks.
    cpu_base_usec: u64,
    /// Whether `cpu.max` was set, so a reused group gets it back to "max".
    throttled: std::sync::atomic::AtomicBool,
    /// Whether `cgroup.kill` was used. Such a group is not reused: on some
    /// kernels (6.18 here) a child cloned into a group with
    /// `CLONE_INTO_CGROUP` is killed at birth if the group was ever killed.
    killed: std::sync::atomic::AtomicBool,
    /// Whether the group was ever frozen; such a group is not reused, so
    /// that no later task can be born frozen.
    froze: std::sync::atomic::AtomicBool,
    /// Seen with no live process after its task started: it stays so,
    /// since nothing outside it can add one (see [`TaskGroup::populated`]).
    emptied: std::sync::atomic::AtomicBool,
    procs: KeptFile,
    events: KeptFile,
    cpu_stat: KeptFile,
    memory_peak: KeptFile,
    memory_current: KeptFile,
}

/// A group file read every sample: opened once and re-read with `pread`,
/// because opening a cgroup file costs more than producing its content.
#[derive(Debug)]
struct KeptFile {
    path: PathBuf,
    /// Produced by the kernel as one record (see [`pread_record`]); not
    /// `cgroup.procs`, one record per process.
    one_record: bool,
    open: Mutex<(Option<fs::File>, Vec<u8>)>,
}

impl KeptFile {
    fn new(path: PathBuf) -> KeptFile {
        let one_record = !path.ends_with("cgroup.procs");
        KeptFile {
            path,
            one_record,
            open: Mutex::new((None, Vec::new())),
        }
    }

    /// Parses the file's current content with `parse`.
    fn read<R>(&self, parse: impl FnOnce(&str) -> Option<R>) -> Option<R> {
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (file, buf) = &mut *guard;
        if file.is_none() {
            *file = fs::File::open(&self.path).ok();
        }
        let file = file.as_ref()?;
        if self.one_record {
            pread_record(file, buf).ok()?;
        } else {
            pread_all(file, buf).ok()?;
        }
        parse(std::str::from_utf8(buf).ok()?)
    }

    /// Closes the descriptor, before the group directory is removed.
    fn close(&self) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0 = None;
    }

    /// The same file, with the descriptor (if open) moved over from this one.
    fn take(&self) -> KeptFile {
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (file, buf) = &mut *guard;
        KeptFile {
            path: self.path.clone(),
            one_record: self.one_record,
            open: Mutex::new((file.take(), std::mem::take(buf))),
        }
    }
}

/// The mount point of a cgroup2 hierarchy and the path of this process's
/// group inside it, both from the kernel's own tables rather than a guessed
/// `/sys/fs/cgroup`, because hybrid hosts mount it elsewhere.
fn own_cgroup_dir() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (root, mount_point) = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        Some((unescape(fields.get(3)?), unescape(fields.get(4)?)))
    })?;
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    // The mount may expose only a subtree (containers); our path is then
    // relative to that subtree's root.
    let rel = own.strip_prefix(root.as_str()).unwrap_or(own);
    let mut dir = PathBuf::from(mount_point);
    dir.push(rel.trim_start_matches('/'));
    Some(dir)
}

/// Removes the groups of monitors that died without cleaning up (their
/// tasks are gone too: a task group is removed only once empty, and
/// non-empty leftovers are kept for inspection).
fn remove_stale(parent: &Path) {
    let Ok(rd) = fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("drover-monitor-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if alive {
            continue;
        }
        if let Ok(tasks) = fs::read_dir(e.path()) {
            for t in tasks.flatten() {
                if t.path().is_dir() {
                    let _ = fs::remove_dir(t.path());
                }
            }
        }
        let _ = fs::remove_dir(e.path());
    }
}

/// Undoes the octal escapes (`\040` for space) mountinfo uses.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Moves the calling process into the group whose `cgroup.procs` is `procs`.
/// Only async-signal-safe calls: this runs between fork and exec.
pub(crate) fn join_raw(procs: &CString) -> io::Result<()> {
    // SAFETY: plain syscalls on a valid NUL-terminated path and a static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // "0" means the writing process itself, so nothing is formatted here.
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

fn write_file(path: &Path, s: &str) -> io::Result<()> {
    fs::write(path, s)
}

impl CgroupBase {
    /// Creates the monitor's group and checks that a forked child can join a
    /// task group in it. Returns `None` (so the caller uses /proc sampling)
    /// when there is no cgroup2 mount, no write access, or joining fails.
    pub fn create() -> Option<CgroupBase> {
        let parent = own_cgroup_dir()?;
        remove_stale(&parent);
        let dir = parent.join(format!("drover-monitor-{}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::debug!("cannot create cgroup {}: {e}", dir.display());
                return None;
            }
        }
        // Controllers can only be delegated to children of a group that has no
        // processes of its own (or the root); failure just means no memory.*
        // files, which the per-task check notices.
        for c in ["+memory", "+cpu"] {
            let _ = write_file(&parent.join("cgroup.subtree_control"), c);
            let _ = write_file(&dir.join("cgroup.subtree_control"), c);
        }
        let memory = fs::read_to_string(dir.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "memory"));
        let mut base = CgroupBase {
            dir,
            memory,
            idle: Mutex::new(Vec::new()),
            _guard: None,
        };
        if !base.probe() {
            let _ = fs::remove_dir(&base.dir);
            return None;
        }
        match Guard::start(&base.dir.join("cgroup.kill")) {
            Ok(g) => base._guard = Some(g),
            Err(e) => tracing::warn!("no guard for the tasks if this process dies: {e}"),
        }
        Some(base)
    }

    /// Forks a child that joins a fresh group, because mkdir permission does
    /// not imply permission to move processes (delegation rules).
    ///
    /// Monitors of one process share its base group, so each probe has a
    /// name of its own: two monitors made at once (tests, the Python
    /// module) would otherwise fail each other's mkdir and fall back to
    /// /proc sampling.
    fn probe(&self) -> bool {
        static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let group = match self.task_group(&format!("probe-{n}")) {
            Ok(g) => g,
            Err(_) => return false,
        };
        // SAFETY: the child only runs async-signal-safe code and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = if join_raw(&group.procs_path).is_ok() {
                0
            } else {
                1
            };
            // SAFETY: terminating the forked child without running destructors.
            unsafe { libc::_exit(code) };
        }
        if pid < 0 {
            group.remove();
            return false;
        }
        let mut status = 0;
        // SAFETY: waiting for the child we just forked.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        group.remove();
        r == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }

    /// Whether task groups get the memory controller (`memory.peak`).
    pub fn has_memory(&self) -> bool {
        self.memory
    }

    /// The group for one task: an idle one when there is one, else a new
    /// directory named `name`.
    pub fn task_group(&self, name: &str) -> io::Result<TaskGroup> {
        let reused = self.lock_idle().pop();
        let idle = match reused {
            Some(idle) => idle,
            None => {
                let dir = self.dir.join(name);
                fs::create_dir(&dir)?;
                IdleGroup::new(dir)
            }
        };
        let IdleGroup {
            dir,
            dir_fd,
            procs,
            events,
            cpu_stat,
        } = idle;
        let procs_path = CString::new(procs.path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let dir_fd = dir_fd.or_else(|| crate::spawn::open_dir(&dir).ok());
        // Every group under the base gets the controllers the base enables
        // for its children, so this need not be looked up per task.
        let memory = self.memory;
        let mut group = TaskGroup {
            dir_fd: Mutex::new(dir_fd),
            procs,
            events,
            cpu_stat,
            memory_peak: KeptFile::new(dir.join("memory.peak")),
            memory_current: KeptFile::new(dir.join("memory.current")),
            cpu_base_usec: 0,
            throttled: std::sync::atomic::AtomicBool::new(false),
            killed: std::sync::atomic::AtomicBool::new(false),
            froze: std::sync::atomic::AtomicBool::new(false),
            emptied: std::sync::atomic::AtomicBool::new(false),
            dir,
            procs_path,
            memory,
        };
        group.cpu_base_usec = group.cpu_usec().unwrap_or(0);
        Ok(group)
    }

    /// Done with a task's group: kept for the next task when it is empty
    /// and its counters can be rebased (CPU can, by its value at hand-out;
    /// `memory.peak` cannot be reset on every kernel, so groups with the
    /// memory controller are removed), else removed. Reuse saves a mkdir
    /// and rmdir in cgroupfs per task, which cost more than the whole
    /// sampling of a short task.
    pub fn release(&self, group: &TaskGroup) {
        let reusable = !group.memory
            && !group.killed.load(std::sync::atomic::Ordering::Relaxed)
            && !group.froze.load(std::sync::atomic::Ordering::Relaxed)
            && !group.populated();
        if reusable && self.lock_idle().len() < IDLE_GROUPS {
            let unthrottled = !group.throttled.load(std::sync::atomic::Ordering::Relaxed)
                || write_file(&group.dir.join("cpu.max"), "max").is_ok();
            if unthrottled {
                let idle = IdleGroup {
                    dir: group.dir.clone(),
                    dir_fd: group.dir_fd().take(),
                    procs: group.procs.take(),
                    events: group.events.take(),
                    cpu_stat: group.cpu_stat.take(),
                };
                group.close_files();
                self.lock_idle().push(idle);
                return;
            }
        }
        group.rmdir();
    }

    fn lock_idle(&self) -> MutexGuard<'_, Vec<IdleGroup>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for CgroupBase {
    fn drop(&mut self) {
        for idle in self.lock_idle().drain(..) {
            drop(idle.dir_fd);
            let _ = fs::remove_dir(idle.dir);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

fn read_small(path: &Path, buf: &mut String) -> io::Result<()> {
    buf.clear();
    fs::File::open(path)?.read_to_string(buf)?;
    Ok(())
}

impl TaskGroup {
    /// Throttles the group to `cores` when the cpu controller is enabled.
    pub fn set_cores(&self, cores: f64) {
        let path = self.dir.join("cpu.max");
        if path.exists() {
            let period = 100_000u64;
            let quota = ((cores * period as f64).ceil() as u64).max(1000);
            match write_file(&path, &format!("{quota} {period}")) {
                Ok(()) => self
                    .throttled
                    .store(true, std::sync::atomic::Ordering::Relaxed),
                Err(e) => tracing::debug!("cannot set {}: {e}", path.display()),
            }
        }
    }

    /// Freezes (`true`) or thaws the group through `cgroup.freeze`: a
    /// frozen task holds its memory but runs no instruction, so it can wait
    /// for a decision without growing further. A fatal signal still kills
    /// frozen processes, so a frozen group can be killed as usual.
    pub fn freeze(&self, frozen: bool) -> io::Result<()> {
        if frozen {
            self.froze.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        write_file(
            &self.dir.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )
    }

    /// Pids of the processes in the group now.
    pub fn pids(&self, out: &mut Vec<i32>) -> io::Result<()> {
        self.procs
            .read(|text| {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                Some(())
            })
            .ok_or_else(|| io::Error::other(format!("cannot read {}", self.procs.path.display())))
    }

    /// CPU time of everything that ran in the group since it was handed
    /// to this task, microseconds.
    pub fn cpu_usec(&self) -> Option<u64> {
        let total: u64 = self.cpu_stat.read(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
        })?;
        Some(total.saturating_sub(self.cpu_base_usec))
    }

    /// Peak memory charged to the group, bytes (`memory.peak`, or the
    /// current usage on kernels before 5.19 that lack it).
    pub fn memory_peak(&self) -> Option<u64> {
        if !self.memory {
            return None;
        }
        let number = |text: &str| text.trim().parse::<u64>().ok();
        let peak = self.memory_peak.read(number);
        let current = self.memory_current.read(number);
        match (peak, current) {
            (Some(p), Some(c)) => Some(u64::max(p, c)),
            (p, c) => p.or(c),
        }
    }

    /// Processes of the group the kernel's OOM killer killed (`oom_kill`
    /// in `memory.events`), whichever limit ran out: the group's, an
    /// ancestor's, or the machine's. Read once, when the task ends.
    pub fn oom_kills(&self) -> Option<u64> {
        if !self.memory {
            return None;
        }
        let text = fs::read_to_string(self.dir.join("memory.events")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Peak swap of the group, bytes, when the memory controller exposes it.
    pub fn swap_peak(&self, buf: &mut String) -> Option<u64> {
        if !self.memory {
            return None;
        }
        for f in ["memory.swap.peak", "memory.swap.current"] {
            if read_small(&self.dir.join(f), buf).is_ok() {
                if let Ok(v) = buf.trim().parse() {
                    return Some(v);
                }
            }
        }
        None
    }

    /// Whether any process is in the group. Only its processes' children
    /// can join a group once its task started (the monitor writes to
    /// `cgroup.procs` only to start a task), so once empty it stays empty,
    /// and the answer is kept: finishing a task asks several times.
    pub fn populated(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.emptied.load(Relaxed) {
            return false;
        }
        let populated = self.events.read(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("populated "))
                .map(|v| v.trim() != "0")
        });
        if populated == Some(false) {
            self.emptied.store(true, Relaxed);
        }
        populated.unwrap_or(false)
    }

    /// The group's directory, open, for starting a task in it.
    pub fn dir_fd(&self) -> MutexGuard<'_, Option<OwnedFd>> {
        self.dir_fd.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close_files(&self) {
        *self.dir_fd() = None;
        for f in [
            &self.procs,
            &self.events,
            &self.cpu_stat,
            &self.memory_peak,
            &self.memory_current,
        ] {
            f.close();
        }
    }

    /// Kills every process in the group. `cgroup.kill` (5.14+) does it
    /// atomically, so a forking process cannot outrun it; otherwise every
    /// member gets SIGKILL, repeatedly, until the group is empty.
    ///
    /// An empty group is left alone: besides saving the write, a group that
    /// was never killed can be reused (see [`CgroupBase::release`]).
    pub fn kill(&self) {
        if !self.populated() {
            return;
        }
        self.killed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if write_file(&self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        let mut pids = Vec::new();
        for _ in 0..50 {
            pids.clear();
            if self.pids(&mut pids).is_err() || pids.is_empty() {
                return;
            }
            for &p in &pids {
                // SAFETY: sending a signal; pids in our group cannot be
                // recycled into processes outside it.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills what is left, waits for the group to empty, and removes it.
    pub fn remove(&self) {
        self.kill();
        self.wait_empty();
        self.rmdir();
    }

    /// Waits (at most a few seconds) until no live process is left in the group.
    pub fn wait_empty(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.populated() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Removes the (empty) group directory, retrying briefly because the
    /// kernel may still be tearing down the last exited member.
    pub fn rmdir(&self) {
        self.close_files();
        let mut delay = Duration::from_millis(1);
        for _ in 0..10 {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => {
                    thread::sleep(delay);
                    delay *= 2;
                }
            }
        }
        tracing::warn!("could not remove cgroup {}", self.dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape(r"\04"), r"\04");
    }
}
