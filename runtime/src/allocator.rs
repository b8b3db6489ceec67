//! Settings of the process allocator, mimalloc (the `refract` binary and the
//! benchmarks declare it as the global allocator).

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`; the same in its v2 and
/// v3): how long freed memory stays mapped before it is returned to the OS.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory for a second before returning it to the OS, instead
/// of mimalloc's default 10 ms.
///
/// Every batch frees its events, writes and documents — megabytes while a
/// projection catches up — and the next batch allocates as much again a few
/// milliseconds later. Returned at once, those pages were faulted back in and
/// zeroed, and each return interrupted the other cores to flush their TLBs:
/// that was ~15% of the projector thread while indexing, and a 1 s delay made
/// search indexing end to end ~16% faster (docs/benchmarks.md, Search). An
/// idle runtime still returns what it no longer uses, a second later.
pub fn configure() {
    // SAFETY: sets an option; mimalloc reads options atomically, at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
}
