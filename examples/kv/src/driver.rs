//! The driver behind `cairn-kv run`: commits the workload's batches and keeps the engine
//! replicated on a schedule, reporting each step as an [`Event`].
//!
//! Schedule: after every seal, ship the new segment; once the WAL since the page file's
//! LSN reaches `checkpoint_bytes`, take a page checkpoint and truncate the store's head;
//! then delete the local WAL nothing needs. Every decision depends only on durable state
//! (the WAL and the page file), never on counters of the process, so a run killed again
//! and again still checkpoints and keeps its WAL bounded. At start (after recovery) the
//! same maintenance runs once, finishing what a crash interrupted; at the end a final page
//! checkpoint covers the last batch.
//!
//! Contract: an event is reported after the step it describes is durable (a `commit` after
//! its sync, `shipped` and `pages` after Cairn published). A crash between a step and its
//! event loses only the event. Retries and cancellation: those of [`crate::replica`].

use serde::Serialize;

use crate::engine::Kv;
use crate::error::Result;
use crate::replica::Replica;
use crate::workload::Workload;

/// What the driver does.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// The batches to commit.
    pub workload: Workload,
    /// Commit until this many batches are committed.
    pub until: u64,
    /// Take a page checkpoint once the WAL since the page file's LSN reaches this.
    pub checkpoint_bytes: u64,
    /// Page checkpoints whose WAL the store keeps (see [`Replica::trim_store`]).
    pub retain: usize,
}

/// One step of a run, printed as a JSON line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The engine opened and recovered.
    Recovered {
        /// Batches committed (the next sequence number).
        next_seq: u64,
        /// The end of the WAL.
        lsn: u64,
        /// The page file's LSN.
        flushed_lsn: u64,
        /// Records replayed from the WAL.
        replayed: u64,
        /// Bytes of a torn record cut off.
        torn_bytes: u64,
        /// The LSN of an interrupted flush completed from the double-write buffer.
        repaired_flush: Option<u64>,
        /// Cairn jobs resumed.
        resumed: u64,
        /// Local WAL bytes.
        wal_bytes: u64,
    },
    /// A batch committed.
    Commit {
        /// Its sequence number.
        seq: u64,
        /// The LSN after it.
        lsn: u64,
    },
    /// The active WAL file was sealed.
    Sealed {
        /// The segment.
        segment: String,
        /// Its first LSN.
        start: u64,
        /// One past its last.
        end: u64,
        /// Local WAL bytes now.
        wal_bytes: u64,
    },
    /// Segments were published.
    Shipped {
        /// Generation.
        generation: u64,
        /// Segments added.
        segments: u64,
        /// The published stream's end.
        through: u64,
    },
    /// A page checkpoint was published.
    Pages {
        /// Generation.
        generation: u64,
        /// The LSN it covers.
        lsn: u64,
        /// Pages the flush wrote.
        pages_written: u64,
        /// Pages Cairn found changed.
        pages_dirty: u64,
        /// Bytes uploaded.
        bytes_uploaded: u64,
        /// Whether the tracker's pages were used.
        tracked: bool,
    },
    /// The store's stream lost its head.
    TruncatedStore {
        /// Generation published (`None`: nothing to drop).
        generation: Option<u64>,
        /// The LSN asked for.
        before: u64,
        /// Segments dropped.
        dropped: u64,
        /// The stream's start now.
        wal_start: u64,
    },
    /// Local WAL was deleted.
    TrimmedLocal {
        /// Cairn's watermark.
        watermark: u64,
        /// Deleted up to.
        limit: u64,
        /// Segments deleted.
        deleted: u64,
        /// Local WAL bytes now.
        wal_bytes: u64,
    },
    /// The run reached its target.
    Done {
        /// Batches committed.
        next_seq: u64,
        /// The end of the WAL.
        lsn: u64,
        /// Local WAL bytes.
        wal_bytes: u64,
    },
}

/// Runs the schedule on an opened engine and replica, reporting through `emit`.
pub async fn run(
    kv: &mut Kv,
    rep: &mut Replica,
    s: &Schedule,
    emit: &mut impl FnMut(&Event),
) -> Result<()> {
    s.workload.check_fits(kv.page_count() - 1)?;
    seal(kv, emit)?;
    maintain(kv, rep, s, false, emit).await?;
    while kv.next_seq() < s.until {
        let c = kv.commit(&s.workload.batch(kv.next_seq()))?;
        emit(&Event::Commit {
            seq: c.seq,
            lsn: c.end,
        });
        if seal(kv, emit)? {
            maintain(kv, rep, s, false, emit).await?;
        }
    }
    maintain(kv, rep, s, true, emit).await?;
    emit(&Event::Done {
        next_seq: kv.next_seq(),
        lsn: kv.lsn(),
        wal_bytes: kv.wal().local_bytes(),
    });
    Ok(())
}

fn seal(kv: &mut Kv, emit: &mut impl FnMut(&Event)) -> Result<bool> {
    let Some(seg) = kv.seal_if_full()? else {
        return Ok(false);
    };
    emit(&Event::Sealed {
        end: seg.end(),
        segment: seg.name,
        start: seg.start,
        wal_bytes: kv.wal().local_bytes(),
    });
    Ok(true)
}

/// Ship, maybe take a page checkpoint (always at the end), delete local WAL.
async fn maintain(
    kv: &mut Kv,
    rep: &mut Replica,
    s: &Schedule,
    last: bool,
    emit: &mut impl FnMut(&Event),
) -> Result<()> {
    if let Some(sh) = rep.ship(kv).await? {
        emit(&Event::Shipped {
            generation: sh.generation,
            segments: sh.segments,
            through: sh.through,
        });
    }
    if last || kv.lsn() - kv.flushed_lsn() >= s.checkpoint_bytes {
        if let Some(p) = rep.checkpoint_pages(kv).await? {
            emit(&Event::Pages {
                generation: p.generation,
                lsn: p.lsn,
                pages_written: p.pages_written,
                pages_dirty: p.pages_dirty,
                bytes_uploaded: p.bytes_uploaded,
                tracked: p.tracked,
            });
            if let Some(t) = rep.trim_store(s.retain).await? {
                emit(&Event::TruncatedStore {
                    generation: t.generation,
                    before: t.before,
                    dropped: t.dropped,
                    wal_start: t.wal_start,
                });
            }
        }
    }
    if let Some(t) = rep.trim_local(kv).await? {
        emit(&Event::TrimmedLocal {
            watermark: t.watermark,
            limit: t.limit,
            deleted: t.deleted,
            wal_bytes: kv.wal().local_bytes(),
        });
    }
    Ok(())
}
