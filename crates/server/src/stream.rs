//! Engine events to OpenAI responses: a whole response, or server-sent event chunks ending in
//! `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{select_all, StreamExt};
use pagedkv::Admission;
use pagedkv_engine::{FinishReason, GgufTokenizer, TokenLogprobs};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};

use crate::engine::{Command, GenEvent};
use crate::error::ApiError;
use crate::report::cache_report_json;
use crate::request::{GenerationRequest, Route};
use crate::routes::unix_time;
use crate::state::{AppState, Ready};
use crate::text::TextStream;

/// What every chunk or response of one request repeats.
pub struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    route: Route,
    prompt_tokens: usize,
    logprobs: bool,
    cache_report: bool,
    include_usage: bool,
}

impl ResponseMeta {
    /// The metadata of a request whose prompt has `prompt_tokens` tokens and whose first
    /// choice has the engine id `first_id` (unique, so the response id is too).
    pub fn new(
        app: &AppState,
        req: &GenerationRequest,
        prompt_tokens: usize,
        first_id: u64,
    ) -> Self {
        let prefix = match req.route {
            Route::Chat => "chatcmpl",
            Route::Completion => "cmpl",
        };
        Self {
            id: format!("{prefix}-{:x}{first_id:06x}", unix_time()),
            created: unix_time(),
            model: app.config.model_name.clone(),
            route: req.route,
            prompt_tokens,
            logprobs: req.logprobs.is_some(),
            cache_report: req.cache_report,
            include_usage: req.include_usage,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.route, chunk) {
            (Route::Chat, false) => "chat.completion",
            (Route::Chat, true) => "chat.completion.chunk",
            (Route::Completion, _) => "text_completion",
        }
    }

    /// The envelope of a response or chunk around its choices.
    fn envelope(&self, choices: Vec<Value>, chunk: bool) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if chunk && self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// `usage`, with the cached tokens of the first choice (the others find its prompt cached).
    fn usage(&self, choices: &[ChoiceState]) -> Value {
        let completion: usize = choices.iter().map(|c| c.tokens).sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": first_cached(choices)},
        })
    }

    fn cache_json(&self, choices: &[ChoiceState]) -> Option<Value> {
        let report = choices.first()?.admission.as_ref()?;
        Some(cache_report_json(&report.report, self.prompt_tokens))
    }
}

fn first_cached(choices: &[ChoiceState]) -> usize {
    choices
        .first()
        .and_then(|c| c.admission.as_ref())
        .map_or(0, |a| a.cached_tokens)
}

/// One choice's progress.
struct ChoiceState {
    id: u64,
    text: TextStream,
    /// Tokens generated.
    tokens: usize,
    finish: Option<&'static str>,
    admission: Option<Admission>,
    /// Log-probabilities of tokens whose text is not yet released.
    pending: Vec<(u32, TokenLogprobs)>,
}

/// What one event adds to a choice.
enum Update {
    Nothing,
    /// Text released, with the log-probabilities of the tokens that made it.
    Text(String, Vec<(u32, TokenLogprobs)>),
    Failed(ApiError),
}

impl ChoiceState {
    fn new(id: u64, stops: &[String]) -> Self {
        Self {
            id,
            text: TextStream::new(stops.to_vec()),
            tokens: 0,
            finish: None,
            admission: None,
            pending: Vec::new(),
        }
    }

    fn apply(&mut self, tokenizer: &GgufTokenizer, event: GenEvent) -> Update {
        if self.finish.is_some() {
            return Update::Nothing;
        }
        match event {
            GenEvent::Admitted(a) => {
                self.admission = Some(a);
                Update::Nothing
            }
            GenEvent::Token { token, logprobs } => {
                self.tokens += 1;
                if let Some(lp) = logprobs {
                    self.pending.push((token, lp));
                }
                let released = self.text.push(tokenizer, token);
                if released.stopped {
                    self.finish = Some("stop");
                }
                if released.text.is_empty() && !released.stopped {
                    return Update::Nothing;
                }
                Update::Text(released.text, std::mem::take(&mut self.pending))
            }
            GenEvent::Finished(reason) => {
                let tail = self.text.finish(tokenizer);
                self.finish = Some(if self.text.stopped() {
                    "stop"
                } else {
                    finish_reason(reason)
                });
                Update::Text(tail, std::mem::take(&mut self.pending))
            }
            GenEvent::Failed(e) => {
                self.finish = Some("error");
                Update::Failed(e)
            }
            GenEvent::Pinned(_) => Update::Nothing,
        }
    }
}

/// OpenAI's name of a finish reason.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
}

/// Log-probabilities in the route's format; `offset` is the text offset of the first token
/// (completions only).
fn logprobs_json(
    route: Route,
    tokenizer: &GgufTokenizer,
    entries: &[(u32, TokenLogprobs)],
    offset: usize,
) -> Value {
    let piece = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
    match route {
        Route::Chat => {
            let entry = |id: u32, logprob: f32| {
                let token = piece(id);
                json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
            };
            let content: Vec<Value> = entries
                .iter()
                .map(|(id, lp)| {
                    let mut e = entry(*id, lp.logprob);
                    e["top_logprobs"] = lp.top.iter().map(|(t, l)| entry(*t, *l)).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Route::Completion => {
            let mut text_offset = Vec::new();
            let mut at = offset;
            let tokens: Vec<String> = entries
                .iter()
                .map(|(id, _)| {
                    let p = piece(*id);
                    text_offset.push(at);
                    at += p.len();
                    p
                })
                .collect();
            let top: Vec<Value> = entries
                .iter()
                .map(|(_, lp)| {
                    let map: serde_json::Map<String, Value> =
                        lp.top.iter().map(|(t, l)| (piece(*t), json!(l))).collect();
                    Value::Object(map)
                })
                .collect();
            json!({
                "tokens": tokens,
                "token_logprobs": entries.iter().map(|e| e.1.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": text_offset,
            })
        }
    }
}

type Choices = Vec<(u64, mpsc::UnboundedReceiver<GenEvent>)>;

/// One choice to its end: its state, its text and the log-probabilities of its tokens.
async fn follow_choice(
    app: &AppState,
    tokenizer: &GgufTokenizer,
    mut state: ChoiceState,
    mut receiver: mpsc::UnboundedReceiver<GenEvent>,
) -> Result<(ChoiceState, String, Vec<(u32, TokenLogprobs)>), ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while state.finish.is_none() {
        let Some(event) = receiver.recv().await else {
            return Err(ApiError::unavailable("the engine stopped"));
        };
        match state.apply(tokenizer, event) {
            Update::Nothing => {}
            Update::Text(t, lp) => {
                text.push_str(&t);
                logprobs.extend(lp);
            }
            Update::Failed(e) => return Err(e),
        }
    }
    if state.text.stopped() {
        // the stop string ended the choice: the engine need not run it further
        let _ = app.send(Command::Cancel { id: state.id });
    }
    Ok((state, text, logprobs))
}

/// Waits for every choice and builds the whole response.
pub async fn collect(
    app: &AppState,
    ready: &Ready,
    meta: &ResponseMeta,
    choices: Choices,
    stops: &[String],
) -> Result<Value, ApiError> {
    // every choice is followed at once, so each is cancelled as soon as its stop string shows
    let runs = choices.into_iter().map(|(id, receiver)| {
        follow_choice(app, &ready.tokenizer, ChoiceState::new(id, stops), receiver)
    });
    let mut states = Vec::new();
    let mut bodies = Vec::new();
    for (index, run) in futures_util::future::join_all(runs)
        .await
        .into_iter()
        .enumerate()
    {
        let (state, text, logprobs) = run?;
        let logprobs = meta
            .logprobs
            .then(|| logprobs_json(meta.route, &ready.tokenizer, &logprobs, 0));
        bodies.push(match meta.route {
            Route::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": state.finish,
            }),
            Route::Completion => json!({
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": state.finish,
            }),
        });
        states.push(state);
    }
    let mut response = meta.envelope(bodies, false);
    response["usage"] = meta.usage(&states);
    if meta.cache_report {
        response["pagedkv_cache"] = meta.cache_json(&states).unwrap_or(Value::Null);
    }
    Ok(response)
}

/// Streams the choices as server-sent events. The events are produced by a task; when the
/// client goes, the task's next send fails, it ends, and dropping the choices' channels
/// cancels their sequences in the engine.
pub fn stream_response(
    app: Arc<AppState>,
    meta: ResponseMeta,
    choices: Choices,
    stops: Vec<String>,
) -> Response {
    let (sender, receiver) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        // a send fails only when the client is gone: then stop
        let _ = produce(&app, &meta, choices, &stops, &sender).await;
    });
    Sse::new(ReceiverStream::new(receiver).map(Ok::<_, Infallible>)).into_response()
}

struct ClientGone;

async fn produce(
    app: &AppState,
    meta: &ResponseMeta,
    choices: Choices,
    stops: &[String],
    sender: &mpsc::Sender<Event>,
) -> Result<(), ClientGone> {
    let send = |v: Value| async move {
        sender
            .send(Event::default().data(v.to_string()))
            .await
            .map_err(|_| ClientGone)
    };
    let Some(ready) = app.shared.ready.get() else {
        return send(ApiError::unavailable("the model is loading").body()).await;
    };
    let mut states: Vec<ChoiceState> = choices
        .iter()
        .map(|c| ChoiceState::new(c.0, stops))
        .collect();
    let mut offsets = vec![0usize; states.len()];
    if meta.route == Route::Chat {
        for index in 0..states.len() {
            let delta = json!({"role": "assistant", "content": ""});
            send(meta.envelope(vec![chunk_choice(meta, index, delta, None, None)], true)).await?;
        }
    }
    let mut merged = select_all(
        choices
            .into_iter()
            .enumerate()
            .map(|(index, (_, receiver))| {
                UnboundedReceiverStream::new(receiver).map(move |event| (index, event))
            }),
    );
    let mut open = states.len();
    while open > 0 {
        let next = tokio::select! {
            next = merged.next() => next,
            // a client that leaves while its request waits is noticed now, not at its first token
            () = sender.closed() => return Err(ClientGone),
        };
        let Some((index, event)) = next else {
            return send(ApiError::unavailable("the engine stopped").body()).await;
        };
        let state = &mut states[index];
        let was_open = state.finish.is_none();
        match state.apply(&ready.tokenizer, event) {
            Update::Nothing => {}
            Update::Text(text, logprobs) => {
                let lp = (meta.logprobs && !logprobs.is_empty()).then(|| {
                    logprobs_json(meta.route, &ready.tokenizer, &logprobs, offsets[index])
                });
                offsets[index] += text.len();
                let finish = state.finish;
                if !text.is_empty() || lp.is_some() {
                    let delta = json!({"content": text});
                    let body = chunk_choice(meta, index, delta, lp, None);
                    send(meta.envelope(vec![body], true)).await?;
                }
                if let Some(reason) = finish {
                    let body = chunk_choice(meta, index, json!({}), None, Some(reason));
                    send(meta.envelope(vec![body], true)).await?;
                }
            }
            Update::Failed(e) => send(e.body()).await?,
        }
        if was_open && state.finish.is_some() {
            open -= 1;
            if state.text.stopped() {
                let _ = app.send(Command::Cancel { id: state.id });
            }
        }
    }
    if meta.include_usage || meta.cache_report {
        let mut last = meta.envelope(Vec::new(), true);
        if meta.include_usage {
            last["usage"] = meta.usage(&states);
        }
        if meta.cache_report {
            last["pagedkv_cache"] = meta.cache_json(&states).unwrap_or(Value::Null);
        }
        send(last).await?;
    }
    sender
        .send(Event::default().data("[DONE]"))
        .await
        .map_err(|_| ClientGone)
}

/// One choice of a chunk: a chat `delta` or completion `text`.
fn chunk_choice(
    meta: &ResponseMeta,
    index: usize,
    delta: Value,
    logprobs: Option<Value>,
    finish: Option<&str>,
) -> Value {
    match meta.route {
        Route::Chat => json!({
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish,
        }),
        Route::Completion => json!({
            "index": index,
            "text": delta.get("content").cloned().unwrap_or(json!("")),
            "logprobs": logprobs,
            "finish_reason": finish,
        }),
    }
}
