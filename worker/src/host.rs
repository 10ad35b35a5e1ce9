//! What this machine offers: cores, memory, free disk.

use std::path::Path;

use drover_protocol::Resources;

/// Detects this machine's resources: all cores, total memory, free disk under `workdir`.
pub fn detect_resources(workdir: &Path) -> Resources {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mb = procfs::Meminfo::current_mb().unwrap_or(1024);
    let disk_mb = free_disk_mb(workdir).unwrap_or(1024);
    Resources {
        cores,
        memory_mb,
        disk_mb,
        gpus: 0,
    }
}

trait MeminfoMb {
    fn current_mb() -> Option<u64>;
}

impl MeminfoMb for procfs::Meminfo {
    fn current_mb() -> Option<u64> {
        use procfs::Current;
        procfs::Meminfo::current()
            .ok()
            .map(|m| m.mem_total / (1024 * 1024))
    }
}

fn free_disk_mb(path: &Path) -> Option<u64> {
    crate::disk::free_bytes(path).map(|b| b / (1024 * 1024))
}
