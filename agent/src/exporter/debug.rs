//! `debug`: logs what passes, one summary line per batch or, with `verbosity: detailed`,
//! every metric and data point.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use prost::Message;
use serde::Deserialize;
use serde_yaml::Value;

use super::{ExportError, ExportItem, Exporter, ExporterConfig, ExporterFactory};
use crate::config::{self, ComponentId, Issue};
use crate::otlp::{wire, ExportMetricsServiceRequest};

pub const FACTORY: ExporterFactory = ExporterFactory {
    type_name: "debug",
    parse,
};

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Verbosity {
    /// One line per batch: resources, metrics, data points, bytes.
    #[default]
    Basic,
    /// Every resource, metric and data point.
    Detailed,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DebugConfig {
    #[serde(default)]
    pub verbosity: Verbosity,
}

fn parse(value: Value) -> Result<Arc<dyn ExporterConfig>, Vec<Issue>> {
    let config: DebugConfig = config::deserialize(value).map_err(|i| vec![i])?;
    Ok(Arc::new(config))
}

impl ExporterConfig for DebugConfig {
    fn build(&self, id: &ComponentId) -> Result<Arc<dyn Exporter>, String> {
        Ok(Arc::new(DebugExporter {
            id: id.to_string(),
            verbosity: self.verbosity,
        }))
    }
}

pub struct DebugExporter {
    id: String,
    verbosity: Verbosity,
}

/// The summary line of one batch.
pub fn summary(bytes: &[u8]) -> String {
    match wire::count(bytes) {
        Ok(c) => format!(
            "resource_metrics={} metrics={} data_points={} bytes={}",
            c.resources,
            c.metrics,
            c.data_points,
            bytes.len()
        ),
        Err(err) => format!("undecodable batch of {} bytes: {err}", bytes.len()),
    }
}

impl Exporter for DebugExporter {
    fn export(&self, item: ExportItem) -> BoxFuture<'static, Result<(), ExportError>> {
        tracing::info!(exporter = %self.id, "{}", summary(&item.bytes));
        if self.verbosity == Verbosity::Detailed {
            match ExportMetricsServiceRequest::decode(item.bytes.clone()) {
                Ok(request) => tracing::info!(exporter = %self.id, "{request:#?}"),
                Err(err) => {
                    tracing::warn!(exporter = %self.id, error = %err, "cannot decode batch")
                }
            }
        }
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::testdata;

    #[test]
    fn summary_counts_the_batch() {
        let bytes = testdata::request(2, 3, 4).encode_to_vec();
        assert_eq!(
            summary(&bytes),
            format!(
                "resource_metrics=2 metrics=6 data_points=24 bytes={}",
                bytes.len()
            )
        );
    }

    #[test]
    fn verbosity_is_checked() {
        let issues = parse(serde_yaml::from_str("{verbosity: loud}").unwrap()).unwrap_err();
        assert_eq!(issues[0].path, "verbosity");
    }
}
