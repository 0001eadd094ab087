//! Forward-pass efficiency of `ppl` on the fixture model, against the f32 matmul rate
//! measured in the same run.
//!
//!     cargo bench --bench forward            # fixture from SMOLLM2_FIXTURE_DIR / default cache
//!
//! Prints: GFLOP/s of large f32 matmuls (candle), tokens/s of the perplexity forward at
//! seqlen 2048, the model FLOPs per token, and achieved / matmul ratio; then a breakdown
//! (blocks' linears, attention core, LM head + loss).

use bitsmith::eval::{perplexity, wikitext_joined, PplOptions};
use bitsmith::loader::{load_tokenizer, resolve_model};
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;

#[path = "timing.rs"]
mod timing;
use timing::{best_of, matmul_gflops};

fn main() {
    let fixture = std::env::var_os("SMOLLM2_FIXTURE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap())
                .join(".cache/bitsmith/fixtures/smollm2")
        });
    std::env::set_var("HF_HOME", fixture.join("hf-home"));
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let repo = "fixtures/SmolLM2-135M-Instruct-Q4_1-dequant";
    let files = resolve_model(repo, None).expect("fixture (run scripts/make-fixture.sh)");
    let model = bitsmith::load_model(&files, DType::F32, &Device::Cpu).unwrap();
    let c = model.config.clone();

    let mm_big = matmul_gflops(2048, 2048, 2048);
    let mm_mlp = matmul_gflops(2048, 576, 1536);
    println!("f32 matmul (candle): 2048x2048x2048 {mm_big:.1} GFLOP/s, 2048x576x1536 {mm_mlp:.1} GFLOP/s");

    let raw = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/wikitext-2-raw/wiki.test.raw"),
    )
    .unwrap();
    let ids = load_tokenizer(&files)
        .unwrap()
        .encode(wikitext_joined(&raw).as_str(), true)
        .unwrap()
        .get_ids()
        .to_vec();
    let seqlen = 2048;
    let windows = 2;
    let r = perplexity(
        &model,
        &ids,
        &PplOptions {
            seqlen,
            batch: 1,
            limit: Some(windows),
            progress: false,
        },
    )
    .unwrap();

    let linear_params: usize = (c.hidden_size * c.num_attention_heads * c.head_dim * 2
        + c.hidden_size * c.num_key_value_heads * c.head_dim * 2
        + 3 * c.hidden_size * c.intermediate_size)
        * c.num_hidden_layers;
    let head_params = c.vocab_size * c.hidden_size;
    // causal attention: QKᵀ and PV over (seq+1)/2 keys on average
    let attn_flops = 4.0
        * (c.num_hidden_layers * c.num_attention_heads * c.head_dim) as f64
        * (seqlen as f64 + 1.0)
        / 2.0;
    let flops_per_token = 2.0 * (linear_params + head_params) as f64 + attn_flops;
    let achieved = flops_per_token * r.tokens_per_second / 1e9;
    println!(
        "ppl forward, seqlen {seqlen}, {windows} windows: {:.1} tok/s; model FLOPs/token {:.1} M (linears {:.1} M, head {:.1} M, causal attention {:.1} M)",
        r.tokens_per_second,
        flops_per_token / 1e6,
        2.0 * linear_params as f64 / 1e6,
        2.0 * head_params as f64 / 1e6,
        attn_flops / 1e6
    );
    println!(
        "achieved {achieved:.1} GFLOP/s = {:.0}% of the 2048^3 matmul rate",
        100.0 * achieved / mm_big
    );

    // breakdown on one window
    let input = Tensor::from_slice(&ids[..seqlen], (1, seqlen), &Device::Cpu).unwrap();
    let ctx = model.context(seqlen).unwrap();
    let x = model.embed(&input).unwrap();
    let t_blocks = best_of(2, || {
        model.run_blocks(x.clone(), &ctx).unwrap();
    });
    let xn = x.narrow(1, 0, seqlen - 1).unwrap();
    let t_head = best_of(2, || {
        model.head(&xn).unwrap();
    });
    let t_linears = best_of(2, || {
        for b in &model.blocks {
            let a = &b.self_attn;
            for l in [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &b.mlp.gate_proj,
                &b.mlp.up_proj,
            ] {
                let y = l.forward(&x).unwrap();
                if y.dim(2).unwrap() == c.intermediate_size {
                    b.mlp.down_proj.forward(&y).unwrap();
                }
            }
        }
    });
    let total = t_blocks + t_head;
    println!(
        "one window: blocks {t_blocks:.2} s (linears {t_linears:.2} s, attention core + norms + elementwise {:.2} s), head {t_head:.2} s; total {total:.2} s",
        t_blocks - t_linears
    );
}
