//! A followed log file: read from where the last turn stopped, through rename rotation (the
//! old file is read to its end, then the new one from its start) and copytruncate (a file
//! that got shorter, or whose first bytes changed, is read again from its start), in bounded
//! chunks and lines.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::{BUDGET, MAX_LINE};

/// Bytes of a file's start remembered to tell a rewritten file (copytruncate) from a grown one.
const HEAD: usize = 256;

/// One followed file.
pub(super) struct Follower {
    pub(super) path: PathBuf,
    file: Option<File>,
    /// (device, inode) of the open file.
    id: (u64, u64),
    offset: u64,
    head: Vec<u8>,
    /// What was read, cut into lines.
    lines: Lines,
    /// Whether the file was looked at once: a file there at the first look is followed from
    /// its end; one that appears later, from its start.
    seen: bool,
}

impl Follower {
    pub(super) fn new(path: PathBuf) -> Follower {
        Follower {
            path,
            file: None,
            id: (0, 0),
            offset: 0,
            head: Vec::new(),
            lines: Lines::default(),
            seen: false,
        }
    }

    /// Reads what was written since the last turn: complete lines into `lines`. Returns
    /// whether the budget ran out (more is waiting).
    pub(super) fn poll(&mut self, lines: &mut Vec<String>) -> bool {
        let first_look = !self.seen;
        self.seen = true;
        let current = std::fs::metadata(&self.path).ok();
        if let (Some(_), Some(meta)) = (&self.file, &current) {
            if (meta.dev(), meta.ino()) != self.id {
                // Renamed away and a new file made: finish the old one, then the new.
                let more = self.read(lines);
                if more {
                    return true;
                }
                self.lines.flush(lines);
                self.file = None;
            } else if meta.len() < self.offset || !self.same_head() {
                // Truncated (copytruncate) or rewritten: from the start again.
                self.offset = 0;
                self.head.clear();
                self.lines = Lines::default();
            }
        }
        if self.file.is_none() {
            if current.is_none() {
                return false;
            }
            let Ok(mut file) = File::open(&self.path) else {
                return false;
            };
            // What was opened, not what the path named a moment before (a rotation between
            // the two would count the new file twice).
            let Ok(meta) = file.metadata() else {
                return false;
            };
            self.id = (meta.dev(), meta.ino());
            self.offset = if first_look { meta.len() } else { 0 };
            // Its first bytes now, so a rewrite is seen even of a file followed from its end.
            self.head = vec![0u8; HEAD.min(self.offset as usize)];
            if file.read_exact(&mut self.head).is_err() {
                self.head.clear();
            }
            self.file = Some(file);
            self.lines = Lines::default();
        }
        self.read(lines)
    }

    /// Whether the file still starts with the bytes it started with.
    fn same_head(&mut self) -> bool {
        let Some(file) = &mut self.file else {
            return true;
        };
        if self.head.is_empty() {
            return true;
        }
        let mut now = vec![0u8; self.head.len()];
        let read = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.read_exact(&mut now));
        read.is_err() || now == self.head
    }

    /// Reads from the offset, at most `BUDGET` bytes; returns whether more is waiting.
    fn read(&mut self, lines: &mut Vec<String>) -> bool {
        let Some(mut file) = self.file.take() else {
            return false;
        };
        let more = self.read_from(&mut file, lines);
        self.file = Some(file);
        more
    }

    fn read_from(&mut self, file: &mut File, lines: &mut Vec<String>) -> bool {
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0;
        while total < BUDGET {
            let n = match file.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if self.offset < HEAD as u64 && self.head.len() as u64 == self.offset {
                let take = (HEAD as u64 - self.offset).min(n as u64) as usize;
                self.head.extend_from_slice(&buf[..take]);
            }
            self.offset += n as u64;
            total += n;
            self.lines.split(&buf[..n], lines);
        }
        true
    }
}

/// Bytes cut into lines of at most [`MAX_LINE`] bytes: an unfinished last line is kept for
/// the next bytes, and a longer line is skipped whole. The followed files, the journal's
/// output and `ipgate jail test` all read through one.
#[derive(Default)]
pub(super) struct Lines {
    /// An incomplete last line, waiting for its end.
    partial: Vec<u8>,
    /// Inside a line longer than `MAX_LINE`: dropped up to its newline.
    skipping: bool,
}

impl Lines {
    /// Splits bytes into lines, keeping an unfinished one and skipping overlong ones.
    pub(super) fn split(&mut self, mut bytes: &[u8], lines: &mut Vec<String>) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            let (line, rest) = bytes.split_at(nl);
            bytes = &rest[1..];
            if self.skipping {
                self.skipping = false;
                continue;
            }
            if self.partial.len() + line.len() > MAX_LINE {
                self.partial.clear();
                continue;
            }
            self.partial.extend_from_slice(line);
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
        }
        if self.skipping {
            return;
        }
        if self.partial.len() + bytes.len() > MAX_LINE {
            self.partial.clear();
            self.skipping = true;
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    /// The last line without a newline (a rotated file's, the end of an input) still counts.
    pub(super) fn flush(&mut self, lines: &mut Vec<String>) {
        if !self.partial.is_empty() && !self.skipping {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        *self = Lines::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_with_overlong_ones_skipped() {
        let mut f = Lines::default();
        let mut lines = Vec::new();
        f.split(b"one\ntw", &mut lines);
        f.split(b"o\n", &mut lines);
        f.split(&vec![b'x'; MAX_LINE + 1], &mut lines);
        f.split(b"xx\nthree\n", &mut lines);
        assert_eq!(lines, vec!["one", "two", "three"]);
    }
}
