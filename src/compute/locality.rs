//! Locality counters: which node's memory the weight bytes of every op ggml-cpu computes are
//! read from, and by which node's threads.
//!
//! - Ops numa-moe computes count exactly, from the plan: each chunk of rows a thread group
//!   computes is read from the node that holds it (its piece's node), by the group's node.
//!   Summed per thread and op, added once per op and thread.
//! - Ops left to ggml-cpu (weights numa-moe did not place, or ops it declined) count their
//!   weight bytes as "left to stock": the adapter sees every op ggml-cpu computes and reports
//!   those reading weights (MUL_MAT, MUL_MAT_ID: the routed experts only, GET_ROWS: the rows
//!   fetched) from thread 0.
//!
//! Decode is what "per token" means: ops over one token (one activation column per plane,
//! one routed token) are counted apart, and decoded tokens are the one-row lookups of the
//! token embeddings (one per one-token graph). Every op is also counted in the totals.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::weights::Category;

const CATS: usize = Category::ALL.len();

/// Bytes by category: read on the reader's own node, on another node, and by ops left to
/// ggml-cpu (node unknown: llama.cpp's first-touch placement).
struct Counters {
    local: [AtomicU64; CATS],
    remote: [AtomicU64; CATS],
    stock: [AtomicU64; CATS],
    tokens: AtomicU64,
}

impl Counters {
    const fn new() -> Self {
        Counters {
            local: [const { AtomicU64::new(0) }; CATS],
            remote: [const { AtomicU64::new(0) }; CATS],
            stock: [const { AtomicU64::new(0) }; CATS],
            tokens: AtomicU64::new(0),
        }
    }

    fn snapshot(&self) -> Snapshot {
        let load = |a: &[AtomicU64; CATS]| std::array::from_fn(|i| a[i].load(Ordering::Relaxed));
        Snapshot {
            local: load(&self.local),
            remote: load(&self.remote),
            stock: load(&self.stock),
            tokens: self.tokens.load(Ordering::Relaxed),
        }
    }

    fn reset(&self) {
        for a in [&self.local, &self.remote, &self.stock] {
            a.iter().for_each(|c| c.store(0, Ordering::Relaxed));
        }
        self.tokens.store(0, Ordering::Relaxed);
    }
}

static DECODE: Counters = Counters::new();
static ALL: Counters = Counters::new();
static ON: AtomicBool = AtomicBool::new(true);

/// Whether counting is on (NUMA_MOE_LOCALITY=0 turns it off; the cost is a few relaxed
/// atomic adds per op).
pub fn enabled() -> bool {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if std::env::var("NUMA_MOE_LOCALITY").is_ok_and(|v| v.trim() == "0") {
            ON.store(false, Ordering::Relaxed);
        }
    });
    ON.load(Ordering::Relaxed)
}

pub fn set_enabled(on: bool) {
    enabled();
    ON.store(on, Ordering::Relaxed);
}

/// What one thread read in one op it computed, added to the counters once.
#[derive(Default)]
pub struct Tally {
    local: u64,
    remote: u64,
}

impl Tally {
    /// `bytes` of weights held on `holder`, read by a thread working for `reader`.
    pub fn read(&mut self, reader: u32, holder: u32, bytes: u64) {
        if reader == holder {
            self.local += bytes;
        } else {
            self.remote += bytes;
        }
    }

    pub fn flush(&self, category: Category, decode: bool) {
        if self.local == 0 && self.remote == 0 {
            return;
        }
        let i = category.index();
        let add = |c: &Counters| {
            c.local[i].fetch_add(self.local, Ordering::Relaxed);
            c.remote[i].fetch_add(self.remote, Ordering::Relaxed);
        };
        if decode {
            add(&DECODE);
        }
        add(&ALL);
    }
}

/// Weight bytes an op left to ggml-cpu read.
pub fn record_stock(category: Category, bytes: u64, decode: bool) {
    let i = category.index();
    if decode {
        DECODE.stock[i].fetch_add(bytes, Ordering::Relaxed);
    }
    ALL.stock[i].fetch_add(bytes, Ordering::Relaxed);
}

/// Tokens embedded by one graph (`n`): one is a decoded token.
pub fn record_tokens(n: u64) {
    if n == 1 {
        DECODE.tokens.fetch_add(1, Ordering::Relaxed);
    }
    ALL.tokens.fetch_add(n, Ordering::Relaxed);
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub local: [u64; CATS],
    pub remote: [u64; CATS],
    pub stock: [u64; CATS],
    pub tokens: u64,
}

impl Snapshot {
    pub fn local_total(&self) -> u64 {
        self.local.iter().sum()
    }
    pub fn remote_total(&self) -> u64 {
        self.remote.iter().sum()
    }
    pub fn stock_total(&self) -> u64 {
        self.stock.iter().sum()
    }
    pub fn total(&self) -> u64 {
        self.local_total() + self.remote_total() + self.stock_total()
    }
}

/// (decode, every op).
pub fn snapshot() -> (Snapshot, Snapshot) {
    (DECODE.snapshot(), ALL.snapshot())
}

pub fn reset() {
    DECODE.reset();
    ALL.reset();
}

fn pct(x: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * x as f64 / of as f64
    }
}

/// The exit report's lines: per decoded token, the weight bytes and where they were read,
/// with the categories that were not all read on their own node; `None` before any weight
/// was read.
pub fn report_lines(decode: &Snapshot, all: &Snapshot) -> Vec<String> {
    let (s, per, what) = if decode.tokens > 0 && decode.total() > 0 {
        (decode, decode.tokens, "per decoded token")
    } else if all.total() > 0 {
        (all, 1, "over the run (no one-token graph seen)")
    } else {
        return Vec::new();
    };
    let total = s.total();
    let mut lines = vec![format!(
        "numa-moe: weights read {what}: {}, {:.1}% read on their own node, {:.1}% from another node, {:.1}% left to llama.cpp",
        crate::topology::format_gib(total / per),
        pct(s.local_total(), total),
        pct(s.remote_total(), total),
        pct(s.stock_total(), total)
    )];
    let mut parts = Vec::new();
    for c in Category::ALL {
        let i = c.index();
        let t = s.local[i] + s.remote[i] + s.stock[i];
        if t == 0 {
            continue;
        }
        parts.push(format!(
            "{} {} ({:.1}% local{})",
            c.name(),
            crate::topology::format_gib(t / per),
            pct(s.local[i], t),
            if s.stock[i] > 0 { format!(", {:.1}% left", pct(s.stock[i], t)) } else { String::new() }
        ));
    }
    lines.push(format!("numa-moe: by category: {}", parts.join(", ")));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_splits_bytes_by_where_they_were_read() {
        let mut d = Snapshot { tokens: 2, ..Default::default() };
        d.local[Category::RoutedExperts.index()] = 3 << 30;
        d.remote[Category::RoutedExperts.index()] = 1 << 30;
        d.stock[Category::Embeddings.index()] = 0;
        d.local[Category::Attention.index()] = 0;
        d.stock[Category::Attention.index()] = 4 << 30;
        let lines = report_lines(&d, &d);
        assert_eq!(lines[0], "numa-moe: weights read per decoded token: 4.0 GiB, 37.5% read on their own node, 12.5% from another node, 50.0% left to llama.cpp");
        assert_eq!(lines[1], "numa-moe: by category: routed experts 2.0 GiB (75.0% local), attention 2.0 GiB (0.0% local, 100.0% left)");
        assert!(report_lines(&Snapshot::default(), &Snapshot::default()).is_empty());
    }

    #[test]
    fn a_tally_counts_reads_on_the_readers_node_as_local() {
        let mut t = Tally::default();
        t.read(0, 0, 10);
        t.read(0, 1, 5);
        assert_eq!((t.local, t.remote), (10, 5));
    }
}
