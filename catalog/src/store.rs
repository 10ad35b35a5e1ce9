//! The catalog's bounded, expiring table of reports and its state file.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::report::{EntryKey, MasterReport};

/// The newest report per [`EntryKey`], bounded in count and age.
///
/// Entries are also indexed by arrival order so that both eviction of the
/// oldest entry (when full) and expiry are O(log n): under a flood of new keys
/// the catalog must not scan the whole table per datagram.
#[derive(Debug)]
pub struct Store {
    entries: HashMap<EntryKey, (u64, MasterReport)>,
    order: BTreeMap<u64, EntryKey>,
    /// Per (kind, project): the address of the first entry to claim it and
    /// how many non-rival entries it holds; a claim from another address is
    /// a rival until these are gone.
    owners: HashMap<(String, String), (String, usize)>,
    next_seq: u64,
    max_entries: usize,
    expiry_secs: u64,
    generation: u64,
    /// Entries pushed out because the table was full.
    pub evicted: u64,
    /// Entries dropped because they were older than the expiry.
    pub expired: u64,
    /// Reports dropped because a newer one of the same master run was
    /// already in.
    pub stale: u64,
    /// New entries refused because the table was full of entries that all
    /// reported recently.
    pub refused: u64,
    /// Reports kept as rival entries because another address owns the key.
    pub rivals: u64,
}

/// An entry that reported within this many seconds is never evicted to make
/// room for a new one.
pub const PROTECTED_SECS: u64 = 60;

impl Store {
    /// An empty store holding at most `max_entries` (at least 1) entries, each
    /// for `expiry_secs` after its last report.
    pub fn new(max_entries: usize, expiry_secs: u64) -> Self {
        Store {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            owners: HashMap::new(),
            next_seq: 0,
            max_entries: max_entries.max(1),
            expiry_secs,
            generation: 0,
            evicted: 0,
            expired: 0,
            stale: 0,
            refused: 0,
            rivals: 0,
        }
    }

    /// Number of entries, expired or not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Increases on every change; lets the server save only when needed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Records a report received at `now`. Returns false, and keeps what is
    /// held, if the report is older than the one held for the same master
    /// run (see [`MasterReport::seq`]) or if the table is full of entries
    /// that all reported within [`PROTECTED_SECS`].
    ///
    /// Without a signature, an entry belongs to the address it first came
    /// from: a report for the same key from another address is kept as a
    /// separate rival entry, so it can neither mark the owner stopped nor
    /// redirect workers. A signed report (checked by the server under the
    /// catalog key) may replace an entry from any address.
    pub fn insert(&mut self, mut report: MasterReport, now: u64) -> bool {
        report.rival = false;
        if !report.signed {
            let owner = match self.entries.get(&report.key()) {
                Some((_, held)) => Some(held.source_addr.as_str()),
                None => self
                    .owners
                    .get(&(report.kind.clone(), report.project.clone()))
                    .map(|(addr, _)| addr.as_str()),
            };
            if owner.is_some_and(|o| !o.is_empty() && o != report.source_addr) {
                report.rival = true;
                self.rivals += 1;
            }
        }
        let mut reports = 1;
        if let Some((_, held)) = self.entries.get(&report.key()) {
            let same_run = report.run_id != 0 && held.run_id == report.run_id;
            if same_run && held.seq > report.seq {
                self.stale += 1;
                return false;
            }
            reports = held.reports.saturating_add(1);
        }
        report.clamp();
        report.last_update = now;
        report.reports = reports;
        self.insert_as_is(report, now)
    }

    /// Stores `report`, making room if it is new and the table is full.
    /// Returns false if there is no room.
    fn insert_as_is(&mut self, report: MasterReport, now: u64) -> bool {
        let key = report.key();
        if let Some((old_seq, _)) = self.entries.get(&key) {
            self.order.remove(old_seq);
        } else {
            while self.entries.len() >= self.max_entries {
                if !self.evict_one(now) {
                    self.refused += 1;
                    return false;
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, key.clone());
        if !report.rival {
            let owner = self
                .owners
                .entry((key.kind.clone(), key.project.clone()))
                .or_insert_with(|| (report.source_addr.clone(), 0));
            owner.1 += 1;
        }
        if let Some((_, old)) = self.entries.insert(key, (seq, report)) {
            self.disown(&old);
        }
        self.generation += 1;
        true
    }

    /// Drops the entry with the fewest reports among those that have not
    /// reported within [`PROTECTED_SECS`] (the least recently updated of
    /// equals), so a flood of one-shot fake projects cannot push out a
    /// master that keeps reporting. Returns false if every entry is
    /// protected.
    fn evict_one(&mut self, now: u64) -> bool {
        // `order` is by last update, so the first entry that reported after
        // the cutoff ends the search: every later one did too.
        let mut victim: Option<(u64, u64)> = None;
        for (&seq, key) in &self.order {
            let Some((_, r)) = self.entries.get(key) else {
                continue;
            };
            if r.last_update.saturating_add(PROTECTED_SECS) > now {
                break;
            }
            let fewer = match victim {
                None => true,
                Some((_, fewest)) => r.reports < fewest,
            };
            if fewer {
                victim = Some((seq, r.reports));
            }
        }
        let Some((seq, _)) = victim else {
            return false;
        };
        self.remove(seq);
        self.evicted += 1;
        true
    }

    fn remove(&mut self, seq: u64) {
        if let Some(key) = self.order.remove(&seq) {
            if let Some((_, old)) = self.entries.remove(&key) {
                self.disown(&old);
            }
        }
    }

    /// Forgets `gone`'s share in its project's ownership.
    fn disown(&mut self, gone: &MasterReport) {
        if gone.rival {
            return;
        }
        let k = (gone.kind.clone(), gone.project.clone());
        if let Some(owner) = self.owners.get_mut(&k) {
            owner.1 = owner.1.saturating_sub(1);
            if owner.1 == 0 {
                self.owners.remove(&k);
            }
        }
    }

    fn is_expired(&self, r: &MasterReport, now: u64) -> bool {
        r.last_update.saturating_add(self.expiry_secs) <= now
    }

    /// Drops entries whose last report is older than the expiry; returns how
    /// many were dropped.
    pub fn expire(&mut self, now: u64) -> usize {
        let mut dropped = 0;
        // Arrival order matches last_update order except across a clock step,
        // so stopping at the first live entry is right in practice and a
        // straggler only lives until the entries before it expire.
        while let Some((&seq, key)) = self.order.first_key_value() {
            let expired = match self.entries.get(key) {
                Some((_, r)) => self.is_expired(r, now),
                None => true,
            };
            if !expired {
                break;
            }
            self.remove(seq);
            dropped += 1;
        }
        if dropped > 0 {
            self.expired += dropped as u64;
            self.generation += 1;
        }
        dropped
    }

    /// Unexpired entries, most recently updated first.
    pub fn live(&self, now: u64) -> Vec<&MasterReport> {
        self.order
            .values()
            .rev()
            .filter_map(|k| self.entries.get(k))
            .map(|(_, r)| r)
            .filter(|r| !self.is_expired(r, now))
            .collect()
    }

    /// Restores saved entries, keeping their `last_update` so that reloading
    /// does not extend their life; expired ones are skipped.
    pub fn restore(&mut self, mut reports: Vec<MasterReport>, now: u64) {
        reports.sort_by_key(|r| r.last_update);
        for mut r in reports {
            if self.is_expired(&r, now) {
                continue;
            }
            r.clamp();
            self.insert_as_is(r, now);
        }
    }
}

/// What the state file holds.
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
pub struct StateFile {
    /// Format version, for later changes.
    pub version: u32,
    /// When the file was written, unix seconds.
    pub saved_at: u64,
    /// The entries at that time.
    pub entries: Vec<MasterReport>,
}

/// Writes `state` to `path` atomically: a crash leaves either the old or the
/// new file, never a torn one.
pub fn save_state(path: &Path, state: &StateFile) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .with_context(|| format!("state file {} has no file name", path.display()))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let write = || -> anyhow::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(std::io::BufWriter::new(&mut f), state)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing state file {}", path.display())));
    }
    // Persist the rename itself; not every filesystem allows opening a
    // directory, and the data is already safe in the file, so ignore errors.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a state file; a missing file is an empty state.
pub fn load_state(path: &Path) -> anyhow::Result<StateFile> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing state file {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(e) => Err(e).with_context(|| format!("reading state file {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(project: &str, port: u16) -> MasterReport {
        MasterReport::new_master(project, "h", port)
    }

    #[test]
    fn newest_per_key_wins() {
        let mut s = Store::new(10, 100);
        let mut r = rep("a", 1);
        r.tasks_done = 1;
        s.insert(r.clone(), 10);
        r.tasks_done = 2;
        s.insert(r, 11);
        s.insert(rep("b", 1), 12);
        assert_eq!(s.len(), 2);
        let live = s.live(12);
        assert_eq!(live[0].project, "b");
        assert_eq!(live[1].tasks_done, 2);
        assert_eq!(live[1].last_update, 11);
    }

    #[test]
    fn a_late_report_does_not_undo_a_newer_one() {
        let mut s = Store::new(10, 100);
        let mut r = rep("a", 1);
        r.run_id = 50;
        r.seq = 7;
        r.stopped = true;
        assert!(s.insert(r.clone(), 10));
        let mut late = r.clone();
        late.seq = 6;
        late.stopped = false;
        assert!(!s.insert(late.clone(), 11));
        assert_eq!(s.stale, 1);
        assert!(s.live(11)[0].stopped);
        // A new run of the master starts over at 1.
        late.run_id = 60;
        late.seq = 1;
        assert!(s.insert(late, 12));
        assert!(!s.live(12)[0].stopped);
        // Senders that do not number their reports are always taken.
        let plain = rep("a", 1);
        assert!(s.insert(plain, 13));
    }

    #[test]
    fn key_includes_kind_host_port_project() {
        let mut s = Store::new(10, 100);
        s.insert(rep("a", 1), 1);
        s.insert(rep("a", 2), 1);
        let mut other_kind = rep("a", 1);
        other_kind.kind = "other".into();
        s.insert(other_kind, 1);
        let mut other_host = rep("a", 1);
        other_host.host = "h2".into();
        s.insert(other_host, 1);
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn flood_evicts_fewest_reports_and_never_a_recent_one() {
        let mut s = Store::new(3, 10_000);
        for t in 1..=5 {
            s.insert(rep("real", 1), t);
        }
        s.insert(rep("b", 1), 2);
        s.insert(rep("c", 1), 3);
        // Everything reported within the last minute: a newcomer waits.
        assert!(!s.insert(rep("d", 1), 10));
        assert_eq!(s.refused, 1);
        // Later, the one-report entries go first even though "real" is the
        // least recently updated.
        assert!(s.insert(rep("d", 1), 100));
        assert_eq!(s.evicted, 1);
        for i in 0..10_000 {
            s.insert(rep(&format!("flood{i}"), 1), 200 + i / 100);
        }
        assert_eq!(s.len(), 3);
        // A master that keeps reporting through the flood is never dropped.
        let mut s = Store::new(3, 10_000);
        for i in 0..10_000u64 {
            if i % 30 == 0 {
                s.insert(rep("real", 1), i);
            }
            s.insert(rep(&format!("flood{i}"), 1), i);
        }
        assert!(s.live(10_000).iter().any(|r| r.project == "real"));
    }

    fn from(mut r: MasterReport, addr: &str) -> MasterReport {
        r.source_addr = addr.to_string();
        r
    }

    #[test]
    fn another_address_cannot_take_over_an_entry() {
        let mut s = Store::new(10, 100);
        let mut real = from(rep("p", 9), "10.0.0.1");
        real.run_id = 5;
        real.seq = 1;
        assert!(s.insert(real.clone(), 1));
        let mut spoof = from(real.clone(), "10.0.0.66");
        spoof.seq = 1000;
        spoof.stopped = true;
        assert!(s.insert(spoof.clone(), 2));
        assert_eq!(s.rivals, 1);
        assert_eq!(s.len(), 2);
        real.seq = 2;
        assert!(s.insert(real, 3), "the owner's next report is not stale");
        let live = s.live(3);
        let owner = live.iter().find(|r| !r.rival).unwrap();
        assert!(!owner.stopped);
        assert_eq!(owner.reports, 2);
        let rival = live.iter().find(|r| r.rival).unwrap();
        assert_eq!(rival.source_addr, "10.0.0.66");
        // Another port under the same project from elsewhere is a rival too.
        let mut other_port = from(rep("p", 10), "10.0.0.66");
        assert!(s.insert(other_port.clone(), 3));
        assert!(s.live(3).iter().any(|r| r.rival && r.port == 10));
        other_port.source_addr = "10.0.0.1".into();
        other_port.port = 11;
        assert!(s.insert(other_port, 3));
        assert!(s.live(3).iter().any(|r| !r.rival && r.port == 11));
        // A signed report may come from anywhere.
        spoof.signed = true;
        assert!(s.insert(spoof, 4));
        assert!(s.live(4).iter().any(|r| !r.rival && r.stopped));
    }

    #[test]
    fn expiry() {
        let mut s = Store::new(10, 10);
        s.insert(rep("a", 1), 100);
        s.insert(rep("b", 1), 105);
        assert_eq!(s.live(109).len(), 2);
        assert_eq!(
            s.live(110).len(),
            1,
            "expired entries are hidden before the sweep"
        );
        assert_eq!(s.expire(110), 1);
        assert_eq!(s.len(), 1);
        assert_eq!(s.expire(200), 1);
        assert!(s.is_empty());
        assert_eq!(s.expired, 2);
    }

    #[test]
    fn state_round_trip_keeps_age() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(load_state(&path).unwrap().entries.is_empty());
        let mut s = Store::new(10, 10);
        s.insert(rep("old", 1), 100);
        s.insert(rep("new", 1), 108);
        let state = StateFile {
            version: 1,
            saved_at: 108,
            entries: s.live(108).into_iter().cloned().collect(),
        };
        save_state(&path, &state).unwrap();
        let loaded = load_state(&path).unwrap();
        let mut s2 = Store::new(10, 10);
        s2.restore(loaded.entries, 112);
        let live = s2.live(112);
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].project, "new");
        assert_eq!(live[0].last_update, 108);
        // Only the state file is left behind, no temp files.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load_state(&path).is_err());
    }
}
