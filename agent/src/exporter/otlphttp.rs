//! `otlphttp`: OTLP over HTTP with protobuf bodies, sent as they are.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use indexmap::IndexMap;
use prost::Message;
use serde::Deserialize;
use serde_yaml::Value;

use super::otlp::Compression;
use super::{
    validate_endpoint, validate_network_settings, DeliverySettings, ExportError, ExportItem,
    Exporter, ExporterConfig, ExporterFactory, QueueSettings, RetrySettings,
};
use crate::config::{self, ComponentId, Issue};
use crate::otlp::ExportMetricsServiceResponse;

pub const FACTORY: ExporterFactory = ExporterFactory {
    type_name: "otlphttp",
    parse,
};

/// Config of the `otlphttp` exporter; keys as in the Collector.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpHttpExporterConfig {
    /// Base URL; metrics go to `<endpoint>/v1/metrics` unless `metrics_endpoint` is set.
    pub endpoint: String,
    /// Full URL for metrics, overriding `endpoint`.
    #[serde(default)]
    pub metrics_endpoint: Option<String>,
    #[serde(default)]
    pub compression: Compression,
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default)]
    pub sending_queue: QueueSettings,
    #[serde(default)]
    pub retry_on_failure: RetrySettings,
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn parse(value: Value) -> Result<Arc<dyn ExporterConfig>, Vec<Issue>> {
    let config: OtlpHttpExporterConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    validate_network_settings(
        &config.endpoint,
        &config.headers,
        config.timeout,
        &config.sending_queue,
        &config.retry_on_failure,
        &mut issues,
    );
    if let Some(url) = &config.metrics_endpoint {
        validate_endpoint("metrics_endpoint", url, &mut issues);
    }
    if issues.is_empty() {
        Ok(Arc::new(config))
    } else {
        Err(issues)
    }
}

impl ExporterConfig for OtlpHttpExporterConfig {
    fn build(&self, _id: &ComponentId) -> Result<Arc<dyn Exporter>, String> {
        let url = self
            .metrics_endpoint
            .clone()
            .unwrap_or_else(|| format!("{}/v1/metrics", self.endpoint.trim_end_matches('/')));
        let mut headers = http::HeaderMap::new();
        for (name, value) in &self.headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
            let value = http::HeaderValue::from_str(value).map_err(|e| e.to_string())?;
            headers.insert(name, value);
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        if self.compression == Compression::Gzip {
            headers.insert(
                http::header::CONTENT_ENCODING,
                http::HeaderValue::from_static("gzip"),
            );
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .map_err(|e| format!("building HTTP client: {e}"))?;
        Ok(Arc::new(OtlpHttpExporter {
            client,
            url,
            compression: self.compression,
        }))
    }

    fn delivery(&self) -> DeliverySettings {
        DeliverySettings {
            queue: self.sending_queue.clone(),
            retry: self.retry_on_failure.clone(),
            timeout: self.timeout,
        }
    }
}

pub struct OtlpHttpExporter {
    client: reqwest::Client,
    url: String,
    compression: Compression,
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(bytes)?;
    encoder.finish()
}

impl Exporter for OtlpHttpExporter {
    fn export(&self, item: ExportItem) -> BoxFuture<'static, Result<(), ExportError>> {
        let client = self.client.clone();
        let url = self.url.clone();
        let compression = self.compression;
        Box::pin(async move {
            let body = match compression {
                Compression::Gzip => Bytes::from(
                    gzip(&item.bytes).map_err(|e| ExportError::Permanent(format!("gzip: {e}")))?,
                ),
                Compression::None => item.bytes,
            };
            let response =
                client
                    .post(&url)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| ExportError::Retryable {
                        message: format!("POST {url}: {e}"),
                        retry_after: None,
                    })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = response.bytes().await.unwrap_or_default();
            if status.is_success() {
                if let Ok(reply) = ExportMetricsServiceResponse::decode(body) {
                    if let Some(partial) = reply.partial_success {
                        if partial.rejected_data_points > 0 {
                            return Err(ExportError::Permanent(format!(
                                "server rejected {} data points: {}",
                                partial.rejected_data_points, partial.error_message
                            )));
                        }
                    }
                }
                return Ok(());
            }
            let message = format!(
                "POST {url}: HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(256)])
            );
            Err(classify(status.as_u16(), message, retry_after))
        })
    }
}

/// The OTLP/HTTP specification's retryable statuses; everything else is permanent.
fn classify(status: u16, message: String, retry_after: Option<Duration>) -> ExportError {
    match status {
        429 | 502 | 503 | 504 => ExportError::Retryable {
            message,
            retry_after,
        },
        _ => ExportError::Permanent(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses_follow_the_otlp_spec() {
        for code in [429, 502, 503, 504] {
            assert!(matches!(
                classify(code, String::new(), None),
                ExportError::Retryable { .. }
            ));
        }
        for code in [400, 401, 404, 413, 500] {
            assert!(matches!(
                classify(code, String::new(), None),
                ExportError::Permanent(_)
            ));
        }
    }

    #[test]
    fn https_is_refused_with_a_reason() {
        let issues =
            parse(serde_yaml::from_str("{endpoint: 'https://x:4318'}").unwrap()).unwrap_err();
        assert_eq!(issues[0].path, "endpoint");
        assert!(issues[0].message.contains("https"));
    }
}
