//! Problems found in a config, its list files and certificates, collected all at once, each
//! named by file, key path and line.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a config file, list file or certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in (the config file, or a list or certificate file it names).
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Key path in the config, like `site[0].upstream`; empty for a whole-file problem.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found while loading a config; never empty.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Errors(pub Vec<Problem>);

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Collects problems against one source file, resolving key paths to line numbers.
pub struct Report<'a> {
    file: &'a Path,
    doc: Option<toml_edit::ImDocument<&'a str>>,
    text: &'a str,
    problems: Vec<Problem>,
}

impl<'a> Report<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        let doc = toml_edit::ImDocument::parse(text).ok();
        Report {
            file,
            doc,
            text,
            problems: Vec::new(),
        }
    }

    /// Records a problem at a config key path such as `site[0].route[1].path`.
    pub fn key(&mut self, key: &str, message: impl Into<String>) {
        let line = self
            .doc
            .as_ref()
            .and_then(|d| span_of(d, key))
            .map(|offset| line_of(self.text, offset));
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Records a problem in another file (a list or certificate file) named by a config key.
    pub fn other(&mut self, file: &Path, line: Option<usize>, key: &str, message: String) {
        self.problems.push(Problem {
            file: file.to_path_buf(),
            line,
            key: key.to_string(),
            message,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn finish<T>(self, value: T) -> Result<T, Errors> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(self.into_errors())
        }
    }

    pub fn into_errors(self) -> Errors {
        Errors(self.problems)
    }
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Byte offset of the value at a key path like `site[0].route[1].path`, or failing that of
/// the nearest parent that exists.
pub(super) fn span_of(doc: &toml_edit::ImDocument<&str>, key: &str) -> Option<usize> {
    use toml_edit::TableLike;
    let segments: Vec<&str> = key.split('.').collect();
    let mut table: &dyn TableLike = doc.as_table();
    let mut best = None;
    for (n, segment) in segments.iter().enumerate() {
        let (name, index) = match segment.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (*segment, None),
        };
        let Some(item) = table.get(name) else {
            return best;
        };
        best = item.span().map(|s| s.start).or(best);
        let next: Option<&dyn TableLike> = match index {
            None => item.as_table_like(),
            Some(i) => {
                if let Some(tables) = item.as_array_of_tables() {
                    let Some(t) = tables.get(i) else { return best };
                    best = t.span().map(|s| s.start).or(best);
                    Some(t as &dyn TableLike)
                } else {
                    let Some(v) = item.as_array().and_then(|a| a.get(i)) else {
                        return best;
                    };
                    best = v.span().map(|s| s.start).or(best);
                    v.as_inline_table().map(|t| t as &dyn TableLike)
                }
            }
        };
        if n + 1 == segments.len() {
            break;
        }
        match next {
            Some(t) => table = t,
            None => break,
        }
    }
    best
}
