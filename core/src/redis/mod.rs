//! Redis as data: the commands the filter sends and the replies it reads. Transports (webdis
//! over `dispatch_http_call` today) only move these bytes.

pub mod functions;
pub mod resp;
pub mod webdis;

/// One Redis command, as its arguments (`EVAL`, script, numkeys, keys..., args...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisCommand {
    pub args: Vec<Vec<u8>>,
}

impl RedisCommand {
    pub fn new(name: &str) -> Self {
        Self {
            args: vec![name.as_bytes().to_vec()],
        }
    }

    pub fn arg(mut self, arg: impl AsRef<[u8]>) -> Self {
        self.args.push(arg.as_ref().to_vec());
        self
    }
}

/// A Redis reply, whatever transport carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisReply {
    Nil,
    Int(i64),
    Bulk(Vec<u8>),
    Status(String),
    Array(Vec<RedisReply>),
    /// Redis answered with an error (`ERR ...`, `NOSCRIPT ...`, `OOM ...`).
    Error(String),
}

/// Why no usable reply arrived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The command certainly did not run (no connection, webdis refused it, Redis down).
    #[error("redis unreachable: {0}")]
    NotSent(String),
    /// No answer in time: the command may or may not have run.
    #[error("redis call timed out or was cut off: {0}")]
    Unknown(String),
    /// An answer that is not what the script returns.
    #[error("unexpected redis reply: {0}")]
    BadReply(String),
}

impl RedisReply {
    /// Integers of an array reply (what both scripts return).
    pub fn into_ints(self) -> Result<Vec<i64>, TransportError> {
        match self {
            RedisReply::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    RedisReply::Int(n) => Ok(n),
                    other => Err(TransportError::BadReply(format!(
                        "expected an integer, got {other:?}"
                    ))),
                })
                .collect(),
            RedisReply::Error(message) => Err(TransportError::NotSent(message)),
            other => Err(TransportError::BadReply(format!(
                "expected an array, got {other:?}"
            ))),
        }
    }
}
