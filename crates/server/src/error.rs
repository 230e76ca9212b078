//! Errors in OpenAI's wire shape: `{"error": {"message", "type", "param", "code"}}`, with the
//! status code the SDKs map to their exceptions (400 `BadRequestError`, 401, 404 `NotFoundError`,
//! 413, 429 `RateLimitError`, 503).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A stable machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// 400: a field is missing, of the wrong type or out of range.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            code: Some("invalid_value"),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// 400: the body is not the JSON the route expects.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self {
            code: Some("invalid_request_body"),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// 400: prompt and answer do not fit the context (or the cache).
    pub fn context_length(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            code: Some("context_length_exceeded"),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// 404: the model is not served here.
    pub fn unknown_model(model: &str, served: &str) -> Self {
        Self {
            param: Some("model".to_string()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                format!("The model `{model}` does not exist; this server serves `{served}`"),
            )
        }
    }

    /// 404: no such route.
    pub fn no_route(path: &str) -> Self {
        Self {
            code: Some("not_found"),
            ..Self::new(StatusCode::NOT_FOUND, format!("no route for {path}"))
        }
    }

    /// 401/403: an admin route without the right token.
    pub fn unauthorized(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            code: Some("unauthorized"),
            ..Self::new(status, message)
        }
    }

    /// 413: the body is over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the limit of {limit} bytes"),
            )
        }
    }

    /// 429: the admission queue is full.
    pub fn queue_full(limit: usize) -> Self {
        Self {
            code: Some("queue_full"),
            retry_after_s: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("the server's queue of {limit} waiting requests is full; retry later"),
            )
        }
    }

    /// 503: loading, draining, or the engine stopped.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: Some("unavailable"),
            retry_after_s: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let kind = match self.status.as_u16() {
            400 | 413 => "invalid_request_error",
            401 | 403 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            _ => "server_error",
        };
        json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}
