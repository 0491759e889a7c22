//! Cutting failed writes out of fjall's journal while the database is closed.
//!
//! fjall 3 journals each write batch as `Start{item count, seqno}`, its items, and
//! `End{checksum, trailer}`, and buffers the journal in memory. A batch whose fsync failed
//! can therefore still reach the file whole (the buffer is flushed when the database
//! closes, or the data was written and only the fsync failed), and a replay would bring
//! back a write whose caller was told it failed. Recovery already drops a torn last batch;
//! this cut removes whole ones. The layout (fjall 3.1 `journal/entry.rs`, little-endian):
//!
//! - Start: tag 1, item count u32, seqno u64;
//! - Item: tag 2, value type u8, compression u8, keyspace id u64, key length u16, value
//!   length u32, stored value length u32, key, stored value;
//! - End: tag 3, checksum u64, 4 trailer bytes;
//! - Clear: tag 4, keyspace id u64.
//!
//! Anything else (the zeros fjall preallocates, or a torn entry) ends the journal.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::out_of_space::FailedWrite;

const START_TAG: u8 = 1;
const ITEM_TAG: u8 = 2;
const END_TAG: u8 = 3;
const CLEAR_TAG: u8 = 4;

/// Bytes after the tag of each entry but an item.
const START_BODY_BYTES: u64 = 12;
const END_BODY_BYTES: u64 = 12;
const CLEAR_BODY_BYTES: u64 = 8;
/// An item's fixed fields after its tag.
const ITEM_HEADER_BYTES: usize = 20;

/// Where a cut was made: the journal file and its new length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct JournalCut {
    pub journal: PathBuf,
    pub length: u64,
}

/// Truncates the journal at the start of the first batch holding one of `failed_writes`,
/// which drops that batch and every later one in the file (none can be acknowledged: fjall
/// refuses all writes after a failed one). Only while the database is closed.
pub(super) fn cut_failed_writes(
    store_dir: &Path,
    failed_writes: &[FailedWrite],
) -> std::io::Result<Option<JournalCut>> {
    if failed_writes.is_empty() {
        return Ok(None);
    }
    for journal in journals_oldest_first(store_dir)? {
        if let Some(length) = first_failed_batch_offset(&journal, failed_writes)? {
            let file = OpenOptions::new().write(true).open(&journal)?;
            file.set_len(length)?;
            file.sync_all()?;
            return Ok(Some(JournalCut { journal, length }));
        }
    }
    Ok(None)
}

/// Waits until this process holds no journal of `store_dir` open: fjall's last handles
/// (a worker thread's, say) may drop just after the database closed, and a journal
/// dropped then still flushes its buffer, which must happen before the cut. Linux only
/// (`/proc/self/fd`); elsewhere it returns at once.
pub(super) fn wait_until_journals_closed(
    store_dir: &Path,
    timeout: Duration,
) -> Result<(), String> {
    let Ok(store_dir) = store_dir.canonicalize() else {
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    loop {
        let Ok(descriptors) = std::fs::read_dir("/proc/self/fd") else {
            return Ok(());
        };
        let open_journal = descriptors
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .find(|target| {
                target.parent() == Some(store_dir.as_path())
                    && target
                        .extension()
                        .is_some_and(|extension| extension == "jnl")
            });
        let Some(open_journal) = open_journal else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "{} was still open {} s after the database closed",
                open_journal.display(),
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The `<id>.jnl` files of a fjall folder, by ascending id.
fn journals_oldest_first(store_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut journals = Vec::new();
    for entry in std::fs::read_dir(store_dir)? {
        let path = entry?.path();
        let id = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".jnl"))
            .and_then(|id| id.parse::<u64>().ok());
        if let Some(id) = id {
            journals.push((id, path));
        }
    }
    journals.sort();
    Ok(journals.into_iter().map(|(_, path)| path).collect())
}

/// The offset of the first batch in `journal` holding a failed write.
fn first_failed_batch_offset(
    journal: &Path,
    failed_writes: &[FailedWrite],
) -> std::io::Result<Option<u64>> {
    let mut reader = BufReader::new(File::open(journal)?);
    let mut offset = 0u64;
    let mut batch = (0u64, 0u64);
    let mut key = Vec::new();
    loop {
        let mut tag = [0u8; 1];
        if !read_or_end(&mut reader, &mut tag)? {
            return Ok(None);
        }
        let body_bytes = match tag[0] {
            START_TAG => {
                let mut body = [0u8; START_BODY_BYTES as usize];
                if !read_or_end(&mut reader, &mut body)? {
                    return Ok(None);
                }
                let seqno = u64::from_le_bytes(body[4..12].try_into().expect("8 bytes"));
                batch = (offset, seqno);
                START_BODY_BYTES
            }
            ITEM_TAG => {
                let mut header = [0u8; ITEM_HEADER_BYTES];
                if !read_or_end(&mut reader, &mut header)? {
                    return Ok(None);
                }
                let keyspace_id = u64::from_le_bytes(header[2..10].try_into().expect("8 bytes"));
                let key_length = u16::from_le_bytes(header[10..12].try_into().expect("2 bytes"));
                let stored_value_length =
                    u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
                key.resize(usize::from(key_length), 0);
                if !read_or_end(&mut reader, &mut key)? {
                    return Ok(None);
                }
                let (batch_offset, batch_seqno) = batch;
                if failed_writes.iter().any(|failed| {
                    failed.keyspace_id == keyspace_id
                        && failed.key == key
                        && batch_seqno >= failed.min_batch_seqno
                }) {
                    return Ok(Some(batch_offset));
                }
                let skipped = std::io::copy(
                    &mut (&mut reader).take(u64::from(stored_value_length)),
                    &mut std::io::sink(),
                )?;
                if skipped < u64::from(stored_value_length) {
                    return Ok(None);
                }
                (ITEM_HEADER_BYTES + key.len()) as u64 + skipped
            }
            END_TAG => END_BODY_BYTES,
            CLEAR_TAG => CLEAR_BODY_BYTES,
            _ => return Ok(None),
        };
        if tag[0] == END_TAG || tag[0] == CLEAR_TAG {
            let skipped = std::io::copy(&mut (&mut reader).take(body_bytes), &mut std::io::sink())?;
            if skipped < body_bytes {
                return Ok(None);
            }
        }
        offset += 1 + body_bytes;
    }
}

/// Fills `buffer`; `false` at the end of the file, also mid-buffer (a torn entry).
fn read_or_end(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<bool> {
    match reader.read_exact(buffer) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(error) => Err(error),
    }
}
