//! The compression behind held approvals. Records of one approval are
//! near copies of each other's structure (field names, the matrix version,
//! rosters, topics, the `decide` block), so the bytes are compressed with
//! zstd against a dictionary: the first record seen whose first lane is the
//! same, used as raw content. Dictionaries are never replaced (a held blob
//! names the one it was compressed with), and their number is capped so a
//! changelog of odd shapes cannot grow them without bound; past the cap,
//! records are compressed without one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use zstd::zstd_safe::{CCtx, CDict, DCtx, DDict};

use super::HeldError;

/// zstd level for held records: the fastest positive level. With a
/// dictionary it compresses a bench record (2 KB) to about 30 bytes at
/// about 4 µs; higher levels cost more time for almost nothing.
const LEVEL: i32 = 1;
/// At most this many dictionaries (one per first lane seen).
pub(super) const MAX_DICTIONARIES: usize = 64;
/// The blob's first byte when it was compressed without a dictionary.
pub(super) const NO_DICTIONARY: u8 = u8::MAX;
/// Records larger than this are never a dictionary (a dictionary is kept
/// for the process's life, twice: prepared for compression and for
/// decompression).
const MAX_DICTIONARY_BYTES: usize = 64 * 1024;
/// A held record never decompresses to more than this (the producer's
/// largest message is far smaller); a frame claiming more is corrupt.
const MAX_RECORD_BYTES: u64 = 16 * 1024 * 1024;

/// One compression dictionary, prepared for both directions.
struct Dictionary {
    compress: CDict<'static>,
    decompress: DDict<'static>,
}

#[derive(Default)]
struct Dictionaries {
    /// First lane name → index in `list`.
    by_shape: HashMap<Arc<str>, u8>,
    list: Vec<Arc<Dictionary>>,
}

/// What every held approval shares: compression dictionaries and interned
/// lane names. Shared by the threads that restore partitions in parallel.
#[derive(Default)]
pub struct Store {
    dictionaries: RwLock<Dictionaries>,
    lanes: RwLock<HashMap<Arc<str>, ()>>,
}

thread_local! {
    /// Compression and decompression contexts are costly to create (their
    /// work space is allocated on first use), so each thread keeps one.
    static CONTEXTS: RefCell<(CCtx<'static>, DCtx<'static>, Vec<u8>)> =
        RefCell::new((CCtx::create(), DCtx::create(), Vec::new()));
}

impl Store {
    /// The one shared copy of a lane name.
    pub fn intern(&self, lane: &str) -> Arc<str> {
        // A poisoned lock only means another thread panicked while holding
        // it; the map itself is always whole (inserts are single calls).
        if let Some((name, ())) = self
            .lanes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get_key_value(lane)
        {
            return name.clone();
        }
        let mut lanes = self.lanes.write().unwrap_or_else(|e| e.into_inner());
        if let Some((name, ())) = lanes.get_key_value(lane) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(lane);
        lanes.insert(name.clone(), ());
        name
    }

    /// The dictionary for records whose first lane is `shape`, made from
    /// `sample` when there is none yet and there is room.
    fn dictionary(&self, shape: &str, sample: &[u8]) -> Option<(u8, Arc<Dictionary>)> {
        {
            let dicts = self.dictionaries.read().unwrap_or_else(|e| e.into_inner());
            if let Some(&i) = dicts.by_shape.get(shape) {
                return dicts.list.get(i as usize).map(|d| (i, d.clone()));
            }
            if dicts.list.len() >= MAX_DICTIONARIES || sample.len() > MAX_DICTIONARY_BYTES {
                return None;
            }
        }
        let mut dicts = self.dictionaries.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&i) = dicts.by_shape.get(shape) {
            return dicts.list.get(i as usize).map(|d| (i, d.clone()));
        }
        if dicts.list.len() >= MAX_DICTIONARIES {
            return None;
        }
        let dictionary = Arc::new(Dictionary {
            compress: CDict::try_create(sample, LEVEL)?,
            decompress: DDict::try_create(sample)?,
        });
        let index = u8::try_from(dicts.list.len()).ok()?;
        dicts.list.push(dictionary.clone());
        let shape = self.intern(shape);
        dicts.by_shape.insert(shape, index);
        Some((index, dictionary))
    }

    fn dictionary_at(&self, index: u8) -> Option<Arc<Dictionary>> {
        let dicts = self.dictionaries.read().unwrap_or_else(|e| e.into_inner());
        dicts.list.get(index as usize).cloned()
    }

    /// `bytes` compressed: the dictionary's index, then a zstd frame.
    pub(super) fn pack(&self, shape: &str, bytes: &[u8]) -> Result<Box<[u8]>, HeldError> {
        let dictionary = self.dictionary(shape, bytes);
        CONTEXTS.with(|cell| {
            let (cctx, _, buffer) = &mut *cell.borrow_mut();
            buffer.clear();
            buffer.reserve(zstd::zstd_safe::compress_bound(bytes.len()));
            let (index, written) = match &dictionary {
                Some((index, d)) => (*index, cctx.compress_using_cdict(buffer, bytes, &d.compress)),
                None => (NO_DICTIONARY, cctx.compress(buffer, bytes, LEVEL)),
            };
            written
                .map_err(|code| HeldError::Compression(zstd::zstd_safe::get_error_name(code).to_string()))?;
            let mut blob = Vec::with_capacity(buffer.len() + 1);
            blob.push(index);
            blob.extend_from_slice(buffer);
            Ok(blob.into_boxed_slice())
        })
    }

    /// The bytes [`Store::pack`] was given.
    pub(super) fn unpack(&self, blob: &[u8]) -> Result<Vec<u8>, HeldError> {
        let broken = |what: &str| HeldError::Compression(what.to_string());
        let (&index, frame) = blob.split_first().ok_or_else(|| broken("empty blob"))?;
        let size = zstd::zstd_safe::get_frame_content_size(frame)
            .ok()
            .flatten()
            .filter(|n| *n <= MAX_RECORD_BYTES)
            .ok_or_else(|| broken("frame without a plausible content size"))?;
        // Bounded by MAX_RECORD_BYTES just above, so it fits any usize.
        let mut out = Vec::with_capacity(size as usize);
        let dictionary = match index {
            NO_DICTIONARY => None,
            i => Some(
                self.dictionary_at(i)
                    .ok_or_else(|| broken("unknown dictionary"))?,
            ),
        };
        CONTEXTS.with(|cell| {
            let (_, dctx, _) = &mut *cell.borrow_mut();
            match &dictionary {
                Some(d) => dctx.decompress_using_ddict(&mut out, frame, &d.decompress),
                None => dctx.decompress(&mut out, frame),
            }
            .map_err(|code| broken(zstd::zstd_safe::get_error_name(code)))
        })?;
        Ok(out)
    }
}
