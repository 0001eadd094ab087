//! The differentiable mode: gradients through a block and the whole model, checked against
//! central finite differences in float64, and its forward equal to the fused one.

mod common;

use bitsmith::loader::{resolve_model, ModelConfig, WeightStore};
use bitsmith::model::{BlockContext, BlockWeights, CausalLm, DecoderBlock, Mode};
use candle_core::{DType, Device, Tensor, Var};
use common::{Lcg, Synth};

fn load(s: &Synth, dtype: DType) -> (tempfile::TempDir, CausalLm) {
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 7, false);
    let files = resolve_model(dir.path().to_str().unwrap(), None).unwrap();
    let config = ModelConfig::from_file(&files.config).unwrap();
    let store = WeightStore::open(&files.weights).unwrap();
    let m = CausalLm::load_dense(&config, &store, dtype, &Device::Cpu).unwrap();
    (dir, m)
}

fn small() -> Synth {
    Synth {
        hidden: 16,
        intermediate: 24,
        heads: 4,
        kv_heads: 2,
        vocab: 23,
        tied: false,
        ..Synth::default()
    }
}

fn ids(s: &Synth, batch: usize, seq: usize) -> Tensor {
    let v: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7 + 3) % s.vocab) as u32)
        .collect();
    Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// `t` with element `i` (flat index) moved by `delta`.
fn nudged(t: &Tensor, i: usize, delta: f64) -> Tensor {
    let mut v = values(t);
    v[i] += delta;
    Tensor::from_vec(v, t.shape(), t.device()).unwrap()
}

fn random(rng: &mut Lcg, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.vec(n, scale), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

/// Compare the autograd gradient `grad` of `loss` at `param` with central differences at
/// a few elements; returns the largest |gradient| checked, so callers can insist that
/// the check was not of zeros.
fn check_gradient(
    what: &str,
    param: &Tensor,
    grad: Option<&Tensor>,
    loss: &dyn Fn(&Tensor) -> f64,
    rng: &mut Lcg,
) -> f64 {
    let grad = values(grad.unwrap_or_else(|| panic!("{what}: no gradient")));
    let n = grad.len();
    let h = 1e-5;
    let mut largest = 0f64;
    for _ in 0..6 {
        let i = ((rng.next() as f64 * 0.5 + 0.5) * n as f64) as usize % n;
        let fd = (loss(&nudged(param, i, h)) - loss(&nudged(param, i, -h))) / (2.0 * h);
        let g = grad[i];
        assert!(
            (fd - g).abs() <= 1e-7 + 1e-6 * g.abs().max(fd.abs()),
            "{what}[{i}]: autograd {g:e}, finite differences {fd:e}"
        );
        largest = largest.max(g.abs());
    }
    largest
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Block output MSE against a fixed target: FlexRound's loss.
fn block_mse(
    b: &DecoderBlock,
    w: &BlockWeights,
    x: &Tensor,
    ctx: &BlockContext,
    target: &Tensor,
) -> Tensor {
    let out = b.with_weights(w).unwrap().forward(x, ctx).unwrap();
    (out - target).unwrap().sqr().unwrap().mean_all().unwrap()
}

struct BlockCase {
    _dir: tempfile::TempDir,
    block: DecoderBlock,
    weights: BlockWeights,
    x: Tensor,
    ctx: BlockContext,
    target: Tensor,
}

fn block_case(rng: &mut Lcg) -> BlockCase {
    let s = small();
    let (dir, m) = load(&s, DType::F64);
    let x = m.embed(&ids(&s, 2, 7)).unwrap();
    let ctx = m.context(7).unwrap().differentiable();
    let block = m.blocks[0].clone();
    let weights = block.weights().unwrap();
    let target = random(rng, x.dims(), 1.0);
    BlockCase {
        _dir: dir,
        block,
        weights,
        x,
        ctx,
        target,
    }
}

#[test]
fn gradients_of_linear_and_norm_weights_match_finite_differences() {
    let mut rng = Lcg::new(1);
    let c = block_case(&mut rng);
    let linears: Vec<Var> = c
        .weights
        .linears
        .iter()
        .map(|w| Var::from_tensor(w).unwrap())
        .collect();
    let norms = [
        Var::from_tensor(&c.weights.input_norm).unwrap(),
        Var::from_tensor(&c.weights.post_attention_norm).unwrap(),
    ];
    let w = BlockWeights {
        linears: linears.iter().map(|v| v.as_tensor().clone()).collect(),
        input_norm: norms[0].as_tensor().clone(),
        post_attention_norm: norms[1].as_tensor().clone(),
    };
    let grads = block_mse(&c.block, &w, &c.x, &c.ctx, &c.target)
        .backward()
        .unwrap();
    for (k, v) in linears.iter().enumerate() {
        let loss = |p: &Tensor| {
            let mut w = c.weights.clone();
            w.linears[k] = p.clone();
            scalar(&block_mse(&c.block, &w, &c.x, &c.ctx, &c.target))
        };
        let g = check_gradient(&format!("linear {k}"), v, grads.get(v), &loss, &mut rng);
        assert!(g > 1e-4, "linear {k}: gradients checked are ~0 ({g:e})");
    }
    for (k, v) in norms.iter().enumerate() {
        let loss = |p: &Tensor| {
            let mut w = c.weights.clone();
            match k {
                0 => w.input_norm = p.clone(),
                _ => w.post_attention_norm = p.clone(),
            }
            scalar(&block_mse(&c.block, &w, &c.x, &c.ctx, &c.target))
        };
        let g = check_gradient(&format!("norm {k}"), v, grads.get(v), &loss, &mut rng);
        assert!(g > 1e-4, "norm {k}: gradients checked are ~0 ({g:e})");
    }
}

#[test]
fn gradient_of_a_matrix_before_the_attention_inputs_matches_finite_differences() {
    // y = (x·R)·Wᵀ for q, k and v: the weights become W·Rᵀ (OSTQuant's rotation, learned)
    let mut rng = Lcg::new(2);
    let c = block_case(&mut rng);
    let d = c.x.dim(2).unwrap();
    let eye = Tensor::eye(d, DType::F64, &Device::Cpu).unwrap();
    let r0 = (eye + random(&mut rng, &[d, d], 0.2)).unwrap();
    let with_r = |r: &Tensor| {
        let mut w = c.weights.clone();
        for l in &mut w.linears[..3] {
            *l = l.matmul(&r.t().unwrap()).unwrap();
        }
        w
    };
    let r = Var::from_tensor(&r0).unwrap();
    let grads = block_mse(&c.block, &with_r(r.as_tensor()), &c.x, &c.ctx, &c.target)
        .backward()
        .unwrap();
    let loss = |p: &Tensor| scalar(&block_mse(&c.block, &with_r(p), &c.x, &c.ctx, &c.target));
    let g = check_gradient("R", &r, grads.get(&r), &loss, &mut rng);
    assert!(g > 1e-4, "R: gradients checked are ~0 ({g:e})");
}

#[test]
fn gradient_of_a_learned_rounding_factor_matches_finite_differences_of_its_smooth_part() {
    // w_q = s·round_ste(w / (s·e^F)) for every linear, per-row scale s, a learned factor
    // F per weight (FlexRound); round_ste(x) = x + (round(x) − x) held constant
    let mut rng = Lcg::new(3);
    let c = block_case(&mut rng);
    let scale = |w: &Tensor| {
        (w.abs().unwrap().max_keepdim(1).unwrap() / 7.0)
            .unwrap()
            .clamp(1e-8, f64::MAX)
            .unwrap()
    };
    let ratio = |w: &Tensor, f: &Tensor| {
        let s = scale(w);
        w.broadcast_div(&s.broadcast_mul(&f.exp().unwrap()).unwrap())
            .unwrap()
    };
    let f0: Vec<Tensor> = c
        .weights
        .linears
        .iter()
        .map(|w| random(&mut rng, w.dims(), 0.3))
        .collect();
    let vars: Vec<Var> = f0.iter().map(|f| Var::from_tensor(f).unwrap()).collect();
    // the rounding residual at F0, the constant part of the straight-through estimator
    let residual: Vec<Tensor> = c
        .weights
        .linears
        .iter()
        .zip(&f0)
        .map(|(w, f)| {
            let x = ratio(w, f);
            (x.round().unwrap() - x).unwrap()
        })
        .collect();
    let ste = |w: &Tensor, f: &Tensor| {
        let x = ratio(w, f);
        let rounded = (&x + (x.round().unwrap() - &x).unwrap().detach()).unwrap();
        scale(w).broadcast_mul(&rounded).unwrap()
    };
    let mut w = c.weights.clone();
    for ((l, v), orig) in w.linears.iter_mut().zip(&vars).zip(&c.weights.linears) {
        *l = ste(orig, v.as_tensor());
    }
    // the forward really runs rounded weights: on the grid s·ℤ
    let grid = (w.linears[6].broadcast_div(&scale(&c.weights.linears[6])))
        .unwrap()
        .round()
        .unwrap();
    let off = (grid.broadcast_mul(&scale(&c.weights.linears[6])).unwrap() - &w.linears[6])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(scalar(&off) < 1e-12);
    let grads = block_mse(&c.block, &w, &c.x, &c.ctx, &c.target)
        .backward()
        .unwrap();
    for k in [0, 3, 6] {
        let loss = |p: &Tensor| {
            let mut w = w.clone();
            let orig = &c.weights.linears[k];
            let smooth = (ratio(orig, p) + &residual[k]).unwrap();
            w.linears[k] = scale(orig).broadcast_mul(&smooth).unwrap();
            scalar(&block_mse(&c.block, &w, &c.x, &c.ctx, &c.target))
        };
        let v = &vars[k];
        let g = check_gradient(&format!("F {k}"), v, grads.get(v), &loss, &mut rng);
        assert!(g > 1e-6, "F {k}: gradients checked are ~0 ({g:e})");
    }
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    let mut rng = Lcg::new(4);
    let s = small();
    let (_dir, m) = load(&s, DType::F64);
    let input = ids(&s, 1, 9);
    let probe = random(&mut rng, &[1, 9, s.vocab], 1.0);
    let base = m.blocks[0].weights().unwrap();
    let loss_with = |w: &BlockWeights| {
        let mut m = m.clone();
        m.blocks[0] = m.blocks[0].with_weights(w).unwrap();
        (m.forward_in(&input, Mode::Differentiable).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let v = Var::from_tensor(&base.linears[1]).unwrap(); // k_proj of the first block
    let mut w = base.clone();
    w.linears[1] = v.as_tensor().clone();
    let grads = loss_with(&w).backward().unwrap();
    let loss = |p: &Tensor| {
        let mut w = base.clone();
        w.linears[1] = p.clone();
        scalar(&loss_with(&w))
    };
    let g = check_gradient("k_proj", &v, grads.get(&v), &loss, &mut rng);
    assert!(g > 1e-4, "k_proj: gradients checked are ~0 ({g:e})");
}

#[test]
fn differentiable_forward_equals_the_fused_forward() {
    for s in [
        Synth::default(),
        Synth {
            arch: "Qwen2ForCausalLM",
            tied: false,
            ..Synth::default()
        },
        Synth {
            arch: "MistralForCausalLM",
            sliding_window: Some(4),
            ..Synth::default()
        },
    ] {
        let (_dir, m) = load(&s, DType::F32);
        let input = ids(&s, 2, 11);
        let fused = m.forward(&input).unwrap();
        let diff = m.forward_in(&input, Mode::Differentiable).unwrap();
        let scale = fused
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let err = (fused - diff)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err <= 1e-5 * scale, "{}: {err} of {scale}", s.arch);
    }
}

#[test]
fn fused_ops_give_no_gradient_to_norm_weights() {
    // why the mode exists: candle's fused norm kernel has no backward pass, so a loss
    // through it silently trains nothing (f32: the fused kernel has no f64 version)
    let s = small();
    let (_dir, m) = load(&s, DType::F32);
    let x = m.embed(&ids(&s, 1, 5)).unwrap();
    let block = &m.blocks[0];
    let v = Var::from_tensor(block.input_layernorm.weight()).unwrap();
    let mut w = block.weights().unwrap();
    w.input_norm = v.as_tensor().clone();
    let norm_grad = |mode: Mode| -> f32 {
        let ctx = m.context(5).unwrap().with_mode(mode);
        let out = block.with_weights(&w).unwrap().forward(&x, &ctx).unwrap();
        let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        grads.get(&v).map_or(0.0, |g| {
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
    };
    assert_eq!(norm_grad(Mode::Fused), 0.0);
    assert!(norm_grad(Mode::Differentiable) > 1e-3);
}
