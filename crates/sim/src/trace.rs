//! Loading recorded workload traces (the only I/O of the simulator).
//!
//! A trace is a directory with one file per VM; each line of a file is one
//! integer CPU utilisation in percent, sampled at a fixed interval (the
//! PlanetLab traces: 288 lines, every 5 minutes over 24 hours). Files are
//! taken in byte order of their names, so "VM i" is the same VM on every
//! machine (CloudSim took them in whatever order the file system listed
//! them). A malformed file is rejected with its name and line.

use std::path::{Path, PathBuf};

/// Why a trace cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("reading trace directory {dir}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading trace file {file}")]
    ReadFile {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trace directory {0} holds no trace files")]
    Empty(PathBuf),
    #[error("{file}:{line}: {reason} (found {text:?})")]
    Malformed { file: PathBuf, line: usize, text: String, reason: &'static str },
    #[error("{file}: {got} samples, but {first} has {expected}: every VM of a trace must cover the same time")]
    Length { file: PathBuf, got: usize, first: PathBuf, expected: usize },
    #[error("{file}: only {got} samples, at least 2 are needed")]
    TooShort { file: PathBuf, got: usize },
}

/// A loaded trace: utilisation in percent per VM per sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Where it came from (for reports).
    pub source: String,
    /// File names, in VM order.
    pub names: Vec<String>,
    /// `samples[vm][t]`, percent 0..=100.
    pub samples: Vec<Vec<u8>>,
}

impl Trace {
    pub fn vms(&self) -> usize {
        self.samples.len()
    }

    /// Samples per VM.
    pub fn len(&self) -> usize {
        self.samples.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Parse one trace file's text.
pub fn parse_file(file: &Path, text: &str) -> Result<Vec<u8>, TraceError> {
    let mut out = Vec::with_capacity(288);
    let mut lines = text.lines().enumerate().peekable();
    while let Some((i, raw)) = lines.next() {
        let line = raw.trim();
        if line.is_empty() {
            // Trailing blank lines are harmless; a hole in the series is not.
            if lines.clone().all(|(_, rest)| rest.trim().is_empty()) {
                break;
            }
            return Err(TraceError::Malformed {
                file: file.to_owned(),
                line: i + 1,
                text: raw.to_owned(),
                reason: "empty line inside the series",
            });
        }
        let value: u32 = line.parse().map_err(|_| TraceError::Malformed {
            file: file.to_owned(),
            line: i + 1,
            text: raw.to_owned(),
            reason: "not a whole number of percent",
        })?;
        if value > 100 {
            return Err(TraceError::Malformed {
                file: file.to_owned(),
                line: i + 1,
                text: raw.to_owned(),
                reason: "utilisation above 100 %",
            });
        }
        out.push(value as u8);
    }
    if out.len() < 2 {
        return Err(TraceError::TooShort { file: file.to_owned(), got: out.len() });
    }
    Ok(out)
}

/// Load every file of `dir` (not recursing) as one VM.
pub fn load_dir(dir: &Path) -> Result<Trace, TraceError> {
    let rd = std::fs::read_dir(dir).map_err(|source| TraceError::ReadDir { dir: dir.to_owned(), source })?;
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| TraceError::ReadDir { dir: dir.to_owned(), source })?;
        let path = entry.path();
        let is_file =
            entry.file_type().map_err(|source| TraceError::ReadFile { file: path.clone(), source })?.is_file();
        if is_file {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(TraceError::Empty(dir.to_owned()));
    }
    let mut names = Vec::with_capacity(files.len());
    let mut samples: Vec<Vec<u8>> = Vec::with_capacity(files.len());
    for file in &files {
        let text =
            std::fs::read_to_string(file).map_err(|source| TraceError::ReadFile { file: file.clone(), source })?;
        let s = parse_file(file, &text)?;
        if let Some(first) = samples.first()
            && s.len() != first.len()
        {
            return Err(TraceError::Length {
                file: file.clone(),
                got: s.len(),
                first: files[0].clone(),
                expected: first.len(),
            });
        }
        names.push(file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        samples.push(s);
    }
    Ok(Trace { source: dir.display().to_string(), names, samples })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_tolerates_trailing_blank_lines() {
        let p = Path::new("vm a");
        assert_eq!(parse_file(p, "1\n2\n99\n\n\n").expect("valid"), vec![1, 2, 99]);
    }

    #[test]
    fn rejects_malformed_lines_with_file_and_line() {
        let p = Path::new("some vm");
        let err = parse_file(p, "1\n2\nx3\n4\n").expect_err("x3 is no number");
        assert_eq!(err.to_string(), "some vm:3: not a whole number of percent (found \"x3\")");
        let err = parse_file(p, "1\n\n4\n").expect_err("hole");
        assert!(err.to_string().starts_with("some vm:2: empty line inside the series"), "{err}");
        let err = parse_file(p, "1\n101\n").expect_err("above 100");
        assert!(err.to_string().starts_with("some vm:2: utilisation above 100 %"), "{err}");
        assert!(matches!(parse_file(p, "5\n"), Err(TraceError::TooShort { got: 1, .. })));
    }

    #[test]
    fn loads_a_directory_in_name_order_and_checks_lengths() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("b vm"), "3\n4\n").expect("write");
        std::fs::write(dir.path().join("a vm"), "1\n2\n").expect("write");
        let t = load_dir(dir.path()).expect("valid trace");
        assert_eq!(t.names, vec!["a vm", "b vm"]);
        assert_eq!(t.samples, vec![vec![1, 2], vec![3, 4]]);
        std::fs::write(dir.path().join("c vm"), "3\n4\n5\n").expect("write");
        let err = load_dir(dir.path()).expect_err("length mismatch");
        assert!(err.to_string().contains("c vm: 3 samples"), "{err}");
        let empty = tempfile::tempdir().expect("temp dir");
        assert!(matches!(load_dir(empty.path()), Err(TraceError::Empty(_))));
    }
}
