// Candle allocates a fresh buffer for every op; mimalloc reuses freed pages instead of
// returning them to the kernel, which removed most page-fault time from `ppl`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::ffi::{c_int, c_long};

extern "C" {
    // mimalloc's C API, compiled into libmimalloc-sys whatever its Cargo features
    fn mi_option_set(option: c_int, value: c_long);
}

/// `mi_option_purge_delay` in the `mi_option_t` enum of the mimalloc v3 sources that
/// libmimalloc-sys 0.1.49 builds (`c_src/mimalloc/v3/include/mimalloc.h`; Cargo.lock pins
/// the version).
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// Commands that run forwards of the same shapes over and over (evaluation, serving).
const KEEP_FREED_PAGES: &[&str] = &["ppl", "generate", "bench", "compare"];

/// Commands whose freed pages go back to the kernel once unused for a second.
const PURGE_AFTER_A_SECOND: &[&str] = &["quantize"];

fn main() {
    // For those, never hand freed pages back to the kernel: a forward frees and reallocates
    // the same activation sizes every layer, and each purge made the next allocation fault
    // in freshly zeroed pages (fixture, interleaved: prefill 512 at 446–500 → 593–676
    // tok/s, `ppl --limit 4` 419 → 519 tok/s; peak RSS +0–6 %). Not for `quantize`: there
    // it saved 15 % of the time but raised the peak RSS by 31 % (varied sizes fragment),
    // and bounded memory is what that command promises. Its forwards free and reallocate
    // each segment's activations within a fraction of a second, so a purge delay of one
    // second (mimalloc's default is 10 ms) keeps those pages and still returns what stays
    // unused: GPTQ 32 × 2048 on the fixture took 252 s at 970 MiB peak instead of 260 s at
    // 963 MiB (never purging: 251 s, 1061 MiB); an earlier 16 × 2048 pair showed no
    // difference beyond this machine's noise, and no run showed a cost. A user's
    // MIMALLOC_PURGE_DELAY still wins.
    let command = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let is = |list: &[&str]| command.as_deref().is_some_and(|c| list.contains(&c));
    let delay_ms = if is(KEEP_FREED_PAGES) {
        Some(-1)
    } else if is(PURGE_AFTER_A_SECOND) {
        Some(1000)
    } else {
        None
    };
    if let Some(ms) = delay_ms.filter(|_| std::env::var_os("MIMALLOC_PURGE_DELAY").is_none()) {
        // SAFETY: a plain setter of an integer option, called before any other thread runs
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ms) };
    }
    std::process::exit(bitsmith::run_cli());
}
