//! A bridge for the few synchronous places that read or write the store (progress
//! callbacks, the forwarder's resync closure, bookkeeping helpers called under locks).

use std::future::Future;

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs a store future to completion from synchronous code: on a multi-threaded runtime
/// the worker hands its other tasks off while it waits (`block_in_place`); elsewhere (a
/// single-threaded test runtime, whose store is SQLite and never suspends) it is polled
/// in place.
pub(crate) trait Wait: Future + Sized {
    fn wait(self) -> Self::Output {
        match Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| handle.block_on(self))
            }
            _ => futures::executor::block_on(self),
        }
    }
}

impl<F: Future> Wait for F {}
