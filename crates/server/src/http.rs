//! The HTTP API (SPEC section 3). Handlers validate input, hand a request to the node task
//! and turn its answer into status codes; they never touch storage themselves.

use crate::inbox::{FailedRequest, Inbox};
use crate::metrics::{Metrics, OpLabels, RequestLabels};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use mendkv_core::bucket::{BucketProps, PropsUpdate, Resolution};
use mendkv_core::message::{ClientRequest, ClientResponse};
use mendkv_core::quorum::ConsistencyLevel;
use mendkv_core::request::{validate_bucket, validate_key, validate_value_size};
use mendkv_core::version::{CausalContext, ContextKey, Object, Value};
use mendkv_storage::FjallStorage;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

pub const CONTEXT_HEADER: &str = "x-mendkv-context";

#[derive(Clone)]
pub struct ApiState {
    pub inbox: mpsc::Sender<Inbox>,
    pub metrics: Arc<Metrics>,
    pub max_value_bytes: usize,
    pub default_read: ConsistencyLevel,
    pub default_write: ConsistencyLevel,
    pub request_timeout: Duration,
    /// Seals the contexts this node hands out and opens those clients send back.
    pub contexts: ContextKey,
    /// A request body must arrive in full within this long (`http.idle_timeout_ms`).
    pub body_timeout: Duration,
    /// Asked by `/health` only (whether it takes writes); requests go to the node task.
    pub storage: FjallStorage,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/kv/{bucket}/{*key}", get(kv).put(kv).delete(kv))
        // Paths without a key still get SPEC's 400, not a bare 404.
        .route("/kv/{bucket}", get(kv).put(kv).delete(kv))
        .route("/kv/{bucket}/", get(kv).put(kv).delete(kv))
        .route("/admin/local/{bucket}/{*key}", get(admin_local))
        .route("/cluster/status", get(cluster_status))
        .route("/admin/repair", axum::routing::post(start_repair))
        .route("/admin/repair/{id}", get(repair_status))
        .route("/admin/decommission", axum::routing::post(decommission))
        .route("/admin/remove-node/{id}", axum::routing::post(remove_node))
        .route("/admin/membership/{id}", get(membership_status))
        .route("/buckets/{bucket}/props", get(get_props).put(put_props))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard_page))
        .route("/admin/dashboard.json", get(dashboard_state))
        .route("/admin/dashboard/history", get(dashboard_history))
        .route("/health", get(health))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::middleware::map_response(method_not_allowed_as_json))
        // Bodies are read with our own limit below, so the client gets SPEC's 413 JSON.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// 200 while the node serves reads and writes; 503 with the reason while its storage takes
/// no writes (disk full, engine stopped), so load balancers and operators see it.
async fn health(State(state): State<ApiState>) -> Response {
    match state.storage.health() {
        Ok(()) => "ok\n".into_response(),
        Err(reason) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason),
    }
}

/// An error response in SPEC's JSON shape.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": code, "message": message.into() });
    (status, axum::Json(body)).into_response()
}

/// The router answers a method no route lists with an empty 405; SPEC wants JSON there too.
/// The `Allow` header the router computed is kept.
async fn method_not_allowed_as_json(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED
        || response.headers().contains_key(header::CONTENT_TYPE)
    {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let mut json = method_not_allowed(allow.as_ref().and_then(|v| v.to_str().ok()));
    if let Some(allow) = allow {
        json.headers_mut().insert(header::ALLOW, allow);
    }
    json
}

fn method_not_allowed(allowed: Option<&str>) -> Response {
    let message = match allowed {
        Some(allowed) if !allowed.is_empty() => format!("this path allows {allowed}"),
        _ => "method not allowed on this path".to_string(),
    };
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        message,
    )
}

/// Failure of a handler: the response plus the outcome label for metrics.
struct Failure(Box<Response>, &'static str);

impl Failure {
    fn new(response: Response, outcome: &'static str) -> Self {
        Failure(Box::new(response), outcome)
    }
}

fn bad_request(message: impl Into<String>) -> Failure {
    Failure::new(
        error(StatusCode::BAD_REQUEST, "bad_request", message),
        "bad_request",
    )
}

/// Bucket and key from the raw path `/<prefix>/<bucket>/<percent-encoded key>`; keys are
/// arbitrary bytes, so they are decoded here rather than as UTF-8 strings.
fn bucket_and_key(uri: &Uri, prefix: &str) -> Result<(String, Vec<u8>), Failure> {
    let rest = uri
        .path()
        .strip_prefix(prefix)
        .ok_or_else(|| bad_request("bad path"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket =
        String::from_utf8(percent_decode(bucket).map_err(|e| bad_request(format!("bucket: {e}")))?)
            .map_err(|_| bad_request("bucket is not UTF-8"))?;
    validate_bucket(&bucket).map_err(|e| bad_request(e.to_string()))?;
    let key = percent_decode(key).map_err(|e| bad_request(format!("key: {e}")))?;
    validate_key(&key).map_err(|e| bad_request(e.to_string()))?;
    Ok((bucket, key))
}

/// A `%` not followed by two hex digits. Taking it as literal bytes (as lenient decoders do)
/// would store a key the client never meant, and two spellings would name one key.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid percent-escape at byte {0}: '%' must be followed by two hex digits")]
struct InvalidEscape(usize);

/// Percent-decodes `text`, refusing invalid escapes.
fn percent_decode(text: &str) -> Result<Vec<u8>, InvalidEscape> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        if byte != b'%' {
            decoded.push(byte);
            at += 1;
            continue;
        }
        let hex = |offset: usize| {
            bytes
                .get(at + offset)
                .and_then(|b| (*b as char).to_digit(16))
        };
        match (hex(1), hex(2)) {
            (Some(high), Some(low)) => decoded.push((high * 16 + low) as u8),
            _ => return Err(InvalidEscape(at)),
        }
        at += 3;
    }
    Ok(decoded)
}

/// The first query parameter `name`, percent-decoded; invalid escapes or UTF-8 are refused.
fn query_param(uri: &Uri, name: &str) -> Result<Option<String>, Failure> {
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    let Some(raw) = query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    }) else {
        return Ok(None);
    };
    let bytes =
        percent_decode(raw).map_err(|e| bad_request(format!("query parameter {name}: {e}")))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| bad_request(format!("query parameter {name} is not UTF-8")))
}

fn level(uri: &Uri, name: &str, default: ConsistencyLevel) -> Result<ConsistencyLevel, Failure> {
    match query_param(uri, name)? {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|e: mendkv_core::quorum::UnknownLevel| bad_request(e.to_string())),
    }
}

/// The client's context for `bucket`/`key`: it must be one this cluster issued for them.
fn context(
    state: &ApiState,
    headers: &HeaderMap,
    bucket: &str,
    key: &[u8],
) -> Result<Option<CausalContext>, Failure> {
    let Some(value) = headers.get(CONTEXT_HEADER) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| bad_request("context header is not ASCII"))?;
    if text.is_empty() {
        return Ok(None);
    }
    state
        .contexts
        .open(text, bucket, key)
        .map(Some)
        .map_err(|e| bad_request(format!("bad context: {e}")))
}

async fn ask(state: &ApiState, request: ClientRequest) -> Result<ClientResponse, Failure> {
    crate::inbox::ask(&state.inbox, request, state.request_timeout)
        .await
        .map_err(|no_answer| failure(FailedRequest::from_no_answer(no_answer)))
}

/// Where a context was read: contexts are sealed for their bucket and key.
struct ContextScope<'a> {
    contexts: &'a ContextKey,
    bucket: &'a str,
    key: &'a [u8],
}

impl ContextScope<'_> {
    fn seal(&self, context: &CausalContext) -> String {
        self.contexts.seal(context, self.bucket, self.key)
    }
}

fn with_context(mut response: Response, scope: &ContextScope, context: &CausalContext) -> Response {
    if !context.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&scope.seal(context)) {
            response.headers_mut().insert(CONTEXT_HEADER, value);
        }
    }
    response
}

/// Maps the failures every coordinated request shares (one table for HTTP and RESP).
fn coordination_failure(response: ClientResponse) -> Failure {
    failure(FailedRequest::from_response(response))
}

/// A failed request as SPEC's JSON error with its status code.
fn failure(failed: FailedRequest) -> Failure {
    let status = match failed.code {
        "bad_request" => StatusCode::BAD_REQUEST,
        "timeout" => StatusCode::GATEWAY_TIMEOUT,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "too_many_siblings" | "conflict" => StatusCode::CONFLICT,
        "not_found" => StatusCode::NOT_FOUND,
        "insufficient_storage" => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Failure::new(error(status, failed.code, failed.message), failed.outcome)
}

fn object_response(scope: &ContextScope, object: Object) -> (Response, &'static str) {
    let context = object.causal_context();
    let live: Vec<_> = object.live_values().collect();
    match live.as_slice() {
        [] => (
            with_context(
                error(StatusCode::NOT_FOUND, "not_found", "no value for this key"),
                scope,
                &context,
            ),
            "not_found",
        ),
        [single] => {
            let Value::Data {
                bytes,
                content_type,
            } = &single.value
            else {
                unreachable!("live values are data")
            };
            let mut response = Response::new(Body::from(bytes.clone()));
            if let Ok(value) = HeaderValue::from_str(if content_type.is_empty() {
                "application/octet-stream"
            } else {
                content_type
            }) {
                response.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            (with_context(response, scope, &context), "ok")
        }
        many => {
            let siblings: Vec<_> = many
                .iter()
                .filter_map(|s| match &s.value {
                    Value::Data {
                        bytes,
                        content_type,
                    } => Some(json!({
                        "value_base64": STANDARD.encode(bytes),
                        "content_type": content_type,
                    })),
                    Value::Tombstone => None,
                })
                .collect();
            let body = json!({ "siblings": siblings, "context": scope.seal(&context) });
            let response = (StatusCode::MULTIPLE_CHOICES, axum::Json(body)).into_response();
            (with_context(response, scope, &context), "siblings")
        }
    }
}

async fn kv(State(state): State<ApiState>, request: Request) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let op: &'static str = match method {
        Method::GET => "get",
        Method::HEAD => "head",
        Method::PUT => "put",
        Method::DELETE => "delete",
        // The router lists only the methods above; nothing else may reach a write below.
        _ => return method_not_allowed(Some("GET,HEAD,PUT,DELETE")),
    };
    let (level_label, result) = handle_kv(&state, request).await;
    let (response, outcome) = match result {
        Ok(ok) => ok,
        Err(Failure(response, outcome)) => (*response, outcome),
    };
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            op,
            level: level_label,
            outcome,
        })
        .inc();
    state
        .metrics
        .request_duration
        .get_or_create(&OpLabels { op })
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn handle_kv(
    state: &ApiState,
    request: Request,
) -> (&'static str, Result<(Response, &'static str), Failure>) {
    let (parts, body) = request.into_parts();
    // HEAD is a read: the same status and headers as GET (the body is dropped on the way out).
    let is_read = matches!(parts.method, Method::GET | Method::HEAD);
    let (name, default) = if is_read {
        ("r", state.default_read)
    } else {
        ("w", state.default_write)
    };
    let level = match level(&parts.uri, name, default) {
        Ok(level) => level,
        Err(failure) => return ("invalid", Err(failure)),
    };
    let label = level.as_str();
    let result = async {
        let (bucket, key) = bucket_and_key(&parts.uri, "/kv/")?;
        let scope_key = key.clone();
        let scope_bucket = bucket.clone();
        let scope = ContextScope {
            contexts: &state.contexts,
            bucket: &scope_bucket,
            key: &scope_key,
        };
        match parts.method {
            Method::GET | Method::HEAD => {
                let response = ask(state, ClientRequest::Get { bucket, key, level }).await?;
                match response {
                    ClientResponse::Object(object) => {
                        let bytes_out: usize =
                            object.live_values().map(|s| s.value.size_bytes()).sum();
                        state.metrics.count_bytes("out", "client", bytes_out);
                        Ok(object_response(&scope, object))
                    }
                    other => Err(coordination_failure(other)),
                }
            }
            Method::PUT => {
                let context = context(state, &parts.headers, &bucket, &key)?.unwrap_or_default();
                let declared = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok());
                let too_large = |size: usize| {
                    let e = validate_value_size(size, state.max_value_bytes).err();
                    Failure::new(
                        error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "too_large",
                            e.map(|e| e.to_string()).unwrap_or_default(),
                        ),
                        "too_large",
                    )
                };
                if let Some(size) = declared {
                    if size > state.max_value_bytes {
                        return Err(too_large(size));
                    }
                }
                let bytes = read_body(state, body).await.map_err(|e| match e {
                    BodyError::TooLarge => too_large(state.max_value_bytes + 1),
                    BodyError::TooSlow => Failure::new(
                        error(
                            StatusCode::REQUEST_TIMEOUT,
                            "timeout",
                            format!(
                                "request body not received within {} ms",
                                state.body_timeout.as_millis()
                            ),
                        ),
                        "timeout",
                    ),
                    BodyError::Malformed(e) => {
                        bad_request(format!("request body is truncated or malformed: {e}"))
                    }
                })?;
                state.metrics.count_bytes("in", "client", bytes.len());
                let content_type = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("application/octet-stream")
                    .chars()
                    .take(256)
                    .collect();
                let value = Value::Data {
                    bytes,
                    content_type,
                };
                let response = ask(
                    state,
                    ClientRequest::Put {
                        bucket,
                        key,
                        context,
                        value,
                        level,
                    },
                )
                .await?;
                written(&scope, response)
            }
            Method::DELETE => {
                let context = context(state, &parts.headers, &bucket, &key)?;
                let response = ask(
                    state,
                    ClientRequest::Delete {
                        bucket,
                        key,
                        context,
                        level,
                    },
                )
                .await?;
                written(&scope, response)
            }
            _ => Err(Failure::new(
                method_not_allowed(Some("GET,HEAD,PUT,DELETE")),
                "bad_request",
            )),
        }
    }
    .await;
    (label, result)
}

enum BodyError {
    /// More than `max_value_bytes`: SPEC's 413.
    TooLarge,
    /// Not all there within `body_timeout`: a stalled or trickling client.
    TooSlow,
    /// The connection ended early, or a chunk line was garbage: the client's 400.
    Malformed(String),
}

/// Reads a request body whole, telling real oversize apart from a broken body.
async fn read_body(state: &ApiState, body: Body) -> Result<bytes::Bytes, BodyError> {
    let limited = http_body_util::Limited::new(body, state.max_value_bytes);
    match tokio::time::timeout(
        state.body_timeout,
        http_body_util::BodyExt::collect(limited),
    )
    .await
    {
        Err(_) => Err(BodyError::TooSlow),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Ok(Err(e)) => Err(BodyError::Malformed(e.to_string())),
    }
}

fn written(
    scope: &ContextScope,
    response: ClientResponse,
) -> Result<(Response, &'static str), Failure> {
    match response {
        ClientResponse::Written { context } => Ok((
            with_context(StatusCode::NO_CONTENT.into_response(), scope, &context),
            "ok",
        )),
        other => Err(coordination_failure(other)),
    }
}

async fn admin_local(State(state): State<ApiState>, uri: Uri) -> Response {
    let (bucket, key) = match bucket_and_key(&uri, "/admin/local/") {
        Ok(pair) => pair,
        Err(Failure(response, _)) => return *response,
    };
    let sealed = |object: &Object| state.contexts.seal(&object.causal_context(), &bucket, &key);
    match ask(
        &state,
        ClientRequest::GetLocal {
            bucket: bucket.clone(),
            key: key.clone(),
        },
    )
    .await
    {
        Ok(ClientResponse::Local(Some(object))) => {
            let siblings: Vec<_> = object
                .siblings()
                .iter()
                .map(|s| match &s.value {
                    Value::Data {
                        bytes,
                        content_type,
                    } => json!({
                        "value_base64": STANDARD.encode(bytes),
                        "content_type": content_type,
                        "tombstone": false,
                    }),
                    Value::Tombstone => json!({ "value_base64": "", "tombstone": true }),
                })
                .collect();
            let body = json!({ "siblings": siblings, "context": sealed(&object) });
            axum::Json(body).into_response()
        }
        Ok(ClientResponse::Local(None)) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this node holds nothing for this key",
        ),
        Ok(other) => *coordination_failure(other).0,
        Err(Failure(response, _)) => *response,
    }
}

/// `POST /admin/repair?bucket=`: starts an anti-entropy run over every range this node
/// replicates; with `bucket`, it compares and repairs only that bucket's keys (trees of
/// the bucket built per exchange, see docs/design.md).
async fn start_repair(State(state): State<ApiState>, uri: Uri) -> Response {
    let request = match query_param(&uri, "bucket") {
        Ok(Some(bucket)) => {
            if let Err(e) = validate_bucket(&bucket) {
                return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string());
            }
            ClientRequest::StartBucketRepair { bucket }
        }
        Ok(None) => ClientRequest::StartRepair,
        Err(Failure(response, _)) => return *response,
    };
    match ask(&state, request).await {
        Ok(ClientResponse::RepairStarted { id }) => {
            (StatusCode::ACCEPTED, axum::Json(json!({ "id": id }))).into_response()
        }
        Ok(other) => *coordination_failure(other).0,
        Err(Failure(response, _)) => *response,
    }
}

/// The largest properties body read (a few small fields).
const MAX_PROPS_BODY_BYTES: usize = 4096;

/// `PUT /buckets/{bucket}/props`: any of the fields; others are refused (SPEC section 3).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PropsBody {
    resolution: Option<String>,
    max_siblings: Option<u64>,
    warn_siblings: Option<u64>,
}

fn props_json(props: &BucketProps) -> Response {
    axum::Json(json!({
        "resolution": props.resolution.as_str(),
        "max_siblings": props.max_siblings,
        "warn_siblings": props.warn_siblings,
    }))
    .into_response()
}

/// The bucket of a `/buckets/{bucket}/props` path, or the 400 to answer. Read from the raw
/// path (as `/kv/` is), so a bad escape gets SPEC's JSON rather than the extractor's text.
fn props_bucket(uri: &Uri) -> Result<String, Box<Response>> {
    let bad = |message: String| Box::new(error(StatusCode::BAD_REQUEST, "bad_request", message));
    let raw = uri
        .path()
        .strip_prefix("/buckets/")
        .and_then(|rest| rest.strip_suffix("/props"))
        .ok_or_else(|| bad("bad path".into()))?;
    let decoded = percent_decode(raw)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| bad("bucket is not valid percent-encoded UTF-8".into()))?;
    validate_bucket(&decoded).map_err(|e| bad(e.to_string()))?;
    Ok(decoded)
}

/// `GET /buckets/{bucket}/props`: this node's view (defaults for a bucket never set).
async fn get_props(State(state): State<ApiState>, uri: Uri) -> Response {
    let bucket = match props_bucket(&uri) {
        Ok(bucket) => bucket,
        Err(response) => return *response,
    };
    match ask(&state, ClientRequest::GetBucketProps { bucket }).await {
        Ok(ClientResponse::BucketProps(props)) => props_json(&props),
        Ok(other) => *coordination_failure(other).0,
        Err(Failure(response, _)) => *response,
    }
}

/// `PUT /buckets/{bucket}/props`: 204 once stored durably on this node; gossip spreads it.
async fn put_props(State(state): State<ApiState>, uri: Uri, body: Body) -> Response {
    let bucket = match props_bucket(&uri) {
        Ok(bucket) => bucket,
        Err(response) => return *response,
    };
    let limited = http_body_util::Limited::new(body, MAX_PROPS_BODY_BYTES);
    let bytes = match tokio::time::timeout(
        state.body_timeout,
        http_body_util::BodyExt::collect(limited),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("a properties body is at most {MAX_PROPS_BODY_BYTES} bytes"),
            )
        }
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "request body not received in time",
            )
        }
    };
    let parsed: PropsBody = match serde_json::from_slice(&bytes) {
        Ok(parsed) => parsed,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("properties: {e}"),
            )
        }
    };
    let resolution = match parsed.resolution.as_deref().map(str::parse::<Resolution>) {
        None => None,
        Some(Ok(resolution)) => Some(resolution),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
    };
    let update = PropsUpdate {
        resolution,
        max_siblings: parsed.max_siblings,
        warn_siblings: parsed.warn_siblings,
    };
    match ask(&state, ClientRequest::SetBucketProps { bucket, update }).await {
        Ok(ClientResponse::BucketProps(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(other) => *coordination_failure(other).0,
        Err(Failure(response, _)) => *response,
    }
}

/// A membership request's answer: the change's progress (`accepted` for the two that start
/// one), or SPEC's JSON error (404 unknown node, 409 conflict).
async fn change_answer(state: &ApiState, request: ClientRequest, accepted: bool) -> Response {
    match ask(state, request).await {
        Ok(ClientResponse::Change(progress)) => {
            let status = if accepted {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            (status, axum::Json(progress)).into_response()
        }
        Ok(other) => *coordination_failure(other).0,
        Err(Failure(response, _)) => *response,
    }
}

/// A node id from a path segment, or the 400 to answer.
fn node_id_param(id: &str) -> Result<mendkv_core::NodeId, Box<Response>> {
    if id.is_empty() || id.len() > mendkv_core::gossip::MAX_NODE_ID_BYTES {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "a node id is 1 to {} bytes",
                mendkv_core::gossip::MAX_NODE_ID_BYTES
            ),
        )));
    }
    Ok(mendkv_core::NodeId::new(id))
}

/// `POST /admin/decommission`: this node starts leaving (SPEC section 7).
async fn decommission(State(state): State<ApiState>) -> Response {
    change_answer(&state, ClientRequest::Decommission, true).await
}

/// `POST /admin/remove-node/{id}`: re-replicate a dead node's ranges and remove it.
async fn remove_node(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match node_id_param(&id) {
        Ok(node) => change_answer(&state, ClientRequest::RemoveNode { node }, true).await,
        Err(response) => *response,
    }
}

/// `GET /admin/membership/{id}`: where that node's change stands, as this node sees it.
async fn membership_status(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match node_id_param(&id) {
        Ok(node) => change_answer(&state, ClientRequest::ChangeStatus { node }, false).await,
        Err(response) => *response,
    }
}

/// `GET /admin/repair/{id}`.
async fn repair_status(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "repair id must be a number",
        );
    };
    match ask(&state, ClientRequest::RepairStatus { id }).await {
        Ok(ClientResponse::Repair(Some(run))) => axum::Json(run).into_response(),
        Ok(ClientResponse::Repair(None)) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no repair run {id} on this node"),
        ),
        Ok(other) => *coordination_failure(other).0,
        Err(Failure(response, _)) => *response,
    }
}

async fn cluster_status(State(state): State<ApiState>) -> Response {
    let (reply, answer) = oneshot::channel();
    if state.inbox.send(Inbox::Status { reply }).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "node is shutting down",
        );
    }
    match answer.await {
        Ok(status) => axum::Json(status).into_response(),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "node is shutting down",
        ),
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// `GET /dashboard`: the page, embedded in the binary; it fetches only from this node.
async fn dashboard_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                crate::dashboard::CONTENT_SECURITY_POLICY,
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        crate::dashboard::PAGE,
    )
        .into_response()
}

/// `GET /admin/dashboard/history`: the charted metrics of the last minutes, for a page that
/// just opened.
async fn dashboard_history(State(state): State<ApiState>) -> Response {
    axum::Json(json!({ "samples": state.metrics.history.samples() })).into_response()
}

/// `GET /admin/dashboard.json`: repair runs, hints per target, breaker and repair rate.
async fn dashboard_state(State(state): State<ApiState>) -> Response {
    let (reply, answer) = oneshot::channel();
    if state.inbox.send(Inbox::Dashboard { reply }).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "node is shutting down",
        );
    }
    match answer.await {
        Ok(snapshot) => axum::Json(snapshot).into_response(),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "node is shutting down",
        ),
    }
}

#[cfg(test)]
mod path_fuzz;
