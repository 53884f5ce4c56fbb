//! The error a bad config file produces: every issue found, each with the
//! file, line, column and key path, so that `check-config` and a failed start
//! can name exactly what to fix.

use std::fmt;
use std::path::PathBuf;

/// Everything wrong with one config file. Displayed as one line per issue:
/// `{file}:{line}:{col}: {key_path}: {message}` (line, column and key path are
/// left out when unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file, as the caller named it.
    pub file: PathBuf,
    /// All issues found, ordered by position in the file; issues without a
    /// position come last. Never empty.
    pub issues: Vec<ConfigIssue>,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// 1-based line of the offending value (or of its table when the key is
    /// missing); `None` when the issue has no place in the file.
    pub line: Option<usize>,
    /// 1-based column, in characters.
    pub column: Option<usize>,
    /// Dotted key path such as `sinks.https[0].url`; empty when unknown
    /// (e.g. a file that cannot be read).
    pub key_path: String,
    /// What is wrong, lowercase, without the key path.
    pub message: String,
}

impl ConfigError {
    /// An error with a single issue that has no position (e.g. an unreadable file).
    pub(crate) fn single(file: PathBuf, key_path: &str, message: String) -> ConfigError {
        ConfigError {
            file,
            issues: vec![ConfigIssue {
                line: None,
                column: None,
                key_path: key_path.to_owned(),
                message,
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}", self.file.display())?;
            if let Some(line) = issue.line {
                write!(f, ":{line}")?;
                if let Some(column) = issue.column {
                    write!(f, ":{column}")?;
                }
            }
            if !issue.key_path.is_empty() {
                write!(f, ": {}", issue.key_path)?;
            }
            write!(f, ": {}", issue.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(line: Option<usize>, column: Option<usize>, key_path: &str) -> ConfigIssue {
        ConfigIssue {
            line,
            column,
            key_path: key_path.to_owned(),
            message: "something is wrong".to_owned(),
        }
    }

    #[test]
    fn display_writes_one_line_per_issue_and_omits_unknown_parts() {
        let err = ConfigError {
            file: PathBuf::from("plantrelay.toml"),
            issues: vec![
                issue(Some(3), Some(7), "journal.max_size"),
                issue(None, None, "sinks"),
                issue(Some(1), None, ""),
            ],
        };
        assert_eq!(
            err.to_string(),
            "plantrelay.toml:3:7: journal.max_size: something is wrong\n\
             plantrelay.toml: sinks: something is wrong\n\
             plantrelay.toml:1: something is wrong"
        );
    }
}
