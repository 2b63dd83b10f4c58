//! Window: the last `T` rows of one entity, for sequence models.
//!
//! A [`Ring`] is a fixed buffer of `T × F` values written in place; [`Ring::push`] copies the
//! window out in time order once it is full, so the batch holds one contiguous `[T, F]` sample
//! per scored record and nothing is reallocated per record.

/// A ring buffer of the last `window` rows of `features` values.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ring {
    buf: Box<[f32]>,
    features: usize,
    /// Index (in rows) of the slot the next row goes to.
    next: usize,
    /// Rows held, up to the window.
    filled: usize,
}

impl Ring {
    pub fn new(window: usize, features: usize) -> Ring {
        Ring {
            buf: vec![0.0; window * features].into_boxed_slice(),
            features,
            next: 0,
            filled: 0,
        }
    }

    /// Whether this ring holds rows of `features` values over `window` rows (a checkpointed
    /// ring is reused only if it does).
    pub fn fits(&self, window: usize, features: usize) -> bool {
        self.features == features && self.buf.len() == window * features && self.next < window
    }

    pub fn window(&self) -> usize {
        self.buf.len() / self.features
    }

    /// Appends one row. When the window is full, appends the whole window, oldest row first,
    /// to `out` and returns true; otherwise returns false (the entity is still warming up).
    pub fn push(&mut self, row: &[f32], out: &mut Vec<f32>) -> bool {
        debug_assert_eq!(row.len(), self.features);
        let window = self.window();
        let f = self.features;
        self.buf[self.next * f..(self.next + 1) * f].copy_from_slice(row);
        self.next = (self.next + 1) % window;
        self.filled = (self.filled + 1).min(window);
        if self.filled < window {
            return false;
        }
        // `next` now points at the oldest row.
        out.extend_from_slice(&self.buf[self.next * f..]);
        out.extend_from_slice(&self.buf[..self.next * f]);
        true
    }

    /// Bytes held by this ring (for the memory-per-key figure).
    pub fn heap_bytes(&self) -> usize {
        self.buf.len() * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_emits_windows_in_time_order() {
        let mut ring = Ring::new(3, 2);
        let mut out = Vec::new();
        assert!(!ring.push(&[1.0, 10.0], &mut out));
        assert!(!ring.push(&[2.0, 20.0], &mut out));
        assert!(out.is_empty());
        assert!(ring.push(&[3.0, 30.0], &mut out));
        assert_eq!(out, [1.0, 10.0, 2.0, 20.0, 3.0, 30.0]);
        out.clear();
        assert!(ring.push(&[4.0, 40.0], &mut out));
        assert_eq!(out, [2.0, 20.0, 3.0, 30.0, 4.0, 40.0]);
        out.clear();
        for i in 5..=9 {
            assert!(ring.push(&[i as f32, 0.0], &mut out));
        }
        // The last push emitted rows 7, 8, 9.
        assert_eq!(&out[out.len() - 6..], [7.0, 0.0, 8.0, 0.0, 9.0, 0.0]);
    }

    #[test]
    fn a_window_of_one_emits_every_row() {
        let mut ring = Ring::new(1, 3);
        let mut out = Vec::new();
        assert!(ring.push(&[1.0, 2.0, 3.0], &mut out));
        assert!(ring.push(&[4.0, 5.0, 6.0], &mut out));
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }
}
