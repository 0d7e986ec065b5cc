//! The sync journal, `audit.wal`: where a batch is made durable before it is appended
//! to `audit.log`.
//!
//! Why: on ext4 an appending `fdatasync` also writes the inode (the size changed), a
//! second synchronous write and virtio kick per batch. The journal is a file of fixed
//! size, zero-filled when it is made, that batches overwrite in place, so its
//! `fdatasync` writes the data and flushes, nothing else. `audit.log` stays what
//! operators and tools read (JSON lines, nothing after the last record) and is written
//! right after the journal's sync, in the page cache; it is synced when the journal
//! wraps, at a clean stop and at start. Measured: 1 CSR × 16 in flight on/off 0.73-0.76
//! against 0.67-0.68 appending, in alternated pairs, and 1 in flight 0.51-0.52 against
//! 0.44-0.46 (docs/performance.md, "Issue 16, tenth pass").
//!
//! A frame is a 64-byte header and the batch's bytes: `ZTIDJNL1`, the run's random
//! epoch, the batch's offset in `audit.log`, its length, 4 zero bytes, and the SHA-256
//! of the header's first 32 bytes and the batch. Frames follow one another from the
//! journal's start; a batch that does not fit before its end starts the journal over,
//! after `audit.log` is synced (so the frames overwritten are on disk in the log).
//! Reading stops at the first frame that is torn, of another run, or not the next
//! bytes of the log.
//!
//! At start the frames *complete* `audit.log` when the machine stopped before the log's
//! pages were written back: the log is shorter than the frames reach, or zeros where
//! they hold records. Frames that disagree with bytes the log does hold, or that begin
//! after the log ends, are not used (the log was changed or cut back: recovery and
//! `audit verify` then judge the log as it is, and name what is wrong). The journal
//! holds nothing the log is not meant to: whatever it completes is then checked like
//! the rest (seals, chain, anchors).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ring::digest;

use super::format::{JOURNAL_FILE, LOG_FILE};

/// How often, while batches are written, the journal checks that `audit.log` and
/// `audit.wal` are still the files at their paths (and at every wrap).
const IN_PLACE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The journal's size: a wrap (one sync of `audit.log`) every 4 MiB of records.
pub(super) const CAPACITY: u64 = 4 << 20;
/// A frame's header.
const HEADER: usize = 64;
const MAGIC: &[u8; 8] = b"ZTIDJNL1";

/// The journal as the leader of a batch writes it (one leader at a time).
pub(super) struct Journal {
    file: File,
    capacity: u64,
    epoch: u64,
    /// Where the next frame goes.
    pos: u64,
    /// Where the next batch goes in `audit.log` (its length once the batch in hand is in).
    log_len: u64,
    /// The frame being written, kept between batches (see `Chain::give_back` for why).
    frame: Vec<u8>,
    /// The audit directory, where `audit.log` and `audit.wal` must stay.
    dir: PathBuf,
    /// When the files were last found in place (`None`: not yet).
    checked_at: Option<Instant>,
}

impl Journal {
    /// Opens the journal in `dir` (making and zero-filling it when it is missing or of
    /// another size, else ending the last run's frames at its start) for a log now
    /// `log_len` bytes long and synced.
    pub(super) fn open(dir: &Path, log_len: u64, capacity: u64) -> io::Result<Self> {
        let path = dir.join(JOURNAL_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        if file.metadata()?.len() != capacity {
            // Written, not `fallocate`d: ext4 converts unwritten extents on their first
            // write, which is an inode change again.
            file.set_len(0)?;
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < capacity {
                let chunk = zeros.get(..(capacity - at) as usize).unwrap_or(&zeros);
                file.write_all_at(chunk, at)?;
                at += chunk.len() as u64;
            }
            file.sync_all()?;
            File::open(dir)?.sync_all()?;
        } else {
            // The last run's frames are in the synced log now; unread from here on,
            // they can never complete a log that recovery has since cut back.
            file.write_all_at(&[0; HEADER], 0)?;
            file.sync_data()?;
        }
        let mut epoch = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut epoch)
            .map_err(|_| io::Error::other("no randomness for the journal's epoch"))?;
        Ok(Self {
            file,
            capacity,
            epoch: u64::from_le_bytes(epoch),
            pos: 0,
            log_len,
            frame: Vec::new(),
            dir: dir.to_path_buf(),
            checked_at: None,
        })
    }

    /// Refuses to go on when `audit.log` or `audit.wal` is no longer the file at its
    /// path (renamed over, removed): records would be acknowledged into a file that no
    /// reader, `audit verify` or start will see, and the journal's wrap would then let
    /// go of the only copy that a restart could still use. The writer fails closed on
    /// it: no answer leaves, and the operator restarts the server, whose start judges
    /// the log at the path against its anchors.
    fn check_in_place(&mut self, log: &File) -> io::Result<()> {
        for (name, open) in [(LOG_FILE, log), (JOURNAL_FILE, &self.file)] {
            let path = self.dir.join(name);
            let held = open.metadata()?;
            let moved = match std::fs::symlink_metadata(&path) {
                Ok(at) => (at.dev(), at.ino()) != (held.dev(), held.ino()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => true,
                Err(e) => return Err(e),
            };
            if moved || held.nlink() == 0 {
                return Err(io::Error::other(format!(
                    "{} is no longer the file this server writes (replaced or removed \
                     while it ran); no record is acknowledged into a file no reader sees: \
                     restart the server, whose start checks the log against its anchors",
                    path.display()
                )));
            }
        }
        self.checked_at = Some(Instant::now());
        Ok(())
    }

    /// Makes `batch` (the next bytes of `audit.log`) durable in the journal, syncing
    /// `log` first when the journal starts over; then appends it to `log`, unsynced.
    /// A batch larger than the journal is appended and synced in `log` itself, in two
    /// steps: its records, synced, then its last line (the seal), synced. Written in one,
    /// a machine that stopped during the sync could leave the seal on disk with a hole
    /// before it (pages are written back in no set order), which a start must refuse as
    /// a broken signed log; this way a hole can only lie after the last seal on disk,
    /// where a start sets the unacknowledged records aside.
    pub(super) fn write(&mut self, log: &File, batch: &[u8]) -> io::Result<()> {
        let frame_len = (HEADER + batch.len()) as u64;
        let wraps = frame_len > self.capacity || self.pos + frame_len > self.capacity;
        if wraps
            || self
                .checked_at
                .is_none_or(|t| t.elapsed() >= IN_PLACE_CHECK_EVERY)
        {
            self.check_in_place(log)?;
        }
        if frame_len > self.capacity {
            let (records, seal) = batch.split_at(last_line_start(batch));
            let mut log_w = log;
            for part in [records, seal] {
                if !part.is_empty() {
                    io::Write::write_all(&mut log_w, part)?;
                    log.sync_data()?;
                }
            }
            self.log_len += batch.len() as u64;
            // The log holds everything: the next frame starts the journal over.
            self.pos = 0;
            return Ok(());
        }
        if self.pos + frame_len > self.capacity {
            log.sync_data()?;
            self.pos = 0;
        }
        let frame = &mut self.frame;
        frame.clear();
        frame.extend_from_slice(MAGIC);
        frame.extend_from_slice(&self.epoch.to_le_bytes());
        frame.extend_from_slice(&self.log_len.to_le_bytes());
        frame.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        frame.extend_from_slice(&[0; 4]);
        let sum = frame_sum(frame, batch);
        frame.extend_from_slice(sum.as_ref());
        frame.extend_from_slice(batch);
        self.file.write_all_at(frame, self.pos)?;
        if frame.capacity() > 1 << 20 {
            *frame = Vec::new();
        }
        self.file.sync_data()?;
        self.pos += frame_len;
        let mut log_w = log;
        io::Write::write_all(&mut log_w, batch)?;
        self.log_len += batch.len() as u64;
        Ok(())
    }
}

/// Where the last line of `batch` (its lines each ending in `\n`) begins.
fn last_line_start(batch: &[u8]) -> usize {
    let body = batch.strip_suffix(b"\n").unwrap_or(batch);
    body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
}

/// The SHA-256 a frame's header ends with: over its first 32 bytes and the batch.
fn frame_sum(head: &[u8], batch: &[u8]) -> digest::Digest {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(head);
    ctx.update(batch);
    ctx.finish()
}

fn le_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// The frames of the journal's last run, in order: (offset in the log, bytes).
fn frames(journal: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out: Vec<(u64, &[u8])> = Vec::new();
    let (mut pos, mut epoch) = (0usize, None);
    while let Some(head) = journal.get(pos..pos + HEADER) {
        let (Some(ep), Some(offset), Some(len)) = (
            head.get(8..16).and_then(le_u64),
            head.get(16..24).and_then(le_u64),
            head.get(24..28)
                .and_then(|b| Some(u32::from_le_bytes(b.try_into().ok()?) as usize)),
        ) else {
            break;
        };
        let Some(batch) = journal.get(pos + HEADER..pos + HEADER + len) else {
            break;
        };
        // A frame's offset comes from the file: a crafted one near the top of u64 must
        // not overflow, and a frame whose end would is not one the writer made.
        let next = out.last().map(|(o, b)| o.checked_add(b.len() as u64));
        if head.get(..8) != Some(MAGIC.as_slice())
            || head.get(28..32) != Some([0u8; 4].as_slice())
            || len == 0
            || offset.checked_add(len as u64).is_none()
            || epoch.is_some_and(|e| e != ep)
            || next.is_some_and(|n| n != Some(offset))
            || head.get(32..)
                != head
                    .get(..32)
                    .map(|h| frame_sum(h, batch))
                    .as_ref()
                    .map(AsRef::as_ref)
        {
            break;
        }
        epoch = Some(ep);
        out.push((offset, batch));
        pos += HEADER + len;
    }
    out
}

/// What the journal holds of `audit.log`: its bytes from `at` on, as the frames hold
/// them (`bytes`), and how many of them the log lacked or held as zeros (`missing`, 0
/// when the log, as read, holds them all).
pub(super) struct Completion {
    pub(super) at: u64,
    pub(super) bytes: Vec<u8>,
    pub(super) missing: u64,
}

/// What the journal in `dir` holds of `log` (`log_len` bytes long): `None` when there
/// is no journal, no frame, or the frames disagree with the log (see the module's doc).
/// Only the journal's first [`CAPACITY`] bytes are read: the writer writes no further,
/// and a larger file (made so by someone else) must not cost a start its memory.
pub(super) fn completion(dir: &Path, log: &File, log_len: u64) -> io::Result<Option<Completion>> {
    let mut journal = Vec::new();
    match File::open(dir.join(JOURNAL_FILE)) {
        Ok(f) => {
            io::Read::read_to_end(&mut io::Read::take(f, CAPACITY), &mut journal)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let frames = frames(&journal);
    let (Some(&(at, _)), Some(&(last, last_bytes))) = (frames.first(), frames.last()) else {
        return Ok(None);
    };
    // `frames` checked that no frame's end overflows.
    let end = last.saturating_add(last_bytes.len() as u64);
    if at > log_len {
        tracing::warn!(
            log_len,
            journal_from = at,
            "audit.log ends before the records audit.wal holds begin: the journal is not used"
        );
        return Ok(None);
    }
    let mut held = vec![0u8; (log_len.min(end) - at) as usize];
    log.read_exact_at(&mut held, at)?;
    let bytes: Vec<u8> = frames.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    let mut missing = end.saturating_sub(log_len);
    for (i, (h, j)) in held.iter().zip(&bytes).enumerate() {
        if h != j {
            if *h != 0 {
                tracing::warn!(
                    offset = at + i as u64,
                    "audit.log differs from the records audit.wal holds for it: the journal is not used"
                );
                return Ok(None);
            }
            missing += 1;
        }
    }
    Ok(Some(Completion { at, bytes, missing }))
}

/// Completes `audit.log` from the journal at start (before recovery reads the log),
/// syncing what it wrote; once the start has synced the log after recovery, the log
/// alone holds every record and the journal's frames are not needed again. A log that
/// is gone is not made again (its directory entry was synced with the journal's: it
/// was removed, which is for the anchors to judge).
///
/// The frames' bytes are written and synced even when the log, as read, holds them
/// all: it is read through the page cache, and after a failed sync (the last run
/// failed closed on it) Linux keeps the pages that were never written as clean, so the
/// log can look whole while the disk lacks acknowledged records. The journal is the
/// only durable copy of them until this sync, and the start zeroes it after.
pub(super) fn complete_log(dir: &Path, log_path: &Path) -> io::Result<()> {
    let log = match OpenOptions::new().read(true).write(true).open(log_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let log_len = log.metadata()?.len();
    let Some(c) = completion(dir, &log, log_len)? else {
        return Ok(());
    };
    log.write_all_at(&c.bytes, c.at)?;
    log.sync_all()?;
    if c.missing > 0 {
        tracing::warn!(
            event = "audit_log_completed_from_journal",
            from = c.at,
            bytes = c.missing,
            "audit.log lacked records audit.wal holds (the machine stopped before they were written back): completed from it"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(dir: &Path, batches: &[&[u8]], capacity: u64) -> File {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(dir.join("audit.log"))
            .unwrap();
        let mut j = Journal::open(dir, 0, capacity).unwrap();
        for b in batches {
            j.write(&log, b).unwrap();
        }
        log
    }

    /// `audit.log` or `audit.wal` renamed over or removed while the server runs: the
    /// next batch (checked at least every second and at every wrap) is refused, so the
    /// writer fails closed instead of acknowledging records into files no one reads
    /// (found by the rev-blackbox review: a cut copy renamed over the log went unnoticed
    /// until the journal wrapped and the records were gone).
    #[test]
    fn a_log_or_journal_replaced_while_running_is_refused() {
        for name in [LOG_FILE, JOURNAL_FILE] {
            let dir = tempfile::tempdir().unwrap();
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(dir.path().join(LOG_FILE))
                .unwrap();
            let mut j = Journal::open(dir.path(), 0, 4096).unwrap();
            j.write(&log, b"one\n").unwrap();
            // Within the second: not looked at again.
            j.write(&log, b"two\n").unwrap();
            let copy = dir.path().join("copy");
            std::fs::write(&copy, b"one\n").unwrap();
            std::fs::rename(&copy, dir.path().join(name)).unwrap();
            j.checked_at = None;
            let e = j.write(&log, b"three\n").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Other, "{name}");
            assert!(
                e.to_string()
                    .contains("is no longer the file this server writes"),
                "{name}: {e}"
            );
            // Removed outright: the same.
            std::fs::remove_file(dir.path().join(name)).unwrap();
            assert!(j.write(&log, b"three\n").is_err(), "{name}");
        }
        // In place, a wrap checks too and goes on.
        let dir = tempfile::tempdir().unwrap();
        let log = journal(dir.path(), &[&[b'x'; 100], &[b'y'; 100]], 300);
        assert_eq!(log.metadata().unwrap().len(), 200);
    }

    #[test]
    fn frames_complete_a_log_cut_short_or_zeroed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        journal(dir.path(), &[b"one\n", b"two\n", b"three\n"], 1 << 16);
        let path = dir.path().join("audit.log");
        // Not the appending handle: Linux appends a positioned write to one.
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert_eq!(
            completion(dir.path(), &log, 14).unwrap().unwrap().missing,
            0
        );
        // Cut short: completed.
        log.set_len(6).unwrap();
        let c = completion(dir.path(), &log, 6).unwrap().unwrap();
        assert_eq!((c.at, c.missing), (0, 8));
        complete_log(dir.path(), &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\nthree\n");
        // Zeros where records were: completed.
        log.write_all_at(&[0; 3], 4).unwrap();
        complete_log(dir.path(), &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\nthree\n");
        // A byte changed: not used, the log is left as it is.
        log.write_all_at(b"T", 4).unwrap();
        log.set_len(10).unwrap();
        assert!(completion(dir.path(), &log, 10).unwrap().is_none());
        complete_log(dir.path(), &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\nTwo\nth");
    }

    #[test]
    fn a_wrapped_journal_holds_the_frames_since_its_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let batches: Vec<Vec<u8>> = (0..40)
            .map(|i| format!("{i:0100}\n").into_bytes())
            .collect();
        let refs: Vec<&[u8]> = batches.iter().map(Vec::as_slice).collect();
        // Room for 6 frames of 165 bytes: the journal starts over 6 times.
        journal(dir.path(), &refs, 1000);
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("audit.log"))
            .unwrap();
        let all: Vec<u8> = batches.concat();
        let j = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        let fs = frames(&j);
        assert_eq!(fs.len(), 40 % 6);
        assert_eq!(fs[0].0, (all.len() - fs.len() * 101) as u64);
        // The last batches lost from the log come back; a cut before them does not.
        log.set_len(all.len() as u64 - 150).unwrap();
        complete_log(dir.path(), &dir.path().join("audit.log")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("audit.log")).unwrap(), all);
        log.set_len(all.len() as u64 - 500).unwrap();
        assert!(completion(dir.path(), &log, all.len() as u64 - 500)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_batch_larger_than_the_journal_goes_to_the_log_synced() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'x'; 2000];
        let log = journal(dir.path(), &[b"a\n", &big, b"b\n"], 1000);
        assert_eq!(log.metadata().unwrap().len(), 2004);
        let j = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        assert_eq!(frames(&j), vec![(2002u64, b"b\n".as_slice())]);
    }

    #[test]
    fn a_log_that_reads_whole_is_still_written_again_from_the_frames() {
        // After a failed sync the page cache can show records the disk lacks: the
        // start writes the frames' bytes again (the file's mtime shows the write).
        let dir = tempfile::tempdir().unwrap();
        journal(dir.path(), &[b"one\n", b"two\n"], 1 << 16);
        let path = dir.path().join("audit.log");
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        complete_log(dir.path(), &path).unwrap();
        assert!(std::fs::metadata(&path).unwrap().modified().unwrap() > old);
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\n");
    }

    #[test]
    fn a_batch_larger_than_the_journal_is_synced_records_first_then_its_seal() {
        assert_eq!(last_line_start(b"a\nb\nseal\n"), 4);
        assert_eq!(last_line_start(b"seal\n"), 0);
        assert_eq!(last_line_start(b"a\nseal"), 2);
        assert_eq!(last_line_start(b""), 0);
    }

    #[test]
    fn crafted_offsets_and_an_oversized_journal_are_refused_without_harm() {
        let dir = tempfile::tempdir().unwrap();
        let batch = b"x\n";
        let mut f = Vec::new();
        f.extend_from_slice(MAGIC);
        f.extend_from_slice(&1u64.to_le_bytes());
        f.extend_from_slice(&(u64::MAX - 1).to_le_bytes());
        f.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        let sum = frame_sum(&f, batch);
        f.extend_from_slice(sum.as_ref());
        f.extend_from_slice(batch);
        assert!(frames(&f).is_empty());
        let path = dir.path().join(JOURNAL_FILE);
        std::fs::write(&path, &f).unwrap();
        // Made far larger than the writer makes it (sparse): read no further than it.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        std::fs::write(dir.path().join("audit.log"), b"").unwrap();
        let log = File::open(dir.path().join("audit.log")).unwrap();
        assert!(completion(dir.path(), &log, 0).unwrap().is_none());
    }

    #[test]
    fn a_new_run_reads_none_of_the_last_runs_frames() {
        let dir = tempfile::tempdir().unwrap();
        journal(dir.path(), &[b"one\n", b"two\n"], 1 << 16);
        let path = dir.path().join(JOURNAL_FILE);
        assert_eq!(frames(&std::fs::read(&path).unwrap()).len(), 2);
        Journal::open(dir.path(), 8, 1 << 16).unwrap();
        assert!(frames(&std::fs::read(&path).unwrap()).is_empty());
    }

    #[test]
    fn torn_or_foreign_frames_end_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        journal(dir.path(), &[b"one\n", b"two\n"], 1 << 16);
        let path = dir.path().join(JOURNAL_FILE);
        let mut j = std::fs::read(&path).unwrap();
        assert_eq!(frames(&j).len(), 2);
        // The second frame's last byte torn.
        j[2 * HEADER + 7] ^= 1;
        assert_eq!(frames(&j).len(), 1);
        // A frame of another run after the first.
        let mut other = j.clone();
        other[HEADER + 4 + 8] ^= 1; // the second frame's epoch
        assert_eq!(frames(&other).len(), 1);
        // A length past the end.
        j[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(frames(&j).is_empty());
    }
}
