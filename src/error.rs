//! How every component's errors are classified, so callers decide uniformly what to do with them.

/// Whose problem an error is: decides the exit code, the log level and who gets told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorClass {
    /// Bad input or configuration: the user must change something.
    User,
    /// A system we depend on failed (broker, SMTP server, disk, a missing library).
    External,
    /// A bug in bearwatch or its model files.
    Internal,
}

/// Implemented by each component's error enum.
pub trait Classified {
    fn class(&self) -> ErrorClass;
    /// Whether trying the same operation again can succeed.
    fn retryable(&self) -> bool;
}
