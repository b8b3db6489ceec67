//! The wasmtime engine all plugins share, and the clock behind batch deadlines.

use std::time::Duration;

use wasmtime::{Config, Engine, OptLevel};

/// How often the epoch advances; batch deadlines are whole multiples of it.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The engine: component model on, epoch interruption for deadlines, a bounded
/// wasm stack so deep recursion traps instead of overflowing the host, and
/// linear memories that stay where they were reserved.
pub fn new_engine() -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .cranelift_opt_level(OptLevel::Speed)
        .max_wasm_stack(1 << 20)
        .parallel_compilation(true)
        // A 32-bit memory fits in wasmtime's default 4 GiB reservation on
        // 64-bit hosts, so it never has to move: say so, and compiled code
        // keeps the memory's base in a register instead of reloading it
        // (the map enricher ran 0.85 → 0.97 of native with this).
        .memory_may_move(false);
    // `REFRACT_WASM_PROFILER=perfmap`: name plugin functions in `perf` profiles.
    if std::env::var("REFRACT_WASM_PROFILER").as_deref() == Ok("perfmap") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&config)?;
    start_epoch_ticker(&engine);
    Ok(engine)
}

/// Advance `engine`'s epoch every [`EPOCH_TICK`] for as long as it exists.
fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("refract-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawn epoch thread");
}

/// The number of epoch ticks covering `deadline` (at least one).
pub fn deadline_ticks(deadline: Duration) -> u64 {
    (deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
}
