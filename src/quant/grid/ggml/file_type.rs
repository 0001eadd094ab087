//! What `--type` names for a GGUF file: one block type for every linear (what
//! `llama-quantize --pure` writes), or one of llama.cpp's named mixes (`Q4_K_M`, …), which
//! give some tensors a wider type by role and depth. The mixes follow
//! `llama_tensor_get_type_impl` (`src/llama-quant.cpp`) for the `llama` architecture
//! without experts, so `bitsmith export --type Q4_K_M` writes the types (and, rounding to
//! nearest, the bytes) `llama-quantize` writes for `Q4_K_M`.

use super::GgmlType;
use crate::loader::ModelConfig;
use anyhow::{anyhow, Result};

/// A GGUF file's quantization: one block type or one of llama.cpp's mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufFileType {
    /// Every linear in this type (or its fallback where the rows are not whole blocks).
    Pure(GgmlType),
    /// llama.cpp's named mix.
    Mix(LlamaMix),
}

/// llama.cpp's named K-quant mixes (`llama-quantize`'s file types of the same name).
/// Its plain `Q2_K` mix is not here: `Q2_K` names the pure type in bitsmith.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LlamaMix {
    Q2KS,
    Q3KS,
    Q3KM,
    Q3KL,
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
}

/// What a block linear does, as llama.cpp's mixes tell tensors apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearRole {
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
}

impl LinearRole {
    /// The role of a Hugging Face module name's last part (`self_attn.v_proj` → `AttnV`).
    pub fn of_suffix(suffix: &str) -> Option<Self> {
        Some(match suffix {
            "self_attn.q_proj" => Self::AttnQ,
            "self_attn.k_proj" => Self::AttnK,
            "self_attn.v_proj" => Self::AttnV,
            "self_attn.o_proj" => Self::AttnOutput,
            "mlp.gate_proj" => Self::FfnGate,
            "mlp.up_proj" => Self::FfnUp,
            "mlp.down_proj" => Self::FfnDown,
            _ => return None,
        })
    }

    /// The layer index and role of a block linear's module name
    /// (`model.layers.3.mlp.down_proj` → `(3, FfnDown)`).
    pub fn of_module(name: &str) -> Option<(usize, Self)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, suffix) = rest.split_once('.')?;
        Some((layer.parse().ok()?, Self::of_suffix(suffix)?))
    }
}

/// The model facts llama.cpp's mixes look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MixShape {
    pub n_layers: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
}

impl MixShape {
    pub fn of(c: &ModelConfig) -> Self {
        Self {
            n_layers: c.num_hidden_layers,
            n_head: c.num_attention_heads,
            n_head_kv: c.num_key_value_heads,
        }
    }

    fn n_gqa(&self) -> usize {
        self.n_head.checked_div(self.n_head_kv).unwrap_or(0)
    }

    /// llama.cpp's `LLM_TYPE_70B` for the `llama` architecture (80 layers, grouped
    /// queries), whose small `attn_v` gets a wider type.
    fn is_70b(&self) -> bool {
        self.n_layers == 80 && self.n_head != self.n_head_kv
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third
/// one between.
fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    let (i, n) = (layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

impl LlamaMix {
    pub const ALL: [Self; 8] = [
        Self::Q2KS,
        Self::Q3KS,
        Self::Q3KM,
        Self::Q3KL,
        Self::Q4KS,
        Self::Q4KM,
        Self::Q5KS,
        Self::Q5KM,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Q2KS => "Q2_K_S",
            Self::Q3KS => "Q3_K_S",
            Self::Q3KM => "Q3_K_M",
            Self::Q3KL => "Q3_K_L",
            Self::Q4KS => "Q4_K_S",
            Self::Q4KM => "Q4_K_M",
            Self::Q5KS => "Q5_K_S",
            Self::Q5KM => "Q5_K_M",
        }
    }

    /// The type of every tensor no rule widens.
    pub fn base(self) -> GgmlType {
        match self {
            Self::Q2KS => GgmlType::Q2K,
            Self::Q3KS | Self::Q3KM | Self::Q3KL => GgmlType::Q3K,
            Self::Q4KS | Self::Q4KM => GgmlType::Q4K,
            Self::Q5KS | Self::Q5KM => GgmlType::Q5K,
        }
    }

    /// `general.file_type` (llama.h's `LLAMA_FTYPE_MOSTLY_*`).
    pub fn file_type(self) -> u32 {
        match self {
            Self::Q2KS => 21,
            Self::Q3KS => 11,
            Self::Q3KM => 12,
            Self::Q3KL => 13,
            Self::Q4KS => 14,
            Self::Q4KM => 15,
            Self::Q5KS => 16,
            Self::Q5KM => 17,
        }
    }

    /// The type of linear `role` of layer `layer`, before any fallback for its width.
    fn linear_type(self, role: LinearRole, layer: usize, shape: &MixShape) -> GgmlType {
        use GgmlType::{Q4K, Q5K, Q6K};
        use LinearRole::*;
        let n = shape.n_layers;
        let base = self.base();
        match role {
            AttnV => {
                let ty = match self {
                    Self::Q2KS if shape.n_gqa() >= 4 => Q4K,
                    Self::Q3KM if layer < 2 => Q5K,
                    Self::Q3KM => Q4K,
                    Self::Q3KL => Q5K,
                    Self::Q4KM | Self::Q5KM if use_more_bits(layer, n) => Q6K,
                    Self::Q4KS if layer < 4 => Q5K,
                    _ => base,
                };
                // 70B's attn_v is 8× smaller than attn_q: more bits cost little
                if shape.is_70b() && matches!(ty, GgmlType::Q3K | Q4K) {
                    Q5K
                } else {
                    ty
                }
            }
            FfnDown => match self {
                Self::Q2KS if layer < n / 8 => Q4K,
                Self::Q3KM if layer < n / 16 => Q5K,
                Self::Q3KM => Q4K,
                Self::Q3KL => Q5K,
                Self::Q4KM | Self::Q5KM if use_more_bits(layer, n) => Q6K,
                Self::Q4KS if layer < n / 8 => Q5K,
                _ => base,
            },
            AttnOutput => match self {
                Self::Q3KM => Q4K,
                Self::Q3KL => Q5K,
                _ => base,
            },
            AttnQ | AttnK | FfnGate | FfnUp => base,
        }
    }
}

impl GgufFileType {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pure(t) => t.name(),
            Self::Mix(m) => m.name(),
        }
    }

    /// The type most linears get (the pure type, or the mix's base type).
    pub fn base(self) -> GgmlType {
        match self {
            Self::Pure(t) => t,
            Self::Mix(m) => m.base(),
        }
    }

    pub fn is_float(self) -> bool {
        self.base().is_float()
    }

    /// Mixes `llama-quantize` refuses to round without an importance matrix (Q2_K_S: its
    /// 2-bit layers lose too much to rounding to nearest); bitsmith solves them with
    /// calibration data (GPTQ) only.
    pub fn needs_calibration(self) -> bool {
        self == Self::Mix(LlamaMix::Q2KS)
    }

    /// `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            Self::Pure(t) => t.file_type(),
            Self::Mix(m) => m.file_type(),
        }
    }

    /// The type of the linear `role` of layer `layer`, before any fallback for its width
    /// ([`GgmlType::fallback_for`]).
    pub fn linear_type(self, role: LinearRole, layer: usize, shape: &MixShape) -> GgmlType {
        match self {
            Self::Pure(t) => t,
            Self::Mix(m) => m.linear_type(role, layer, shape),
        }
    }

    /// The type of a linear by its module name; a name that is not a block linear (a
    /// quantized head) gets the base type.
    pub fn module_type(self, module: &str, shape: &MixShape) -> GgmlType {
        match LinearRole::of_module(module) {
            Some((layer, role)) => self.linear_type(role, layer, shape),
            None => self.base(),
        }
    }

    /// The type a mix gives the output head (and a tied token embedding) of a model
    /// `cols` wide when no type is asked for: Q6_K, or Q8_0 where the rows are not whole
    /// blocks of the base type; then the fallback for the width. `None` for a pure type
    /// (bitsmith's default, F32, applies).
    pub fn default_head_type(self, cols: usize) -> Option<GgmlType> {
        let Self::Mix(m) = self else { return None };
        let ty = if !cols.is_multiple_of(m.base().block_size()) {
            GgmlType::Q8_0
        } else {
            GgmlType::Q6K
        };
        Some(ty.fallback_for(cols))
    }

    /// A mix's type for an untied token embedding when none is asked for: the base type,
    /// then the fallback for the width.
    pub fn default_untied_embedding_type(self, cols: usize) -> Option<GgmlType> {
        let Self::Mix(m) = self else { return None };
        Some(m.base().fallback_for(cols))
    }

    /// Every name `--type` takes, for messages.
    pub fn names() -> String {
        let mut names: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
        names.extend(LlamaMix::ALL.iter().map(|m| m.name()));
        names.join(", ")
    }
}

impl std::fmt::Display for GgufFileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for GgufFileType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(m) = LlamaMix::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
        {
            return Ok(Self::Mix(m));
        }
        GgmlType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .map(Self::Pure)
            .ok_or_else(|| anyhow!("unknown GGUF type `{s}` (available: {})", Self::names()))
    }
}

impl From<GgmlType> for GgufFileType {
    fn from(t: GgmlType) -> Self {
        Self::Pure(t)
    }
}

impl serde::Serialize for GgufFileType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for GgufFileType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(e))
    }
}

#[cfg(test)]
mod tests {
    /// Every type a named mix gives a linear, and its fallback for any width, is a block
    /// type FlexRound trains on (`recipe.rs` accepts a mix under FlexRound for this).
    #[test]
    fn mixes_use_only_the_block_types_flexround_trains() {
        use crate::quant::flexround::ggml_blocks::FLEXROUND_GGML_TYPES;
        use LinearRole::*;
        for shape in [
            MixShape { n_layers: 30, n_head: 9, n_head_kv: 3 },
            MixShape { n_layers: 80, n_head: 64, n_head_kv: 8 },
            MixShape { n_layers: 32, n_head: 32, n_head_kv: 32 },
        ] {
            for mix in LlamaMix::ALL {
                for layer in 0..shape.n_layers {
                    for role in [AttnQ, AttnK, AttnV, AttnOutput, FfnGate, FfnUp, FfnDown] {
                        let ty = mix.linear_type(role, layer, &shape);
                        for cols in [576, 4096, 1536 + 32] {
                            let t = ty.fallback_for(cols);
                            assert!(FLEXROUND_GGML_TYPES.contains(&t), "{} {t}", mix.name());
                        }
                    }
                }
            }
        }
    }

    use super::*;
    use GgmlType::*;

    const SMOLLM2: MixShape = MixShape {
        n_layers: 30,
        n_head: 9,
        n_head_kv: 3,
    };

    #[test]
    fn use_more_bits_is_llama_cpps() {
        // n = 32: layers 0-3, 28-31 and every third from 6
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            picked,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn q4_k_m_widens_attn_v_and_ffn_down_where_llama_cpp_does() {
        let t: GgufFileType = "q4_k_m".parse().unwrap();
        assert_eq!(t, GgufFileType::Mix(LlamaMix::Q4KM));
        assert_eq!(t.file_type(), 15);
        assert_eq!(t.module_type("model.layers.0.mlp.down_proj", &SMOLLM2), Q6K);
        assert_eq!(t.module_type("model.layers.4.mlp.down_proj", &SMOLLM2), Q4K);
        assert_eq!(
            t.module_type("model.layers.5.self_attn.v_proj", &SMOLLM2),
            Q6K
        );
        assert_eq!(
            t.module_type("model.layers.5.self_attn.q_proj", &SMOLLM2),
            Q4K
        );
        assert_eq!(t.module_type("lm_head", &SMOLLM2), Q4K);
        // a tied 576-wide head: not whole Q4_K blocks → Q8_0
        assert_eq!(t.default_head_type(576), Some(Q8_0));
        assert_eq!(t.default_head_type(4096), Some(Q6K));
    }

    #[test]
    fn q3_k_m_and_70b() {
        let t = GgufFileType::Mix(LlamaMix::Q3KM);
        assert_eq!(t.linear_type(LinearRole::AttnV, 1, &SMOLLM2), Q5K);
        assert_eq!(t.linear_type(LinearRole::AttnV, 2, &SMOLLM2), Q4K);
        assert_eq!(t.linear_type(LinearRole::AttnOutput, 9, &SMOLLM2), Q4K);
        // n/16 = 1 layer
        assert_eq!(t.linear_type(LinearRole::FfnDown, 0, &SMOLLM2), Q5K);
        assert_eq!(t.linear_type(LinearRole::FfnDown, 1, &SMOLLM2), Q4K);
        assert_eq!(t.linear_type(LinearRole::FfnUp, 2, &SMOLLM2), Q3K);
        let big = MixShape {
            n_layers: 80,
            n_head: 64,
            n_head_kv: 8,
        };
        assert_eq!(t.linear_type(LinearRole::AttnV, 40, &big), Q5K);
        let q2 = GgufFileType::Mix(LlamaMix::Q2KS);
        assert_eq!(q2.linear_type(LinearRole::AttnV, 40, &big), Q5K);
        assert_eq!(q2.linear_type(LinearRole::AttnV, 4, &SMOLLM2), Q2K);
    }

    #[test]
    fn pure_types_parse_as_before() {
        let t: GgufFileType = "Q4_K".parse().unwrap();
        assert_eq!(t, GgufFileType::Pure(Q4K));
        assert_eq!(t.module_type("model.layers.0.mlp.down_proj", &SMOLLM2), Q4K);
        assert_eq!(t.default_head_type(576), None);
        let e = "Q4_K_X".parse::<GgufFileType>().unwrap_err().to_string();
        assert!(e.contains("Q4_K_M") && e.contains("IQ4_NL"), "{e}");
    }
}
