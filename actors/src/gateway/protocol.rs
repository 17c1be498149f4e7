//! The gateway wire protocol: re-exported from the `warden-protocol` crate, which holds
//! the frames, the pure handshake check, principals and approval grants with no actor or
//! network code, so a fuzz target builds in about a minute.

pub use warden_protocol::*;
