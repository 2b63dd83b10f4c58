//! Batch: micro-batching of records before inference.
//!
//! A batch closes when it holds `max_size` records or when its first record has waited
//! `max_wait`, whichever comes first: under load, batches are full and inference is efficient;
//! when traffic is light, no record waits longer than `max_wait`.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::Instant;

/// Collects items into batches by size and age.
#[derive(Debug)]
pub struct MicroBatcher<T> {
    max_size: usize,
    max_wait: Duration,
    pending: Vec<T>,
    /// When the open batch must close: its first item's arrival + `max_wait`.
    deadline: Option<Instant>,
}

impl<T> MicroBatcher<T> {
    pub fn new(max_size: usize, max_wait: Duration) -> MicroBatcher<T> {
        MicroBatcher {
            max_size: max_size.max(1),
            max_wait,
            pending: Vec::with_capacity(max_size.max(1)),
            deadline: None,
        }
    }

    /// Adds an item; returns the batch if it is now full.
    pub fn push(&mut self, item: T) -> Option<Vec<T>> {
        if self.pending.is_empty() {
            self.deadline = Some(Instant::now() + self.max_wait);
        }
        self.pending.push(item);
        (self.pending.len() >= self.max_size).then(|| self.take())
    }

    /// Closes the open batch (empty if none).
    pub fn take(&mut self) -> Vec<T> {
        self.deadline = None;
        std::mem::replace(&mut self.pending, Vec::with_capacity(self.max_size))
    }

    /// Waits for the next batch from `rx`: full, or aged `max_wait`, or the last items once the
    /// channel is closed. `None` when the channel is closed and nothing is left.
    ///
    /// What is already queued is taken without a timer: under load batches fill from the queue
    /// alone, and a timer (registering it wakes the runtime's driver) is armed only when the
    /// queue runs dry with a batch open.
    pub async fn next(&mut self, rx: &mut mpsc::Receiver<T>) -> Option<Vec<T>> {
        loop {
            loop {
                match rx.try_recv() {
                    Ok(item) => {
                        if let Some(full) = self.push(item) {
                            return Some(full);
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        return (!self.pending.is_empty()).then(|| self.take())
                    }
                }
            }
            let item = match self.deadline {
                Some(deadline) => tokio::select! {
                    item = rx.recv() => item,
                    _ = tokio::time::sleep_until(deadline) => return Some(self.take()),
                },
                None => rx.recv().await,
            };
            match item {
                Some(item) => {
                    if let Some(full) = self.push(item) {
                        return Some(full);
                    }
                }
                None if self.pending.is_empty() => return None,
                None => return Some(self.take()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_closes_at_once() {
        let (tx, mut rx) = mpsc::channel(100);
        let mut b = MicroBatcher::new(4, Duration::from_secs(3600));
        for i in 0..10 {
            tx.send(i).await.unwrap();
        }
        assert_eq!(b.next(&mut rx).await, Some(vec![0, 1, 2, 3]));
        assert_eq!(b.next(&mut rx).await, Some(vec![4, 5, 6, 7]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_closes_after_max_wait_from_its_first_item() {
        let (tx, mut rx) = mpsc::channel(100);
        let mut b = MicroBatcher::new(100, Duration::from_millis(20));
        let start = Instant::now();
        tx.send(1).await.unwrap();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(15)).await;
            tx.send(2).await.unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
            tx.send(3).await.unwrap();
            tx
        });
        // Item 2 joins the open batch; item 3 arrives after its deadline and opens the next.
        assert_eq!(b.next(&mut rx).await, Some(vec![1, 2]));
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        let tx = sender.await.unwrap();
        assert_eq!(b.next(&mut rx).await, Some(vec![3]));
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        drop(tx);
        assert_eq!(b.next(&mut rx).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_the_channel_flushes_what_is_left() {
        let (tx, mut rx) = mpsc::channel(100);
        let mut b = MicroBatcher::new(100, Duration::from_secs(3600));
        tx.send(7).await.unwrap();
        tx.send(8).await.unwrap();
        drop(tx);
        assert_eq!(b.next(&mut rx).await, Some(vec![7, 8]));
        assert_eq!(b.next(&mut rx).await, None);
    }
}
