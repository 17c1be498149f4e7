//! Integration tests: the gateway over real sockets.
