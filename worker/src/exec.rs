//! Running one task's process: spawn in its own process group, wait for it
//! without a thread per task (pidfd + epoll through tokio), kill the whole
//! group on cancel or wall-time expiry, and collect rusage when it is reaped.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

/// How the process ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub wall_time: Duration,
    pub cpu_time_s: f64,
    pub max_rss_kb: i64,
}

/// A running process group whose leader we reap ourselves.
pub struct Running {
    pid: libc::pid_t,
    pidfd: AsyncFd<PidFd>,
    started: Instant,
    reaped: bool,
}

struct PidFd(OwnedFd);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Running {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(mut cmd: Command) -> io::Result<Running> {
        cmd.process_group(0);
        let child = cmd.spawn()?;
        let pid = child.id() as libc::pid_t;
        // std's Child neither reaps nor kills on drop; we own the pid from here on.
        drop(child);
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            kill_group(pid);
            reap_blocking(pid);
            return Err(io::Error::new(err.kind(), format!("pidfd_open: {err}")));
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // SAFETY: the fd is owned by the PidFd we hand over, and stays open as long as the AsyncFd.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(PidFd(owned), tokio::io::Interest::READABLE) }
                .map_err(|e| io::Error::other(format!("registering pidfd: {e}")))?;
        Ok(Running {
            pid,
            pidfd,
            started: Instant::now(),
            reaped: false,
        })
    }

    /// Kills the whole process group.
    pub fn kill(&self) {
        if !self.reaped {
            kill_group(self.pid);
        }
    }

    /// Waits for the leader to exit and reaps it; then kills what is left of
    /// its group, so a task never outlives its report.
    pub async fn wait(&mut self) -> io::Result<Exit> {
        loop {
            if let Some(exit) = self.try_reap()? {
                kill_group(self.pid);
                return Ok(exit);
            }
            let mut guard = self.pidfd.readable().await?;
            guard.clear_ready();
        }
    }

    fn try_reap(&mut self) -> io::Result<Option<Exit>> {
        let mut status = 0;
        // SAFETY: rusage is plain old data; wait4 fills it in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to locals; WNOHANG never blocks.
        let r = unsafe { libc::wait4(self.pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == 0 {
            return Ok(None);
        }
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.reaped = true;
        let (code, signal) = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else if libc::WIFSIGNALED(status) {
            (None, Some(libc::WTERMSIG(status)))
        } else {
            (None, None)
        };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok(Some(Exit {
            code,
            signal,
            wall_time: self.started.elapsed(),
            cpu_time_s: tv(usage.ru_utime) + tv(usage.ru_stime),
            max_rss_kb: usage.ru_maxrss,
        }))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            // A dropped task (worker shutting down) must not leave processes or zombies.
            kill_group(self.pid);
            reap_blocking(self.pid);
        }
    }
}

fn kill_group(pid: libc::pid_t) {
    // SAFETY: signalling a process group we created; ESRCH when already gone is fine.
    unsafe {
        libc::killpg(pid, libc::SIGKILL);
    }
}

fn reap_blocking(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: the group was just sent SIGKILL, so this returns promptly.
    unsafe {
        libc::waitpid(pid, &mut status, 0);
    }
}
