//! The library's error type. The cases a program may want to handle have their own
//! variants; everything else is a message naming the file or option and what is wrong
//! with it, with its context ("RUN/config.json: not valid: ...").

use crate::checkpoint::CheckpointError;
use crate::onnx_format::OnnxError;
use std::path::PathBuf;

/// What went wrong in a library call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A checkpoint file is unreadable, unsafe or malformed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// An `.onnx` file is unreadable or not a model.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// Registered weights could not be found, downloaded or verified.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// A new run was asked for in a folder that holds one.
    #[error(transparent)]
    RunExists(#[from] RunExists),
    /// The job was cancelled; its last finished epoch is saved.
    #[error(transparent)]
    Interrupted(#[from] Interrupted),
    /// Anything else, with its context.
    #[error("{0:#}")]
    Other(anyhow::Error),
}

/// The run was cancelled (Ctrl-C) and stopped after saving its last finished epoch.
#[derive(Debug, thiserror::Error)]
#[error("interrupted; resume with --resume {0}")]
pub struct Interrupted(pub String);

/// A new run was asked for in a folder that already holds one.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0}: already holds a run; continue it with --resume {0}, or pass --overwrite to remove it and start over"
)]
pub struct RunExists(pub String);

/// Why weights could not be had.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A file's digest is not the registered one.
    #[error("{}: SHA-256 {actual} does not match the registered {expected}{advice}", file.display())]
    Mismatch {
        /// The file.
        file: PathBuf,
        /// The registered digest (or its prefix).
        expected: String,
        /// The file's digest.
        actual: String,
        /// What to do about it.
        advice: &'static str,
    },
    /// Offline mode, and the file is in neither cache.
    #[error(
        "{name}: RETRAIN_OFFLINE is set and {file} is not cached; download {url} and put it in {}",
        dir.display()
    )]
    Offline {
        /// The weights' name.
        name: String,
        /// Their file name.
        file: String,
        /// Where they are published.
        url: String,
        /// retrain's checkpoint cache.
        dir: PathBuf,
    },
    /// A name that cannot be registered weights or a Hub repository.
    #[error("{0}: not a Hugging Face repository id (hf-hub:ORG/NAME)")]
    BadName(String),
    /// The download failed.
    #[error("{url}: download failed: {message}")]
    Download {
        /// What was being fetched.
        url: String,
        /// Why it failed.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A library call's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<anyhow::Error> for Error {
    /// The typed variant when the error is exactly one of them (no context added, which
    /// would be lost), else [`Error::Other`].
    fn from(e: anyhow::Error) -> Self {
        if e.chain().count() > 1 {
            return Error::Other(e);
        }
        let e = match e.downcast::<CheckpointError>() {
            Ok(e) => return Error::Checkpoint(e),
            Err(e) => e,
        };
        let e = match e.downcast::<OnnxError>() {
            Ok(e) => return Error::Onnx(e),
            Err(e) => e,
        };
        let e = match e.downcast::<HubError>() {
            Ok(e) => return Error::Hub(e),
            Err(e) => e,
        };
        let e = match e.downcast::<RunExists>() {
            Ok(e) => return Error::RunExists(e),
            Err(e) => e,
        };
        match e.downcast::<Interrupted>() {
            Ok(e) => Error::Interrupted(e),
            Err(e) => Error::Other(e),
        }
    }
}

/// `anyhow::bail!` for functions returning either [`Result`] or `anyhow::Result`.
macro_rules! bail {
    ($($message:tt)*) => {
        return Err(anyhow::anyhow!($($message)*).into())
    };
}
pub(crate) use bail;
