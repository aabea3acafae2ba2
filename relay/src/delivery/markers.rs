//! In-flight markers: which recipients of which message were past the final dot of a transfer
//! whose outcome is not recorded yet (see the queue's module docs for what they are for).
//!
//! They live in one append-only journal, `<spool>/inflight/journal`: a line `+<name> <recipient
//! indices>` when a marker is written, `-<name>` when it goes. A marker costs one small `write`
//! to the page cache each way, on the delivery path, with no file of its own: a file per
//! marker (taken from a pool, written, truncated, renamed back) measured 15-25 % of the relay's
//! throughput. The journal is not flushed, like the marker files before it: markers survive a
//! killed process, not a power loss. The live markers are kept in memory; once the journal
//! passes [`JOURNAL_MAX`] bytes it is rewritten with only those (a temporary file renamed over
//! it, so a crash leaves the old journal or the new one).
//!
//! Opening reads the journal and any marker files left by earlier versions (`<id>.<n>`, taken
//! over and deleted, as are their spent `*.free` files) and rewrites the journal with what is
//! live.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

const JOURNAL: &str = "journal";
const JOURNAL_TMP: &str = "journal.tmp";
/// The journal is rewritten with the live markers when it grows past this.
pub const JOURNAL_MAX: u64 = 1 << 20;

/// The marker journal of one spool.
pub struct Markers {
    dir: PathBuf,
    state: Mutex<Journal>,
}

struct Journal {
    file: File,
    len: u64,
    /// Live markers: name → recipient indices (`"0,2"`).
    live: BTreeMap<String, String>,
}

impl Markers {
    /// Opens (creating) the journal in `dir`; returns it and the markers a previous run left.
    pub fn open(dir: &Path) -> io::Result<(Markers, Vec<(String, String)>)> {
        fs::create_dir_all(dir)?;
        let mut live = BTreeMap::new();
        if let Ok(text) = fs::read_to_string(dir.join(JOURNAL)) {
            replay(&text, &mut live);
        }
        // Marker files of earlier versions, and their spent ones.
        for entry in fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == JOURNAL || name == JOURNAL_TMP {
                continue;
            }
            if !name.ends_with(".free") {
                let content = fs::read_to_string(entry.path()).unwrap_or_default();
                if valid_name(&name) {
                    live.insert(name, content.trim().to_owned());
                }
            }
            fs::remove_file(entry.path())?;
        }
        let file = rewrite(dir, &live)?;
        let recovered = live.iter().map(|(n, c)| (n.clone(), c.clone())).collect();
        let len = file.metadata()?.len();
        Ok((
            Markers {
                dir: dir.to_path_buf(),
                state: Mutex::new(Journal { file, len, live }),
            },
            recovered,
        ))
    }

    /// Writes (or replaces) the marker `name` naming `recipients` (`"0,2"`).
    pub fn write(&self, name: &str, recipients: &str) -> io::Result<()> {
        if !valid_name(name) || recipients.contains(['\n', ' ']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("marker {name:?}"),
            ));
        }
        let mut j = self.lock();
        j.append(format!("+{name} {recipients}\n").as_bytes())?;
        j.live.insert(name.to_owned(), recipients.to_owned());
        self.maybe_compact(&mut j)
    }

    /// Removes the marker `name` (nothing if there is none).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let mut j = self.lock();
        if j.live.remove(name).is_none() {
            return Ok(());
        }
        j.append(format!("-{name}\n").as_bytes())?;
        self.maybe_compact(&mut j)
    }

    /// Live markers (name, recipient indices), by name.
    pub fn live(&self) -> Vec<(String, String)> {
        let j = self.lock();
        j.live.iter().map(|(n, c)| (n.clone(), c.clone())).collect()
    }

    fn lock(&self) -> MutexGuard<'_, Journal> {
        // Whole-statement updates only: a panic elsewhere leaves it consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn maybe_compact(&self, j: &mut Journal) -> io::Result<()> {
        if j.len > JOURNAL_MAX {
            j.file = rewrite(&self.dir, &j.live)?;
            j.len = j.file.metadata()?.len();
        }
        Ok(())
    }
}

impl Journal {
    fn append(&mut self, line: &[u8]) -> io::Result<()> {
        // One write per line: a killed process leaves whole lines (and at most a cut last one,
        // which `replay` ignores).
        self.file.write_all(line)?;
        self.len += line.len() as u64;
        Ok(())
    }
}

/// Marker names are `<id>.<n>` (or `<id>.r<n>` once recovered): no separators of the journal.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains([' ', '\n', '/']) && name.contains('.')
}

/// Applies journal lines to `live`; a line cut short by a kill (no newline) is ignored.
fn replay(text: &str, live: &mut BTreeMap<String, String>) {
    let mut lines: Vec<&str> = text.split('\n').collect();
    // Whatever follows the last newline: empty, or a line the kill cut short.
    lines.pop();
    for line in lines {
        if let Some(rest) = line.strip_prefix('+') {
            if let Some((name, rcpts)) = rest.split_once(' ') {
                live.insert(name.to_owned(), rcpts.to_owned());
            }
        } else if let Some(name) = line.strip_prefix('-') {
            live.remove(name);
        }
    }
}

/// Writes a journal holding exactly `live` and opens it for appending.
fn rewrite(dir: &Path, live: &BTreeMap<String, String>) -> io::Result<File> {
    let tmp = dir.join(JOURNAL_TMP);
    let mut text = String::new();
    for (name, rcpts) in live {
        text.push_str(&format!("+{name} {rcpts}\n"));
    }
    fs::write(&tmp, text)?;
    fs::rename(&tmp, dir.join(JOURNAL))?;
    OpenOptions::new().append(true).open(dir.join(JOURNAL))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn markers_survive_reopening_and_removed_ones_do_not() {
        let tmp = tempfile::tempdir().unwrap();
        let (m, found) = Markers::open(tmp.path()).unwrap();
        assert!(found.is_empty());
        m.write("a.0", "0,1").unwrap();
        m.write("b.2", "2").unwrap();
        m.write("a.0", "0").unwrap();
        m.remove("b.2").unwrap();
        m.remove("never.0").unwrap();
        drop(m);
        let (m, found) = Markers::open(tmp.path()).unwrap();
        assert_eq!(found, vec![("a.0".to_owned(), "0".to_owned())]);
        assert_eq!(m.live(), found);
    }

    #[test]
    fn a_cut_last_line_is_ignored_and_old_marker_files_are_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(JOURNAL), "+a.0 0\n+b.1 1\n-a.0\n+c.2 2").unwrap();
        fs::write(tmp.path().join("d.r3"), "3,4\n").unwrap();
        fs::write(tmp.path().join("00000001.free"), "").unwrap();
        let (_, found) = Markers::open(tmp.path()).unwrap();
        assert_eq!(
            found,
            vec![
                ("b.1".to_owned(), "1".to_owned()),
                ("d.r3".to_owned(), "3,4".to_owned())
            ]
        );
        let mut names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![JOURNAL.to_owned()]);
    }

    #[test]
    fn the_journal_is_rewritten_when_it_grows() {
        let tmp = tempfile::tempdir().unwrap();
        let (m, _) = Markers::open(tmp.path()).unwrap();
        m.write("keep.0", "0").unwrap();
        let rounds = JOURNAL_MAX as usize / 40 + 10;
        for i in 0..rounds {
            let name = format!("{i:032}.0");
            m.write(&name, "0").unwrap();
            m.remove(&name).unwrap();
        }
        let len = fs::metadata(tmp.path().join(JOURNAL)).unwrap().len();
        assert!(len <= JOURNAL_MAX, "{len}");
        drop(m);
        let (_, found) = Markers::open(tmp.path()).unwrap();
        assert_eq!(found, vec![("keep.0".to_owned(), "0".to_owned())]);
    }

    #[test]
    fn names_that_would_break_the_journal_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (m, _) = Markers::open(tmp.path()).unwrap();
        assert!(m.write("a b.0", "0").is_err());
        assert!(m.write("a.0", "0\n+x.0 1").is_err());
        assert!(m.live().is_empty());
    }
}
