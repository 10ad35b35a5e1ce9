//! `drover monitor`: measure (and limit) one command by hand, like CCTools'
//! `resource_monitor`.
//!
//! Exit status: the command's own status (128 + N if it was killed by
//! signal N); [`LIMIT_EXIT_STATUS`] (147) if it was killed for going over a
//! `--limit`; 127 if the command does not exist, 126 if it cannot be
//! executed; 1 for errors of the monitor itself. SIGINT, SIGTERM and SIGHUP
//! sent to `drover monitor` kill the command's whole tree (which runs in its
//! own session, so the terminal does not signal it directly); the summary
//! is still written.

use crate::monitor::{Method, Monitor, MonitorOptions, SpawnOptions};
use crate::summary::{Limits, LIMIT_EXIT_STATUS};
use anyhow::Context;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// What `drover monitor` runs and how; the binary fills it from its options.
#[derive(Debug)]
pub struct MonitorConfig {
    /// Limits; the whole tree is killed when memory (MB), disk (MB, of the
    /// sandbox) or wall_time (s) goes over, and the exit status is 147.
    /// cores throttles when possible and is advisory otherwise.
    pub limit: Option<Limits>,
    /// Milliseconds between samples.
    pub interval: u64,
    /// Write the JSON summary here instead of to stdout.
    pub summary: Option<PathBuf>,
    /// Write one JSON object per sample, one per line, here.
    pub series: Option<PathBuf>,
    /// Directory whose size is the task's disk usage (default: none, unless
    /// a disk limit is given, then the current directory).
    pub sandbox: Option<PathBuf>,
    /// How to find the command's processes.
    pub method: Method,
    /// The command and its arguments.
    pub command: Vec<OsString>,
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write is async-signal-safe; a full pipe just drops the byte.
        unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    }
}

/// A pipe that becomes readable when we get SIGINT, SIGTERM or SIGHUP, so the
/// wait loop can poll it next to the pidfd.
fn signal_pipe() -> io::Result<OwnedFd> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us these; the write end lives for the
    // rest of the process, owned by the signal handler.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls write.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    Ok(read)
}

fn poll2(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if r >= 0 {
            return Ok((fds[0].revents != 0, fds[1].revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Runs `drover monitor`; returns the exit status to exit with.
pub fn run(args: MonitorConfig) -> anyhow::Result<i32> {
    let limits = args.limit.clone().unwrap_or_default();
    let sandbox = match (&args.sandbox, limits.disk_mb) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(_)) => Some(std::env::current_dir().context("current directory")?),
        (None, None) => None,
    };
    let (program, rest) = args.command.split_first().context("no command given")?;
    let mut cmd = Command::new(program);
    cmd.args(rest);
    let series = match &args.series {
        Some(p) => Some(Box::new(BufWriter::new(
            File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )) as Box<dyn Write + Send>),
        None => None,
    };
    let monitor = Monitor::with_options(MonitorOptions {
        interval: Duration::from_millis(args.interval.max(1)),
        method: args.method,
    });
    let signals = signal_pipe().context("installing signal handlers")?;
    let mut watched = match monitor.spawn_with(
        cmd,
        sandbox.as_deref(),
        limits,
        SpawnOptions {
            series,
            ..Default::default()
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            eprintln!(
                "drover monitor: cannot run {}: {e}",
                program.to_string_lossy()
            );
            return Ok(match e.kind() {
                io::ErrorKind::NotFound => 127,
                io::ErrorKind::PermissionDenied => 126,
                _ => 1,
            });
        }
    };
    let report = loop {
        if let Some(r) = watched.try_finish()? {
            break r;
        }
        let (_, signalled) = poll2(watched.pidfd(), signals.as_fd())?;
        if signalled {
            let mut drain = [0u8; 64];
            // SAFETY: reading from our own non-blocking pipe.
            while unsafe { libc::read(signals.as_raw_fd(), drain.as_mut_ptr().cast(), 64) } > 0 {}
            watched.kill();
        }
    };
    if let Some(why) = report.summary.ending_message() {
        eprintln!("drover monitor: {}: {why}", program.to_string_lossy());
    }
    let json = serde_json::to_string_pretty(&report.summary.to_json_with_units())?;
    match &args.summary {
        Some(p) => {
            std::fs::write(p, json + "\n").with_context(|| format!("writing {}", p.display()))?
        }
        None => println!("{json}"),
    }
    Ok(if report.summary.limits_exceeded.is_some() {
        LIMIT_EXIT_STATUS
    } else {
        report.exit.shell_status()
    })
}
