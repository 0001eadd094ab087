//! What other software accepts of a file bitsmith is about to write (the GPTQ layout, the
//! exports), said before the work starts rather than discovered by the user at load time.

use super::ZeroConvention;
use crate::loader::config::ONLINE_HADAMARD_KEY;
use crate::loader::ModelConfig;
use crate::model::LinearSpec;
use crate::quant::GroupSize;
use anyhow::{bail, Result};

/// How a model that needs no online op is made, for the messages below.
const DEPLOYABLE: &str = "quantize a deployable variant instead: `--transform ostquant \
     --no-online-hadamard` (its rotations all folded into the weights), or leave out \
     `--transform down-hadamard`";

/// Refuse to export a model that rotates `down_proj`'s input online (config.json's
/// `bitsmith_online_hadamard`) to `format`, read by `consumer`: the consumer has no such op
/// and would run the rotated weights on unrotated activations, silently computing wrong
/// outputs.
pub fn refuse_online_ops(config: &ModelConfig, format: &str, consumer: &str) -> Result<()> {
    if config.online_hadamard_down {
        bail!(
            "{format} export refused: config.json declares `{ONLINE_HADAMARD_KEY}` (a \
             Hadamard rotation of down_proj's input that the model runs online, with its other \
             half folded into down_proj's weight); {consumer} has no such op and would compute \
             wrong outputs. Only bitsmith runs this model; {DEPLOYABLE}"
        );
    }
    Ok(())
}

/// A warning for a packed model that declares an online op: its GPTQ layout loads in
/// transformers, vLLM and GPTQModel, which ignore the key and compute wrong outputs.
pub fn online_op_warning(config: &ModelConfig) -> Option<String> {
    config.online_hadamard_down.then(|| {
        format!(
            "the output's config.json declares `{ONLINE_HADAMARD_KEY}`: the model rotates \
             down_proj's input online, which bitsmith runs; transformers, vLLM and GPTQModel \
             load the GPTQ layout but ignore this key and compute wrong outputs. For those, \
             {DEPLOYABLE}"
        )
    })
}

/// The group sizes GPTQ kernels are commonly built for (gptqmodel's, vLLM's Marlin).
const KERNEL_GROUP_SIZES: &[usize] = &[16, 32, 64, 128, 256, 512, 1024];

/// A warning when `group_size` does not divide the input width of every layer in
/// `linears`: bitsmith writes (and reads) the partial last group, but gptqmodel's default
/// CPU kernels refuse such a layer (measured with gptqmodel 7.7 and transformers 5.24 on
/// CPU: at load or at the first forward; only `backend="torch"` runs it; gptqmodel's kernel
/// check is "`in_features` must be divisible by `group_size`" unless the kernel declares
/// `SUPPORTS_AUTO_PADDING`, gptqmodel/nn_modules/qlinear/__init__.py), and
/// compressed-tensors' group strategy has no partial groups. Names the widths, an
/// example layer, and the kernel group sizes that divide every width.
pub fn group_size_warning(group_size: GroupSize, linears: &[LinearSpec]) -> Option<String> {
    let g = group_size.as_columns()?;
    let partial: Vec<&LinearSpec> = linears
        .iter()
        .filter(|s| !s.in_features.is_multiple_of(g))
        .collect();
    let first = partial.first()?;
    let mut widths: Vec<usize> = partial.iter().map(|s| s.in_features).collect();
    widths.sort_unstable();
    widths.dedup();
    let gcd = linears.iter().fold(0, |a, s| gcd(a, s.in_features));
    let fits: Vec<String> = KERNEL_GROUP_SIZES
        .iter()
        .filter(|&&k| gcd.is_multiple_of(k))
        .map(|k| k.to_string())
        .chain(std::iter::once("-1 (per channel)".to_string()))
        .collect();
    Some(format!(
        "--group-size {g} does not divide the input width of {} of {} quantized layers \
         (width {}, e.g. `{}`): their last group is partial. bitsmith reads such a file, and \
         gptqmodel's backend=\"torch\" does, but gptqmodel's default CPU kernels refuse it \
         (at load or at the first forward), and `export --format compressed-tensors` \
         cannot write it. Group sizes that divide every width: {}",
        partial.len(),
        linears.len(),
        widths
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        first.name,
        fits.join(", ")
    ))
}

/// A warning for an asymmetric `gptq` (v1) checkpoint: `GPTQModel.load` refuses one unless
/// `meta.quantizer` names gptqmodel itself at version 0.9.0 or later
/// (`is_quantized_by_gptaq` in gptqmodel/quantization/config.py, checked in
/// gptqmodel/models/loader.py: older producers' v1 zero points could wrap). bitsmith names
/// itself there, truthfully; transformers' GPTQ integration does not check it.
pub fn checkpoint_format_warning(sym: bool, zeros: ZeroConvention) -> Option<String> {
    (!sym && zeros == ZeroConvention::V1).then(|| {
        "an asymmetric `gptq` (v1) checkpoint is refused by gptqmodel's own `GPTQModel.load`, \
         which trusts asymmetric v1 files only when meta.quantizer names gptqmodel >= 0.9.0 \
         (this file names bitsmith); transformers' AutoModelForCausalLM loads it. For \
         GPTQModel.load pass --checkpoint-format gptq_v2 (or --sym)"
            .to_string()
    })
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, k: usize) -> LinearSpec {
        LinearSpec {
            name: name.into(),
            out_features: 8,
            in_features: k,
            bias: false,
        }
    }

    /// SmolLM2-135M's widths: 576 (attention, gate/up) and 1536 (down).
    #[test]
    fn names_the_partial_layers_and_the_sizes_that_fit() {
        let linears = [
            spec("model.layers.0.self_attn.q_proj", 576),
            spec("model.layers.0.mlp.down_proj", 1536),
        ];
        let w = group_size_warning(GroupSize::Columns(128), &linears).unwrap();
        assert!(
            w.contains(
                "1 of 2 quantized layers (width 576, e.g. `model.layers.0.self_attn.q_proj`)"
            ),
            "{w}"
        );
        assert!(
            w.ends_with("every width: 16, 32, 64, -1 (per channel)"),
            "{w}"
        );
        assert_eq!(group_size_warning(GroupSize::Columns(64), &linears), None);
        assert_eq!(group_size_warning(GroupSize::PerChannel, &linears), None);
        let w = group_size_warning(GroupSize::Columns(1024), &linears).unwrap();
        assert!(
            w.contains("2 of 2 quantized layers (width 576, 1536"),
            "{w}"
        );
    }

    #[test]
    fn only_asymmetric_v1_is_refused_by_gptqmodel_load() {
        assert!(checkpoint_format_warning(false, ZeroConvention::V1).is_some());
        assert!(checkpoint_format_warning(true, ZeroConvention::V1).is_none());
        assert!(checkpoint_format_warning(false, ZeroConvention::V2).is_none());
    }
}
