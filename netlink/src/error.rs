use std::io;

use super::op::Op;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a NETLINK_ROUTE socket: {0}")]
    Connect(#[source] io::Error),

    #[error("a real netlink handle needs a running tokio runtime to drive its socket")]
    NoRuntime,

    #[error("netlink connection closed while {what}")]
    Closed { what: String },

    /// The kernel refused one change; `op` says what was attempted.
    #[error("{op}: {source}")]
    Op {
        op: Box<Op>,
        #[source]
        source: io::Error,
    },

    #[error("{what}: {source}")]
    Query {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("{what}: unexpected netlink reply: {detail}")]
    Unexpected { what: String, detail: String },

    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),

    #[error("no link with index {ifindex}")]
    NoSuchLink { ifindex: u32 },
}

impl NetlinkError {
    /// The kernel's errno, when the failure came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Op { source, .. } | NetlinkError::Query { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    #[cfg(any(test, feature = "fake"))]
    pub(crate) fn op(op: &Op, errno: i32) -> NetlinkError {
        NetlinkError::Op {
            op: Box::new(op.clone()),
            source: io::Error::from_raw_os_error(errno),
        }
    }
}
