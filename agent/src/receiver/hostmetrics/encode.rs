//! One scrape's output written straight as OTLP protobuf bytes (an
//! `ExportMetricsServiceRequest`), so the process scraper allocates nothing per process: its
//! metric names, units and descriptions are `&'static str`, its resource is encoded once per
//! process and copied while unchanged, and points go to one buffer the pipelines receive as it
//! is. Host scrapers, one small resource each, still build prost structs and encode them here.
//!
//! Fields are written in tag order and defaults left out as prost does, so the bytes are the
//! ones prost would encode from the same structs (a test holds it to that).

use opentelemetry_proto::tonic::metrics::v1::{AggregationTemporality, ResourceMetrics};
use prost::encoding::{encode_varint, WireType};
use prost::Message;

use super::metadata::{Kind, MetricDef, ValueType};

/// A length-delimited field being written: where its length placeholder is, and its width.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct Mark {
    at: usize,
    width: usize,
}

/// Appends the key of field `tag` (every tag written here is below 16: one byte).
fn key(buf: &mut Vec<u8>, tag: u32, wire_type: WireType) {
    encode_varint(u64::from(tag << 3 | wire_type as u32), buf);
}

/// Starts a length-delimited field expected to be shorter than 128 bytes; [`end`] writes its
/// length.
pub fn begin(buf: &mut Vec<u8>, tag: u32) -> Mark {
    begin_with(buf, tag, 1)
}

/// [`begin`] for a field expected to be 128 bytes to 16 KiB long (a process's resource and
/// scope metrics), so that its body is not moved to make room for its length.
pub fn begin_wide(buf: &mut Vec<u8>, tag: u32) -> Mark {
    begin_with(buf, tag, 2)
}

fn begin_with(buf: &mut Vec<u8>, tag: u32, width: usize) -> Mark {
    key(buf, tag, WireType::LengthDelimited);
    let at = buf.len();
    buf.resize(at + width, 0);
    Mark { at, width }
}

/// Writes the length of the field started at `mark`. When it needs another width than the
/// placeholder's, the body moves once (instead of being sized in advance): varints stay
/// minimal, as prost writes them.
pub fn end(buf: &mut Vec<u8>, mark: Mark) {
    let mut len = buf.len().saturating_sub(mark.at + mark.width) as u64;
    let mut varint = [0u8; 10];
    let mut n = 0;
    for slot in &mut varint {
        n += 1;
        if len < 0x80 {
            *slot = len as u8;
            break;
        }
        *slot = (len as u8 & 0x7f) | 0x80;
        len >>= 7;
    }
    let (Some(placeholder), Some(varint)) =
        (buf.get_mut(mark.at..mark.at + mark.width), varint.get(..n))
    else {
        return;
    };
    if n == mark.width {
        placeholder.copy_from_slice(varint);
    } else {
        buf.splice(mark.at..mark.at + mark.width, varint.iter().copied());
    }
}

pub fn bytes_field(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    key(buf, tag, WireType::LengthDelimited);
    encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

/// A proto3 `string`: left out when empty.
pub fn string_field(buf: &mut Vec<u8>, tag: u32, value: &str) {
    if !value.is_empty() {
        bytes_field(buf, tag, value.as_bytes());
    }
}

/// A proto3 `fixed64`: left out when 0.
fn fixed64_field(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        key(buf, tag, WireType::SixtyFourBit);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

/// A `KeyValue` with a string value, as field `tag` (a oneof value: written even when empty).
pub fn str_attr(buf: &mut Vec<u8>, tag: u32, k: &str, v: &str) {
    let kv = begin(buf, tag);
    string_field(buf, 1, k);
    let any = begin(buf, 2);
    bytes_field(buf, 1, v.as_bytes());
    end(buf, any);
    end(buf, kv);
}

/// A `KeyValue` with an int value, as field `tag`.
pub fn int_attr(buf: &mut Vec<u8>, tag: u32, k: &str, v: i64) {
    let kv = begin(buf, tag);
    string_field(buf, 1, k);
    let any = begin(buf, 2);
    key(buf, 3, WireType::Varint);
    encode_varint(v as u64, buf);
    end(buf, any);
    end(buf, kv);
}

/// An `ExportMetricsServiceRequest` being written, and its data point count.
#[derive(Debug, Default)]
pub struct RequestWriter {
    buf: Vec<u8>,
    data_points: u64,
}

impl RequestWriter {
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
            data_points: 0,
        }
    }

    /// Appends a resource built as prost structs (the host scrapers').
    pub fn push(&mut self, rm: &ResourceMetrics) {
        self.data_points += rm
            .scope_metrics
            .iter()
            .flat_map(|sm| &sm.metrics)
            .map(|m| crate::otlp::metric_data_points(m.data.as_ref()) as u64)
            .sum::<u64>();
        key(&mut self.buf, 1, WireType::LengthDelimited);
        encode_varint(rm.encoded_len() as u64, &mut self.buf);
        rm.encode_raw(&mut self.buf);
    }

    /// The buffer, for a scraper that writes resources itself (field 1 of the request).
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Appends one metric of `def` whose points are `(value, attribute)`; an int metric's
    /// value is converted from `f64` as [`MetricDef::point`] does. Sums start at `start`.
    pub fn metric(
        &mut self,
        tag: u32,
        def: &MetricDef,
        start: u64,
        now: u64,
        points: &[(f64, Option<(&str, &str)>)],
    ) {
        let buf = &mut self.buf;
        let metric = begin(buf, tag);
        string_field(buf, 1, def.name);
        string_field(buf, 2, def.description);
        string_field(buf, 3, def.unit);
        let (data_tag, start) = match def.kind {
            Kind::Gauge => (5, 0),
            Kind::Sum { .. } => (7, start),
        };
        let data = begin(buf, data_tag);
        for &(value, attr) in points {
            let point = begin(buf, 1);
            fixed64_field(buf, 2, start);
            fixed64_field(buf, 3, now);
            match def.value {
                ValueType::Double => {
                    key(buf, 4, WireType::SixtyFourBit);
                    buf.extend_from_slice(&value.to_le_bytes());
                }
                ValueType::Int => {
                    key(buf, 6, WireType::SixtyFourBit);
                    buf.extend_from_slice(&(value as i64).to_le_bytes());
                }
            }
            if let Some((k, v)) = attr {
                str_attr(buf, 7, k, v);
            }
            end(buf, point);
        }
        if let Kind::Sum { monotonic } = def.kind {
            key(buf, 2, WireType::Varint);
            encode_varint(AggregationTemporality::Cumulative as u64, buf);
            if monotonic {
                key(buf, 3, WireType::Varint);
                buf.push(1);
            }
        }
        end(buf, data);
        end(buf, metric);
        self.data_points += points.len() as u64;
    }

    /// The encoded request and its data point count.
    pub fn into_parts(self) -> (Vec<u8>, u64) {
        (self.buf, self.data_points)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length-delimited field of `len` bytes, started narrow or wide, is what prost writes:
    /// lengths of one, two and three varint bytes, placeholders too wide and too narrow.
    #[test]
    fn lengths_are_minimal_varints_whatever_the_placeholder() {
        for len in [0, 5, 127, 128, 300, 16_383, 16_384, 70_000] {
            let body = vec![7u8; len];
            let mut expected = vec![9];
            prost::encoding::bytes::encode(3, &body, &mut expected);
            for wide in [false, true] {
                let mut buf = vec![9];
                let mark = if wide {
                    begin_wide(&mut buf, 3)
                } else {
                    begin(&mut buf, 3)
                };
                buf.extend_from_slice(&body);
                end(&mut buf, mark);
                assert_eq!(buf, expected, "len {len}, wide {wide}");
            }
        }
    }
}
