//! One training step of OSTQuant (methods.md §6.4): the student (the transformed model,
//! weights fake-quantized) against the teacher (the source model) under the KL-Top loss,
//! and the gradient of that loss with respect to every rotation and scaling.
//!
//! Memory is bounded by recomputation: the forward keeps only each block's input
//! (`[tokens, hidden]` per layer); the backward walks the blocks from the last, rebuilding
//! one block's autograd graph at a time on its saved input and pulling the incoming
//! gradient through it (`Σ out ⊙ g` as the surrogate loss). The gradient then splits in
//! two: the block's graph gives `∂L/∂Ŵ` for its fake-quantized weights (passed straight
//! through where the weight was not clipped), and a second small graph — the weights
//! composed from the parameters (`compose`) — carries it on to the parameters. Neither
//! graph ever spans more than one block.

use super::base::{base_layer, head_with_norm};
use super::compose::{compose, BaseLayer, ComposedLayer, LayerTensors};
use super::fake_quant::FakeQuant;
use super::kl_top::{kl_top_loss_and_grad, TeacherTopK};
use super::params::{LayerParams, OstParams, Widths};
use crate::loader::{ModelConfig, WeightStore};
use crate::model::{CausalLm, DecoderBlock, OnlineHadamard};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use std::sync::Arc;
use std::time::Instant;

/// The gradient of every parameter, laid out as [`OstParams`].
pub type Grads = OstParams;

/// Everything a step needs that does not change between steps.
pub struct Trainer {
    pub widths: Widths,
    teacher: CausalLm,
    base: Vec<BaseLayer>,
    /// The student's embedding `[vocab, hidden]`.
    embed: Tensor,
    /// `[vocab, hidden]`, the final norm folded in.
    head: Tensor,
    r4: Option<Arc<OnlineHadamard>>,
    /// The student's weight quantizer (`None`: a float student, for gradient checks).
    pub quant: Option<FakeQuant>,
    pub top_k: usize,
    eps: f64,
}

/// Seconds per part of a step.
#[derive(Debug, Default, Clone, Copy)]
pub struct StepTimes {
    pub teacher: f64,
    pub compose_quantize: f64,
    pub forward: f64,
    pub backward: f64,
    /// Of `backward`: the weights' composition from the parameters (its graph and its
    /// backward), which costs the same whatever the batch.
    pub compose_backward: f64,
}

/// One layer of the student, ready to run.
struct StudentLayer {
    composed: ComposedLayer,
    /// The weights the block runs (fake-quantized, or the composed ones).
    run: [Tensor; 7],
    /// 1 where the gradient passes (the weight was not clipped).
    mask: [Option<Tensor>; 7],
}

impl Trainer {
    /// The student starts from `store`, the teacher is `store` too.
    pub fn new(config: &ModelConfig, store: &WeightStore, online_hadamard: bool) -> Result<Self> {
        Self::with_teacher(config, store, store, online_hadamard)
    }

    /// The student starts from `student`; `teacher` (same architecture) gives the targets.
    pub fn with_teacher(
        config: &ModelConfig,
        student: &WeightStore,
        teacher: &WeightStore,
        online_hadamard: bool,
    ) -> Result<Self> {
        let store = student;
        ensure!(
            !config.online_hadamard_down,
            "the model already rotates down_proj's input online; OSTQuant starts from a model without online ops"
        );
        let dev = Device::Cpu;
        let teacher = CausalLm::load_dense(config, teacher, DType::F32, &dev)
            .context("loading the teacher (the source model in f32)")?;
        let base = (0..config.num_hidden_layers)
            .map(|l| base_layer(config, store, l, &dev))
            .collect::<Result<Vec<_>>>()?;
        let embed = Tensor::from_vec(
            store.f32_vec(
                "model.embed_tokens.weight",
                &[config.vocab_size, config.hidden_size],
            )?,
            (config.vocab_size, config.hidden_size),
            &dev,
        )?;
        let head = Tensor::from_vec(
            head_with_norm(config, store)?,
            (config.vocab_size, config.hidden_size),
            &dev,
        )?;
        let r4 = if online_hadamard {
            Some(Arc::new(OnlineHadamard::new(
                config.intermediate_size,
                DType::F32,
                &dev,
            )?))
        } else {
            None
        };
        Ok(Self {
            widths: Widths::of(config),
            teacher,
            base,
            embed,
            head,
            r4,
            quant: None,
            top_k: 1000,
            eps: config.rms_norm_eps,
        })
    }

    pub fn r4(&self) -> Option<&OnlineHadamard> {
        self.r4.as_deref()
    }

    /// The teacher's top-k for one sequence.
    fn teacher_top_k(&self, ids: &[u32]) -> Result<TeacherTopK> {
        let t = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu)?;
        let logits = self.teacher.forward(&t)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(TeacherTopK::from_logits(
            &logits,
            self.widths_vocab(),
            self.top_k,
        ))
    }

    fn widths_vocab(&self) -> usize {
        self.head.dims()[0]
    }

    /// Compose layer `l` from `p` and quantize its weights.
    fn student_layer(&self, p: &OstParams, l: usize) -> Result<StudentLayer> {
        let t = LayerTensors::new(&p.r1, &p.layers[l], self.widths, &Device::Cpu)?;
        let composed = compose(&self.base[l], &t, self.widths, self.r4())?;
        let mut run = composed.w.clone();
        let mut mask: [Option<Tensor>; 7] = Default::default();
        if let Some(fq) = self.quant {
            for (i, w) in composed.w.iter().enumerate() {
                let (rows, cols) = w.dims2()?;
                let (q, m) = fq.apply(&w.flatten_all()?.to_vec1::<f32>()?, cols);
                run[i] = Tensor::from_vec(q, (rows, cols), &Device::Cpu)?;
                let m: Vec<f32> = m.iter().map(|&b| f32::from(b)).collect();
                mask[i] = Some(Tensor::from_vec(m, (rows, cols), &Device::Cpu)?);
            }
        }
        Ok(StudentLayer {
            composed,
            run,
            mask,
        })
    }

    /// The teacher's block `l` running the given weights, biases and norms.
    fn block(
        &self,
        l: usize,
        w: &[Tensor; 7],
        b: &[Option<Tensor>; 7],
        norms: (&Tensor, &Tensor),
    ) -> Result<DecoderBlock> {
        let mut blk = self.teacher.blocks[l].clone();
        for (i, suffix) in crate::model::spec::BLOCK_LINEARS.iter().enumerate() {
            let lin = blk
                .linear_mut(suffix)
                .context("every declared linear is a field of the block")?;
            lin.set_weight(w[i].clone())?;
            lin.set_bias(b[i].clone())?;
        }
        blk.input_layernorm = blk.input_layernorm.with_weight(norms.0.clone())?;
        blk.post_attention_layernorm = blk.post_attention_layernorm.with_weight(norms.1.clone())?;
        blk.mlp.down_input = self.r4.clone();
        Ok(blk)
    }

    /// The KL-Top loss (mean over tokens) of the student with parameters `p` on the
    /// sequences `ids` (equal lengths), and its gradient.
    pub fn step(&self, p: &OstParams, ids: &[Vec<u32>]) -> Result<(f64, Grads, StepTimes)> {
        let dev = Device::Cpu;
        let mut times = StepTimes::default();
        let (b, seq) = (ids.len(), ids[0].len());
        ensure!(
            ids.iter().all(|s| s.len() == seq),
            "training sequences of unequal length"
        );
        let tokens = b * seq;
        let w = self.widths;
        let t0 = Instant::now();
        let teacher = ids
            .iter()
            .map(|s| self.teacher_top_k(s))
            .collect::<Result<Vec<_>>>()?;
        let t1 = Instant::now();
        times.teacher = (t1 - t0).as_secs_f64();
        let layers = (0..w.layers)
            .map(|l| self.student_layer(p, l))
            .collect::<Result<Vec<_>>>()?;
        let t2 = Instant::now();
        times.compose_quantize = (t2 - t1).as_secs_f64();

        // forward, keeping each block's input
        let flat: Vec<u32> = ids.concat();
        let id_t = Tensor::from_vec(flat, (b, seq), &dev)?;
        let emb = self.embed.index_select(&id_t.flatten_all()?, 0)?;
        let r1 = Tensor::from_slice(&p.r1, (w.hidden, w.hidden), &dev)?;
        let mut x = emb.matmul(&r1)?.reshape((b, seq, w.hidden))?;
        let ctx = self.teacher.context(seq)?;
        let mut inputs = Vec::with_capacity(w.layers);
        for (l, s) in layers.iter().enumerate() {
            let blk = self.block(
                l,
                &s.run,
                &s.composed.b,
                (&s.composed.input_norm, &s.composed.post_norm),
            )?;
            inputs.push(x.clone());
            x = blk.forward(&x, &ctx)?;
        }
        let t3 = Instant::now();
        times.forward = (t3 - t2).as_secs_f64();

        // the head and the loss, one sequence at a time
        let mut grads = zero_grads(p);
        let mut g_rows = Vec::with_capacity(b);
        let mut loss = 0f64;
        for (i, top) in teacher.iter().enumerate() {
            let h = Var::from_tensor(&x.get(i)?)?;
            let r1v = Var::from_tensor(&r1)?;
            let hs = h.as_tensor();
            let rms = (hs.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
            let hn = hs.broadcast_div(&rms)?;
            // y = hn R1ᵀ, z = y Hᵀ: the head's product stays out of the graph (autograd
            // would also compute the constant head's gradient, a second vocab-sized product)
            let y = hn.matmul(&r1v.as_tensor().t()?)?;
            let z = y.detach().matmul(&self.head.t()?)?;
            let mut dz = z.flatten_all()?.to_vec1::<f32>()?;
            loss += kl_top_loss_and_grad(&mut dz, self.widths_vocab(), top, 1.0 / tokens as f32);
            let dy = Tensor::from_vec(dz, z.dims(), &dev)?.matmul(&self.head)?;
            let g = (y * dy)?.sum_all()?.backward()?;
            g_rows.push(
                g.get(hs)
                    .context("the head's input has a gradient")?
                    .clone(),
            );
            add(&mut grads.r1, g.get(r1v.as_tensor()))?;
        }
        let mut g = Tensor::stack(&g_rows, 0)?;

        // backward, block by block from the last
        let dctx = ctx.differentiable();
        for l in (0..w.layers).rev() {
            let s = &layers[l];
            let xv = Var::from_tensor(&inputs[l])?;
            let leaves: Vec<Var> = s
                .run
                .iter()
                .map(Var::from_tensor)
                .collect::<candle_core::Result<_>>()?;
            let bias_leaves: Vec<Option<Var>> = s
                .composed
                .b
                .iter()
                .map(|b| b.as_ref().map(Var::from_tensor).transpose())
                .collect::<candle_core::Result<_>>()?;
            let n_in = Var::from_tensor(&s.composed.input_norm)?;
            let n_post = Var::from_tensor(&s.composed.post_norm)?;
            let wl: [Tensor; 7] = std::array::from_fn(|i| leaves[i].as_tensor().clone());
            let bl: [Option<Tensor>; 7] =
                std::array::from_fn(|i| bias_leaves[i].as_ref().map(|v| v.as_tensor().clone()));
            let blk = self.block(l, &wl, &bl, (n_in.as_tensor(), n_post.as_tensor()))?;
            let out = blk.forward(xv.as_tensor(), &dctx)?;
            let gs = (out * &g)?.sum_all()?.backward()?;
            let g_next = gs
                .get(xv.as_tensor())
                .context("the block's input has a gradient")?
                .clone();

            // carry ∂L/∂Ŵ (straight through the quantizer) to the parameters
            let tc = Instant::now();
            let t = LayerTensors::new(&p.r1, &p.layers[l], w, &dev)?;
            let vars = ParamVars::new(&t)?;
            let c = compose(&self.base[l], &vars.tensors(), w, self.r4())?;
            let mut surrogate = Tensor::zeros((), DType::F32, &dev)?;
            for i in 0..7 {
                let Some(gw) = gs.get(leaves[i].as_tensor()) else {
                    continue;
                };
                let gw = match &s.mask[i] {
                    Some(m) => (gw * m)?,
                    None => gw.clone(),
                };
                surrogate = (surrogate + (&c.w[i] * gw)?.sum_all()?)?;
                if let (Some(bv), Some(cb)) = (&bias_leaves[i], &c.b[i]) {
                    if let Some(gb) = gs.get(bv.as_tensor()) {
                        surrogate = (surrogate + (cb * gb)?.sum_all()?)?;
                    }
                }
            }
            for (n, cn) in [(&n_in, &c.input_norm), (&n_post, &c.post_norm)] {
                if let Some(gn) = gs.get(n.as_tensor()) {
                    surrogate = (surrogate + (cn * gn)?.sum_all()?)?;
                }
            }
            let gp = surrogate.backward()?;
            vars.collect(&gp, &mut grads.r1, &mut grads.layers[l])?;
            times.compose_backward += tc.elapsed().as_secs_f64();
            g = g_next;
        }
        // the embedding: x₀ = E[ids] R1, so ∂L/∂R1 += E[ids]ᵀ g₀
        let g0 = g.reshape((tokens, w.hidden))?;
        add(&mut grads.r1, Some(&emb.t()?.matmul(&g0)?))?;
        times.backward = t3.elapsed().as_secs_f64();
        Ok((loss / tokens as f64, grads, times))
    }
}

/// One layer's parameters as variables.
struct ParamVars {
    v: [Var; 7],
}

impl ParamVars {
    fn new(t: &LayerTensors) -> Result<Self> {
        let v = |x: &Tensor| Var::from_tensor(x);
        Ok(Self {
            v: [
                v(&t.r1)?,
                v(&t.r2)?,
                v(&t.s_qkv)?,
                v(&t.s_ug)?,
                v(&t.s_qk)?,
                v(&t.s_ov)?,
                v(&t.s_ud)?,
            ],
        })
    }

    fn tensors(&self) -> LayerTensors {
        let t = |i: usize| self.v[i].as_tensor().clone();
        LayerTensors {
            r1: t(0),
            r2: t(1),
            s_qkv: t(2),
            s_ug: t(3),
            s_qk: t(4),
            s_ov: t(5),
            s_ud: t(6),
        }
    }

    fn collect(
        &self,
        g: &candle_core::backprop::GradStore,
        r1: &mut [f32],
        layer: &mut LayerParams,
    ) -> Result<()> {
        let get = |i: usize| g.get(self.v[i].as_tensor());
        add(r1, get(0))?;
        add(&mut layer.r2, get(1))?;
        add(&mut layer.s_qkv, get(2))?;
        add(&mut layer.s_ug, get(3))?;
        add(&mut layer.s_qk, get(4))?;
        add(&mut layer.s_ov, get(5))?;
        add(&mut layer.s_ud, get(6))?;
        Ok(())
    }
}

/// `acc += g` (nothing when a parameter got no gradient).
fn add(acc: &mut [f32], g: Option<&Tensor>) -> Result<()> {
    if let Some(g) = g {
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        ensure!(
            g.len() == acc.len(),
            "a gradient of {} values for {}",
            g.len(),
            acc.len()
        );
        acc.iter_mut().zip(&g).for_each(|(a, g)| *a += g);
    }
    Ok(())
}

fn zero_grads(p: &OstParams) -> Grads {
    let z = |v: &Vec<f32>| vec![0f32; v.len()];
    OstParams {
        widths: p.widths,
        r1: z(&p.r1),
        layers: p
            .layers
            .iter()
            .map(|l| LayerParams {
                r2: z(&l.r2),
                s_qkv: z(&l.s_qkv),
                s_ug: z(&l.s_ug),
                s_qk: z(&l.s_qk),
                s_ov: z(&l.s_ov),
                s_ud: z(&l.s_ud),
            })
            .collect(),
    }
}
