//! Why a call to an engine failed.

/// Why an upstream call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The URL or a header could not be built.
    Request,
    /// Connecting, sending or reading failed, or the response was not HTTP/1.1 we can read.
    Transport,
    /// The request's deadline passed.
    Timeout,
    /// The body was not the JSON expected.
    Decode,
}

#[derive(Debug)]
pub struct Error {
    kind: Kind,
    message: String,
}

impl Error {
    pub(crate) fn new(kind: Kind, message: impl std::fmt::Display) -> Self {
        Self {
            kind,
            message: message.to_string(),
        }
    }

    pub(crate) fn transport(message: impl std::fmt::Display) -> Self {
        Self::new(Kind::Transport, message)
    }

    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
