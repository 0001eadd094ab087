//! A downstream crate's view of bitsmith: it is built without the `internals` feature, so
//! it sees only the crate-root API. `.ci/run` builds it (it is never run); a public item
//! that moves behind `pub(crate)`, or a public signature that names an internal type,
//! breaks this build.

use bitsmith::recipe::{AllocationSpec, GridSpec, GroupSize, RangeFit, RoundingSpec};
use bitsmith::{
    kl_divergence, load_model_with, load_tokenizer, parse_device, parse_dtype, perplexity,
    quantize, quantize_to, resolve_model, Engine, ErrorKind, GenerateOptions, KlBase, KlOptions,
    LoadOptions, LogitsFor, Message, PplOptions, Prompt, Recipe, RunOptions, SourceModel,
    WeightMode, WriteOptions,
};
use candle_core::Tensor;
use std::ops::ControlFlow;
use std::path::Path;

fn quantize_and_check(model: &str, out: &Path) -> bitsmith::Result<f64> {
    let source = SourceModel::open(model, None)?;
    let mut recipe = Recipe::from_file(Path::new("recipe.json"))?;
    recipe.allocation = AllocationSpec::Uniform {
        grid: GridSpec::Uniform {
            bits: 4,
            group_size: GroupSize::Columns(128),
            sym: false,
            range: RangeFit::MinMax,
        },
    };
    recipe.rounding = RoundingSpec::Rtn;
    recipe.validate()?;
    let in_memory = quantize(&source, &recipe, None, &RunOptions::default())?;
    assert!(!in_memory.layers.is_empty());
    let written = quantize_to(out, &source, &recipe, &WriteOptions::default())?;

    let device = parse_device("cpu")?;
    let files = resolve_model(written.path.to_str().unwrap_or_default(), None)?;
    let packed = load_model_with(
        &files,
        parse_dtype("f32")?,
        &device,
        WeightMode::Packed(Default::default()),
    )?;
    let reference =
        bitsmith::load_model(&resolve_model(model, None)?, parse_dtype("f32")?, &device)?;
    let ids = load_tokenizer(&files)?
        .encode("The capital of France is Paris.", false)
        .map_err(|e| bitsmith::Error::from(anyhow::anyhow!("{e}")))?
        .get_ids()
        .to_vec();
    let opts = PplOptions {
        seqlen: 4,
        batch: 1,
        limit: None,
        progress: false,
    };
    let ppl = perplexity(&packed, &ids, &opts)?.ppl;
    let kl = KlOptions {
        seqlen: 4,
        batch: 1,
        limit: None,
        progress: false,
    };
    let _ = kl_divergence(KlBase::Model(&reference), &[&packed], &ids, &kl)?;
    let mut cache = packed.new_cache(16);
    let t = Tensor::from_slice(&ids, (1, ids.len()), &device)?;
    let _ = packed.forward_cached(&t, &mut cache, LogitsFor::Last)?;
    Ok(ppl)
}

fn main() -> anyhow::Result<()> {
    match quantize_and_check("HuggingFaceTB/SmolLM2-135M-Instruct", Path::new("out")) {
        Ok(ppl) => println!("{ppl}"),
        Err(e) if e.kind() == ErrorKind::ModelNotFound => eprintln!("{e}"),
        Err(e) => return Err(e.into()),
    }
    let engine = Engine::load("out", &LoadOptions::default())?;
    let prompt = Prompt::Chat(vec![Message::user("Hi")]);
    let done = engine.generate(&prompt, &GenerateOptions::default(), |event| {
        print!("{}", event.text);
        ControlFlow::Continue(())
    })?;
    println!("{:?}", done.finish);
    Ok(())
}
