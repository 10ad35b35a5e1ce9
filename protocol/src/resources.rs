//! Resource vectors shared by the master, the worker and the wire protocol.

use serde::{Deserialize, Serialize};

/// An amount of each schedulable resource.
///
/// Used for what a worker offers, what a task asks for, what it is
/// allocated and what it was measured to use. Zero memory, disk or gpus in a
/// request means "none reserved"; cores are whole cores.
///
/// ```
/// use drover_protocol::Resources;
/// let worker = Resources { cores: 4, memory_mb: 8000, disk_mb: 10_000, gpus: 0 };
/// let task = Resources { cores: 2, memory_mb: 1000, ..Default::default() };
/// assert!(task.fits_in(&worker));
/// assert_eq!(worker.saturating_sub(&task).cores, 2);
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Resources {
    pub cores: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub gpus: u32,
}

/// For people: "1 core, 100 MB memory, 50 MB disk" (parts that are 0 left
/// out; "nothing" when all are).
impl std::fmt::Display for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        let mut parts = Vec::new();
        if self.cores > 0 {
            parts.push(format!("{} core{}", self.cores, plural(self.cores.into())));
        }
        if self.memory_mb > 0 {
            parts.push(format!("{} MB memory", self.memory_mb));
        }
        if self.disk_mb > 0 {
            parts.push(format!("{} MB disk", self.disk_mb));
        }
        if self.gpus > 0 {
            parts.push(format!("{} GPU{}", self.gpus, plural(self.gpus.into())));
        }
        if parts.is_empty() {
            return f.write_str("nothing");
        }
        f.write_str(&parts.join(", "))
    }
}

impl Resources {
    /// True when every component of `self` is at most the same component of `available`.
    #[inline]
    pub fn fits_in(&self, available: &Resources) -> bool {
        self.cores <= available.cores
            && self.memory_mb <= available.memory_mb
            && self.disk_mb <= available.disk_mb
            && self.gpus <= available.gpus
    }

    /// Component-wise `self - other`, clamped at zero.
    #[inline]
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        Resources {
            cores: self.cores.saturating_sub(other.cores),
            memory_mb: self.memory_mb.saturating_sub(other.memory_mb),
            disk_mb: self.disk_mb.saturating_sub(other.disk_mb),
            gpus: self.gpus.saturating_sub(other.gpus),
        }
    }

    /// Component-wise sum, saturating.
    #[inline]
    pub fn saturating_add(&self, other: &Resources) -> Resources {
        Resources {
            cores: self.cores.saturating_add(other.cores),
            memory_mb: self.memory_mb.saturating_add(other.memory_mb),
            disk_mb: self.disk_mb.saturating_add(other.disk_mb),
            gpus: self.gpus.saturating_add(other.gpus),
        }
    }

    /// Component-wise larger of the two.
    #[inline]
    pub fn max_each(&self, other: &Resources) -> Resources {
        Resources {
            cores: self.cores.max(other.cores),
            memory_mb: self.memory_mb.max(other.memory_mb),
            disk_mb: self.disk_mb.max(other.disk_mb),
            gpus: self.gpus.max(other.gpus),
        }
    }

    /// Component-wise smaller of the two.
    #[inline]
    pub fn min_each(&self, other: &Resources) -> Resources {
        Resources {
            cores: self.cores.min(other.cores),
            memory_mb: self.memory_mb.min(other.memory_mb),
            disk_mb: self.disk_mb.min(other.disk_mb),
            gpus: self.gpus.min(other.gpus),
        }
    }

    /// True when nothing at all is requested.
    #[inline]
    pub fn is_zero(&self) -> bool {
        *self == Resources::default()
    }
}
