//! A small Rust client for mendkv's HTTP API (SPEC section 3), used by the CLI and `bench`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use percent_encoding::{percent_encode, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;

pub const CONTEXT_HEADER: &str = "x-mendkv-context";

/// Everything but unreserved characters is escaped in path segments.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node answered with an error (SPEC's JSON `{"error","message"}`).
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach the node: {0}")]
    Transport(String),
    #[error("unexpected answer: {0}")]
    Decode(String),
}

impl From<reqwest::Error> for ClientError {
    fn from(e: reqwest::Error) -> Self {
        ClientError::Transport(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling {
    pub value: Vec<u8>,
    pub content_type: String,
}

/// The result of a GET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadResult {
    Value {
        value: Vec<u8>,
        content_type: String,
        context: Option<String>,
    },
    Siblings {
        siblings: Vec<Sibling>,
        context: String,
    },
    NotFound {
        context: Option<String>,
    },
}

impl ReadResult {
    pub fn context(&self) -> Option<&str> {
        match self {
            ReadResult::Value { context, .. } | ReadResult::NotFound { context } => {
                context.as_deref()
            }
            ReadResult::Siblings { context, .. } => Some(context),
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    message: String,
}

#[derive(Deserialize)]
struct SiblingsBody {
    siblings: Vec<SiblingBody>,
    context: String,
}

#[derive(Deserialize)]
struct SiblingBody {
    value_base64: String,
    #[serde(default)]
    content_type: String,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

fn context_of(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(CONTEXT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A success answer's JSON body, or the API error of any other answer.
async fn json_answer(response: reqwest::Response) -> Result<serde_json::Value, ClientError> {
    if response.status().is_success() {
        response
            .json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    } else {
        Err(api_error(response).await)
    }
}

async fn api_error(response: reqwest::Response) -> ClientError {
    let status = response.status().as_u16();
    match response.json::<ErrorBody>().await {
        Ok(body) => ClientError::Api {
            status,
            code: body.error,
            message: body.message,
        },
        Err(e) => ClientError::Api {
            status,
            code: "unknown".into(),
            message: e.to_string(),
        },
    }
}

impl Client {
    /// `base` like `http://127.0.0.1:8001`.
    pub fn new(base: &str) -> Self {
        let http = Self::builder().build().unwrap_or_default();
        Client {
            http,
            base: base.trim_end_matches('/').to_string(),
        }
    }

    /// `base` like `https://127.0.0.1:8001`, whose certificate is checked against the CA
    /// certificate(s) in `ca_pem` (PEM) only: no built-in roots.
    pub fn with_ca(base: &str, ca_pem: &[u8]) -> Result<Self, ClientError> {
        let mut builder = Self::builder().tls_built_in_root_certs(false);
        let certs = reqwest::Certificate::from_pem_bundle(ca_pem)
            .map_err(|e| ClientError::Transport(format!("CA certificate: {e}")))?;
        if certs.is_empty() {
            return Err(ClientError::Transport(
                "CA file holds no PEM certificate".into(),
            ));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Transport(format!("TLS client: {e}")))?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_string(),
        })
    }

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn kv_url(
        &self,
        prefix: &str,
        bucket: &str,
        key: &[u8],
        level: Option<(&str, &str)>,
    ) -> String {
        let mut url = format!(
            "{}/{prefix}/{}/{}",
            self.base,
            utf8_percent_encode(bucket, SEGMENT),
            percent_encode(key, SEGMENT)
        );
        if let Some((name, value)) = level {
            url.push_str(&format!("?{name}={value}"));
        }
        url
    }

    pub async fn get(
        &self,
        bucket: &str,
        key: &[u8],
        r: Option<&str>,
    ) -> Result<ReadResult, ClientError> {
        let url = self.kv_url("kv", bucket, key, r.map(|r| ("r", r)));
        let response = self.http.get(url).send().await?;
        let context = context_of(&response);
        match response.status().as_u16() {
            200 => {
                let content_type = response
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let value = response.bytes().await?.to_vec();
                Ok(ReadResult::Value {
                    value,
                    content_type,
                    context,
                })
            }
            300 => {
                let body: SiblingsBody = response
                    .json()
                    .await
                    .map_err(|e| ClientError::Decode(e.to_string()))?;
                let siblings = body
                    .siblings
                    .into_iter()
                    .map(|s| {
                        STANDARD
                            .decode(s.value_base64)
                            .map(|value| Sibling {
                                value,
                                content_type: s.content_type,
                            })
                            .map_err(|e| ClientError::Decode(e.to_string()))
                    })
                    .collect::<Result<_, _>>()?;
                Ok(ReadResult::Siblings {
                    siblings,
                    context: body.context,
                })
            }
            404 => Ok(ReadResult::NotFound { context }),
            _ => Err(api_error(response).await),
        }
    }

    /// Stores a value; returns the new context.
    pub async fn put(
        &self,
        bucket: &str,
        key: &[u8],
        value: Vec<u8>,
        content_type: Option<&str>,
        w: Option<&str>,
        context: Option<&str>,
    ) -> Result<Option<String>, ClientError> {
        let url = self.kv_url("kv", bucket, key, w.map(|w| ("w", w)));
        let mut request = self.http.put(url).body(value);
        if let Some(ct) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, ct);
        }
        if let Some(ctx) = context {
            request = request.header(CONTEXT_HEADER, ctx);
        }
        let response = request.send().await?;
        if response.status().as_u16() == 204 {
            Ok(context_of(&response))
        } else {
            Err(api_error(response).await)
        }
    }

    pub async fn delete(
        &self,
        bucket: &str,
        key: &[u8],
        w: Option<&str>,
        context: Option<&str>,
    ) -> Result<(), ClientError> {
        let url = self.kv_url("kv", bucket, key, w.map(|w| ("w", w)));
        let mut request = self.http.delete(url);
        if let Some(ctx) = context {
            request = request.header(CONTEXT_HEADER, ctx);
        }
        let response = request.send().await?;
        if response.status().as_u16() == 204 {
            Ok(())
        } else {
            Err(api_error(response).await)
        }
    }

    /// `GET /admin/local/...` as JSON, `None` when the node holds nothing.
    pub async fn local(
        &self,
        bucket: &str,
        key: &[u8],
    ) -> Result<Option<serde_json::Value>, ClientError> {
        let response = self
            .http
            .get(self.kv_url("admin/local", bucket, key, None))
            .send()
            .await?;
        match response.status().as_u16() {
            200 => Ok(Some(
                response
                    .json()
                    .await
                    .map_err(|e| ClientError::Decode(e.to_string()))?,
            )),
            404 => Ok(None),
            _ => Err(api_error(response).await),
        }
    }

    /// GET `path` and decode its JSON, or the API error.
    async fn get_json(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        let response = self.http.get(format!("{}{path}", self.base)).send().await?;
        json_answer(response).await
    }

    pub async fn status(&self) -> Result<serde_json::Value, ClientError> {
        self.get_json("/cluster/status").await
    }

    /// Starts an anti-entropy run on this node; returns its id.
    pub async fn start_repair(&self) -> Result<u64, ClientError> {
        self.start_repair_of(None).await
    }

    /// Starts an anti-entropy run on this node, of one bucket's keys only when `bucket` is
    /// given; returns its id.
    pub async fn start_repair_of(&self, bucket: Option<&str>) -> Result<u64, ClientError> {
        let mut url = format!("{}/admin/repair", self.base);
        if let Some(bucket) = bucket {
            url.push_str(&format!("?bucket={}", utf8_percent_encode(bucket, SEGMENT)));
        }
        let response = self.http.post(url).send().await?;
        if response.status().as_u16() != 202 {
            return Err(api_error(response).await);
        }
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        body["id"]
            .as_u64()
            .ok_or_else(|| ClientError::Decode("no id in the answer".into()))
    }

    /// `GET /buckets/{bucket}/props`: `{"resolution","max_siblings","warn_siblings"}`.
    pub async fn bucket_props(&self, bucket: &str) -> Result<serde_json::Value, ClientError> {
        self.get_json(&format!(
            "/buckets/{}/props",
            utf8_percent_encode(bucket, SEGMENT)
        ))
        .await
    }

    /// `PUT /buckets/{bucket}/props` with the given JSON fields.
    pub async fn set_bucket_props(
        &self,
        bucket: &str,
        props: &serde_json::Value,
    ) -> Result<(), ClientError> {
        let response = self
            .http
            .put(format!(
                "{}/buckets/{}/props",
                self.base,
                utf8_percent_encode(bucket, SEGMENT)
            ))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(props.to_string())
            .send()
            .await?;
        if response.status().as_u16() == 204 {
            Ok(())
        } else {
            Err(api_error(response).await)
        }
    }

    /// `POST /admin/decommission`: the node starts leaving; its change's progress.
    pub async fn decommission(&self) -> Result<serde_json::Value, ClientError> {
        self.post_json("/admin/decommission").await
    }

    /// `POST /admin/remove-node/{id}`: re-replicate a dead node's ranges and remove it.
    pub async fn remove_node(&self, node: &str) -> Result<serde_json::Value, ClientError> {
        self.post_json(&format!(
            "/admin/remove-node/{}",
            utf8_percent_encode(node, SEGMENT)
        ))
        .await
    }

    /// `GET /admin/membership/{id}`: where that node's cluster change stands.
    pub async fn membership(&self, node: &str) -> Result<serde_json::Value, ClientError> {
        self.get_json(&format!(
            "/admin/membership/{}",
            utf8_percent_encode(node, SEGMENT)
        ))
        .await
    }

    async fn post_json(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .send()
            .await?;
        json_answer(response).await
    }

    /// Where a repair run stands (SPEC's JSON).
    pub async fn repair_status(&self, id: u64) -> Result<serde_json::Value, ClientError> {
        self.get_json(&format!("/admin/repair/{id}")).await
    }

    pub async fn metrics(&self) -> Result<String, ClientError> {
        let response = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?;
        Ok(response.text().await?)
    }

    /// `GET /health`: `Ok` while the node serves reads and writes, else its reason (503).
    pub async fn health_check(&self) -> Result<(), ClientError> {
        let response = self
            .http
            .get(format!("{}/health", self.base))
            .send()
            .await?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(api_error(response).await)
        }
    }

    pub async fn health(&self) -> bool {
        matches!(self.http.get(format!("{}/health", self.base)).send().await, Ok(r) if r.status().is_success())
    }
}

/// The ring state (`joining`, `normal`, `leaving`, `left`) a `/cluster/status` answer gives
/// the member `id`, if it lists it.
pub fn member_state(status: &serde_json::Value, id: &str) -> Option<String> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"] == id)
        .and_then(|n| n["state"].as_str())
        .map(str::to_string)
}

/// Sums the samples of a Prometheus counter whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
