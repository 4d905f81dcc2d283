//! The error type of `hami-sim`.

/// Errors reading a trace or writing results. Every variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written (the cause follows in the error chain).
    #[error("{path}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The CSV layer failed (malformed quoting, wrong field count, a non-numeric value).
    #[error("{file}, line {line}: {message}")]
    Csv {
        /// File name.
        file: String,
        /// 1-based line number (0 when the CSV layer could not tell).
        line: u64,
        /// What is wrong, naming the column where known.
        message: String,
    },
    /// A row parsed but a value is invalid.
    #[error("{file}, line {line}, field {field}: {reason}")]
    Row {
        /// File name.
        file: String,
        /// 1-based line number.
        line: u64,
        /// Column name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The file holds no usable rows.
    #[error("{file}: no {what} in the file")]
    Empty {
        /// File name.
        file: String,
        /// What was expected.
        what: &'static str,
    },
    /// A trace name that is neither a known file in the data folder nor a path.
    #[error(
        "trace {name:?}: no file {tried} (give --data DIR holding openb_pod_list_<name>.csv, or a path to a pod-list CSV)"
    )]
    UnknownTrace {
        /// The name given.
        name: String,
        /// The path tried.
        tried: String,
    },
    /// A policy name the placement core does not know.
    #[error(transparent)]
    Policy(#[from] hami_policy::Error),
    /// Plotting failed.
    #[error("plot {path}: {message}")]
    Plot {
        /// Output path.
        path: String,
        /// Cause.
        message: String,
    },
}

impl Error {
    pub(crate) fn csv(file: &str, source: &csv::Error, headers: Option<&csv::StringRecord>) -> Self {
        let line = source.position().map_or(0, csv::Position::line);
        let message = match source.kind() {
            csv::ErrorKind::Deserialize { err, .. } => {
                let column = err
                    .field()
                    .and_then(|i| headers.and_then(|h| h.get(usize::try_from(i).unwrap_or(usize::MAX))))
                    .unwrap_or("?");
                format!("field {column}: {}", err.kind())
            }
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => {
                format!("{len} fields, the header has {expected_len}")
            }
            _ => source.to_string(),
        };
        Self::Csv {
            file: file.to_owned(),
            line,
            message,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
