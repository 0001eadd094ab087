//! Names and shapes of the linear layers, in the Hugging Face naming scheme.

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

/// Module suffixes inside a block, in execution order (q/k/v and gate/up share inputs).
pub const BLOCK_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The seven linears of block `layer`.
pub fn block_linears(c: &ModelConfig, layer: usize) -> Vec<LinearSpec> {
    let h = c.hidden_size;
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let i = c.intermediate_size;
    let shapes = [
        (q, h, c.qkv_bias),
        (kv, h, c.qkv_bias),
        (kv, h, c.qkv_bias),
        (h, q, c.o_bias),
        (i, h, c.mlp_bias),
        (i, h, c.mlp_bias),
        (h, i, c.mlp_bias),
    ];
    BLOCK_LINEARS
        .iter()
        .zip(shapes)
        .map(|(suffix, (out_features, in_features, bias))| LinearSpec {
            name: format!("model.layers.{layer}.{suffix}"),
            out_features,
            in_features,
            bias,
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
