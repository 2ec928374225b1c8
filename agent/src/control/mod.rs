//! The control socket: the protocol (typed requests and results, shared with rlctl), who
//! may do what, the transport, and one handler per request.

pub mod access;
pub mod handlers;
pub mod protocol;
pub mod server;
pub mod webhook;
