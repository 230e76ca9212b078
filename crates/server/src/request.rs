//! Parsing and validating OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`).
//!
//! Fields are read from the JSON object one by one so that every error names its `param`.
//! Unknown fields are ignored, as OpenAI's SDKs send extras; fields we support only at their
//! default (penalties, `logit_bias`, tools, `echo`, `best_of`, `suffix`) are refused when set to
//! anything else rather than silently answering with a changed meaning.

use pagedkv_engine::ChatMessage;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most choices per request.
pub const MAX_CHOICES: usize = 16;
/// Most stop strings, as OpenAI allows.
pub const MAX_STOPS: usize = 4;
/// Most alternatives per token in `top_logprobs` / `logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// `max_tokens` of `/v1/completions` when the request gives none (OpenAI's default).
pub const COMPLETION_DEFAULT_MAX_TOKENS: usize = 16;

/// Which route a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// What the prompt is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    /// Chat messages, rendered with the model's template.
    Messages(Vec<ChatMessage>),
    /// Plain text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

impl PromptInput {
    /// The request field it came from.
    pub fn param(&self) -> &'static str {
        match self {
            PromptInput::Messages(_) => "messages",
            PromptInput::Text(_) | PromptInput::Tokens(_) => "prompt",
        }
    }
}

/// A validated generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// The route.
    pub route: Route,
    /// `model`, if given.
    pub model: Option<String>,
    /// The prompt.
    pub prompt: PromptInput,
    /// Most tokens per choice (`None`: up to the context).
    pub max_tokens: Option<usize>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus threshold.
    pub top_p: f32,
    /// RNG seed, if given.
    pub seed: Option<u64>,
    /// Choices.
    pub n: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Alternatives per token when log-probabilities were asked for.
    pub logprobs: Option<usize>,
    /// Server-sent events.
    pub stream: bool,
    /// A final chunk with the usage (streaming only).
    pub include_usage: bool,
    /// Add the `pagedkv_cache` report.
    pub cache_report: bool,
    /// The tenant's cache salt.
    pub cache_salt: Option<String>,
}

/// Parses a request body of `route`.
pub fn parse(route: Route, body: &[u8]) -> Result<GenerationRequest, ApiError> {
    let obj = json_object(body)?;
    let f = Fields(&obj);
    refuse_unsupported(&f, route)?;
    let prompt = match route {
        Route::Chat => PromptInput::Messages(messages(&f)?),
        Route::Completion => completion_prompt(&f)?,
    };
    let max_tokens = match route {
        // `max_completion_tokens` replaces the deprecated `max_tokens` in chat and wins
        Route::Chat => match f.count("max_completion_tokens", 1, usize::MAX)? {
            Some(n) => Some(n),
            None => f.count("max_tokens", 1, usize::MAX)?,
        },
        Route::Completion => Some(
            f.count("max_tokens", 1, usize::MAX)?
                .unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS),
        ),
    };
    let logprobs = match route {
        Route::Chat => {
            let on = f.boolean("logprobs")?.unwrap_or(false);
            let top = f.count("top_logprobs", 0, MAX_TOP_LOGPROBS)?;
            if top.is_some() && !on {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs` set to true",
                ));
            }
            on.then_some(top.unwrap_or(0))
        }
        Route::Completion => f.count("logprobs", 0, MAX_TOP_LOGPROBS)?,
    };
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(options)) => {
            if !stream {
                return Err(ApiError::invalid(
                    "stream_options",
                    "`stream_options` is only allowed with `stream` set to true",
                ));
            }
            Fields(options).boolean("include_usage")?.unwrap_or(false)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` must be an object",
            ))
        }
    };
    Ok(GenerationRequest {
        route,
        model: f.string("model")?,
        prompt,
        max_tokens,
        temperature: f.number("temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32,
        top_p: top_p(&f)?,
        seed: f.seed()?,
        n: f.count("n", 1, MAX_CHOICES)?.unwrap_or(1),
        stop: stops(&f)?,
        logprobs,
        stream,
        include_usage,
        cache_report: f.boolean("cache_report")?.unwrap_or(false),
        cache_salt: salt(&f)?,
    })
}

/// Parses the body of `/v1/cache/lookup` and `/v1/cache/pin`: `prompt` (text or token ids) or
/// `messages`, `cache_salt`, and for pins `ttl_s`.
pub fn parse_cache_prompt(
    body: &[u8],
) -> Result<(PromptInput, Option<String>, Option<f64>), ApiError> {
    let obj = json_object(body)?;
    let f = Fields(&obj);
    let prompt = match (f.get("messages"), f.get("prompt")) {
        (Some(_), None) => PromptInput::Messages(messages(&f)?),
        (None, Some(_)) => completion_prompt(&f)?,
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of `prompt` and `messages`",
            ))
        }
    };
    let ttl = f.number("ttl_s", 0.001, 30.0 * 86_400.0)?;
    Ok((prompt, salt(&f)?, ttl))
}

/// The body as a JSON object.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(ApiError::malformed("the body must be a JSON object")),
        Err(e) => Err(ApiError::malformed(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

/// Typed access to the fields of a request object.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// A field that is present and not `null`.
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::invalid(
                name,
                format!("`{name}` must be a string"),
            )),
        }
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::invalid(
                name,
                format!("`{name}` must be a boolean"),
            )),
        }
    }

    fn number(&self, name: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
                _ => Err(ApiError::invalid(
                    name,
                    format!("`{name}` must be a number from {min} to {max}"),
                )),
            },
        }
    }

    fn count(&self, name: &str, min: usize, max: usize) -> Result<Option<usize>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_u64().and_then(|x| usize::try_from(x).ok()) {
                Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
                _ if max == usize::MAX => Err(ApiError::invalid(
                    name,
                    format!("`{name}` must be an integer of at least {min}"),
                )),
                _ => Err(ApiError::invalid(
                    name,
                    format!("`{name}` must be an integer from {min} to {max}"),
                )),
            },
        }
    }

    /// `seed`: any 64-bit integer (negative ones are taken as their two's complement).
    fn seed(&self) -> Result<Option<u64>, ApiError> {
        match self.get("seed") {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_i64().map(|x| x as u64))
                .map(Some)
                .ok_or_else(|| ApiError::invalid("seed", "`seed` must be an integer")),
        }
    }
}

fn top_p(f: &Fields) -> Result<f32, ApiError> {
    match f.number("top_p", 0.0, 1.0)? {
        Some(p) if p <= 0.0 => Err(ApiError::invalid(
            "top_p",
            "`top_p` must be greater than 0 and at most 1",
        )),
        Some(p) => Ok(p as f32),
        None => Ok(1.0),
    }
}

fn salt(f: &Fields) -> Result<Option<String>, ApiError> {
    match f.string("cache_salt")? {
        Some(s) if s.is_empty() => Err(ApiError::invalid(
            "cache_salt",
            "`cache_salt` must not be empty",
        )),
        other => Ok(other),
    }
}

fn refuse_unsupported(f: &Fields, route: Route) -> Result<(), ApiError> {
    for name in ["presence_penalty", "frequency_penalty"] {
        if f.get(name).is_some_and(|v| v.as_f64() != Some(0.0)) {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` is not supported"),
            ));
        }
    }
    let empty_object = |v: &Value| v.as_object().is_some_and(Map::is_empty);
    if f.get("logit_bias").is_some_and(|v| !empty_object(v)) {
        return Err(ApiError::invalid(
            "logit_bias",
            "`logit_bias` is not supported",
        ));
    }
    let chat_only = [
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
    ];
    let completion_only = ["suffix"];
    let names: &[&str] = match route {
        Route::Chat => &chat_only,
        Route::Completion => &completion_only,
    };
    for name in names {
        if f.get(name).is_some() {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` is not supported"),
            ));
        }
    }
    if route == Route::Completion {
        if f.boolean("echo")? == Some(true) {
            return Err(ApiError::invalid("echo", "`echo` is not supported"));
        }
        if f.count("best_of", 1, MAX_CHOICES)?.is_some_and(|b| b != 1) {
            return Err(ApiError::invalid(
                "best_of",
                "`best_of` other than 1 is not supported",
            ));
        }
    }
    Ok(())
}

fn messages(f: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |m: &str| ApiError::invalid("messages", m.to_string());
    let Some(Value::Array(list)) = f.get("messages") else {
        return Err(bad("`messages` must be a non-empty array of messages"));
    };
    if list.is_empty() {
        return Err(bad("`messages` must not be empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&format!("messages[{i}] needs a `role` string")))?;
            if !["system", "developer", "user", "assistant"].contains(&role) {
                return Err(bad(&format!(
                    "messages[{i}].role `{role}` is not one of system, developer, user, assistant"
                )));
            }
            let content = message_content(m.get("content")).ok_or_else(|| {
                bad(&format!(
                    "messages[{i}].content must be a string or text parts"
                ))
            })?;
            // `developer` is OpenAI's newer name for the system role
            let role = if role == "developer" { "system" } else { role };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

/// A message's text: a string, or an array of `{"type": "text", "text": …}` parts joined.
fn message_content(content: Option<&Value>) -> Option<String> {
    match content? {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(
                |p| match (p.get("type")?.as_str()?, p.get("text")?.as_str()) {
                    ("text", Some(t)) => Some(t.to_string()),
                    _ => None,
                },
            )
            .collect(),
        _ => None,
    }
}

fn completion_prompt(f: &Fields) -> Result<PromptInput, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, an array of token ids, or an array of one string",
        )
    };
    match f.get("prompt") {
        Some(Value::String(s)) => Ok(PromptInput::Text(s.clone())),
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => items
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<Vec<u32>>>()
            .map(PromptInput::Tokens)
            .ok_or_else(bad),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(PromptInput::Text(s.clone())),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

fn stops(f: &Fields) -> Result<Vec<String>, ApiError> {
    let bad = |m: &str| ApiError::invalid("stop", m.to_string());
    let stops = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`stop` must be a string or an array of strings"))?,
        Some(_) => return Err(bad("`stop` must be a string or an array of strings")),
    };
    if stops.len() > MAX_STOPS {
        return Err(bad("`stop` takes at most 4 strings"));
    }
    if stops.iter().any(String::is_empty) {
        return Err(bad("stop strings must not be empty"));
    }
    Ok(stops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(route: Route, body: &str) -> Option<String> {
        parse(route, body.as_bytes()).unwrap_err().param
    }

    #[test]
    fn chat_fields_parse_and_name_their_errors() {
        let r = parse(
            Route::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],
                "max_tokens":5,"max_completion_tokens":7,"stop":"x","n":2,"seed":-1,
                "logprobs":true,"top_logprobs":3,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.stop, vec!["x"]);
        assert_eq!((r.n, r.seed, r.logprobs), (2, Some(u64::MAX), Some(3)));
        assert!(r.include_usage);
        assert_eq!(
            param(Route::Chat, r#"{"messages":[]}"#).as_deref(),
            Some("messages")
        );
        assert_eq!(
            param(
                Route::Chat,
                r#"{"messages":[{"role":"user","content":"a"}],"temperature":3}"#
            )
            .as_deref(),
            Some("temperature")
        );
        assert_eq!(
            param(
                Route::Chat,
                r#"{"messages":[{"role":"user","content":"a"}],"top_logprobs":2}"#
            )
            .as_deref(),
            Some("top_logprobs")
        );
        assert_eq!(
            param(
                Route::Chat,
                r#"{"messages":[{"role":"user","content":"a"}],"stop":["","b"]}"#
            )
            .as_deref(),
            Some("stop")
        );
        assert_eq!(
            param(
                Route::Chat,
                r#"{"messages":[{"role":"user","content":"a"}],"tools":[]}"#
            )
            .as_deref(),
            Some("tools")
        );
        assert!(parse(Route::Chat, b"[1]").unwrap_err().param.is_none());
        assert!(parse(Route::Chat, b"{").is_err());
    }

    #[test]
    fn completion_prompts_and_defaults() {
        let r = parse(Route::Completion, br#"{"prompt":[1,2,3],"logprobs":2}"#).unwrap();
        assert_eq!(r.prompt, PromptInput::Tokens(vec![1, 2, 3]));
        assert_eq!(r.max_tokens, Some(COMPLETION_DEFAULT_MAX_TOKENS));
        assert_eq!(r.logprobs, Some(2));
        assert_eq!(
            param(Route::Completion, r#"{"prompt":["a","b"]}"#).as_deref(),
            Some("prompt")
        );
        assert_eq!(
            param(Route::Completion, r#"{"prompt":"a","n":0}"#).as_deref(),
            Some("n")
        );
        assert_eq!(
            param(Route::Completion, r#"{"prompt":"a","stream_options":{}}"#).as_deref(),
            Some("stream_options")
        );
        assert_eq!(
            param(Route::Completion, r#"{"prompt":"a","echo":true}"#).as_deref(),
            Some("echo")
        );
        assert_eq!(
            param(Route::Completion, r#"{"prompt":[1,99999999999]}"#).as_deref(),
            Some("prompt")
        );
    }
}
