//! The control socket: protocol types (shared with rlctl), authorisation, the server.

pub mod auth;
pub mod protocol;
pub mod server;
