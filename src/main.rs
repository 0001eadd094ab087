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

fn main() {
    // For those, never hand freed pages back to the kernel: a forward frees and reallocates
    // the same activation sizes every layer, and each purge made the next allocation fault
    // in freshly zeroed pages (fixture, interleaved: prefill 512 at 446–500 → 593–676
    // tok/s, `ppl --limit 4` 419 → 519 tok/s; peak RSS +0–6 %). Not for `quantize`: there
    // it saved 15 % of the time but raised the peak RSS by 31 % (varied sizes fragment),
    // and bounded memory is what that command promises. A user's MIMALLOC_PURGE_DELAY
    // still wins.
    let command = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let keep = command.is_some_and(|c| KEEP_FREED_PAGES.contains(&c.as_str()));
    if keep && std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain setter of an integer option, called before any other thread runs
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    std::process::exit(bitsmith::run_cli());
}
