//! The serving API on the real fixture (SmolLM2-135M-Instruct, resolved offline by repo id
//! like `fixture_smollm2.rs`): cached greedy generation equals greedy over repeated full
//! forwards, the chat template renders as the template text says, streamed text equals
//! decoding all ids, and stop conditions end generation. Bounded: a few short generations.
//!
//! Fails, not skips, when the fixture is missing (`SMOLLM2_FIXTURE_DIR`, default
//! ~/.cache/bitsmith/fixtures/smollm2, built by scripts/make-fixture.sh).

mod common;

use bitsmith::infer::{
    Engine, FinishReason, GenerateOptions, LoadOptions, Message, Prompt, SamplingParams,
    TextStream, TokenEvent,
};
use candle_core::Tensor;
use common::fixture_env;
use std::ops::ControlFlow;
use std::sync::OnceLock;

const REPO: &str = "fixtures/SmolLM2-135M-Instruct-Q4_1-dequant";

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        fixture_env();
        Engine::load(REPO, &LoadOptions::default()).unwrap()
    })
}

/// Generate and collect the streamed events.
fn generate(
    prompt: &Prompt,
    opts: &GenerateOptions,
) -> (bitsmith::infer::Generation, Vec<TokenEvent>) {
    let mut events = Vec::new();
    let g = engine()
        .generate(prompt, opts, |e| {
            events.push(e.clone());
            ControlFlow::Continue(())
        })
        .unwrap();
    (g, events)
}

fn capital_prompt() -> Prompt {
    Prompt::Chat(vec![Message::user("What is the capital of France?")])
}

#[test]
fn cached_greedy_equals_greedy_over_full_forwards() {
    let e = engine();
    let prompt = Prompt::Text("The history of the Roman Empire".into());
    let opts = GenerateOptions {
        max_tokens: 16,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let (g, _) = generate(&prompt, &opts);
    assert_eq!(g.tokens.len(), 16);
    assert_eq!(g.finish, FinishReason::MaxTokens);

    let mut ids = e.encode(&prompt).unwrap();
    let n_prompt = ids.len();
    let model = e.model();
    for _ in 0..16 {
        let input = Tensor::from_slice(&ids, (1, ids.len()), model.device()).unwrap();
        let logits = model.forward(&input).unwrap().squeeze(0).unwrap();
        let last: Vec<f32> = logits.get(ids.len() - 1).unwrap().to_vec1().unwrap();
        ids.push(bitsmith::infer::sampler::argmax(&last) as u32);
    }
    assert_eq!(g.tokens, ids[n_prompt..]);
    assert_eq!(g.text, e.decode(&g.tokens).unwrap());
}

#[test]
fn chat_template_renders_like_the_template_says() {
    let e = engine();
    // read off tokenizer_config.json's template: a default system turn when the first
    // message is not one, `<|im_start|>ROLE\nCONTENT<|im_end|>\n` per message, and the
    // assistant header for the generation prompt
    let default_system =
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
    assert_eq!(
        e.render_chat(&[Message::user("Hi there")]).unwrap(),
        format!("{default_system}<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    );
    assert_eq!(
        e.render_chat(&[
            Message::system("Be brief."),
            Message::user("2+2?"),
            Message::new("assistant", "4"),
            Message::user("And 3+3?"),
        ])
        .unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    );
    // the special tokens are single ids, with no extra BOS in front
    let ids = e
        .encode(&Prompt::Chat(vec![Message::user("Hi there")]))
        .unwrap();
    let im_start = e.tokenizer().token_to_id("<|im_start|>").unwrap();
    assert_eq!(ids[0], im_start);
    assert_eq!(ids.iter().filter(|&&t| t == im_start).count(), 3);
    assert_eq!(
        e.eos_token_ids(),
        [e.tokenizer().token_to_id("<|im_end|>").unwrap()]
    );
}

#[test]
fn streamed_text_equals_decoding_all_ids() {
    let e = engine();
    let text = "naïve café — 東京タワー 🦀🦀 ✓ ½ Ωmega\n\tend";
    let ids = e
        .tokenizer()
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let mut stream = TextStream::new(e.tokenizer());
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(stream.push(id).unwrap());
    }
    pieces.push(stream.finish().unwrap());
    assert_eq!(pieces.concat(), e.decode(&ids).unwrap());
    assert_eq!(pieces.concat(), text);
    // some token stopped inside a character (otherwise this test shows nothing)
    assert!(
        pieces[..ids.len()].iter().any(String::is_empty),
        "{pieces:?}"
    );
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
}

#[test]
fn stop_token_and_stop_string_end_generation_and_are_reported() {
    let greedy = GenerateOptions {
        max_tokens: 48,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    let (g, events) = generate(&capital_prompt(), &greedy);
    let eos = engine().eos_token_ids()[0];
    assert_eq!(g.finish, FinishReason::StopToken(eos), "{:?}", g.text);
    assert!(!g.tokens.contains(&eos));
    assert!(g.text.contains("Paris"), "{:?}", g.text);
    let streamed: String = events.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(streamed, g.text);

    let opts = GenerateOptions {
        stop_strings: vec!["Paris".into()],
        ..greedy.clone()
    };
    let (s, events) = generate(&capital_prompt(), &opts);
    assert_eq!(s.finish, FinishReason::StopString("Paris".into()));
    let cut = g.text.find("Paris").unwrap();
    assert_eq!(s.text, g.text[..cut]);
    let streamed: String = events.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(streamed, s.text);

    let opts = GenerateOptions {
        max_tokens: 3,
        ..greedy
    };
    let (m, _) = generate(&capital_prompt(), &opts);
    assert_eq!((m.finish, m.tokens.len()), (FinishReason::MaxTokens, 3));
    assert_eq!(m.tokens, g.tokens[..3]);
}

#[test]
fn sampling_is_reproducible_per_seed_and_cancellable() {
    let opts = |seed| GenerateOptions {
        max_tokens: 12,
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: Some(0.95),
            seed,
            ..SamplingParams::default()
        },
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let prompt = Prompt::Text("Once upon a time".into());
    let (a, _) = generate(&prompt, &opts(7));
    let (b, _) = generate(&prompt, &opts(7));
    let (c, _) = generate(&prompt, &opts(8));
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);

    let mut seen = 0;
    let g = engine()
        .generate(&prompt, &opts(7), |_| {
            seen += 1;
            if seen == 4 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!((g.finish, g.tokens.len()), (FinishReason::Cancelled, 4));
    assert_eq!(g.tokens, a.tokens[..4]);
}

fn bitsmith(args: &[&str]) -> std::process::Output {
    engine(); // sets HF_HOME / HF_HUB_OFFLINE for the child too
    std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_generate_streams_the_api_result_and_rejects_bad_options() {
    let out = bitsmith(&[
        "generate",
        REPO,
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "48",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let opts = GenerateOptions {
        max_tokens: 48,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    let (g, _) = generate(&capital_prompt(), &opts);
    assert_eq!(stdout.trim_end_matches('\n'), g.text);
    assert!(
        stderr.contains("[chat;")
            && stderr.contains("prefill")
            && stderr.contains("finish: stop token"),
        "{stderr}"
    );

    let out = bitsmith(&["generate", REPO, "--prompt", "x", "--temperature=-1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("temperature"),
        "{stderr}"
    );
    let out = bitsmith(&["generate", REPO, "--prompt", "x", "--top-p", "1.5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("top-p"),
        "{stderr}"
    );
}
