//! Kernel tests on the paused clock.
