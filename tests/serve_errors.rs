//! The serving API's typed errors on a synthetic model: every request mistake is its own
//! `ServeError` variant and counts as the caller's, a model that does not load is `Load`,
//! and none of them panics.

mod common;

use bitsmith::infer::{Engine, GenerateOptions, LoadOptions, Message, Prompt, ServeError};
use common::{write_tokenizer, Synth};
use std::ops::ControlFlow;

fn engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let s = Synth::default();
    s.write(dir.path(), 1, false);
    write_tokenizer(dir.path(), s.vocab);
    let e = Engine::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    (dir, e)
}

fn generate(e: &Engine, prompt: Prompt, opts: &GenerateOptions) -> ServeError {
    e.generate(&prompt, opts, |_| ControlFlow::Continue(()))
        .expect_err("the request is wrong")
}

#[test]
fn request_mistakes_are_typed_caller_errors() {
    let (_dir, e) = engine();
    let vocab = e.model().config.vocab_size;
    let context = e.model().config.max_position_embeddings;
    let mut cache = e.new_cache(8);
    let errors = [
        e.forward(&[], &mut cache).unwrap_err(),
        e.forward(&[vec![1, 2], vec![3]], &mut cache).unwrap_err(),
        e.forward(&[vec![1, vocab as u32]], &mut cache).unwrap_err(),
        e.decode(&[vocab as u32 + 5]).unwrap_err(),
        generate(&e, Prompt::Tokens(vec![]), &GenerateOptions::default()),
        generate(
            &e,
            Prompt::Tokens(vec![1; context]),
            &GenerateOptions::default(),
        ),
        generate(&e, Prompt::Tokens(vec![1, 2]), &{
            let mut o = GenerateOptions::default();
            o.sampling.temperature = -1.0;
            o
        }),
        generate(
            &e,
            Prompt::Chat(vec![Message::user("hi")]),
            &GenerateOptions::default(),
        ),
    ];
    assert!(matches!(errors[0], ServeError::EmptyBatch));
    assert!(matches!(&errors[1], ServeError::RaggedBatch { lengths } if lengths == &[2, 1]));
    assert!(
        matches!(errors[2], ServeError::TokenOutOfVocabulary { id, vocab: v } if id as usize == vocab && v == vocab)
    );
    assert!(matches!(errors[3], ServeError::TokenOutOfVocabulary { .. }));
    assert!(matches!(errors[4], ServeError::EmptyPrompt));
    assert!(
        matches!(errors[5], ServeError::PromptTooLong { tokens, context: c } if tokens == context && c == context)
    );
    assert!(matches!(errors[6], ServeError::InvalidSampling { .. }));
    assert!(matches!(errors[7], ServeError::NoChatTemplate { .. }));
    for err in &errors {
        assert!(err.is_caller_error(), "{err}");
    }
    // the messages name the bad value
    assert!(errors[2].to_string().contains(&vocab.to_string()));
    // a good request still works after all that
    let g = e
        .generate(
            &Prompt::Tokens(vec![1, 2, 3]),
            &GenerateOptions {
                max_tokens: 3,
                ..Default::default()
            },
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(g.prompt_tokens, 3);
}

#[test]
fn a_model_that_does_not_load_is_a_load_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let err = match Engine::load(missing.to_str().unwrap(), &LoadOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("a missing folder loaded"),
    };
    assert!(matches!(&err, ServeError::Load { model, .. } if model.ends_with("no-such-model")));
    assert!(!err.is_caller_error());
    assert_eq!(err.load_kind(), Some(bitsmith::ErrorKind::ModelNotFound));
    // a folder with weights but no tokenizer
    Synth::default().write(dir.path(), 1, false);
    let err = match Engine::load(dir.path().to_str().unwrap(), &LoadOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("a model without a tokenizer loaded"),
    };
    assert!(matches!(err, ServeError::Load { .. }), "{err}");
    assert_eq!(err.load_kind(), Some(bitsmith::ErrorKind::InvalidModel));
}
