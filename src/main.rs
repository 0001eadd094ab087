// Candle allocates a fresh buffer for every op; mimalloc reuses freed pages instead of
// returning them to the kernel, which removed most page-fault time from `ppl`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(bitsmith::run_cli());
}
