//! `otlp`: OTLP over gRPC. Sends the encoded request as it is: a forwarded batch is never
//! decoded or re-encoded on its way through the agent.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::uri::PathAndQuery;
use indexmap::IndexMap;
use serde::Deserialize;
use serde_yaml::Value;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use super::{
    validate_network_settings, DeliverySettings, ExportError, ExportItem, Exporter, ExporterConfig,
    ExporterFactory, QueueSettings, RetrySettings,
};
use crate::config::{self, ComponentId, Issue};
use crate::otlp::codec::{RawClientCodec, METRICS_EXPORT_PATH};
use crate::otlp::ExportMetricsServiceResponse;

pub const FACTORY: ExporterFactory = ExporterFactory {
    type_name: "otlp",
    parse,
};

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Gzip,
    None,
}

/// Config of the `otlp` (gRPC) exporter; keys as in the Collector.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpExporterConfig {
    /// `http://host:port` of the OTLP gRPC server.
    pub endpoint: String,
    #[serde(default)]
    pub compression: Compression,
    /// Sent as gRPC metadata with every request (e.g. an API key).
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// Deadline of one attempt.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default)]
    pub sending_queue: QueueSettings,
    #[serde(default)]
    pub retry_on_failure: RetrySettings,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn parse(value: Value) -> Result<Arc<dyn ExporterConfig>, Vec<Issue>> {
    let config: OtlpExporterConfig = config::deserialize(value).map_err(|i| vec![i])?;
    let mut issues = Vec::new();
    validate_network_settings(
        &config.endpoint,
        &config.headers,
        config.timeout,
        &config.sending_queue,
        &config.retry_on_failure,
        &mut issues,
    );
    for name in config.headers.keys() {
        if MetadataKey::<tonic::metadata::Ascii>::from_str(&name.to_ascii_lowercase()).is_err() {
            issues.push(Issue::new(
                format!("headers.{name}"),
                "not a valid gRPC metadata key",
            ));
        }
    }
    if issues.is_empty() {
        Ok(Arc::new(config))
    } else {
        Err(issues)
    }
}

impl ExporterConfig for OtlpExporterConfig {
    fn build(&self, _id: &ComponentId) -> Result<Arc<dyn Exporter>, String> {
        let endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| format!("endpoint {}: {e}", self.endpoint))?
            .tcp_nodelay(true);
        let mut headers = Vec::new();
        for (name, value) in &self.headers {
            let key = MetadataKey::from_str(&name.to_ascii_lowercase())
                .map_err(|e| format!("header {name}: {e}"))?;
            let value = MetadataValue::try_from(value.as_str())
                .map_err(|e| format!("header {name}: {e}"))?;
            headers.push((key, value));
        }
        Ok(Arc::new(OtlpExporter {
            // Connects on first use and reconnects by itself, so a backend that is down at
            // start only delays delivery.
            channel: endpoint.connect_lazy(),
            compression: self.compression,
            headers: Arc::new(headers),
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

type Headers = Vec<(
    MetadataKey<tonic::metadata::Ascii>,
    MetadataValue<tonic::metadata::Ascii>,
)>;

pub struct OtlpExporter {
    channel: Channel,
    compression: Compression,
    headers: Arc<Headers>,
}

impl Exporter for OtlpExporter {
    fn export(&self, item: ExportItem) -> BoxFuture<'static, Result<(), ExportError>> {
        let mut client = tonic::client::Grpc::new(self.channel.clone());
        if self.compression == Compression::Gzip {
            client = client.send_compressed(CompressionEncoding::Gzip);
        }
        let headers = self.headers.clone();
        Box::pin(async move {
            client.ready().await.map_err(|e| ExportError::Retryable {
                message: format!("connecting: {e}"),
                retry_after: None,
            })?;
            let mut request = tonic::Request::new(item.bytes);
            for (key, value) in headers.iter() {
                request.metadata_mut().insert(key.clone(), value.clone());
            }
            let response = client
                .unary(
                    request,
                    PathAndQuery::from_static(METRICS_EXPORT_PATH),
                    RawClientCodec::<ExportMetricsServiceResponse>::default(),
                )
                .await
                .map_err(classify)?;
            if let Some(partial) = response.into_inner().partial_success {
                if partial.rejected_data_points > 0 {
                    return Err(ExportError::Permanent(format!(
                        "server rejected {} data points: {}",
                        partial.rejected_data_points, partial.error_message
                    )));
                }
            }
            Ok(())
        })
    }
}

/// The OTLP specification's retryable gRPC codes; everything else is permanent.
fn classify(status: tonic::Status) -> ExportError {
    let message = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss
        | Code::ResourceExhausted => ExportError::Retryable {
            message,
            retry_after: None,
        },
        _ => ExportError::Permanent(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_codes_follow_the_otlp_spec() {
        assert!(matches!(
            classify(tonic::Status::unavailable("x")),
            ExportError::Retryable { .. }
        ));
        assert!(matches!(
            classify(tonic::Status::invalid_argument("x")),
            ExportError::Permanent(_)
        ));
        assert!(matches!(
            classify(tonic::Status::unauthenticated("x")),
            ExportError::Permanent(_)
        ));
    }

    #[test]
    fn bad_settings_name_their_keys() {
        let issues = parse(
            serde_yaml::from_str(
                "{endpoint: 'gateway:4317', timeout: 0s, headers: {'bad header': v}, sending_queue: {queue_size: 0}}",
            )
            .unwrap(),
        )
        .unwrap_err();
        let paths: Vec<_> = issues.iter().map(|i| i.path.as_str()).collect();
        assert!(paths.contains(&"endpoint"), "{paths:?}");
        assert!(paths.contains(&"timeout"));
        assert!(paths.contains(&"headers.bad header"));
        assert!(paths.contains(&"sending_queue.queue_size"));
    }
}
