//! Integration tests: warden call and the gateway client.
