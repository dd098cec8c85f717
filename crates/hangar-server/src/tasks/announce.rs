//! Telling a caller which task does its work, before the work ends: `POST /v1/requests`
//! with `Prefer: respond-async` answers 202 with the creation task as soon as it exists.
//!
//! [`with_announcement`] runs a future with a one-shot channel in a task-local slot; the
//! request path calls [`announce`] where it begins the task that makes the caller's VM
//! (`Manager::start_create` for `create_vm`, the `install` task). Code running without
//! the slot (every other caller) announces nothing.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

tokio::task_local! {
    static ANNOUNCED: Arc<Mutex<Option<oneshot::Sender<String>>>>;
}

/// Runs `work` so that the first [`announce`] inside it (on this tokio task) sends its
/// task id to the receiver returned. The receiver errs when `work` ends without one.
pub fn with_announcement<F: Future>(
    work: F,
) -> (oneshot::Receiver<String>, impl Future<Output = F::Output>) {
    let (sender, receiver) = oneshot::channel();
    let slot = Arc::new(Mutex::new(Some(sender)));
    let holder = slot.clone();
    let work = ANNOUNCED.scope(slot, async move {
        let output = work.await;
        // Ending without an announcement closes the channel now, not when dropped.
        holder.lock().expect("announcement slot").take();
        output
    });
    (receiver, work)
}

/// Tells the caller of [`with_announcement`], if any, that task `id` does its work.
pub fn announce(id: &str) {
    let _ = ANNOUNCED.try_with(|slot| {
        if let Some(sender) = slot.lock().expect("announcement slot").take() {
            let _ = sender.send(id.to_owned());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_announcement_reaches_the_caller_and_none_closes_the_channel() {
        let (receiver, work) = with_announcement(async {
            announce("task-1");
            announce("task-2");
            7
        });
        assert_eq!(work.await, 7);
        assert_eq!(receiver.await.unwrap(), "task-1");

        let (receiver, work) = with_announcement(async { 8 });
        assert_eq!(work.await, 8);
        assert!(receiver.await.is_err());
        // Outside any scope: nothing happens.
        announce("task-3");
    }
}
