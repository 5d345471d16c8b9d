//! The hot path does not allocate once warmed up: push and pop reuse the
//! BTreeMap's nodes and the arrival queue's buffer. A counting allocator
//! needs its own test binary, so this lives outside the module.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use cochlea::pipeline::jitter::{JitterBuffer, JitterConfig};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Runs `frames` frames of 20 ms, dropping every `drop_every`-th, and
/// returns the allocations made after the first 1000.
fn steady_state_allocations(config: JitterConfig, drop_every: u32, frames: u32) -> u64 {
    let start = Instant::now();
    let mut jb = JitterBuffer::new(config);
    let mut warm = 0;
    for seq in 0..frames {
        if seq == 1000 {
            warm = allocations();
        }
        let now = start + Duration::from_millis(20) * seq;
        if seq % drop_every != drop_every - 1 {
            jb.push(seq, u64::from(seq) * 960, 960, seq, now);
        }
        while jb.pop(now).is_some() {}
    }
    allocations() - warm
}

#[test]
fn in_order_push_pop_does_not_allocate() {
    let before = allocations();
    drop(std::hint::black_box(Box::new(1u64)));
    assert_eq!(allocations(), before + 1, "the counter counts");
    assert_eq!(
        steady_state_allocations(JitterConfig::new(48_000), u32::MAX, 20_000),
        0
    );
}

#[test]
fn held_holes_do_not_allocate() {
    let config = JitterConfig {
        adaptive: false,
        max_delay_ms: 60,
        ..JitterConfig::new(48_000)
    };
    assert_eq!(steady_state_allocations(config, 50, 20_000), 0);
    assert_eq!(
        steady_state_allocations(JitterConfig::new(48_000), 50, 20_000),
        0
    );
}
