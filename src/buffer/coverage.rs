//! Which bytes of a tensor have been written through the buffer interface: a set of
//! disjoint, sorted byte ranges. Replicas are refreshed from the primary exactly where it
//! has none (bytes ggml wrote directly into tensor data), so coverage, not a byte count,
//! decides what is current: writing the same half twice covers half.

use std::ops::Range;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    ranges: Vec<Range<u64>>,
}

impl Coverage {
    /// Adds `r`, merging it with the ranges it touches or overlaps.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        // the first range that ends at or after r.start, the first that starts after r.end
        let lo = self.ranges.partition_point(|x| x.end < r.start);
        let hi = self.ranges.partition_point(|x| x.start <= r.end);
        let mut merged = r;
        if lo < hi {
            merged.start = merged.start.min(self.ranges[lo].start);
            merged.end = merged.end.max(self.ranges[hi - 1].end);
        }
        self.ranges.splice(lo..hi, std::iter::once(merged));
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether every byte of `r` is covered.
    pub fn covers(&self, r: &Range<u64>) -> bool {
        r.is_empty() || self.gaps(r.clone()).is_empty()
    }

    /// The parts of `within` not covered, in order.
    pub fn gaps(&self, within: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut at = within.start;
        for r in &self.ranges {
            if r.end <= at {
                continue;
            }
            if r.start >= within.end {
                break;
            }
            if r.start > at {
                out.push(at..r.start.min(within.end));
            }
            at = at.max(r.end);
            if at >= within.end {
                break;
            }
        }
        if at < within.end {
            out.push(at..within.end);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bytes_written_twice_cover_them_once() {
        let mut c = Coverage::default();
        c.insert(0..50);
        c.insert(0..50);
        assert_eq!(c.len(), 50);
        assert!(!c.covers(&(0..100)));
        assert_eq!(c.gaps(0..100), vec![50..100]);
    }

    #[test]
    fn ranges_merge_and_gaps_are_exact() {
        let mut c = Coverage::default();
        c.insert(10..20);
        c.insert(30..40);
        c.insert(20..25); // touches 10..20
        assert_eq!(c.ranges, vec![10..25, 30..40]);
        assert_eq!(c.gaps(0..50), vec![0..10, 25..30, 40..50]);
        assert_eq!(c.gaps(12..35), vec![25..30]);
        c.insert(5..45);
        assert_eq!(c.ranges, vec![5..45]);
        assert!(c.covers(&(5..45)) && !c.covers(&(4..45)));
        c.insert(50..50);
        assert_eq!(c.len(), 40);
    }

    #[test]
    fn coverage_matches_a_bitmap_on_random_writes() {
        // a small deterministic generator: no dependency, same writes every run
        let mut x = 0x2545f4914f6cdd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let mut c = Coverage::default();
            let mut bits = [false; 256];
            for _ in 0..(next() % 12) {
                let a = next() % 256;
                let b = (a + next() % 64).min(256);
                c.insert(a..b);
                bits[a as usize..b as usize].iter_mut().for_each(|v| *v = true);
            }
            assert_eq!(c.len(), bits.iter().filter(|&&b| b).count() as u64);
            let gap_bytes: u64 = c.gaps(0..256).iter().map(|r| r.end - r.start).sum();
            assert_eq!(gap_bytes, 256 - c.len());
            for g in c.gaps(0..256) {
                assert!(bits[g.start as usize..g.end as usize].iter().all(|&b| !b));
            }
        }
    }
}
