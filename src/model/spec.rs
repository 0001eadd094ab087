//! The structure of a decoder block, declared once: its linears (Hugging Face names), their
//! shapes, the order they run in and the groups that read the same input.
//!
//! Every forward takes the block's structure from [`LINEAR_GROUPS`]: the tensor forward
//! ([`super::DecoderBlock::forward_observed`], which the calibration runner observes), the
//! fused CPU decode step (`super::decode`), loading ([`block_linears`]) and the quantizers'
//! view of a block (`calibration::GroupInput`). A new architecture or an online op
//! changes the declaration and the glue between groups in `block.rs`, nowhere else.

use crate::loader::ModelConfig;

/// One linear layer inside a decoder block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    /// Full module name without `.weight`, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    pub bias: bool,
}

/// A size of a block's activations, read from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// The residual stream, `hidden_size`.
    Hidden,
    /// All query heads, `num_attention_heads · head_dim`.
    QueryHeads,
    /// All key (or value) heads, `num_key_value_heads · head_dim`.
    KvHeads,
    /// The MLP's inner size, `intermediate_size`.
    Intermediate,
}

impl Dim {
    pub fn size(self, c: &ModelConfig) -> usize {
        match self {
            Self::Hidden => c.hidden_size,
            Self::QueryHeads => c.num_attention_heads * c.head_dim,
            Self::KvHeads => c.num_key_value_heads * c.head_dim,
            Self::Intermediate => c.intermediate_size,
        }
    }
}

/// Which config flag says a linear carries a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BiasFlag {
    Qkv,
    O,
    Mlp,
}

impl BiasFlag {
    pub fn get(self, c: &ModelConfig) -> bool {
        match self {
            Self::Qkv => c.qkv_bias,
            Self::O => c.o_bias,
            Self::Mlp => c.mlp_bias,
        }
    }
}

/// One linear of the block: its module suffix, output size and bias (its input size is
/// its group's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearDecl {
    /// Module name inside the block, e.g. `self_attn.q_proj`.
    pub suffix: &'static str,
    pub out: Dim,
    pub bias: BiasFlag,
}

/// Linears that read the same input, run (and quantized true-sequentially) together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearGroup {
    /// Size of the shared input.
    pub input: Dim,
    pub linears: &'static [LinearDecl],
}

/// The Llama-family block, in execution order: `[q,k,v] → [o] → [gate,up] → [down]`.
/// `block.rs` supplies the glue between groups: group 0's outputs are attention's
/// queries, keys and values (in that order), group 1 reads the attention output, group 2's
/// outputs are SwiGLU's gate and up, group 3 reads `silu(gate)·up`.
pub const LINEAR_GROUPS: [LinearGroup; 4] = [
    LinearGroup {
        input: Dim::Hidden,
        linears: &[
            LinearDecl {
                suffix: "self_attn.q_proj",
                out: Dim::QueryHeads,
                bias: BiasFlag::Qkv,
            },
            LinearDecl {
                suffix: "self_attn.k_proj",
                out: Dim::KvHeads,
                bias: BiasFlag::Qkv,
            },
            LinearDecl {
                suffix: "self_attn.v_proj",
                out: Dim::KvHeads,
                bias: BiasFlag::Qkv,
            },
        ],
    },
    LinearGroup {
        input: Dim::QueryHeads,
        linears: &[LinearDecl {
            suffix: "self_attn.o_proj",
            out: Dim::Hidden,
            bias: BiasFlag::O,
        }],
    },
    LinearGroup {
        input: Dim::Hidden,
        linears: &[
            LinearDecl {
                suffix: "mlp.gate_proj",
                out: Dim::Intermediate,
                bias: BiasFlag::Mlp,
            },
            LinearDecl {
                suffix: "mlp.up_proj",
                out: Dim::Intermediate,
                bias: BiasFlag::Mlp,
            },
        ],
    },
    LinearGroup {
        input: Dim::Intermediate,
        linears: &[LinearDecl {
            suffix: "mlp.down_proj",
            out: Dim::Hidden,
            bias: BiasFlag::Mlp,
        }],
    },
];

/// How many linears a block has.
pub const NUM_LINEARS: usize = {
    let mut n = 0;
    let mut g = 0;
    while g < LINEAR_GROUPS.len() {
        n += LINEAR_GROUPS[g].linears.len();
        g += 1;
    }
    n
};

/// Module suffixes inside a block, in execution order (flattened [`LINEAR_GROUPS`]).
pub const BLOCK_LINEARS: [&str; NUM_LINEARS] = {
    let mut out = [""; NUM_LINEARS];
    let (mut g, mut i) = (0, 0);
    while g < LINEAR_GROUPS.len() {
        let mut j = 0;
        while j < LINEAR_GROUPS[g].linears.len() {
            out[i] = LINEAR_GROUPS[g].linears[j].suffix;
            i += 1;
            j += 1;
        }
        g += 1;
    }
    out
};

/// Every declared linear with its group's input size, in execution order.
pub fn declared_linears() -> impl Iterator<Item = (Dim, &'static LinearDecl)> {
    LINEAR_GROUPS
        .iter()
        .flat_map(|g| g.linears.iter().map(move |l| (g.input, l)))
}

/// The linears of block `layer`, in execution order.
pub fn block_linears(c: &ModelConfig, layer: usize) -> Vec<LinearSpec> {
    declared_linears()
        .map(|(input, l)| LinearSpec {
            name: format!("model.layers.{layer}.{}", l.suffix),
            out_features: l.out.size(c),
            in_features: input.size(c),
            bias: l.bias.get(c),
        })
        .collect()
}

/// The output head as a linear (`lm_head`), shaped `[vocab, hidden]`.
pub fn lm_head(c: &ModelConfig) -> LinearSpec {
    LinearSpec {
        name: "lm_head".into(),
        out_features: c.vocab_size,
        in_features: c.hidden_size,
        bias: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattened_order_is_the_groups_order() {
        assert_eq!(
            BLOCK_LINEARS,
            [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ]
        );
    }
}
