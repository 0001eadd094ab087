//! Chat templates: the Jinja template a model ships (`chat_template.jinja`,
//! `chat_template.json` or `tokenizer_config.json`'s `chat_template`), rendered with
//! minijinja in the environment transformers uses (`trim_blocks`, `lstrip_blocks`, loop
//! controls, `raise_exception`, Python string methods).

use crate::loader::ModelFiles;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }

    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }

    pub fn system(content: &str) -> Self {
        Self::new("system", content)
    }
}

/// A model's chat template with the special tokens it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for error messages.
    origin: String,
}

impl ChatTemplate {
    /// The template of a resolved model, if it has one.
    pub fn from_files(files: &ModelFiles) -> Result<Option<Self>> {
        let extra = |name: &str| {
            files
                .extras
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| p.as_path())
        };
        let tokenizer_config = extra("tokenizer_config.json").map(read_json).transpose()?;
        let token = |key: &str| -> String {
            tokenizer_config
                .as_ref()
                .and_then(|c| special_token(c.get(key)?))
                .unwrap_or_default()
        };
        let (source, origin) = if let Some(p) = extra("chat_template.jinja") {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading chat template {}", p.display()))?;
            (text, p.display().to_string())
        } else if let Some(p) = extra("chat_template.json") {
            let v = read_json(p)?;
            let t = template_value(v.get("chat_template"))
                .with_context(|| format!("{}: no usable `chat_template`", p.display()))?;
            (t, p.display().to_string())
        } else {
            let Some(v) = tokenizer_config
                .as_ref()
                .and_then(|c| c.get("chat_template"))
            else {
                return Ok(None);
            };
            let p = extra("tokenizer_config.json").unwrap_or(Path::new("tokenizer_config.json"));
            let t = template_value(Some(v))
                .with_context(|| format!("{}: `chat_template` is not usable", p.display()))?;
            (t, p.display().to_string())
        };
        Ok(Some(Self {
            source,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            origin,
        }))
    }

    /// A template from its source text (tests, or a template supplied by the caller).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Self {
        Self {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            origin: "the given chat template".into(),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt text for `messages`; `add_generation_prompt` appends the header of the
    /// assistant's turn so the model answers.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| anyhow!("chat template in {}: {e:#}", self.origin))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| anyhow!("rendering the chat template of {}: {e:#}", self.origin))
    }
}

fn read_json(p: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))
}

/// A special token in tokenizer_config.json: a string, or an AddedToken `{content: ...}`.
pub(crate) fn special_token(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of named templates (the `default` one is used).
fn template_value(v: Option<&Value>) -> Result<String> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("a list of templates without one named `default`")),
        Some(other) => bail!("expected a string, found {other}"),
        None => bail!("missing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_transformers_whitespace_rules_and_raises() {
        // trim_blocks/lstrip_blocks remove the newlines and indentation around tags
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}{% endif %}\n[{{ m.role | upper }}] {{ m.content.strip() }}{{ eos_token }}\n{% endfor %}\n{% if add_generation_prompt %}[ASSISTANT]{% endif %}",
            "<s>",
            "</s>",
        );
        let s = t
            .render(&[Message::system(" Be brief. "), Message::user("Hi")], true)
            .unwrap();
        assert_eq!(s, "[SYSTEM] Be brief.</s>\n[USER] Hi</s>\n[ASSISTANT]");
        let e = t
            .render(&[Message::new("bad", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no bad"), "{e}");
    }

    #[test]
    fn named_template_list_and_added_token_objects() {
        let v: Value = serde_json::json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]);
        assert_eq!(template_value(Some(&v)).unwrap(), "D");
        let tok: Value = serde_json::json!({"content": "<s>", "lstrip": false});
        assert_eq!(special_token(&tok).unwrap(), "<s>");
    }
}
