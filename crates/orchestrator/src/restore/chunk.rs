//! Restoring one chunk of a page file: its delta chain newest first, then the base, each
//! page written once, straight into place in the assembly file.
//!
//! Contract: every page of the chunk comes from the newest delta that holds it, and the
//! base supplies only the pages no delta holds ([`cairn_executor::Composer`]); the bytes
//! equal the oldest-first application of `docs/FORMATS.md`. Every blob is verified before
//! it is used: each delta is fetched whole (CRC64, content address and XXH3-128 checked by
//! the store), parsed against the chunk, its base and the page size, and only then are its
//! pages used; the newest delta, which comes first, must carry the manifest's chunk length.
//! The base is streamed through the store's verified read; its bytes for pages a delta
//! holds are never written. A base that supplies no page is not read.
//!
//! Two ways, by memory:
//! - *Held*: a chain whose deltas fit in one chunk's share of the restore's
//!   [`MemoryBound`] (the bound divided by the chunks restored at once) reserves them in
//!   one go and keeps them. Each streamed piece of the base is then written with the held
//!   deltas' pages in place, in one vectored write: the file gets the same few large
//!   writes as a chunk without deltas.
//! - *Streamed*: a longer chain reserves each delta before its request and releases it
//!   once the delta's pages are written, so the chunk holds at most [`DELTA_PREFETCH`]
//!   deltas, never its whole chain. The base then writes around those pages.
//!
//! Either way deltas are fetched a few ahead, newest first, and reservations are taken in
//! the order they are used, so the bound cannot deadlock. Only a few chunks fetch their
//! chains at once (a turn from [`MemoryBound::chain_turn`]), so early chunks start their
//! base streams while later ones are still fetching deltas. Stateless: the caller syncs and
//! records each finished chunk; a crash or an error mid-chunk leaves pages that the next
//! attempt writes again, since an unrecorded chunk is composed again from the start.
//! Retries are the store's. Cancellation: dropping the future stops between writes.

use std::io::IoSlice;

use cairn_core::delta::DeltaView;
use cairn_core::{keys, BlobRef, ChunkState, CoreError, DbId, PagesState, TenantId};
use cairn_executor::{held_from, Composer, FileAssembler, HeldPiece, Part};
use cairn_remote_store::RemoteStore;
use futures::stream::{self, StreamExt, TryStreamExt};

use super::memory::{MemoryBound, Reservation};
use crate::{CairnError, Checkpointer};

/// Deltas of one streamed chain fetched ahead of the one being used.
pub(crate) const DELTA_PREFETCH: usize = 4;

/// Deltas of one held chain fetched at once (their memory is reserved already).
const HELD_PREFETCH: usize = 16;

/// Fetches a whole blob into memory, verified (decompressed if it is stored compressed).
pub(crate) async fn fetch_blob(
    store: &RemoteStore,
    key: &str,
    blob: &BlobRef,
) -> Result<Vec<u8>, CairnError> {
    Ok(fetch_blob_decoded(store, key, blob).await?.0)
}

/// [`fetch_blob`], with what the decoder found (the stored object's size, its codec).
pub(crate) async fn fetch_blob_decoded(
    store: &RemoteStore,
    key: &str,
    blob: &BlobRef,
) -> Result<(Vec<u8>, cairn_core::blob::DecodedBlob), CairnError> {
    let mut buf = Vec::with_capacity(usize::try_from(blob.len).unwrap_or(0));
    let decoded = store
        .get_blob(key, blob, |off, bytes| {
            // A re-read after a damaged transfer starts again from offset 0.
            buf.truncate(usize::try_from(off).unwrap_or(usize::MAX));
            buf.extend_from_slice(bytes);
            Ok(())
        })
        .await?;
    Ok((buf, decoded))
}

/// Reserves `bytes` (if any) for delta `i`.
async fn reserve_delta(
    memory: &MemoryBound,
    bytes: Option<u64>,
    i: usize,
) -> Result<(usize, Option<Reservation>), CairnError> {
    let reservation = match bytes {
        Some(b) => Some(memory.reserve(b).await),
        None => None,
    };
    Ok((i, reservation))
}

impl Checkpointer {
    /// Fetches and verifies delta `i` of chunk `c`.
    async fn fetch_delta(
        &self,
        tenant: &TenantId,
        db: &DbId,
        c: &ChunkState,
        i: usize,
        reservation: Option<Reservation>,
    ) -> Result<(usize, String, Vec<u8>, Option<Reservation>), CairnError> {
        let d = &c.deltas[i];
        let key = keys::blob_key(tenant, db, d);
        let payload = fetch_blob(&self.store, &key, d).await?;
        Ok((i, key, payload, reservation))
    }

    /// Restores one chunk (see the module documentation). Returns the blobs read.
    pub(super) async fn restore_chunk(
        &self,
        tenant: &TenantId,
        db: &DbId,
        p: &PagesState,
        c: &ChunkState,
        asm: &FileAssembler,
        memory: &MemoryBound,
    ) -> Result<u64, CairnError> {
        let offset = c.index * p.chunk_size;
        let mut composer = Composer::new(c.len, p.page_size);
        let newest = c.deltas.len().checked_sub(1);
        let chain: u64 = c.deltas.iter().map(|d| d.len).sum();
        let hold = !c.deltas.is_empty() && chain <= memory.chunk_share();
        // Held: the whole chain, reserved before any request. Streamed: each delta, in the
        // order they are used (`then` runs one at a time), so the delta in use always holds
        // its bytes.
        let _chain_reservation = match hold {
            true => Some(memory.reserve(chain).await),
            false => None,
        };
        // Few chunks fetch their chains at once, in chunk order (see `MemoryBound`).
        let turn = match c.deltas.is_empty() {
            true => None,
            false => Some(memory.chain_turn().await),
        };
        let mut deltas = stream::iter((0..c.deltas.len()).rev())
            .then(move |i| reserve_delta(memory, (!hold).then_some(c.deltas[i].len), i))
            .map_ok(move |(i, reservation)| self.fetch_delta(tenant, db, c, i, reservation))
            .try_buffered(if hold { HELD_PREFETCH } else { DELTA_PREFETCH })
            // Boxed where its lifetimes are concrete: awaiting it keeps the future `Send`.
            .boxed();
        let (mut read, mut payloads, mut held) = (0u64, Vec::new(), Vec::new());
        while let Some((i, key, payload, reservation)) = deltas.try_next().await? {
            read += 1;
            let view = DeltaView::parse(&key, &payload, c.index, c.base.crc64, p.page_size)?;
            if Some(i) == newest && view.header.chunk_len != c.len {
                return Err(CairnError::Core(CoreError::CorruptBlob {
                    name: key,
                    reason: format!(
                        "delta says chunk {} is {} bytes long, the manifest says {}",
                        c.index, view.header.chunk_len, c.len
                    ),
                }));
            }
            let pieces = composer.claim(&view);
            if hold {
                let delta = payloads.len();
                held.extend(pieces.into_iter().map(|piece| HeldPiece { piece, delta }));
                payloads.push(payload);
            } else {
                for piece in pieces {
                    asm.write(offset + piece.at, &payload[piece.src_range()])?;
                }
                drop(payload);
                drop(reservation);
            }
        }
        drop(turn);
        held.sort_unstable_by_key(|h| h.piece.at);
        let mut written_to = 0;
        if composer.needs_base(c.base.len) {
            let key = keys::blob_key(tenant, db, &c.base);
            let mut writer = asm.writer()?;
            let payloads = &payloads;
            self.store
                .get_blob(&key, &c.base, |off, bytes| {
                    for w in composer.base_writes(&held, c.base.len, off, bytes.len()) {
                        let mut slices: Vec<IoSlice<'_>> = w
                            .parts
                            .iter()
                            .map(|part| match part {
                                Part::Base(r) => IoSlice::new(&bytes[r.clone()]),
                                Part::Delta { delta, src } => {
                                    IoSlice::new(&payloads[*delta][src.clone()])
                                }
                            })
                            .collect();
                        writer.write_vectored_at(offset + w.at, &mut slices)?;
                    }
                    Ok(())
                })
                .await?;
            read += 1;
            written_to = composer.base_end(c.base.len);
        }
        // Held pages the base stream did not reach: past its end, or all of them when the
        // base was not read.
        for h in held_from(&held, written_to) {
            asm.write(offset + h.piece.at, &payloads[h.delta][h.piece.src_range()])?;
        }
        Ok(read)
    }
}
