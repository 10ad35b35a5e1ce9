//! Starting a task without copying the parent's address space.
//!
//! `std::process::Command` with a `pre_exec` hook (which the monitor needs,
//! to put the child in a new session and in its cgroup before it can fork)
//! always uses `fork`. In a multi-threaded worker with a warm heap, that
//! fork was the largest single cost of running a short task: copying page
//! tables, write-protecting every page, a TLB shoot-down on every core, and
//! afterwards a copy-on-write fault for each page the worker wrote. [`Exec`]
//! instead starts the child the way glibc's `posix_spawn` does,
//! `clone(CLONE_VM | CLONE_VFORK)`: the child borrows the parent's memory
//! on a stack of its own, makes a handful of raw system calls, and execs;
//! the calling thread waits only until then. `posix_spawn` itself cannot be
//! used because it cannot join a cgroup.
//!
//! On x86-64 the clone is `clone3` with `CLONE_INTO_CGROUP`, so the child
//! is born in its task's cgroup. Moving it there after the clone (writing
//! to `cgroup.procs`, the fallback on older kernels and other
//! architectures) takes the cgroup subsystem's thread-group lock for
//! writing, which waits for an RCU grace period whenever the previous
//! migration was a while ago: 10-20 ms per task here, the largest part of
//! what a 50 ms task cost on top of its own run time.
//!
//! The child runs with every signal blocked and resets each caught signal
//! to its default before unblocking, so no handler of the parent ever runs
//! on the child's borrowed memory. Everything it touches is prepared by the
//! parent beforehand; it allocates nothing and cannot panic.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::hash::{BuildHasherDefault, DefaultHasher};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A command to start under a [`crate::Monitor`] with
/// [`crate::Monitor::spawn_exec`]: program, arguments, environment,
/// working directory and standard descriptors, spelled out rather than
/// hidden in a `Command`.
///
/// ```no_run
/// use drover_monitor::{Exec, Limits, Monitor};
/// let monitor = Monitor::new(drover_monitor::DEFAULT_INTERVAL);
/// let mut exec = Exec::new("/bin/sh");
/// exec.arg("-c").arg("echo hi > out").current_dir("/tmp");
/// exec.env("CORES", "1");
/// let report = monitor.spawn_exec(exec, None, Limits::default())?.wait()?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Exec {
    program: OsString,
    args: Vec<OsString>,
    /// The environment it starts from, shared (see [`BaseEnv`]).
    base: BaseEnv,
    /// Variables set with [`Exec::env`], replacing the base's of the same name.
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    stdio: [Option<OwnedFd>; 3],
    /// Program and arguments to exec first, looked up in `PATH`; `program`
    /// runs only if that exec fails (see [`Exec::shell`]).
    direct: Option<Vec<OsString>>,
}

/// An environment for [`Exec`] to start from, taken once and shared: a
/// worker starting thousands of commands copied its whole environment
/// (some fifty variables, an allocation each) for every one of them.
#[derive(Clone, Debug)]
pub struct BaseEnv(Arc<[(OsString, OsString)]>);

impl BaseEnv {
    /// This process's environment now. Later changes to it are not seen
    /// by commands started from this snapshot.
    pub fn current() -> BaseEnv {
        BaseEnv(std::env::vars_os().collect())
    }
}

/// Shell builtins and reserved words: a command that starts with one of
/// them means something else to the shell than the program of that name
/// (or there is none), so it always goes through the shell.
const SHELL_WORDS: &[&str] = &[
    "!", ".", ":", "[", "alias", "bg", "break", "case", "cd", "chdir", "command", "continue", "do",
    "done", "echo", "elif", "else", "esac", "eval", "exec", "exit", "export", "false", "fc", "fg",
    "fi", "for", "function", "getopts", "hash", "if", "in", "jobs", "kill", "local", "printf",
    "pwd", "read", "readonly", "return", "select", "set", "shift", "test", "then", "times", "trap",
    "true", "type", "ulimit", "umask", "unalias", "unset", "until", "wait", "while",
];

/// The words of `command` if the shell would run it as one program with
/// literal arguments (no quoting, expansion, redirection, globbing,
/// assignment, operator or builtin), so that exec'ing them directly is
/// exactly what `sh -c command` would do.
pub(crate) fn plain_words(command: &str) -> Option<Vec<&str>> {
    let literal = |b: u8| b.is_ascii_alphanumeric() || b"_-./,:+@%=".contains(&b);
    if !command.bytes().all(|b| b == b' ' || literal(b)) {
        return None;
    }
    let words: Vec<&str> = command.split(' ').filter(|w| !w.is_empty()).collect();
    let first = *words.first()?;
    if first.contains('=') {
        return None;
    }
    if SHELL_WORDS.contains(&first) {
        // `true` and `false` alone do what the programs do; with
        // arguments the programs may not (`true --help`).
        return (words.len() == 1 && (first == "true" || first == "false")).then_some(words);
    }
    Some(words)
}

impl Exec {
    /// `program` with no arguments and this process's environment. A
    /// program without a `/` is looked up in the `PATH` of that environment.
    pub fn new(program: impl AsRef<OsStr>) -> Exec {
        Exec::new_in(program, BaseEnv::current())
    }

    /// `program` with no arguments, starting from the environment `base`
    /// (a program without a `/` is looked up in its `PATH`).
    pub fn new_in(program: impl AsRef<OsStr>, base: BaseEnv) -> Exec {
        Exec {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            base,
            env: Vec::new(),
            cwd: None,
            stdio: [None, None, None],
            direct: None,
        }
    }

    /// `command` as `/bin/sh -c command` runs it. When the command is one
    /// program with literal arguments (no quotes, `$`, globs, redirections,
    /// operators, assignments or builtins), the program is exec'd directly,
    /// looked up in `PATH` as the shell would: that saves starting the
    /// shell, which for a short task is most of its cost. If that exec
    /// fails for any reason (not found, a script without `#!`), the shell
    /// runs the command as usual, with its own error messages and exit
    /// codes. The direct exec exports `PWD` (the working directory), as the
    /// shell does.
    ///
    /// ```no_run
    /// use drover_monitor::{Exec, Limits, Monitor};
    /// let monitor = Monitor::new(drover_monitor::DEFAULT_INTERVAL);
    /// let mut exec = Exec::shell("wc -c input.dat");
    /// exec.current_dir("/tmp");
    /// let report = monitor.spawn_exec(exec, None, Limits::default())?.wait()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn shell(command: &str) -> Exec {
        Exec::shell_in(command, BaseEnv::current())
    }

    /// [`Exec::shell`] starting from the environment `base`: a program that
    /// starts many commands takes its environment once instead of per command.
    pub fn shell_in(command: &str, base: BaseEnv) -> Exec {
        let mut exec = Exec::new_in("/bin/sh", base);
        exec.arg("-c").arg(command);
        exec.direct = plain_words(command).map(|w| w.iter().map(OsString::from).collect());
        exec
    }

    /// Appends an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Exec {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Sets an environment variable, replacing an inherited one.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Exec {
        // Only the variables set here are kept per command; the base is
        // merged into them once, when the command starts.
        let (key, value) = (key.as_ref(), value.as_ref().to_owned());
        match self.env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.env.push((key.to_owned(), value)),
        }
        self
    }

    /// The child's working directory (the parent's when unset).
    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Exec {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// Whether [`Exec::shell`] found the command plain enough to exec
    /// without the shell.
    pub fn skips_shell(&self) -> bool {
        self.direct.is_some()
    }

    /// Standard input (inherited when unset).
    pub fn stdin(&mut self, fd: impl Into<OwnedFd>) -> &mut Exec {
        self.stdio[0] = Some(fd.into());
        self
    }

    /// Standard output (inherited when unset).
    pub fn stdout(&mut self, fd: impl Into<OwnedFd>) -> &mut Exec {
        self.stdio[1] = Some(fd.into());
        self
    }

    /// Standard error (inherited when unset).
    pub fn stderr(&mut self, fd: impl Into<OwnedFd>) -> &mut Exec {
        self.stdio[2] = Some(fd.into());
        self
    }

    /// The command line, for the summary.
    pub(crate) fn command_line(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// The `PATH` the child gets.
    fn path_var(&self) -> &OsStr {
        self.var("PATH")
            .unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"))
    }

    /// The value of `key` in the child's environment.
    fn var(&self, key: &str) -> Option<&OsStr> {
        let set = self.env.iter().find(|(k, _)| k == key);
        set.or_else(|| self.base.0.iter().find(|(k, _)| k == key))
            .map(|(_, v)| v.as_os_str())
    }

    /// Every variable of the child's environment, each name once: the
    /// base's not set here, then those set here.
    fn vars(&self) -> impl Iterator<Item = &(OsString, OsString)> {
        let set = &self.env;
        self.base
            .0
            .iter()
            .filter(move |(k, _)| !set.iter().any(|(s, _)| s == k))
            .chain(set)
    }

    /// Where the direct program may be, in the order `execvp` tries them,
    /// or with the place it was found last time first (see [`Found`]).
    fn direct_candidates(&self, program: &OsStr) -> io::Result<Arc<[CString]>> {
        if program.as_bytes().contains(&b'/') {
            return Ok(Arc::from([cstring(program.as_bytes(), "program")?]));
        }
        let path = self.path_var();
        if let Some(known) = FOUND.lookup(path, program) {
            return Ok(known);
        }
        std::env::split_paths(path)
            .map(|dir| {
                // An empty PATH entry is the working directory.
                let dir = if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir
                };
                cstring(dir.join(program).into_os_string().into_vec(), "program")
            })
            .collect()
    }

    fn resolve_program(&self) -> io::Result<PathBuf> {
        let program = Path::new(&self.program);
        if self.program.as_bytes().contains(&b'/') {
            return Ok(program.to_owned());
        }
        std::env::split_paths(&self.path_var())
            .map(|dir| dir.join(program))
            .find(|p| {
                std::fs::metadata(p).is_ok_and(|m| {
                    m.is_file()
                        && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                })
            })
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} not found in PATH", self.program.to_string_lossy()),
                )
            })
    }
}

/// Where plain commands' programs were found, by `PATH` and name, as a
/// shell's command hash keeps them: the next direct exec of the same
/// program tries that place first instead of failing through every
/// earlier `PATH` entry (eight failed `execve` for `true` on this
/// project's CI machines, each a path lookup while the spawning thread
/// waits). The order after it is unchanged, so a program that moved is
/// still found. Like the shell's hash, a program installed later in an
/// earlier `PATH` directory is not noticed; places relative to the working
/// directory (which differs per task) are never remembered.
struct Found {
    places: Mutex<HashMap<u64, FoundEntry, BuildHasherDefault<DefaultHasher>>>,
}

struct FoundEntry {
    path: OsString,
    program: OsString,
    candidates: Arc<[CString]>,
}

/// Forgotten all at once past this many programs: a bound, not a cache policy.
const FOUND_MAX: usize = 4096;

static FOUND: Found = Found {
    places: Mutex::new(HashMap::with_hasher(BuildHasherDefault::new())),
};

impl Found {
    fn key(path: &OsStr, program: &OsStr) -> u64 {
        use std::hash::Hasher;
        let mut h = DefaultHasher::new();
        h.write(path.as_bytes());
        h.write_u8(0);
        h.write(program.as_bytes());
        h.finish()
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, FoundEntry, BuildHasherDefault<DefaultHasher>>>
    {
        self.places.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lookup(&self, path: &OsStr, program: &OsStr) -> Option<Arc<[CString]>> {
        let places = self.lock();
        let e = places.get(&Self::key(path, program))?;
        (e.path == path && e.program == program).then(|| Arc::clone(&e.candidates))
    }

    /// The child exec'd `candidates[index]`: remember it first in line,
    /// if it and every place tried before it are absolute.
    fn remember(&self, path: &OsStr, program: &OsStr, candidates: &Arc<[CString]>, index: usize) {
        if index == 0 && self.lookup(path, program).is_some() {
            return;
        }
        let Some(found) = candidates.get(index) else {
            return;
        };
        if !candidates[..=index]
            .iter()
            .all(|c| c.as_bytes().starts_with(b"/"))
        {
            return;
        }
        let reordered: Arc<[CString]> = std::iter::once(found.clone())
            .chain(
                candidates
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != index)
                    .map(|(_, c)| c.clone()),
            )
            .collect();
        let mut places = self.lock();
        if places.len() >= FOUND_MAX {
            places.clear();
        }
        places.insert(
            Self::key(path, program),
            FoundEntry {
                path: path.to_owned(),
                program: program.to_owned(),
                candidates: reordered,
            },
        );
    }
}

fn cstring(s: impl Into<Vec<u8>>, what: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| nul_error(what))
}

fn nul_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("the {what} contains a NUL byte"),
    )
}

/// What the child needs, all prepared before the clone.
struct ChildPlan {
    /// Tried first, in order, with `direct_argv`; see [`Exec::shell`].
    direct: Arc<[CString]>,
    /// Set by the child to the index in `direct` it is about to exec (or
    /// past the end for the shell): after a successful clone, the one
    /// that ran.
    exec_index: AtomicUsize,
    direct_argv: Vec<*const libc::c_char>,
    program: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: Option<CString>,
    stdio: [libc::c_int; 3],
    cgroup_procs: Option<CString>,
    fd_limit: Option<libc::rlimit>,
    /// A session of its own (`setsid`), else a process group of its own
    /// (`setpgid`); see [`own_session_needed`].
    own_session: bool,
    old_mask: libc::sigset_t,
    /// The clone already reset caught signals (CLONE_CLEAR_SIGHAND).
    handlers_cleared: bool,
    /// Set by the child, before it exits, to the errno of the step that
    /// failed; the parent reads it once the clone returns.
    error: AtomicI32,
}

/// Size of the child's stack: it only calls into libc and the kernel.
const CHILD_STACK: usize = 64 * 1024;

thread_local! {
    /// The child's stack, one per spawning thread and reused: CLONE_VFORK
    /// holds the thread until the child has exec'd, so the stack is free
    /// again by the time the thread can spawn another. A fresh zeroed
    /// buffer per task cost a page-zeroing and, in glibc's thread arenas,
    /// an `mprotect` to grow the heap and another to trim it.
    static CHILD_STACK_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; CHILD_STACK].into_boxed_slice());
}

/// Whether a task started now needs a session of its own rather than only
/// a process group of its own. Either way its pid names a process group
/// that a kill of the task reaches. A session is what /proc sampling
/// follows (a session id survives double forks and `setpgid`), so a task
/// without a cgroup gets one. A task in a cgroup is followed by the group,
/// and needs a session only to be rid of this process's controlling
/// terminal: in this session it could open the terminal, and reading it
/// from a background process group would stop it. Otherwise a process
/// group does, and costs less: each new session is also a scheduler
/// autogroup, created and torn down per task (about 1% of the CPU of a
/// stream of short tasks).
pub(crate) fn own_session_needed(in_cgroup: bool) -> bool {
    !in_cgroup || has_controlling_terminal()
}

/// Whether this process has a controlling terminal, looked up once: only
/// a session leader can gain one later, by opening a terminal, which the
/// programs that start tasks here (the worker, `drover monitor`) never do.
fn has_controlling_terminal() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        // The seventh field of /proc/self/stat, after the parenthesised
        // name (which may hold spaces and parentheses), is the terminal's
        // device number, 0 for none. Unreadable: assume a terminal.
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return true;
        };
        let tty = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(4))
            .and_then(|f| f.parse::<i64>().ok());
        tty != Some(0)
    })
}

/// Starts `exec` in a session (or, unless `own_session`, a process group)
/// of its own, and in the cgroup whose `cgroup.procs` is `cgroup_procs`,
/// with the soft open-file limit `fd_limit`. Returns the child's pid; the
/// caller reaps it.
pub(crate) fn spawn(
    exec: Exec,
    cgroup: Option<CgroupTarget<'_>>,
    fd_limit: Option<libc::rlimit>,
    own_session: bool,
) -> io::Result<i32> {
    let program = cstring(
        exec.resolve_program()?.into_os_string().into_vec(),
        "program",
    )?;
    let mut args = Vec::with_capacity(exec.args.len() + 1);
    args.push(cstring(exec.program.as_bytes(), "program")?);
    for a in &exec.args {
        args.push(cstring(a.as_bytes(), "command line")?);
    }
    let mut direct_args = Vec::new();
    let mut direct: Arc<[CString]> = Arc::from([]);
    if let Some(words) = &exec.direct {
        if let Some(program) = words.first() {
            direct = exec.direct_candidates(program)?;
        }
        for w in words {
            direct_args.push(cstring(w.as_bytes(), "command line")?);
        }
    }
    let mut direct_argv: Vec<*const libc::c_char> =
        direct_args.iter().map(|a| a.as_ptr()).collect();
    direct_argv.push(std::ptr::null());
    let mut exec = exec;
    if exec.direct.is_some() {
        // What the shell would export (dash always sets it to the
        // working directory).
        if let Some(cwd) = exec.cwd.clone() {
            exec.env("PWD", cwd);
        }
    }
    // Every `KEY=VALUE\0` in one buffer: one allocation instead of one
    // per variable (some fifty per task, with the worker's environment).
    let size = exec.vars().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut env = Vec::with_capacity(size);
    let mut env_starts = Vec::with_capacity(exec.base.0.len() + exec.env.len() + 1);
    for (k, v) in exec.vars() {
        let (k, v) = (k.as_bytes(), v.as_bytes());
        if k.is_empty() || k.contains(&b'=') {
            continue;
        }
        if k.contains(&0) || v.contains(&0) {
            return Err(nul_error("environment"));
        }
        env_starts.push(env.len());
        env.extend_from_slice(k);
        env.push(b'=');
        env.extend_from_slice(v);
        env.push(0);
    }
    let cwd = match &exec.cwd {
        Some(d) => Some(cstring(d.as_os_str().as_bytes(), "working directory")?),
        None => None,
    };
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // `env` is not touched again until the child has exec'd.
    let mut envp: Vec<*const libc::c_char> = env_starts
        .iter()
        .map(|&at| env[at..].as_ptr().cast())
        .collect();
    envp.push(std::ptr::null());
    let stdio = [0, 1, 2].map(|i| exec.stdio[i].as_ref().map_or(-1, |fd| fd.as_raw_fd()));

    let mut plan = ChildPlan {
        direct,
        exec_index: AtomicUsize::new(usize::MAX),
        direct_argv,
        program,
        argv,
        envp,
        cwd,
        stdio,
        cgroup_procs: cgroup.map(|c| c.procs.clone()),
        fd_limit,
        own_session,
        // SAFETY: sigset_t is plain data, filled by pthread_sigmask below.
        old_mask: unsafe { std::mem::zeroed() },
        handlers_cleared: false,
        error: AtomicI32::new(0),
    };
    let pid = CHILD_STACK_BUF.with_borrow_mut(|stack| clone_child(&mut plan, stack, cgroup))?;
    if let Some(program) = exec.direct.as_ref().and_then(|words| words.first()) {
        let index = plan.exec_index.load(Ordering::Relaxed);
        FOUND.remember(exec.path_var(), program, &plan.direct, index);
    }
    Ok(pid)
}

/// Clones the child that execs `plan` on `stack`, in `cgroup`'s group
/// when it is given; returns its pid once it has exec'd.
fn clone_child(
    plan: &mut ChildPlan,
    stack: &mut [u8],
    cgroup: Option<CgroupTarget<'_>>,
) -> io::Result<i32> {
    // The stack grows down on every architecture Linux runs this on; the
    // top is aligned to 16 bytes as the ABIs require.
    let top = {
        let end = stack.as_mut_ptr() as usize + stack.len();
        (end & !15) as *mut libc::c_void
    };

    // Born in the cgroup when the kernel can do it.
    let cgroup_dir = match cgroup {
        Some(c) if clone3::usable() => c.dir_fd,
        _ => None,
    };
    if cgroup_dir.is_some() {
        plan.cgroup_procs = None;
        plan.handlers_cleared = true;
    }

    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigset pointers; blocks signals in this thread only.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut plan.old_mask);
    }
    let arg = (&*plan as *const ChildPlan)
        .cast_mut()
        .cast::<libc::c_void>();
    let mut pid = -1;
    if let Some(dir) = &cgroup_dir {
        // SAFETY: as for `libc::clone` below; `stack` outlives the call.
        pid = unsafe { clone3::spawn_into(stack.as_mut_ptr(), stack.len(), dir.as_raw_fd(), arg) };
        if pid < 0 {
            let errno = io::Error::last_os_error().raw_os_error();
            if matches!(
                errno,
                Some(libc::ENOSYS | libc::EINVAL | libc::E2BIG | libc::EPERM)
            ) {
                // A kernel without clone3 or CLONE_INTO_CGROUP (or a
                // seccomp filter that refuses it): join by writing
                // cgroup.procs, now and from here on.
                clone3::disable();
            }
            plan.cgroup_procs = cgroup.map(|c| c.procs.clone());
            plan.handlers_cleared = false;
        }
    }
    if pid < 0 {
        // SAFETY: `child_main` only reads `plan` and makes async-signal-safe
        // system calls on its own stack; CLONE_VFORK keeps this thread (and
        // so `plan`, `stack` and the strings it points into) waiting until
        // the child has exec'd or exited.
        pid = unsafe {
            libc::clone(
                child_main,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                arg,
            )
        };
    }
    let clone_error = io::Error::last_os_error();
    // SAFETY: restoring this thread's own mask.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &plan.old_mask, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(clone_error);
    }
    let errno = plan.error.load(Ordering::SeqCst);
    if errno != 0 {
        // SAFETY: reaping the child that just failed before exec.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok(pid)
}

/// The cgroup a task is born in: its `cgroup.procs` (to join by writing
/// it) and, opened before the clone since the child must not allocate,
/// its directory (to be born in it with `CLONE_INTO_CGROUP`).
#[derive(Clone, Copy)]
pub(crate) struct CgroupTarget<'a> {
    pub procs: &'a CString,
    pub dir_fd: Option<BorrowedFd<'a>>,
}

pub(crate) fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)?;
    Ok(f.into())
}

/// `clone3(CLONE_VM | CLONE_VFORK | CLONE_INTO_CGROUP)`. glibc has no
/// wrapper for clone3, and a child that shares the caller's memory must
/// start on its own stack before any compiled code runs, so the call and
/// the child's first steps are a few instructions of assembly.
mod clone3 {
    use std::sync::atomic::{AtomicBool, Ordering};

    static UNSUPPORTED: AtomicBool = AtomicBool::new(!cfg!(target_arch = "x86_64"));

    pub fn usable() -> bool {
        !UNSUPPORTED.load(Ordering::Relaxed)
    }

    pub fn disable() {
        UNSUPPORTED.store(true, Ordering::Relaxed);
    }

    /// Clones a child into the cgroup `cgroup_fd` that runs
    /// `child_main(arg)` on `stack` and exits with its result. Returns the
    /// pid, or -1 with errno set.
    ///
    /// # Safety
    /// As for `libc::clone` with `CLONE_VM | CLONE_VFORK`: `stack` must be
    /// `stack_len` writable bytes that stay alive until the call returns,
    /// and `child_main` must only make async-signal-safe calls.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn spawn_into(
        stack: *mut u8,
        stack_len: usize,
        cgroup_fd: i32,
        arg: *mut libc::c_void,
    ) -> i32 {
        const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
        const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;
        let args = libc::clone_args {
            flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64
                | CLONE_INTO_CGROUP
                | CLONE_CLEAR_SIGHAND,
            pidfd: 0,
            child_tid: 0,
            parent_tid: 0,
            exit_signal: libc::SIGCHLD as u64,
            stack: stack as u64,
            // The kernel starts the child at stack + stack_size: keep that
            // 16-byte aligned, as the ABI wants at a call.
            stack_size: (((stack as usize + stack_len) & !15) - stack as usize) as u64,
            tls: 0,
            set_tid: 0,
            set_tid_size: 0,
            cgroup: cgroup_fd as u64,
        };
        let entry: extern "C" fn(*mut libc::c_void) -> libc::c_int = super::child_main;
        let ret: i64;
        // SAFETY: the parent returns from the syscall with every register
        // but rax, rcx and r11 intact. The child starts on the new stack
        // with the same registers, so it finds `entry` and `arg` in r12 and
        // r13, calls it, and exits with its return value without ever
        // returning into compiled code.
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "xor ebp, ebp",
                "mov rdi, r13",
                "call r12",
                "mov edi, eax",
                "mov eax, 60",
                "syscall",
                "ud2",
                "2:",
                inlateout("rax") libc::SYS_clone3 => ret,
                in("rdi") &args as *const libc::clone_args,
                in("rsi") std::mem::size_of::<libc::clone_args>(),
                in("r12") entry,
                in("r13") arg,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        if ret < 0 {
            // SAFETY: setting this thread's errno.
            unsafe { *libc::__errno_location() = (-ret) as i32 };
            return -1;
        }
        ret as i32
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn spawn_into(_: *mut u8, _: usize, _: i32, _: *mut libc::c_void) -> i32 {
        // SAFETY: setting this thread's errno.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        -1
    }
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildPlan`, alive and unchanged while
    // the parent waits (CLONE_VFORK). Only system calls follow.
    unsafe {
        let plan = &*(arg as *const ChildPlan);
        let fail = |plan: &ChildPlan| -> ! {
            let errno = *libc::__errno_location();
            plan.error.store(
                if errno == 0 { libc::EINVAL } else { errno },
                Ordering::SeqCst,
            );
            libc::_exit(127)
        };
        // Caught signals go back to their defaults while everything is
        // still blocked; ignored ones stay ignored, as across exec.
        let first_to_reset = if plan.handlers_cleared {
            libc::SIGRTMAX()
        } else {
            1
        };
        for sig in first_to_reset..libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        // A process group of its own gives the tree a group to kill; a
        // session, when needed, also an id that survives double forks (for
        // /proc mode) and no controlling terminal (see `own_session_needed`).
        let led = if plan.own_session {
            libc::setsid()
        } else {
            libc::setpgid(0, 0)
        };
        if led < 0 {
            fail(plan);
        }
        if let Some(procs) = &plan.cgroup_procs {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            // "0" moves the writing process itself.
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(plan);
            }
            libc::close(fd);
        }
        if let Some(lim) = &plan.fd_limit {
            // Best effort: the task gets the limit its user set.
            libc::setrlimit(libc::RLIMIT_NOFILE, lim);
        }
        // The Rust runtime ignores SIGPIPE; a task gets the default back
        // (as `std::process::Command` gives it), so `yes | head` ends.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // A source that sits on another standard slot (0-2 were closed in
        // the parent) would be overwritten by an earlier dup2: move it up.
        let mut fds = plan.stdio;
        for (target, fd) in fds.iter_mut().enumerate() {
            if *fd >= 0 && *fd < 3 && *fd != target as libc::c_int {
                *fd = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3);
                if *fd < 0 {
                    fail(plan);
                }
            }
        }
        for (target, &fd) in fds.iter().enumerate() {
            let target = target as libc::c_int;
            if fd < 0 {
                continue;
            }
            let ok = if fd == target {
                // dup2 onto itself keeps close-on-exec; clear it instead.
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, target) == target
            };
            if !ok {
                fail(plan);
            }
        }
        if let Some(dir) = &plan.cwd {
            if libc::chdir(dir.as_ptr()) != 0 {
                fail(plan);
            }
        }
        libc::sigprocmask(libc::SIG_SETMASK, &plan.old_mask, std::ptr::null_mut());
        // A failed exec changes nothing, so the shell can still take over.
        for (index, candidate) in plan.direct.iter().enumerate() {
            plan.exec_index.store(index, Ordering::Relaxed);
            libc::execve(
                candidate.as_ptr(),
                plan.direct_argv.as_ptr(),
                plan.envp.as_ptr(),
            );
        }
        plan.exec_index.store(usize::MAX, Ordering::Relaxed);
        libc::execve(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
        fail(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::{plain_words, spawn, Exec, FOUND};
    use std::ffi::OsStr;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// Runs the plain command `program` with `PATH` set to `path`; its exit code.
    fn exit_code(path: &str, program: &str) -> i32 {
        let mut e = Exec::shell(program);
        assert!(e.skips_shell());
        e.env("PATH", path);
        let pid = spawn(e, None, None, true).unwrap();
        let mut status = 0;
        // SAFETY: reaping the child just spawned.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        libc::WEXITSTATUS(status)
    }

    fn script(dir: &Path, name: &str, code: i32) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\nexit {code}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn first_known(path: &str, program: &str) -> Option<String> {
        let known = FOUND.lookup(OsStr::new(path), OsStr::new(program))?;
        Some(known.first()?.to_string_lossy().into_owned())
    }

    #[test]
    fn where_a_program_was_found_is_tried_first_and_a_moved_one_is_found_again() {
        let root = tempfile::tempdir().unwrap();
        let [missing, b, c] = ["missing", "b", "c"].map(|d| root.path().join(d));
        std::fs::create_dir(&b).unwrap();
        std::fs::create_dir(&c).unwrap();
        let prog = "drover-found-test-prog";
        let path = format!("{}:{}:{}", missing.display(), b.display(), c.display());
        script(&b, prog, 3);
        let in_b = b.join(prog).display().to_string();
        // A child another test forks while the script is still open for
        // writing holds that descriptor until it execs; exec'ing the script
        // meanwhile fails with ETXTBSY, the shell runs it instead, and the
        // place is not remembered (seen under full workspace runs). Such a
        // window is brief: a few tries get past it.
        for _ in 0..20 {
            assert_eq!(exit_code(&path, prog), 3);
            if first_known(&path, prog).is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(first_known(&path, prog), Some(in_b.clone()));
        assert_eq!(exit_code(&path, prog), 3);

        // Moved to a later directory: the remembered place fails, the
        // search goes on in PATH order, and the new place is remembered.
        std::fs::remove_file(b.join(prog)).unwrap();
        script(&c, prog, 4);
        for _ in 0..20 {
            assert_eq!(exit_code(&path, prog), 4);
            if first_known(&path, prog) == Some(c.join(prog).display().to_string()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(
            first_known(&path, prog),
            Some(c.join(prog).display().to_string())
        );
    }

    #[test]
    fn a_place_after_a_relative_path_entry_is_not_remembered() {
        let root = tempfile::tempdir().unwrap();
        let prog = "drover-found-test-relative";
        script(root.path(), prog, 5);
        // "." is each task's own working directory, which could shadow it.
        let path = format!(".:{}", root.path().display());
        assert_eq!(exit_code(&path, prog), 5);
        assert_eq!(first_known(&path, prog), None);
    }

    #[test]
    fn the_environment_reaches_the_child_and_a_nul_in_it_is_an_error() {
        let mut e = Exec::new("/bin/sh");
        e.arg("-c")
            .arg(r#"test "$DROVER_T1" = "a b" && test "$DROVER_T2" = "" && test -n "$PATH""#);
        e.env("DROVER_T1", "a b").env("DROVER_T2", "");
        let pid = spawn(e, None, None, true).unwrap();
        let mut status = 0;
        // SAFETY: reaping the child just spawned.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 0, "the child saw its variables");

        let mut bad = Exec::new("/bin/true");
        bad.env("DROVER_T3", "a\0b");
        let err = spawn(bad, None, None, true).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("environment"), "{err}");
    }

    #[test]
    fn only_plain_commands_skip_the_shell() {
        assert_eq!(
            plain_words("  wc -c input.dat "),
            Some(vec!["wc", "-c", "input.dat"])
        );
        assert_eq!(
            plain_words("./run --n=3 a,b x:y 50% u@h +1"),
            Some(vec!["./run", "--n=3", "a,b", "x:y", "50%", "u@h", "+1"])
        );
        assert_eq!(plain_words("true"), Some(vec!["true"]));
        assert_eq!(plain_words("false"), Some(vec!["false"]));
        for shell in [
            "",
            "   ",
            "true --help",
            "echo hi",
            "cd /tmp",
            "exit 3",
            "A=1 env",
            "if",
            "! false",
            "echo $HOME",
            "ls *.txt",
            "cat 'a b'",
            "cat \"a\"",
            "wc < in",
            "a > out",
            "a | b",
            "a; b",
            "a && b",
            "sleep 1 &",
            "ls ~",
            "a # comment",
            "a\tb",
            "a\nb",
            "cat a\\ b",
            "(a)",
            "{ a; }",
            "ls [ab]",
            "echo `id`",
            "x ?",
        ] {
            assert_eq!(plain_words(shell), None, "{shell:?} needs the shell");
        }
    }
}
