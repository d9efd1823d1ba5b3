//! The local spool of a replicated SQLite database: WAL segments made durable on local disk
//! before the WAL may lose them, then shipped as a segment directory.
//!
//! Contract: [`Spool::write`] leaves a whole, fsynced segment under its final name or
//! nothing (it writes `<name>.tmp`, fsyncs, renames, fsyncs the directory). Names sort in
//! stream order, so the directory is an ordinary segment source. The newest segment is
//! never pruned: its header is where shipping continues after a restart. Crash: a
//! `.tmp` file is garbage and is removed at open; every named segment is complete.
//! Budget: with [`Spool::with_budget`], every segment holds a reservation of its length
//! from the local cache budget until it is pruned (segments found at open are charged,
//! past the limit if need be: they exist); a write that does not fit fails with the
//! budget named and writes nothing, so unshipped WAL then waits in SQLite's own WAL.
//! Retries: none. Cancellation: none (each call is a few local writes).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use cairn_core::sqlite_segment::{SegmentHeader, SEGMENT_HEADER_LEN};
use cairn_quota::{Budget, Reservation};

use crate::error::ExecError;
use crate::fsutil::{fsync_dir, remove_if_exists};

/// A spool directory.
#[derive(Clone, Debug)]
pub struct Spool {
    dir: PathBuf,
    budget: Option<Budget>,
    /// Each segment's reservation, by name.
    held: Arc<Mutex<BTreeMap<String, Reservation>>>,
}

/// A spooled segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spooled {
    /// Its name.
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// Its header.
    pub header: SegmentHeader,
}

impl Spool {
    /// Opens (creating it) the spool at `dir`, removing unfinished writes.
    pub fn open(dir: &Path) -> Result<Self, ExecError> {
        std::fs::create_dir_all(dir).map_err(ExecError::io("create spool", dir))?;
        for e in std::fs::read_dir(dir).map_err(ExecError::io("list spool", dir))? {
            let e = e.map_err(ExecError::io("list spool", dir))?;
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                remove_if_exists(&e.path(), "remove unfinished spool segment")?;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            budget: None,
            held: Arc::default(),
        })
    }

    /// Charges the segments here to `budget`, and reserves every new one from it.
    pub fn with_budget(mut self, budget: Budget) -> Result<Self, ExecError> {
        let mut held = BTreeMap::new();
        for name in self.names()? {
            let path = self.dir.join(&name);
            let len = std::fs::metadata(&path)
                .map_err(ExecError::io("stat spool segment", &path))?
                .len();
            held.insert(name, budget.charge(len));
        }
        self.held = Arc::new(Mutex::new(held));
        self.budget = Some(budget);
        Ok(self)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Reservation>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes segment `name`: `header` then `frames`, durably (see the module docs).
    pub fn write(
        &self,
        name: &str,
        header: &SegmentHeader,
        frames: &[u8],
    ) -> Result<u64, ExecError> {
        let len = (SEGMENT_HEADER_LEN + frames.len()) as u64;
        let reservation = self
            .budget
            .as_ref()
            .map(|b| b.try_reserve(len))
            .transpose()?;
        let tmp = self.dir.join(format!("{name}.tmp"));
        let path = self.dir.join(name);
        let mut f =
            std::fs::File::create(&tmp).map_err(ExecError::io("create spool segment", &tmp))?;
        f.write_all(&header.encode())
            .and_then(|()| f.write_all(frames))
            .and_then(|()| f.sync_all())
            .map_err(ExecError::io("write spool segment", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(ExecError::io("rename spool segment", &path))?;
        fsync_dir(&self.dir)?;
        if let Some(r) = reservation {
            self.held().insert(name.to_string(), r);
        }
        Ok(len)
    }

    fn names(&self) -> Result<Vec<String>, ExecError> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(ExecError::io("list spool", &self.dir))? {
            let e = e.map_err(ExecError::io("list spool", &self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".tmp") {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The newest segment, if any.
    pub fn newest(&self) -> Result<Option<Spooled>, ExecError> {
        let Some(name) = self.names()?.pop() else {
            return Ok(None);
        };
        let path = self.dir.join(&name);
        let mut head = [0u8; SEGMENT_HEADER_LEN];
        let f = std::fs::File::open(&path).map_err(ExecError::io("open spool segment", &path))?;
        let len = f
            .metadata()
            .map_err(ExecError::io("stat spool segment", &path))?
            .len();
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0)
            .map_err(ExecError::io("read spool segment", &path))?;
        let header = SegmentHeader::parse(&name, &head)?;
        Ok(Some(Spooled { name, len, header }))
    }

    /// Removes every segment that sorts at or before `published` except the newest;
    /// returns how many it removed.
    pub fn prune(&self, published: &str) -> Result<usize, ExecError> {
        let mut names = self.names()?;
        names.pop();
        let mut n = 0;
        for name in names.iter().filter(|n| n.as_str() <= published) {
            remove_if_exists(&self.dir.join(name), "remove shipped spool segment")?;
            self.held().remove(name);
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use cairn_core::sqlite_segment::{segment_name, SegmentKind};
    use cairn_core::WalPosition;

    fn h(frame: u32) -> SegmentHeader {
        SegmentHeader {
            kind: SegmentKind::Frames,
            page_size: 4096,
            checkpoint_seq: 1,
            position: WalPosition {
                salts: (1, 2),
                frame,
                checksum: (3, 4),
            },
            first_frame: 1,
            backfilled: false,
            captured_ms: 5,
        }
    }

    #[test]
    fn segments_hold_the_cache_budget_until_pruned_and_a_full_budget_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let cache = Budget::root("cache", 250);
        let s = Spool::open(d.path())
            .unwrap()
            .with_budget(cache.clone())
            .unwrap();
        let a = segment_name(0, 5, SegmentKind::Frames);
        let b = segment_name(100, 6, SegmentKind::Frames);
        let c = segment_name(200, 7, SegmentKind::Frames);
        assert_eq!(s.write(&a, &h(1), &[7; 36]).unwrap(), 100);
        s.write(&b, &h(2), &[7; 36]).unwrap();
        assert_eq!(cache.used(), 200);
        let e = s.write(&c, &h(3), &[7; 36]).unwrap_err();
        assert!(e.to_string().contains("cache"), "{e}");
        assert!(!d.path().join(&c).exists() && !d.path().join(format!("{c}.tmp")).exists());
        assert_eq!(cache.used(), 200);
        // A restarted process charges what it finds, and pruning gives it back.
        drop(s);
        assert_eq!(cache.used(), 0);
        let s = Spool::open(d.path())
            .unwrap()
            .with_budget(cache.clone())
            .unwrap();
        assert_eq!(cache.used(), 200);
        assert_eq!(s.prune(&b).unwrap(), 1);
        assert_eq!(cache.used(), 100);
        s.write(&c, &h(3), &[7; 36]).unwrap();
        assert_eq!(cache.used(), 200);
    }

    #[test]
    fn segments_are_whole_the_newest_survives_pruning_and_tmp_files_go() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::open(d.path()).unwrap();
        assert_eq!(s.newest().unwrap(), None);
        let a = segment_name(0, 5, SegmentKind::Frames);
        let b = segment_name(100, 6, SegmentKind::Frames);
        assert_eq!(s.write(&a, &h(1), &[7; 36]).unwrap(), 100);
        s.write(&b, &h(2), &[]).unwrap();
        std::fs::write(d.path().join("x.tmp"), b"torn").unwrap();
        let n = s.newest().unwrap().unwrap();
        assert_eq!((n.name.as_str(), n.len, n.header), (b.as_str(), 64, h(2)));
        assert_eq!(s.prune(&b).unwrap(), 1);
        assert_eq!(s.prune(&b).unwrap(), 0);
        assert_eq!(s.newest().unwrap().unwrap().name, b);
        Spool::open(d.path()).unwrap();
        assert!(!d.path().join("x.tmp").exists());
    }
}
