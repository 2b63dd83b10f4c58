//! Batch: micro-batching of records before inference.
//!
//! A batch closes when it holds `max_size` records or when its first record has waited
//! `max_wait`, whichever comes first: under load, batches are full and inference is efficient;
//! when traffic is light, no record waits longer than `max_wait`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
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

    /// When the open batch must close, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// `[pipelines.P.batch]`: how records are batched for inference.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BatchConfig {
    /// Most samples per inference call.
    #[serde(default = "default_batch_size")]
    pub max_size: usize,
    /// Longest a record waits for its batch to fill. Under load batches fill long before it
    /// (256 records at 73k records/s take 3.5 ms), so it only matters when traffic is light,
    /// where it is the latency batching adds: 20 ms gave p99 record-to-alert 48-54 ms at
    /// 1k records/s on tansu, 5 ms gave 36 ms (docs/BENCHMARKS.md).
    #[serde(default = "default_batch_wait", with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_size: default_batch_size(),
            max_wait: default_batch_wait(),
        }
    }
}

fn default_batch_size() -> usize {
    256
}
fn default_batch_wait() -> Duration {
    Duration::from_millis(5)
}

/// The largest batch: larger ones would not infer faster, only hold more memory.
pub const MAX_BATCH: usize = 65_536;

impl BatchConfig {
    /// What is wrong with these settings, each as `field: reason`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(1..=MAX_BATCH).contains(&self.max_size) {
            out.push(format!("max_size: must be between 1 and {MAX_BATCH}"));
        }
        out.extend(crate::time::duration_problem(
            "max_wait",
            self.max_wait,
            Duration::ZERO,
        ));
        out
    }

    /// The batcher these settings describe.
    pub fn build<T>(&self) -> MicroBatcher<T> {
        MicroBatcher::new(self.max_size, self.max_wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_batch_closes_at_once() {
        let mut b = MicroBatcher::new(4, Duration::from_secs(3600));
        let full: Vec<_> = (0..10).filter_map(|i| b.push(i)).collect();
        assert_eq!(full, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(b.take(), vec![8, 9]);
        assert_eq!(b.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_must_close_max_wait_after_its_first_item() {
        let mut b = MicroBatcher::new(100, Duration::from_millis(20));
        assert_eq!(b.deadline(), None);
        let start = Instant::now();
        assert_eq!(b.push(1), None);
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert_eq!(b.push(2), None);
        // The second item joins the open batch without moving its deadline.
        assert_eq!(b.deadline(), Some(start + Duration::from_millis(20)));
        assert_eq!(b.take(), vec![1, 2]);
        assert_eq!(b.deadline(), None);
        assert_eq!(b.push(3), None);
        assert_eq!(
            b.deadline(),
            Some(Instant::now() + Duration::from_millis(20))
        );
    }
}
