//! Reproducible `.tar.gz` writing and fast, safe unpacking.
//!
//! Writing: entries in sorted order, fixed times, owners and modes, so the
//! same tree always gives the same bytes. The gzip stream is a series of
//! independent members, one per 4 MiB of tar data, compressed on all cores.
//! Multi-member gzip is plain RFC 1952, so `tar -xzf`, `gzip -d` and every
//! other reader accept it. Each member's header carries its total length in
//! an `FEXTRA` subfield (`DR`, like BGZF's `BC`), which lets our reader hand
//! whole members to several inflating threads without scanning for
//! boundaries (not used yet: inflating is not the bottleneck of unpacking,
//! file creation is). The chunking depends only on the tar bytes, so the
//! output is still deterministic.
//!
//! Unpacking: one thread reads and inflates, parses the tar stream, creates
//! directories and symlinks in order, and hands file contents to a writer
//! pool (`DROVER_UNPACK_THREADS` writers, default 4), so that decompression
//! and file creation overlap.
//! Paths are confined to the destination: absolute paths, `..`, links that
//! point outside, and entries under a symlink are refused.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};

/// Modification time stamped on every entry: 2020-01-01T00:00:00Z. A fixed
/// value keeps archives reproducible; a plausible one keeps tools from
/// warning about timestamps in 1970.
pub const FIXED_MTIME: u64 = 1_577_836_800;

/// Size of the tar data compressed into one gzip member.
const CHUNK: usize = 4 << 20;

/// Files at most this large are buffered and written by the pool; larger
/// ones are streamed by the reading thread so memory stays bounded.
const POOL_MAX_FILE: u64 = 4 << 20;

/// What was written or unpacked.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Tar entries (files, directories, links).
    pub entries: u64,
    /// Bytes of file content.
    pub content_bytes: u64,
    /// Bytes of the compressed archive.
    pub compressed_bytes: u64,
}

/// Sink that hashes and counts what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Builds one gzip member around `data`, with our length subfield.
fn gzip_member(data: &[u8], level: u32) -> io::Result<Vec<u8>> {
    let mut enc = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(data.len() / 3 + 64),
        flate2::Compression::new(level),
    );
    enc.write_all(data)?;
    let deflated = enc.finish()?;
    let mut crc = flate2::Crc::new();
    crc.update(data);
    let total = 10 + 2 + 8 + deflated.len() + 8;
    let total32 = u32::try_from(total)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "gzip member too large"))?;
    let mut out = Vec::with_capacity(total);
    // ID1 ID2 CM=deflate FLG=FEXTRA MTIME=0 XFL=0 OS=255 (unknown): nothing
    // host-specific, so the bytes do not depend on where they were made.
    out.extend_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255]);
    out.extend_from_slice(&8u16.to_le_bytes());
    out.extend_from_slice(b"DR");
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&total32.to_le_bytes());
    out.extend_from_slice(&deflated);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    Ok(out)
}

/// A `Write` that gzips in fixed-size chunks on several threads and writes
/// the members in order.
struct ParallelGz<W: Write> {
    sink: W,
    level: u32,
    buf: Vec<u8>,
    jobs: Option<mpsc::SyncSender<(u64, Vec<u8>)>>,
    results: mpsc::Receiver<(u64, io::Result<Vec<u8>>)>,
    workers: Vec<std::thread::JoinHandle<()>>,
    next_submit: u64,
    next_write: u64,
    pending: std::collections::BTreeMap<u64, Vec<u8>>,
    threads: usize,
    members: u64,
}

impl<W: Write> ParallelGz<W> {
    fn new(sink: W, level: u32, threads: usize) -> Self {
        let threads = threads.max(1);
        let (job_tx, job_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(threads);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (res_tx, results) = mpsc::channel();
        let workers = (0..threads)
            .map(|_| {
                let job_rx = Arc::clone(&job_rx);
                let res_tx = res_tx.clone();
                std::thread::spawn(move || loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((seq, data)) = job else { return };
                    if res_tx.send((seq, gzip_member(&data, level))).is_err() {
                        return;
                    }
                })
            })
            .collect();
        ParallelGz {
            sink,
            level,
            buf: Vec::with_capacity(CHUNK),
            jobs: Some(job_tx),
            results,
            workers,
            next_submit: 0,
            next_write: 0,
            pending: Default::default(),
            threads,
            members: 0,
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("compressor already finished"))?;
        jobs.send((self.next_submit, data))
            .map_err(|_| io::Error::other("compression thread died"))?;
        self.next_submit += 1;
        // Bound memory: keep at most a few chunks in flight.
        while self.next_submit - self.next_write > 2 * self.threads as u64 {
            self.collect_one()?;
        }
        Ok(())
    }

    fn collect_one(&mut self) -> io::Result<()> {
        while !self.pending.contains_key(&self.next_write) {
            let (seq, member) = self
                .results
                .recv()
                .map_err(|_| io::Error::other("compression thread died"))?;
            self.pending.insert(seq, member?);
        }
        if let Some(member) = self.pending.remove(&self.next_write) {
            self.sink.write_all(&member)?;
            self.members += 1;
        }
        self.next_write += 1;
        Ok(())
    }

    fn finish(mut self) -> io::Result<W> {
        if !self.buf.is_empty() || self.next_submit == 0 {
            if self.threads == 1 {
                let member = gzip_member(&self.buf, self.level)?;
                self.buf.clear();
                while self.next_write < self.next_submit {
                    self.collect_one()?;
                }
                self.sink.write_all(&member)?;
            } else {
                self.submit()?;
            }
        }
        while self.next_write < self.next_submit {
            self.collect_one()?;
        }
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.sink.flush()?;
        Ok(self.sink)
    }
}

impl<W: Write> Write for ParallelGz<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.submit()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `root`'s contents (not `root` itself) to `out` as a reproducible
/// `.tar.gz` and returns the BLAKE3 hash of the compressed bytes with stats.
/// `level` is the deflate level (0-9).
pub fn write_archive(
    root: &Path,
    out: &Path,
    level: u32,
    threads: usize,
) -> Result<(String, Stats)> {
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let sink = HashingWriter {
        inner: io::BufWriter::with_capacity(1 << 20, file),
        hasher: blake3::Hasher::new(),
        written: 0,
    };
    let gz = ParallelGz::new(sink, level, threads);
    let mut builder = tar::Builder::new(gz);
    builder.follow_symlinks(false);
    let mut stats = Stats::default();
    append_tree(&mut builder, root, Path::new(""), &mut stats)?;
    let gz = builder
        .into_inner()
        .with_context(|| format!("cannot write {}", out.display()))?;
    let mut sink = gz
        .finish()
        .with_context(|| format!("cannot write {}", out.display()))?;
    sink.flush()?;
    let file = sink
        .inner
        .into_inner()
        .map_err(|e| anyhow!("cannot write {}: {}", out.display(), e.error()))?;
    file.sync_all()
        .with_context(|| format!("cannot write {}", out.display()))?;
    stats.compressed_bytes = sink.written;
    Ok((sink.hasher.finalize().to_hex().to_string(), stats))
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(FIXED_MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    rel: &Path,
    stats: &mut Stats,
) -> Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    // Byte order, not locale order: the same everywhere.
    names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    for name in names {
        let path = dir.join(&name);
        let rel = rel.join(&name);
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("cannot stat {}", path.display()))?;
        let ft = meta.file_type();
        stats.entries += 1;
        if ft.is_symlink() {
            let target = std::fs::read_link(&path)?;
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            builder
                .append_link(&mut h, &rel, &target)
                .with_context(|| format!("cannot archive {}", path.display()))?;
        } else if ft.is_dir() {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            builder
                .append_data(&mut h, &rel, io::empty())
                .with_context(|| format!("cannot archive {}", path.display()))?;
            append_tree(builder, &path, &rel, stats)?;
        } else if ft.is_file() {
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let mut h = header(tar::EntryType::Regular, mode, meta.len());
            let f = File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
            builder
                .append_data(&mut h, &rel, f)
                .with_context(|| format!("cannot archive {}", path.display()))?;
            stats.content_bytes += meta.len();
        } else {
            bail!(
                "cannot archive {}: not a file, directory or symlink",
                path.display()
            );
        }
    }
    Ok(())
}

/// Source that hashes what it reads, so the archive can be verified in the
/// same pass that unpacks it.
struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// A file the pool should write.
struct Job {
    path: PathBuf,
    mode: u32,
    data: Vec<u8>,
}

/// First error raised by any unpacking thread.
#[derive(Default)]
struct Failure {
    flag: AtomicBool,
    error: Mutex<Option<anyhow::Error>>,
}

impl Failure {
    fn set(&self, e: anyhow::Error) {
        if let Ok(mut slot) = self.error.lock() {
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        self.flag.store(true, Ordering::SeqCst);
    }
    fn failed(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    fn take(&self) -> Option<anyhow::Error> {
        self.error.lock().ok().and_then(|mut s| s.take())
    }
}

fn write_file(path: &Path, mode: u32, data: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io_error(e, path))?;
    f.write_all(data).map_err(|e| io_error(e, path))?;
    Ok(())
}

/// Wraps an I/O error with the path; a full disk is called out plainly since
/// it is the error workers meet most.
fn io_error(e: io::Error, path: &Path) -> anyhow::Error {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        anyhow!(
            "no space left on device while writing {}: {e}",
            path.display()
        )
    } else {
        anyhow!("cannot write {}: {e}", path.display())
    }
}

/// Lexically checks an archive path and returns it relative to the
/// destination.
fn safe_rel(path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => bail!("archive entry {:?} escapes the destination", path),
        }
    }
    Ok(out)
}

/// Whether a link at `rel` pointing at `target` stays inside the destination.
fn link_stays_inside(rel: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = rel.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Unpacks the `.tar.gz` at `tarball` into the existing, empty directory
/// `dest`. If `expect_hash` is given, the BLAKE3 hash of the compressed bytes
/// is checked against it (in the same pass) and a mismatch is an error.
/// On error `dest` may hold a partial tree; the caller removes it.
pub fn unpack(tarball: &Path, dest: &Path, expect_hash: Option<&str>) -> Result<Stats> {
    let file = File::open(tarball).with_context(|| format!("cannot open {}", tarball.display()))?;
    let mut source = HashingReader {
        inner: file,
        hasher: blake3::Hasher::new(),
        read: 0,
    };
    // Writers spend their time in the kernel creating inodes. On 2 cores,
    // 1 and 4 writers were within the noise of each other on the 340 MB
    // environment (benches/packager); 4 leaves room on bigger machines.
    let threads = std::env::var("DROVER_UNPACK_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(4)
        .clamp(1, 64);
    let failure = Failure::default();
    let mut stats = Stats::default();

    let read_result: Result<Vec<(PathBuf, PathBuf)>> = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Job>(64);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads {
            let rx = Arc::clone(&rx);
            let failure = &failure;
            scope.spawn(move || loop {
                let job = match rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok(job) = job else { return };
                if failure.failed() {
                    continue;
                }
                if let Err(e) = write_file(&job.path, job.mode, &job.data) {
                    failure.set(e);
                }
            });
        }
        let result = read_entries(&mut source, tarball, dest, &tx, &failure, &mut stats);
        drop(tx);
        result
    });
    if let Some(e) = failure.take() {
        return Err(e);
    }
    // Hard links go last: their targets must be completely written, which
    // the pool guarantees only once it has been joined.
    for (target, link) in read_result? {
        let from = dest.join(&target);
        let to = dest.join(&link);
        std::fs::hard_link(&from, &to).map_err(|e| io_error(e, &to))?;
    }
    stats.compressed_bytes = source.read;
    if let Some(expected) = expect_hash {
        let actual = source.hasher.finalize().to_hex();
        if actual.as_str() != expected {
            bail!(
                "{} is corrupt: its content hash is {actual}, but its name says {expected}",
                tarball.display()
            );
        }
    }
    Ok(stats)
}

fn read_entries<R: Read>(
    source: &mut R,
    tarball: &Path,
    dest: &Path,
    tx: &mpsc::SyncSender<Job>,
    failure: &Failure,
    stats: &mut Stats,
) -> Result<Vec<(PathBuf, PathBuf)>> {
    let corrupt = |e: io::Error| {
        anyhow!(
            "{} is not a valid .tar.gz (corrupt or truncated?): {e}",
            tarball.display()
        )
    };
    let mut gz = flate2::bufread::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, source));
    let mut archive = tar::Archive::new(&mut gz);
    let mut made_dirs: HashSet<PathBuf> = HashSet::new();
    let mut symlinks: HashSet<PathBuf> = HashSet::new();
    let mut hardlinks: Vec<(PathBuf, PathBuf)> = Vec::new();
    made_dirs.insert(PathBuf::new());

    for entry in archive.entries().map_err(corrupt)? {
        if failure.failed() {
            return Ok(Vec::new());
        }
        let mut entry = entry.map_err(corrupt)?;
        let raw_path = entry.path().map_err(corrupt)?.into_owned();
        let rel = safe_rel(&raw_path)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        if rel.ancestors().skip(1).any(|a| symlinks.contains(a)) {
            bail!("archive entry {:?} lies under a symlink", raw_path);
        }
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if !made_dirs.contains(&parent) {
            let p = dest.join(&parent);
            std::fs::create_dir_all(&p).map_err(|e| io_error(e, &p))?;
            for a in parent.ancestors() {
                made_dirs.insert(a.to_path_buf());
            }
        }
        let target = dest.join(&rel);
        let mode = entry.header().mode().map_err(corrupt)? & 0o777;
        stats.entries += 1;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                if made_dirs.insert(rel.clone()) {
                    match std::fs::create_dir(&target) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && target.is_dir() => {}
                        Err(e) => return Err(io_error(e, &target)),
                    }
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                stats.content_bytes += size;
                if size <= POOL_MAX_FILE {
                    let mut data = Vec::with_capacity(size as usize);
                    entry.read_to_end(&mut data).map_err(corrupt)?;
                    tx.send(Job {
                        path: target,
                        mode,
                        data,
                    })
                    .map_err(|_| anyhow!("unpacking threads stopped"))?;
                } else {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(mode)
                        .open(&target)
                        .map_err(|e| io_error(e, &target))?;
                    copy_entry(&mut entry, &mut f, &target).map_err(|e| match e {
                        CopyError::Read(e) => corrupt(e),
                        CopyError::Write(e) => io_error(e, &target),
                    })?;
                }
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| anyhow!("symlink {:?} has no target", raw_path))?
                    .into_owned();
                if !link_stays_inside(&rel, &link) {
                    bail!(
                        "archive symlink {:?} -> {:?} points outside the destination",
                        raw_path,
                        link
                    );
                }
                std::os::unix::fs::symlink(&link, &target).map_err(|e| io_error(e, &target))?;
                symlinks.insert(rel);
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| anyhow!("hard link {:?} has no target", raw_path))?
                    .into_owned();
                let link_rel = safe_rel(&link)?;
                if link_rel.ancestors().any(|a| symlinks.contains(a)) {
                    bail!("archive hard link {:?} points through a symlink", raw_path);
                }
                // The target may still be queued for a writer thread.
                hardlinks.push((link_rel, rel));
            }
            other => bail!(
                "archive entry {:?} has unsupported type {:?}",
                raw_path,
                other
            ),
        }
    }
    // Drain the gzip stream to its end so every member's CRC is checked,
    // including the one holding the tar trailer.
    io::copy(&mut gz, &mut io::sink()).map_err(corrupt)?;

    Ok(hardlinks)
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

fn copy_entry<R: Read>(
    from: &mut R,
    to: &mut File,
    _path: &Path,
) -> std::result::Result<(), CopyError> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
}

/// Sets the mode of every file in `root` that lacks owner-write back to
/// writable, so a tree can be removed or patched.
pub fn make_writable(root: &Path) -> Result<()> {
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_symlink() {
            continue;
        }
        let path = entry.path();
        let mut perm = entry.metadata()?.permissions();
        if perm.mode() & 0o200 == 0 {
            perm.set_mode(perm.mode() | 0o200);
            std::fs::set_permissions(&path, perm)?;
        }
        if ft.is_dir() {
            make_writable(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("b/c")).unwrap();
        std::fs::write(root.join("a.txt"), "alpha").unwrap();
        std::fs::write(
            root.join("b/c/big.bin"),
            vec![7u8; (POOL_MAX_FILE + 10) as usize],
        )
        .unwrap();
        std::fs::write(root.join("b/run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            root.join("b/run.sh"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        std::os::unix::fs::symlink("../a.txt", root.join("b/link")).unwrap();
    }

    #[test]
    fn same_tree_same_bytes_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        tree(&a);
        tree(&b);
        // Different times on the inputs must not matter.
        std::fs::File::options()
            .append(true)
            .open(b.join("a.txt"))
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        let (ha, sa) = write_archive(&a, &dir.path().join("a.tgz"), 6, 3).unwrap();
        let (hb, _) = write_archive(&b, &dir.path().join("b.tgz"), 6, 1).unwrap();
        assert_eq!(ha, hb);
        assert_eq!(sa.entries, 6);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let stats = unpack(&dir.path().join("a.tgz"), &out, Some(&ha)).unwrap();
        assert_eq!(stats.content_bytes, sa.content_bytes);
        assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"alpha");
        assert_eq!(
            std::fs::read(out.join("b/c/big.bin")).unwrap(),
            std::fs::read(a.join("b/c/big.bin")).unwrap()
        );
        let mode = std::fs::metadata(out.join("b/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(out.join("b/link")).unwrap(),
            Path::new("../a.txt")
        );

        // A wrong expected hash is refused.
        let again = dir.path().join("again");
        std::fs::create_dir(&again).unwrap();
        let err = unpack(&dir.path().join("a.tgz"), &again, Some(&"0".repeat(64))).unwrap_err();
        assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
    }

    /// A tar.gz with one entry whose name and link are written raw, bypassing
    /// the checks `tar::Builder` does.
    fn evil(path: &Path, kind: tar::EntryType, name: &str, link: &str) {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(0o644);
        let data: &[u8] = if kind == tar::EntryType::Regular {
            b"x"
        } else {
            b""
        };
        h.set_size(data.len() as u64);
        h.set_cksum();
        let gz = flate2::write::GzEncoder::new(File::create(path).unwrap(), Default::default());
        let mut b = tar::Builder::new(gz);
        b.append(&h, data).unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn refuses_entries_that_escape() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (tar::EntryType::Regular, "../escaped", ""),
            (tar::EntryType::Regular, "/tmp/escaped", ""),
            (tar::EntryType::Symlink, "up", "../../etc"),
            (tar::EntryType::Symlink, "abs", "/etc"),
            (tar::EntryType::Link, "hard", "../../etc/passwd"),
        ];
        for (i, (kind, name, link)) in cases.into_iter().enumerate() {
            let tgz = dir.path().join(format!("{i}.tgz"));
            evil(&tgz, kind, name, link);
            let dest = dir.path().join(format!("dest{i}/inner"));
            std::fs::create_dir_all(&dest).unwrap();
            let err = unpack(&tgz, &dest, None).unwrap_err();
            let msg = format!("{err:#}");
            assert!(
                msg.contains("escapes") || msg.contains("outside"),
                "{name}: {msg}"
            );
            assert!(!dir.path().join(format!("dest{i}/escaped")).exists());
        }
    }

    #[test]
    fn garbage_is_not_a_tarball() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.tar.gz");
        std::fs::write(&p, b"this is not gzip at all").unwrap();
        let err = unpack(&p, dir.path(), None).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a valid .tar.gz"),
            "{err:#}"
        );
    }
}
