//! The plugin's allocator in WebAssembly: a free list per size class for
//! small blocks, in front of talc for everything else.
//!
//! A plugin allocates many small, short-lived blocks per event: the strings
//! and byte lists the host lowers into it, decoded JSON fields, keys,
//! encoded values. Taking such a block off a free list, or putting it back,
//! is a load and a store; a general-purpose allocator spends tens of
//! instructions on bins and headers, which showed as an eighth of a join's
//! time in WebAssembly.
//!
//! The price: small blocks, once freed, are kept for blocks of their class
//! and not returned to talc, so a plugin's memory is its peak use per class.
//!
//! WebAssembly without the atomics feature has one thread, which is what makes
//! the unsynchronized state sound.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;

/// Size classes are multiples of this, which is also their alignment.
const GRAIN: usize = 16;
/// Classes: blocks of 16, 32, … 512 bytes.
const CLASSES: usize = 32;
const LARGEST: usize = GRAIN * CLASSES;
/// Small blocks are carved from chunks of this size, taken from talc.
const CHUNK: usize = 64 << 10;

struct Classes {
    /// Per class, the first free block; each free block holds the next.
    free: [*mut u8; CLASSES],
    /// The unused rest of the current chunk.
    next: *mut u8,
    end: *mut u8,
}

/// Small blocks from free lists, the rest from `L`. Not thread-safe: the
/// global allocator is only declared where there is one thread.
pub struct SmallBlocks<L> {
    classes: UnsafeCell<Classes>,
    large: L,
}

/// The global allocator the export macros declare (feature `talc`).
#[cfg(all(feature = "talc", target_family = "wasm", not(target_feature = "atomics")))]
pub type PluginAllocator = SmallBlocks<talc::wasm::WasmDynamicTalc>;

// SAFETY: WebAssembly without atomics has one thread.
#[cfg(all(feature = "talc", target_family = "wasm", not(target_feature = "atomics")))]
unsafe impl Sync for PluginAllocator {}

#[cfg(all(feature = "talc", target_family = "wasm", not(target_feature = "atomics")))]
impl PluginAllocator {
    #[allow(
        clippy::new_without_default,
        reason = "a const fn for the #[global_allocator] static; Default is not const"
    )]
    pub const fn new() -> Self {
        SmallBlocks::with_large(talc::wasm::new_wasm_dynamic_allocator())
    }
}

impl<L> SmallBlocks<L> {
    pub const fn with_large(large: L) -> Self {
        SmallBlocks {
            classes: UnsafeCell::new(Classes {
                free: [ptr::null_mut(); CLASSES],
                next: ptr::null_mut(),
                end: ptr::null_mut(),
            }),
            large,
        }
    }
}

/// The size class of `layout`, if it is small.
fn class_of(size: usize, align: usize) -> Option<usize> {
    (size <= LARGEST && align <= GRAIN).then(|| size.max(1).div_ceil(GRAIN) - 1)
}

unsafe impl<L: GlobalAlloc> GlobalAlloc for SmallBlocks<L> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout.size(), layout.align()) else {
            return unsafe { self.large.alloc(layout) };
        };
        // SAFETY: one thread, and no call below re-enters this allocator's state.
        let c = unsafe { &mut *self.classes.get() };
        let head = c.free[class];
        if !head.is_null() {
            c.free[class] = unsafe { head.cast::<*mut u8>().read() };
            return head;
        }
        let block = (class + 1) * GRAIN;
        if (c.end as usize) - (c.next as usize) < block {
            // The chunk's remainder (under 512 bytes) is left unused.
            let chunk = unsafe { self.large.alloc(Layout::from_size_align_unchecked(CHUNK, GRAIN)) };
            if chunk.is_null() {
                return chunk;
            }
            c.next = chunk;
            c.end = unsafe { chunk.add(CHUNK) };
        }
        let p = c.next;
        c.next = unsafe { p.add(block) };
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let Some(class) = class_of(layout.size(), layout.align()) else {
            return unsafe { self.large.dealloc(p, layout) };
        };
        let c = unsafe { &mut *self.classes.get() };
        unsafe { p.cast::<*mut u8>().write(c.free[class]) };
        c.free[class] = p;
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (from, to) = (class_of(layout.size(), layout.align()), class_of(new_size, layout.align()));
        match (from, to) {
            (Some(a), Some(b)) if a == b => p,
            (None, None) => unsafe { self.large.realloc(p, layout, new_size) },
            _ => {
                let new = unsafe { self.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
                if !new.is_null() {
                    unsafe {
                        ptr::copy_nonoverlapping(p, new, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(p: *mut u8, size: usize, seed: u8) {
        (0..size).for_each(|i| unsafe { p.add(i).write(seed.wrapping_add(i as u8)) });
    }

    fn holds(p: *const u8, size: usize, seed: u8) -> bool {
        (0..size).all(|i| unsafe { p.add(i).read() } == seed.wrapping_add(i as u8))
    }

    #[test]
    fn blocks_are_aligned_disjoint_and_reused_per_class() {
        let a = SmallBlocks::with_large(std::alloc::System);
        let mut live = Vec::new();
        for (i, size) in (1..=700).step_by(7).enumerate() {
            for align in [1, 2, 8, 16, 32] {
                let layout = Layout::from_size_align(size, align).unwrap();
                let p = unsafe { a.alloc(layout) };
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "size {size} align {align}");
                fill(p, size, i as u8);
                live.push((p, layout, i as u8));
            }
        }
        for &(p, layout, seed) in &live {
            assert!(holds(p, layout.size(), seed), "a block was overwritten by another");
        }
        // A freed small block is the next one handed out in its class.
        let (p, layout, _) = live[10];
        unsafe { a.dealloc(p, layout) };
        let again = unsafe { a.alloc(Layout::from_size_align(layout.size().div_ceil(GRAIN) * GRAIN, 1).unwrap()) };
        assert_eq!(again, p);
        live[10].0 = again;
        fill(again, layout.size(), live[10].2);
        for (p, layout, _) in live {
            unsafe { a.dealloc(p, layout) };
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_classes_and_to_talc_and_back() {
        let a = SmallBlocks::with_large(std::alloc::System);
        let layout = Layout::from_size_align(10, 8).unwrap();
        let mut p = unsafe { a.alloc(layout) };
        fill(p, 10, 3);
        let mut size = 10;
        for new_size in [12, 16, 17, 300, 512, 513, 4096, 600, 40, 5] {
            let q = unsafe { a.realloc(p, Layout::from_size_align(size, 8).unwrap(), new_size) };
            assert!(!q.is_null());
            assert!(holds(q, size.min(new_size).min(10), 3), "{size} -> {new_size}");
            if class_of(size, 8).is_some() && class_of(size, 8) == class_of(new_size, 8) {
                assert_eq!(q, p, "within a class the block stays");
            }
            (p, size) = (q, new_size);
        }
        unsafe { a.dealloc(p, Layout::from_size_align(size, 8).unwrap()) };
    }

    #[test]
    fn many_small_blocks_span_chunks() {
        let a = SmallBlocks::with_large(std::alloc::System);
        let layout = Layout::from_size_align(500, 8).unwrap();
        let blocks: Vec<*mut u8> = (0..1000).map(|_| unsafe { a.alloc(layout) }).collect();
        for (i, &p) in blocks.iter().enumerate() {
            fill(p, 500, i as u8);
        }
        for (i, &p) in blocks.iter().enumerate() {
            assert!(holds(p, 500, i as u8));
        }
        let mut sorted = blocks.clone();
        sorted.sort();
        assert!(sorted.windows(2).all(|w| w[1] as usize - w[0] as usize >= 512), "blocks do not overlap");
        blocks.into_iter().for_each(|p| unsafe { a.dealloc(p, layout) });
    }
}
