//! `blackhole`: accepts and discards. The normal exporter of a shadow candidate, whose
//! output is measured by the pipeline's volume meter and shipped nowhere.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_yaml::Value;

use super::{ExportError, ExportItem, Exporter, ExporterConfig, ExporterFactory};
use crate::config::{self, ComponentId, Issue};

pub const FACTORY: ExporterFactory = ExporterFactory {
    type_name: "blackhole",
    parse,
};

/// The `blackhole` exporter has no settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlackholeConfig {}

fn parse(value: Value) -> Result<Arc<dyn ExporterConfig>, Vec<Issue>> {
    let config: BlackholeConfig = config::deserialize(value).map_err(|i| vec![i])?;
    Ok(Arc::new(config))
}

impl ExporterConfig for BlackholeConfig {
    fn build(&self, _id: &ComponentId) -> Result<Arc<dyn Exporter>, String> {
        Ok(Arc::new(Blackhole))
    }
}

pub struct Blackhole;

impl Exporter for Blackhole {
    fn export(&self, _item: ExportItem) -> BoxFuture<'static, Result<(), ExportError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_no_settings() {
        assert!(parse(Value::Null).is_ok());
        let issues = parse(serde_yaml::from_str("{endpoint: x}").unwrap()).unwrap_err();
        assert!(issues[0].message.contains("unknown field `endpoint`"));
    }
}
