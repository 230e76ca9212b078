//! The HTTP routes: OpenAI's completions, chat completions and models; health and metrics; the
//! cache admin routes (lookup, pin, unpin).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use pagedkv::CacheSalt;
use pagedkv_engine::{Request, SamplingParams};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Command, GenEvent, Submission};
use crate::error::ApiError;
use crate::report::cache_report_json;
use crate::request::{self, GenerationRequest, PromptInput, Route};
use crate::state::{AppState, Ready};
use crate::stream::{collect, stream_response, ResponseMeta};

/// Every route of the server.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/cache/lookup", post(lookup))
        .route("/v1/cache/pin", post(pin))
        .route("/v1/cache/pins", delete(unpin_all))
        .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()) })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

type Body = Result<Bytes, BytesRejection>;

fn body_bytes(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(limit),
        _ => ApiError::malformed(rejection.body_text()),
    })
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn health(State(app): State<Arc<AppState>>) -> Response {
    respond(
        app.ready()
            .map(|_| Json(json!({"status": "ok"})).into_response()),
    )
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    match app.shared.ready.get() {
        Some(ready) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            ready.metrics.render(),
        )
            .into_response(),
        None => ApiError::unavailable("the model is loading").into_response(),
    }
}

async fn models(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": app.config.model_name,
            "object": "model",
            "created": unix_time(),
            "owned_by": "pagedkv",
        }],
    }))
}

async fn chat(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    respond(generate(app, Route::Chat, headers, body).await)
}

async fn completions(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    respond(generate(app, Route::Completion, headers, body).await)
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn generate(
    app: Arc<AppState>,
    route: Route,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let ready = app.ready()?;
    let req = request::parse(route, &body)?;
    if let Some(model) = &req.model {
        if *model != app.config.model_name {
            return Err(ApiError::unknown_model(model, &app.config.model_name));
        }
    }
    let prompt = prompt_tokens(ready, &req.prompt)?;
    let max_tokens = answer_limit(ready, req.prompt.param(), prompt.len(), req.max_tokens)?;
    let salt = request_salt(&app, &headers, req.cache_salt.as_deref())?;
    let sampling = SamplingParams {
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed.unwrap_or_else(fresh_seed),
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid("temperature", e.to_string()))?;
    let choices = submit_choices(&app, &req, &prompt, max_tokens, sampling, salt)?;
    let meta = ResponseMeta::new(&app, &req, prompt.len(), choices[0].0);
    if req.stream {
        Ok(stream_response(app.clone(), meta, choices, req.stop))
    } else {
        let body = collect(&app, ready, &meta, choices, &req.stop).await?;
        Ok(Json(body).into_response())
    }
}

/// Submits the request's `n` choices; returns their event channels with their request ids.
fn submit_choices(
    app: &AppState,
    req: &GenerationRequest,
    prompt: &[u32],
    max_tokens: usize,
    sampling: SamplingParams,
    salt: Option<CacheSalt>,
) -> Result<Vec<(u64, mpsc::UnboundedReceiver<GenEvent>)>, ApiError> {
    app.enqueue(req.n)?;
    let arrived = Instant::now();
    let mut choices = Vec::with_capacity(req.n);
    for index in 0..req.n {
        let id = app.shared.next_id.fetch_add(1, Ordering::SeqCst);
        let (events, receiver) = mpsc::unbounded_channel();
        let request = Request {
            id,
            prompt: prompt.to_vec(),
            max_tokens,
            sampling,
            // choice i of a seeded request samples the same stream on every run
            stream: index as u64,
            salt,
            top_logprobs: req.logprobs,
        };
        let submission = Submission {
            request,
            events,
            pin_ttl: None,
            arrived,
        };
        if let Err(e) = app.send(Command::Generate(Box::new(submission))) {
            app.shared
                .waiting
                .fetch_sub(req.n - index, Ordering::SeqCst);
            return Err(e);
        }
        choices.push((id, receiver));
    }
    Ok(choices)
}

/// A seed for a request that gave none.
fn fresh_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The prompt's token ids.
fn prompt_tokens(ready: &Ready, input: &PromptInput) -> Result<Vec<u32>, ApiError> {
    let ids = match input {
        PromptInput::Messages(messages) => ready.tokenizer.chat_prompt(messages),
        PromptInput::Text(text) => ready.tokenizer.encode_prompt(text),
        PromptInput::Tokens(ids) => {
            if let Some(bad) = ids.iter().find(|t| **t as usize >= ready.vocab) {
                return Err(ApiError::invalid(
                    "prompt",
                    format!(
                        "token id {bad} is outside the vocabulary of {}",
                        ready.vocab
                    ),
                ));
            }
            Ok(ids.clone())
        }
    };
    let param = input.param();
    let ids = ids.map_err(|e| ApiError::invalid(param, e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::invalid(param, "the prompt is empty"));
    }
    Ok(ids)
}

/// Most tokens an answer may have: what the request asks, if prompt and answer fit the model's
/// context and the cache; else all the room left.
fn answer_limit(
    ready: &Ready,
    param: &str,
    prompt: usize,
    asked: Option<usize>,
) -> Result<usize, ApiError> {
    let (limit, what) = if ready.pool_tokens < ready.context_len {
        (ready.pool_tokens, "the KV cache's capacity")
    } else {
        (ready.context_len, "the model's context length")
    };
    let room = limit.saturating_sub(prompt);
    match asked {
        Some(n) if n <= room => Ok(n),
        Some(n) => Err(ApiError::context_length(
            param,
            format!(
            "{what} is {limit} tokens; the prompt has {prompt} and max_tokens asks for {n} more"
        ),
        )),
        None if room > 0 => Ok(room),
        None => Err(ApiError::context_length(
            param,
            format!("{what} is {limit} tokens and the prompt has {prompt}"),
        )),
    }
}

/// The request's cache salt: the configured header's value when present, else `cache_salt`.
fn request_salt(
    app: &AppState,
    headers: &HeaderMap,
    field: Option<&str>,
) -> Result<Option<CacheSalt>, ApiError> {
    if let Some(name) = &app.config.salt_from_header {
        if let Some(value) = headers.get(name.as_str()) {
            let value = value.to_str().map_err(|_| {
                ApiError::invalid(
                    "cache_salt",
                    format!("header `{name}` is not visible ASCII"),
                )
            })?;
            if !value.is_empty() {
                return Ok(Some(CacheSalt::new(value)));
            }
        }
    }
    Ok(field.map(CacheSalt::new))
}

/// Checks the admin bearer token.
fn authorize(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &app.config.admin_token else {
        return Err(ApiError::unauthorized(
            StatusCode::FORBIDDEN,
            "cache admin routes are disabled; start the server with --admin-token",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given != Some(token.as_str()) {
        return Err(ApiError::unauthorized(
            StatusCode::UNAUTHORIZED,
            "a valid `Authorization: Bearer <admin token>` header is required",
        ));
    }
    Ok(())
}

async fn lookup(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    respond(lookup_inner(&app, &headers, body).await)
}

async fn lookup_inner(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(app, headers)?;
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let ready = app.ready()?;
    let (input, salt, _) = request::parse_cache_prompt(&body)?;
    let prompt = prompt_tokens(ready, &input)?;
    let salt = request_salt(app, headers, salt.as_deref())?;
    let (reply, answer) = oneshot::channel();
    app.send(Command::Lookup {
        prompt: prompt.clone(),
        salt,
        reply,
    })?;
    let report = answer
        .await
        .map_err(|_| ApiError::unavailable("the engine has stopped"))?;
    Ok(Json(cache_report_json(&report, prompt.len())).into_response())
}

async fn pin(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    respond(pin_inner(&app, &headers, body).await)
}

async fn pin_inner(app: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    authorize(app, headers)?;
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let ready = app.ready()?;
    let (input, salt, ttl) = request::parse_cache_prompt(&body)?;
    let ttl = ttl.ok_or_else(|| ApiError::invalid("ttl_s", "`ttl_s` (seconds) is required"))?;
    let prompt = prompt_tokens(ready, &input)?;
    answer_limit(ready, input.param(), prompt.len(), Some(1))?;
    let salt = request_salt(app, headers, salt.as_deref())?;
    app.enqueue(1)?;
    let (events, mut receiver) = mpsc::unbounded_channel();
    let submission = Submission {
        request: Request {
            salt,
            ..Request::new(
                app.shared.next_id.fetch_add(1, Ordering::SeqCst),
                prompt.clone(),
                1,
                SamplingParams::default(),
            )
        },
        events,
        pin_ttl: Some(Duration::from_secs_f64(ttl)),
        arrived: Instant::now(),
    };
    if let Err(e) = app.send(Command::Generate(Box::new(submission))) {
        app.shared.waiting.fetch_sub(1, Ordering::SeqCst);
        return Err(e);
    }
    while let Some(event) = receiver.recv().await {
        match event {
            GenEvent::Pinned(tokens) => {
                return Ok(Json(json!({
                    "pinned_tokens": tokens,
                    "prompt_tokens": prompt.len(),
                    "ttl_s": ttl,
                }))
                .into_response())
            }
            GenEvent::Failed(e) => return Err(e),
            GenEvent::Admitted(_) | GenEvent::Token { .. } | GenEvent::Finished(_) => {}
        }
    }
    Err(ApiError::unavailable("the engine stopped before pinning"))
}

async fn unpin_all(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    respond(unpin_inner(&app, &headers).await)
}

async fn unpin_inner(app: &AppState, headers: &HeaderMap) -> Result<Response, ApiError> {
    authorize(app, headers)?;
    app.ready()?;
    let (reply, answer) = oneshot::channel();
    app.send(Command::UnpinAll { reply })?;
    let count = answer
        .await
        .map_err(|_| ApiError::unavailable("the engine has stopped"))?;
    Ok(Json(json!({"unpinned": count})).into_response())
}
