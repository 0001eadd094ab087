//! Compiling bitsmith's Metal kernels (`metal` feature, macOS only): the embedded `.metal`
//! source is compiled by the Metal driver at run time and a pipeline made of each kernel,
//! once per device, by every Metal launcher (packed, lookup-table, online Hadamard).
//! **Never compiled or run**: candle's Metal crates build only on Apple targets.

use anyhow::Result;
use candle_core::MetalDevice;
use candle_metal_kernels::metal::ComputePipeline;

/// Compile the Metal source `src` (named `file` in errors) on `dev` and make a pipeline of
/// each function in `names`, in order.
pub fn compile_pipelines(
    dev: &MetalDevice,
    src: &str,
    file: &str,
    names: &[&str],
) -> Result<Vec<ComputePipeline>> {
    let md = dev.metal_device();
    let lib = md
        .new_library_with_source(src, None)
        .map_err(|e| anyhow::anyhow!("compiling {file}: {e}"))?;
    names
        .iter()
        .map(|name| {
            let f = lib
                .get_function(name, None)
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            md.new_compute_pipeline_state_with_function(&f)
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))
        })
        .collect()
}
