//! Rewriting encoded `ExportMetricsServiceRequest`s without decoding them.
//!
//! A processor that drops or edits a few things (the `filter`, the `attributes` processor)
//! would otherwise pay a full prost decode, a copy of the decoded request and a re-encode for
//! changes that touch a small part of the bytes. Here the request is walked once on the wire
//! and the output is built as it goes:
//!
//! - Nothing is written until the first change. A request nothing changes costs one walk and
//!   no copy: the caller passes its input on as it is.
//! - Unchanged runs of input, however many fields they span, are copied with one
//!   `extend_from_slice`. Only the messages on the path to a change are re-framed: their tag
//!   is written, then a length placeholder, then their body; the real length is filled in when
//!   the message ends (see [`end_message`]).
//! - Removing a message that turns out empty is a truncation of the output to before its tag.
//! - Only what may change is walked: a resource under which no metric decision can differ
//!   from "keep all" is not looked into, and neither are the points of a metric kept whole.
//!   The output's data point count is the input's less what was left out, counted on the way.
//!
//! [`rewrite`] drives the walk down the OTLP metrics schema (resource, scope, metric, data
//! point, attribute) and asks an [`Edit`] what to do at each level; [`Rewriter`] is the
//! output side. Fields the walk does not know are copied verbatim, wherever they are.
//!
//! Protobuf allows a singular field to repeat; a decoder then keeps the last scalar and merges
//! messages. The walk follows suit where it decides something: the last metric name counts,
//! the `resource` fields of a `ResourceMetrics` are merged, and the points of a metric are
//! counted the way prost resolves its `data` oneof.

use std::fmt::Write as _;

use bytes::Bytes;
use prost::Message;

use super::wire::{self, read_varint, AttributeIter, Visitor, WireError};
use super::Payload;

pub const WT_VARINT: u8 = 0;
pub const WT_I64: u8 = 1;
pub const WT_LEN: u8 = 2;
pub const WT_I32: u8 = 5;

// Field numbers from opentelemetry/proto/{collector/metrics,metrics,resource,common}/v1.
pub const REQUEST_RESOURCE_METRICS: u32 = 1;
pub const RESOURCE_METRICS_RESOURCE: u32 = 1;
pub const RESOURCE_METRICS_SCOPE_METRICS: u32 = 2;
pub const RESOURCE_ATTRIBUTES: u32 = 1;
pub const SCOPE_METRICS_SCOPE: u32 = 1;
pub const SCOPE_METRICS_METRICS: u32 = 2;
pub const METRIC_NAME: u32 = 1;
pub const METRIC_GAUGE: u32 = 5;
pub const METRIC_SUM: u32 = 7;
pub const METRIC_HISTOGRAM: u32 = 9;
pub const METRIC_EXPONENTIAL_HISTOGRAM: u32 = 10;
pub const METRIC_SUMMARY: u32 = 11;
pub const DATA_POINTS: u32 = 1;
pub const KEY_VALUE_KEY: u32 = 1;
pub const KEY_VALUE_VALUE: u32 = 2;
pub const ANY_VALUE_STRING: u32 = 1;
pub const ANY_VALUE_BOOL: u32 = 2;
pub const ANY_VALUE_INT: u32 = 3;
pub const ANY_VALUE_DOUBLE: u32 = 4;
pub const ANY_VALUE_ARRAY: u32 = 5;
pub const ANY_VALUE_KVLIST: u32 = 6;
pub const ANY_VALUE_BYTES: u32 = 7;
pub const ANY_VALUE_STRING_STRINDEX: u32 = 8;

/// Where the attributes sit in the data points of a metric data field.
pub fn attribute_field(metric_data_field: u32) -> u32 {
    match metric_data_field {
        METRIC_HISTOGRAM => 9,
        METRIC_EXPONENTIAL_HISTOGRAM => 1,
        _ => 7, // NumberDataPoint and SummaryDataPoint
    }
}

fn is_metric_data(number: u32) -> bool {
    matches!(
        number,
        METRIC_GAUGE
            | METRIC_SUM
            | METRIC_HISTOGRAM
            | METRIC_EXPONENTIAL_HISTOGRAM
            | METRIC_SUMMARY
    )
}

/// Reported for states the rewrite cannot reach on any input (an offset out of order); an
/// error instead of a panic, so that a bug costs one batch and not the agent.
const INTERNAL: WireError = WireError::Truncated("rewrite offset");

// ---- reading ----

/// One field as found on the wire, with its place in the buffer it was read from.
///
/// [`wire::Fields`](super::wire::Fields) yields neither offsets nor scalar values, and both
/// are needed here: offsets to copy runs of input, scalars to read attribute values.
#[derive(Debug, Clone, Copy)]
pub struct Span<'a> {
    pub number: u32,
    pub wire_type: u8,
    /// Offset of the field's tag.
    pub start: usize,
    /// Offset of the payload of a length-delimited field (`end` for other fields).
    pub body_start: usize,
    /// Offset just past the field.
    pub end: usize,
    /// The payload of a length-delimited field; empty for other fields.
    pub body: &'a [u8],
    /// The value of a varint, fixed64 or fixed32 field; 0 for length-delimited fields.
    pub value: u64,
}

impl Span<'_> {
    /// The field must be length-delimited, as the OTLP schema says it is.
    pub fn expect_len(&self) -> Result<(), WireError> {
        if self.wire_type == WT_LEN {
            Ok(())
        } else {
            Err(WireError::UnexpectedWireType(self.number))
        }
    }
}

/// Iterates over the fields of one encoded message, reporting offsets into the whole buffer.
#[derive(Clone)]
pub struct Spans<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Spans<'a> {
    /// The fields of `buf`, a whole message.
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            end: buf.len(),
        }
    }

    /// The fields of the message held by `field`, a length-delimited field read from `buf`.
    pub fn within(buf: &'a [u8], field: &Span<'_>) -> Self {
        Self {
            buf,
            pos: field.body_start,
            end: field.end,
        }
    }

    // Inlined: called once per field, and the call costs more than the field.
    #[inline(always)]
    fn next_span(&mut self) -> Result<Span<'a>, WireError> {
        let rest = self.buf.get(self.pos..self.end).ok_or(INTERNAL)?;
        let mut cur = rest;
        let key = read_varint(&mut cur)?;
        let number = u32::try_from(key >> 3).map_err(|_| WireError::BadVarint)?;
        let wire_type = (key & 7) as u8;
        // Nearly every field the walk steps over is length-delimited, and data points hold
        // fixed64 timestamps: those cases are plain branches, the others are out of line
        // (matched together, they compile to a jump table that mispredicts).
        let (body, value): (&[u8], u64) = if wire_type == WT_LEN {
            let len = read_varint(&mut cur)?;
            let len = usize::try_from(len).map_err(|_| WireError::Truncated("length"))?;
            (take(&mut cur, len, "length-delimited field")?, 0)
        } else if wire_type == WT_I64 {
            let raw = take(&mut cur, 8, "fixed64")?;
            let raw = <[u8; 8]>::try_from(raw).map_err(|_| WireError::Truncated("fixed64"))?;
            (&[], u64::from_le_bytes(raw))
        } else {
            (&[], read_scalar(&mut cur, number, wire_type)?)
        };
        let start = self.pos;
        let end = start + (rest.len() - cur.len());
        self.pos = end;
        Ok(Span {
            number,
            wire_type,
            start,
            body_start: end - body.len(),
            end,
            body,
            value,
        })
    }
}

impl<'a> Iterator for Spans<'a> {
    type Item = Result<Span<'a>, WireError>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let span = self.next_span();
        if span.is_err() {
            // Nothing after a malformed field can be read; stop rather than report it again.
            self.pos = self.end;
        }
        Some(span)
    }
}

/// The value of a field that is not length-delimited.
#[inline(never)]
fn read_scalar(buf: &mut &[u8], number: u32, wire_type: u8) -> Result<u64, WireError> {
    match wire_type {
        WT_VARINT => read_varint(buf),
        WT_I64 => {
            let raw = take(buf, 8, "fixed64")?;
            let raw = <[u8; 8]>::try_from(raw).map_err(|_| WireError::Truncated("fixed64"))?;
            Ok(u64::from_le_bytes(raw))
        }
        WT_I32 => {
            let raw = take(buf, 4, "fixed32")?;
            let raw = <[u8; 4]>::try_from(raw).map_err(|_| WireError::Truncated("fixed32"))?;
            Ok(u64::from(u32::from_le_bytes(raw)))
        }
        _ => Err(WireError::BadWireType {
            field: number,
            wire_type,
        }),
    }
}

#[inline]
fn take<'a>(buf: &mut &'a [u8], len: usize, what: &'static str) -> Result<&'a [u8], WireError> {
    if buf.len() < len {
        return Err(WireError::Truncated(what));
    }
    let (head, tail) = buf.split_at(len);
    *buf = tail;
    Ok(head)
}

/// An attribute value as found on the wire. Strings are raw bytes: the walk does not check
/// UTF-8, a consumer that needs text does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// No value, or an `AnyValue` with none of its fields set.
    Empty,
    String(&'a [u8]),
    Bool(bool),
    Int(i64),
    Double(f64),
    /// The encoded `ArrayValue`.
    Array(&'a [u8]),
    /// The encoded `KeyValueList`.
    Kvlist(&'a [u8]),
    Bytes(&'a [u8]),
    StringStrindex(i32),
}

impl<'a> Value<'a> {
    /// Reads an encoded `AnyValue`; of several value fields the last wins, as in a decoder
    /// (which would merge two arrays or two maps in a row; no sender splits a value so).
    pub fn parse(any_value: &'a [u8]) -> Result<Self, WireError> {
        let mut value = Value::Empty;
        Self::merge(any_value, &mut value)?;
        Ok(value)
    }

    fn merge(any_value: &'a [u8], value: &mut Self) -> Result<(), WireError> {
        for field in Spans::new(any_value) {
            let field = field?;
            let wire_type = match field.number {
                ANY_VALUE_STRING | ANY_VALUE_ARRAY | ANY_VALUE_KVLIST | ANY_VALUE_BYTES => WT_LEN,
                ANY_VALUE_BOOL | ANY_VALUE_INT | ANY_VALUE_STRING_STRINDEX => WT_VARINT,
                ANY_VALUE_DOUBLE => WT_I64,
                _ => continue,
            };
            if field.wire_type != wire_type {
                return Err(WireError::UnexpectedWireType(field.number));
            }
            *value = match field.number {
                ANY_VALUE_STRING => Value::String(field.body),
                ANY_VALUE_BOOL => Value::Bool(field.value != 0),
                // int64 and int32 on the wire are two's complement varints.
                ANY_VALUE_INT => Value::Int(field.value as i64),
                ANY_VALUE_DOUBLE => Value::Double(f64::from_bits(field.value)),
                ANY_VALUE_ARRAY => Value::Array(field.body),
                ANY_VALUE_KVLIST => Value::Kvlist(field.body),
                ANY_VALUE_BYTES => Value::Bytes(field.body),
                _ => Value::StringStrindex(field.value as i32),
            };
        }
        Ok(())
    }
}

/// One encoded `KeyValue`.
#[derive(Debug, Clone, Copy)]
pub struct KeyValueRef<'a> {
    /// The whole encoded `KeyValue`.
    pub encoded: &'a [u8],
    pub key: &'a [u8],
}

impl<'a> KeyValueRef<'a> {
    #[inline]
    pub fn parse(encoded: &'a [u8]) -> Result<Self, WireError> {
        let mut key: &[u8] = &[];
        for field in Spans::new(encoded) {
            let field = field?;
            if field.number == KEY_VALUE_KEY {
                field.expect_len()?;
                key = field.body;
            }
        }
        Ok(Self { encoded, key })
    }

    /// The value; several `value` fields merge like the decoder merges them (the last value
    /// set wins).
    pub fn value(&self) -> Result<Value<'a>, WireError> {
        let mut value = Value::Empty;
        for field in Spans::new(self.encoded) {
            let field = field?;
            if field.number == KEY_VALUE_VALUE {
                field.expect_len()?;
                Value::merge(field.body, &mut value)?;
            }
        }
        Ok(value)
    }
}

/// The attributes of one resource or data point: the `KeyValue` fields numbered `field` of an
/// encoded message.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    message: &'a [u8],
    field: u32,
}

impl<'a> Attributes<'a> {
    pub fn new(message: &'a [u8], field: u32) -> Self {
        Self { message, field }
    }

    /// The attributes of an encoded `Resource`.
    pub fn of_resource(resource: &'a [u8]) -> Self {
        Self::new(resource, RESOURCE_ATTRIBUTES)
    }

    pub fn iter(&self) -> impl Iterator<Item = Result<KeyValueRef<'a>, WireError>> + 'a {
        let field_number = self.field;
        Spans::new(self.message).filter_map(move |field| match field {
            Err(err) => Some(Err(err)),
            Ok(field) if field.number == field_number => Some(
                field
                    .expect_len()
                    .and_then(|()| KeyValueRef::parse(field.body)),
            ),
            Ok(_) => None,
        })
    }

    /// The first attribute with this key.
    pub fn find(&self, key: &[u8]) -> Result<Option<KeyValueRef<'a>>, WireError> {
        for kv in self.iter() {
            let kv = kv?;
            if kv.key == key {
                return Ok(Some(kv));
            }
        }
        Ok(None)
    }
}

/// The SHA-256 of a value's text, as lowercase hex truncated to `N` digits (`N` even, at most
/// 64): strings as they are, integers, doubles and booleans as `1234`, `0.5`, `true`, bytes raw,
/// arrays and maps as the encoding of an `AnyValue` holding them, an empty value as nothing.
pub fn hash_hex<const N: usize>(value: &Value<'_>) -> [u8; N] {
    use sha2::{Digest, Sha256};

    /// Feeds formatted text straight into the digest, without a buffer.
    struct DigestWriter<'a>(&'a mut Sha256);

    impl std::fmt::Write for DigestWriter<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.update(s.as_bytes());
            Ok(())
        }
    }

    let mut hasher = Sha256::new();
    // Writing to a DigestWriter cannot fail.
    match *value {
        Value::Empty => {}
        Value::String(bytes) | Value::Bytes(bytes) => hasher.update(bytes),
        Value::Bool(b) => hasher.update(if b { "true" } else { "false" }),
        Value::Int(i) => {
            let _ = write!(DigestWriter(&mut hasher), "{i}");
        }
        Value::Double(d) => {
            let _ = write!(DigestWriter(&mut hasher), "{d}");
        }
        Value::StringStrindex(i) => {
            let _ = write!(DigestWriter(&mut hasher), "{i}");
        }
        Value::Array(body) | Value::Kvlist(body) => {
            // What hashing the encoded AnyValue gives: its one field, framed.
            let number = if matches!(value, Value::Array(_)) {
                ANY_VALUE_ARRAY
            } else {
                ANY_VALUE_KVLIST
            };
            let (tag, tag_len) = varint(u64::from(number << 3 | u32::from(WT_LEN)));
            let (len, len_len) = varint(body.len() as u64);
            hasher.update(&tag[..tag_len]);
            hasher.update(&len[..len_len]);
            hasher.update(body);
        }
    }
    let digest = hasher.finalize();
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; N];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(digest.iter()) {
        if let [high, low] = pair {
            *high = DIGITS[usize::from(byte >> 4)];
            *low = DIGITS[usize::from(byte & 0x0f)];
        }
    }
    hex
}

// ---- writing ----

pub fn put_varint(out: &mut Vec<u8>, value: u64) {
    let (bytes, len) = varint(value);
    out.extend_from_slice(&bytes[..len]);
}

/// `value` as a varint, in a buffer on the stack: the bytes and how many there are.
fn varint(mut value: u64) -> ([u8; 10], usize) {
    let mut bytes = [0u8; 10];
    let mut len = 0;
    for byte in &mut bytes {
        len += 1;
        if value < 0x80 {
            *byte = value as u8;
            break;
        }
        *byte = (value as u8) | 0x80;
        value >>= 7;
    }
    (bytes, len)
}

pub fn put_tag(out: &mut Vec<u8>, number: u32, wire_type: u8) {
    put_varint(out, (u64::from(number) << 3) | u64::from(wire_type));
}

/// Writes a length-delimited field.
pub fn put_len_field(out: &mut Vec<u8>, number: u32, body: &[u8]) {
    put_tag(out, number, WT_LEN);
    put_varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

fn varint_len(value: u64) -> usize {
    // 1 byte per started 7 bits, at least 1.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// Where the length of a message being written goes, from [`begin_message`].
#[derive(Debug, Clone, Copy)]
pub struct Placeholder {
    at: usize,
    width: usize,
}

/// Starts a length-delimited field whose body is about to be written: its tag, then room for
/// its length. `expected_len` sizes the room (the length of the message it replaces, say), so
/// the body usually does not have to move when the real length is filled in.
pub fn begin_message(out: &mut Vec<u8>, number: u32, expected_len: usize) -> Placeholder {
    put_tag(out, number, WT_LEN);
    let at = out.len();
    let width = varint_len(expected_len as u64);
    out.resize(at + width, 0);
    Placeholder { at, width }
}

/// Fills in the length of the message started by [`begin_message`], moving its body when the
/// length needs more or fewer bytes than the room kept for it.
pub fn end_message(out: &mut Vec<u8>, placeholder: Placeholder) -> Result<(), WireError> {
    let Placeholder { at, width } = placeholder;
    let body_start = at + width;
    let len = out.len().checked_sub(body_start).ok_or(INTERNAL)?;
    let (encoded, needed) = varint(len as u64);
    if needed < width {
        out.copy_within(body_start.., at + needed);
        out.truncate(out.len() - (width - needed));
    } else if needed > width {
        let grow = needed - width;
        out.resize(out.len() + grow, 0);
        out.copy_within(body_start..body_start + len, body_start + grow);
    }
    out.get_mut(at..at + needed)
        .ok_or(INTERNAL)?
        .copy_from_slice(&encoded[..needed]);
    Ok(())
}

/// An input message the walk is inside of.
#[derive(Debug)]
struct Frame {
    number: u32,
    start: usize,
    body_start: usize,
    end: usize,
    /// Where its tag and length went in the output, once it has been written (started).
    written: Option<(usize, Placeholder)>,
    /// Input offset up to which its body is accounted for in the output: copied, replaced
    /// or deliberately left out.
    done: usize,
}

/// The output side of a rewrite: a stack of the input messages the walk is inside of, and the
/// output, written lazily.
///
/// A frame is started (its tag and length placeholder written, after everything of its parent
/// before it) only when something inside it changes; an unchanged message is never written by
/// itself but copied as part of its parent's next run.
pub struct Rewriter<'a> {
    input: &'a [u8],
    out: Vec<u8>,
    frames: Vec<Frame>,
}

/// How a message the walk left ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// Nothing in it changed; the parent copies it with its next run.
    Unchanged,
    /// It was written, changed.
    Rewritten,
}

impl<'a> Rewriter<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        let root = Frame {
            number: 0,
            start: 0,
            body_start: 0,
            end: input.len(),
            written: None,
            done: 0,
        };
        let mut frames = Vec::with_capacity(8);
        frames.push(root);
        Self {
            input,
            out: Vec::new(),
            frames,
        }
    }

    /// Goes into `field`, a length-delimited child of the current message (after every child
    /// already dropped or replaced).
    pub fn enter(&mut self, field: &Span<'_>) {
        self.frames.push(Frame {
            number: field.number,
            start: field.start,
            body_start: field.body_start,
            end: field.end,
            written: None,
            done: field.body_start,
        });
    }

    /// Leaves the current message, keeping it.
    pub fn leave(&mut self) -> Result<Left, WireError> {
        if self.frames.len() < 2 {
            return Err(INTERNAL);
        }
        let frame = self.frames.pop().ok_or(INTERNAL)?;
        let Some((_, placeholder)) = frame.written else {
            return Ok(Left::Unchanged);
        };
        let rest = self.input.get(frame.done..frame.end).ok_or(INTERNAL)?;
        self.out.extend_from_slice(rest);
        end_message(&mut self.out, placeholder)?;
        Ok(Left::Rewritten)
    }

    /// Leaves the current message, leaving it out of the output.
    pub fn leave_dropped(&mut self) -> Result<(), WireError> {
        if self.frames.len() < 2 {
            return Err(INTERNAL);
        }
        let frame = self.frames.pop().ok_or(INTERNAL)?;
        match frame.written {
            // The parent already counts the message as done: taking back what was written
            // of it is enough.
            Some((tag_at, _)) => self.out.truncate(tag_at),
            None => self.skip(frame.start, frame.end)?,
        }
        Ok(())
    }

    /// Leaves `field`, a child of the current message, out of the output.
    pub fn drop_field(&mut self, field: &Span<'_>) -> Result<(), WireError> {
        self.skip(field.start, field.end)
    }

    /// Leaves `field`, a child of the current message, out of the output and returns the
    /// output to write its replacement into, in its place.
    pub fn replace_field(&mut self, field: &Span<'_>) -> Result<&mut Vec<u8>, WireError> {
        self.skip(field.start, field.end)?;
        Ok(&mut self.out)
    }

    /// Returns the output to write new fields into, at input offset `at` of the current
    /// message (which must not be before anything already dropped or replaced).
    pub fn insert_at(&mut self, at: usize) -> Result<&mut Vec<u8>, WireError> {
        self.skip(at, at)?;
        Ok(&mut self.out)
    }

    /// The rewritten request, or `None` if nothing changed.
    pub fn finish(mut self) -> Result<Option<Vec<u8>>, WireError> {
        if self.frames.len() != 1 {
            return Err(INTERNAL);
        }
        let root = self.frames.pop().ok_or(INTERNAL)?;
        if root.written.is_none() {
            return Ok(None);
        }
        let rest = self.input.get(root.done..).ok_or(INTERNAL)?;
        self.out.extend_from_slice(rest);
        Ok(Some(self.out))
    }

    /// Writes the current message up to input offset `from` and marks `from..to` done.
    fn skip(&mut self, from: usize, to: usize) -> Result<(), WireError> {
        self.start()?;
        let input = self.input;
        let frame = self.frames.last_mut().ok_or(INTERNAL)?;
        if to < from {
            return Err(INTERNAL);
        }
        let run = input.get(frame.done..from).ok_or(INTERNAL)?;
        self.out.extend_from_slice(run);
        frame.done = to;
        Ok(())
    }

    /// Starts every frame not started yet, outermost first.
    fn start(&mut self) -> Result<(), WireError> {
        let Some(first) = self.frames.iter().position(|f| f.written.is_none()) else {
            return Ok(());
        };
        for i in first..self.frames.len() {
            if i == 0 {
                // The request itself has no tag: the output starts here. Edits only shrink
                // or slightly grow a request.
                self.out.reserve(self.input.len());
                if let Some(root) = self.frames.first_mut() {
                    root.written = Some((0, Placeholder { at: 0, width: 0 }));
                }
                continue;
            }
            let (parents, children) = self.frames.split_at_mut(i);
            let (Some(parent), Some(frame)) = (parents.last_mut(), children.first_mut()) else {
                return Err(INTERNAL);
            };
            let run = self.input.get(parent.done..frame.start).ok_or(INTERNAL)?;
            self.out.extend_from_slice(run);
            // From here the frame writes its own bytes.
            parent.done = frame.end;
            let tag_at = self.out.len();
            let placeholder =
                begin_message(&mut self.out, frame.number, frame.end - frame.body_start);
            frame.written = Some((tag_at, placeholder));
        }
        Ok(())
    }
}

// ---- the walk ----

/// What a resource decision says.
#[derive(Debug, Clone, Copy)]
pub enum ResourceEdit<R> {
    /// Leave the `ResourceMetrics` out, with everything in it.
    Drop,
    /// Keep the resource as it is; `R` goes to the metric decisions.
    Keep(R),
    /// Replace the resource by what [`Edit::write_resource`] writes (create it if absent).
    Rewrite(R),
    /// Keep the resource without the attributes [`Edit::keep_attribute`] refuses: one pass,
    /// the rest copied as it is.
    FilterAttributes(R),
}

/// What a metric decision says.
#[derive(Debug, Clone, Copy)]
pub enum MetricEdit<P> {
    Drop,
    /// Keep every data point as it is.
    KeepAll,
    /// Ask [`Edit::point`] about every data point.
    PerPoint(P),
}

/// What a data point decision says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointEdit {
    Keep,
    Drop,
    /// Replace the point by what [`Edit::write_point`] writes.
    Rewrite,
    /// Keep the point without the attributes [`Edit::keep_attribute`] refuses.
    FilterAttributes,
}

/// A processor's decisions, asked for by [`rewrite`] on its way down one request.
pub trait Edit {
    /// What a resource decision passes down to the metric decisions under it.
    type Resource: Copy;
    /// What a metric decision passes down to the data point decisions under it.
    type Point: Copy;

    /// Whether metrics left without data points, scopes left without metrics and resources
    /// left without scopes are removed, as [`super::prune_empty`] removes them, wherever the
    /// walk goes (see [`Edit::descends`]).
    const PRUNE: bool;

    /// Decides one `ResourceMetrics` by its encoded `Resource` (`None` if it has none).
    fn resource(
        &mut self,
        resource: Option<&[u8]>,
    ) -> Result<ResourceEdit<Self::Resource>, WireError>;

    /// Writes the body of the new `Resource` after [`ResourceEdit::Rewrite`].
    fn write_resource(
        &mut self,
        resource: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError>;

    /// Whether some metric decision under a resource decided so may differ from
    /// [`MetricEdit::KeepAll`]. When none can, the walk does not go into its scopes: the
    /// resource is copied whole (its resource field aside), as received, empty scopes and
    /// metrics included; and [`Self::PRUNE`] does not apply to it.
    fn descends(&self, resource: Self::Resource) -> bool;

    /// Whether [`Edit::metric`] looks at the name for metrics of this resource. When it does
    /// not, the walk skips a pass over each metric to find the name and passes `""`.
    fn reads_metric_names(&self, resource: Self::Resource) -> bool;

    /// Decides one metric by its name.
    fn metric(&mut self, resource: Self::Resource, name: &str) -> MetricEdit<Self::Point>;

    /// Whether [`Self::PRUNE`] applies under a resource decided so (for edits made of several).
    fn prunes(&self, _resource: Self::Resource) -> bool {
        Self::PRUNE
    }

    /// Whether anything in a `ScopeMetrics` under a resource the walk goes into may change,
    /// judged from its encoded body alone. An edit that can tell from the bytes that nothing
    /// does (no point holds a key it acts on, say) returns false, and the scope is kept whole,
    /// as received, without its metrics being walked ([`Self::PRUNE`] does not apply to it).
    fn may_change_scope(&mut self, _resource: Self::Resource, _scope_metrics: &[u8]) -> bool {
        true
    }

    /// Decides one data point by its attributes.
    fn point(
        &mut self,
        rule: Self::Point,
        attributes: Attributes<'_>,
    ) -> Result<PointEdit, WireError>;

    /// After [`ResourceEdit::FilterAttributes`] or [`PointEdit::FilterAttributes`]: whether
    /// to keep one attribute of a resource (`on_resource`) or of a data point.
    fn keep_attribute(
        &mut self,
        on_resource: bool,
        attribute: KeyValueRef<'_>,
    ) -> Result<bool, WireError>;

    /// Writes the body of the new data point after [`PointEdit::Rewrite`]; its attributes are
    /// the fields numbered `attribute_field` of `point`.
    fn write_point(
        &mut self,
        rule: Self::Point,
        point: &[u8],
        attribute_field: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError>;
}

/// Two edits in one walk: `first`, then `second` on what `first` keeps, as if the request
/// were rewritten by `first` and the result by `second`, with one walk and one copy.
///
/// `first` may only drop (resources, metrics, points) and prune; `second` may change
/// attributes but never drops nor prunes. Anything else is refused with an error at the
/// first decision that breaks it.
pub struct Then<A, B> {
    pub first: A,
    pub second: B,
}

/// A decision [`Then`] cannot compose.
const NOT_COMPOSABLE: WireError = WireError::Truncated("edit that cannot be composed");

impl<A: Edit, B: Edit> Edit for Then<A, B> {
    type Resource = (A::Resource, B::Resource);
    type Point = (Option<A::Point>, Option<B::Point>);

    const PRUNE: bool = {
        assert!(!B::PRUNE, "the second edit of a Then must not prune");
        A::PRUNE
    };

    fn resource(
        &mut self,
        resource: Option<&[u8]>,
    ) -> Result<ResourceEdit<Self::Resource>, WireError> {
        let first = match self.first.resource(resource)? {
            ResourceEdit::Drop => return Ok(ResourceEdit::Drop),
            ResourceEdit::Keep(first) => first,
            ResourceEdit::Rewrite(_) | ResourceEdit::FilterAttributes(_) => {
                return Err(NOT_COMPOSABLE)
            }
        };
        Ok(match self.second.resource(resource)? {
            ResourceEdit::Drop => return Err(NOT_COMPOSABLE),
            ResourceEdit::Keep(second) => ResourceEdit::Keep((first, second)),
            ResourceEdit::Rewrite(second) => ResourceEdit::Rewrite((first, second)),
            ResourceEdit::FilterAttributes(second) => {
                ResourceEdit::FilterAttributes((first, second))
            }
        })
    }

    fn write_resource(
        &mut self,
        resource: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        self.second.write_resource(resource, out)
    }

    fn descends(&self, (first, second): Self::Resource) -> bool {
        self.first.descends(first) || self.second.descends(second)
    }

    fn prunes(&self, (first, _): Self::Resource) -> bool {
        // Where the first edit alone would have walked.
        A::PRUNE && self.first.descends(first)
    }

    fn may_change_scope(&mut self, (first, second): Self::Resource, scope_metrics: &[u8]) -> bool {
        (self.first.descends(first) && self.first.may_change_scope(first, scope_metrics))
            || (self.second.descends(second) && self.second.may_change_scope(second, scope_metrics))
    }

    fn reads_metric_names(&self, (first, second): Self::Resource) -> bool {
        (self.first.descends(first) && self.first.reads_metric_names(first))
            || (self.second.descends(second) && self.second.reads_metric_names(second))
    }

    fn metric(&mut self, (first, second): Self::Resource, name: &str) -> MetricEdit<Self::Point> {
        let first = match self.first.descends(first) {
            false => None,
            true => match self.first.metric(first, name) {
                MetricEdit::Drop => return MetricEdit::Drop,
                MetricEdit::KeepAll => None,
                MetricEdit::PerPoint(rule) => Some(rule),
            },
        };
        let second = match self.second.descends(second) {
            false => None,
            true => match self.second.metric(second, name) {
                MetricEdit::Drop => return MetricEdit::Drop,
                MetricEdit::KeepAll => None,
                MetricEdit::PerPoint(rule) => Some(rule),
            },
        };
        match (first, second) {
            (None, None) => MetricEdit::KeepAll,
            rules => MetricEdit::PerPoint(rules),
        }
    }

    fn point(
        &mut self,
        (first, second): Self::Point,
        attributes: Attributes<'_>,
    ) -> Result<PointEdit, WireError> {
        if let Some(rule) = first {
            match self.first.point(rule, attributes)? {
                PointEdit::Keep => {}
                PointEdit::Drop => return Ok(PointEdit::Drop),
                PointEdit::Rewrite | PointEdit::FilterAttributes => return Err(NOT_COMPOSABLE),
            }
        }
        match second {
            None => Ok(PointEdit::Keep),
            Some(rule) => match self.second.point(rule, attributes)? {
                PointEdit::Drop => Err(NOT_COMPOSABLE),
                edit => Ok(edit),
            },
        }
    }

    fn keep_attribute(
        &mut self,
        on_resource: bool,
        attribute: KeyValueRef<'_>,
    ) -> Result<bool, WireError> {
        self.second.keep_attribute(on_resource, attribute)
    }

    fn write_point(
        &mut self,
        (_, second): Self::Point,
        point: &[u8],
        attribute_field: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        let rule = second.ok_or(NOT_COMPOSABLE)?;
        self.second.write_point(rule, point, attribute_field, out)
    }
}

/// What [`rewrite`] made of a request.
#[derive(Debug)]
pub struct Rewritten {
    /// The new request, `None` if it is the input unchanged.
    pub bytes: Option<Vec<u8>>,
    /// Data points in the output: those of the input less those left out.
    pub data_points: u64,
    /// `ResourceMetrics` in the output.
    pub resources: u64,
}

/// Rewrites an encoded `ExportMetricsServiceRequest` holding `data_points` data points as
/// `edit` decides, in one pass.
///
/// Only what may change is walked: a resource under which [`Edit::descends`] says no metric
/// decision can differ from keeping it all is kept whole, without looking inside. The points
/// of what is left out are counted as it goes, so the output's count is exact (given an
/// exact input count) without walking what stays.
pub fn rewrite<E: Edit>(
    input: &[u8],
    data_points: u64,
    edit: &mut E,
) -> Result<Rewritten, WireError> {
    rewrite_observed(input, data_points, edit, None::<&mut Unobserved>).map(|(r, _)| r)
}

/// The observer of a rewrite nobody observes.
pub struct Unobserved;

impl Visitor for Unobserved {}

/// [`rewrite`], also telling `observer` about the output as [`wire::walk`] would if it walked
/// it: a rewrite and a walk of its output in one pass. Returns whether the observer saw all of
/// it; it stops at the first part it cannot read (which the rewrite itself may not need to),
/// and the caller then walks the output instead.
///
/// What it sees of each data point of the output is exact. It may be told of a resource,
/// scope or metric that is then pruned, with no points, which a walk of the output would not
/// report. Visitors with [`Visitor::DETAIL`] are not supported.
pub fn rewrite_observed<E: Edit, V: Visitor>(
    input: &[u8],
    data_points: u64,
    edit: &mut E,
    observer: Option<&mut V>,
) -> Result<(Rewritten, bool), WireError> {
    const { assert!(!V::DETAIL, "the walk does not report metric data") };
    let mut walk = Walk {
        rw: Rewriter::new(input),
        input,
        edit,
        dropped_points: 0,
        observed: observer.is_some(),
        observer,
        kept: Vec::new(),
    };
    let mut resources = 0;
    for field in Spans::new(input) {
        let field = field?;
        if field.number != REQUEST_RESOURCE_METRICS {
            continue;
        }
        field.expect_len()?;
        if walk.resource_metrics(&field)? {
            resources += 1;
        }
    }
    let (dropped_points, observed) = (walk.dropped_points, walk.observed);
    let rewritten = Rewritten {
        bytes: walk.rw.finish()?,
        data_points: data_points.saturating_sub(dropped_points),
        resources,
    };
    Ok((rewritten, observed))
}

/// One rewrite under way.
struct Walk<'a, 'e, E, V> {
    rw: Rewriter<'a>,
    input: &'a [u8],
    edit: &'e mut E,
    /// Data points in what was left out so far.
    dropped_points: u64,
    /// Told about the output as it is written; `None` once it could not be.
    observer: Option<&'e mut V>,
    /// Whether the observer saw everything so far.
    observed: bool,
    /// The attributes kept of the message being filtered, or the resource being rewritten,
    /// for the observer.
    kept: Vec<u8>,
}

impl<E: Edit, V: Visitor> Walk<'_, '_, E, V> {
    /// Stops observing after a part of the input the observer could not read.
    fn observation<T>(&mut self, result: Result<T, WireError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(_) => {
                self.observer = None;
                self.observed = false;
                None
            }
        }
    }

    /// Tells the observer the resource of a `ResourceMetrics` the walk goes into, as the
    /// output will have it (a walk of the output reads the last `resource` field).
    fn observe_resource(
        &mut self,
        resource: Option<&[u8]>,
        last: Option<&[u8]>,
        rewrite: bool,
        filter: bool,
    ) -> Result<(), WireError> {
        let Some(observer) = self.observer.as_deref_mut() else {
            return Ok(());
        };
        if !rewrite && !filter {
            observer.resource(last.unwrap_or_default());
            return Ok(());
        }
        self.kept.clear();
        if rewrite {
            self.edit.write_resource(resource, &mut self.kept)?;
        } else if let Some(last) = last {
            for field in Spans::new(last) {
                let field = field?;
                if field.number == RESOURCE_ATTRIBUTES {
                    field.expect_len()?;
                    let attribute = KeyValueRef::parse(field.body)?;
                    if !self.edit.keep_attribute(true, attribute)? {
                        continue;
                    }
                }
                let raw = last.get(field.start..field.end).ok_or(INTERNAL)?;
                self.kept.extend_from_slice(raw);
            }
        }
        observer.resource(&self.kept);
        Ok(())
    }

    /// Tells the observer the scope of a `ScopeMetrics` the walk goes into.
    fn observe_scope(&mut self, sm: &Span<'_>) -> Result<(), WireError> {
        let Some(observer) = self.observer.as_deref_mut() else {
            return Ok(());
        };
        let mut scope: &[u8] = &[];
        for field in Spans::within(self.input, sm) {
            let field = field?;
            if field.number == SCOPE_METRICS_SCOPE {
                field.expect_len()?;
                scope = field.body;
            }
        }
        observer.scope(scope);
        Ok(())
    }

    /// Whether the `ResourceMetrics` stays.
    fn resource_metrics(&mut self, rm: &Span<'_>) -> Result<bool, WireError> {
        let input = self.input;
        // The resource may follow the scopes on the wire: find it first. A resource sent in
        // several fields is one resource to a decoder, their concatenation.
        let mut first: Option<Span<'_>> = None;
        let mut last: Option<&[u8]> = None;
        let mut several = false;
        // Whether every resource field comes before every scope, as encoders write them.
        let (mut resources_lead, mut scope_seen) = (true, false);
        for field in Spans::within(input, rm) {
            let field = field?;
            if field.number == RESOURCE_METRICS_RESOURCE {
                field.expect_len()?;
                several |= first.is_some();
                first.get_or_insert(field);
                last = Some(field.body);
                resources_lead &= !scope_seen;
            } else if field.number == RESOURCE_METRICS_SCOPE_METRICS {
                scope_seen = true;
            }
        }
        let merged: Vec<u8>;
        let resource = match first {
            None => None,
            Some(field) if !several => Some(field.body),
            Some(_) => {
                let mut all = Vec::new();
                for field in Spans::within(input, rm) {
                    let field = field?;
                    if field.number == RESOURCE_METRICS_RESOURCE {
                        all.extend_from_slice(field.body);
                    }
                }
                merged = all;
                Some(&merged[..])
            }
        };

        let (state, rewrite_resource, filter_attributes) = match self.edit.resource(resource)? {
            ResourceEdit::Drop => {
                self.dropped_points += resource_points(input, rm)?;
                self.rw.drop_field(rm)?;
                return Ok(false);
            }
            ResourceEdit::Keep(state) => (state, false, false),
            ResourceEdit::Rewrite(state) => (state, true, false),
            ResourceEdit::FilterAttributes(state) => (state, false, true),
        };
        let descend = self.edit.descends(state);
        if !descend && !rewrite_resource && !filter_attributes {
            // Nothing in it can change: it goes with the next run of input.
            if let Some(observer) = self.observer.as_deref_mut() {
                let observed = wire::walk_resource_metrics(rm.body, observer);
                self.observation(observed);
            }
            return Ok(true);
        }
        // A resource that changes is shown to the observer as the walk writes it, unless the
        // scopes come first; then it is worked out before.
        let observe_in_place = self.observer.is_some()
            && resources_lead
            && first.is_some()
            && (rewrite_resource || filter_attributes);
        if self.observer.is_some() && !observe_in_place {
            let observed =
                self.observe_resource(resource, last, rewrite_resource, filter_attributes);
            self.observation(observed);
        }
        self.rw.enter(rm);
        if rewrite_resource && first.is_none() {
            let out = self.rw.insert_at(rm.body_start)?;
            let placeholder = begin_message(out, RESOURCE_METRICS_RESOURCE, 0);
            self.edit.write_resource(None, out)?;
            end_message(out, placeholder)?;
        }
        let mut resource_written = false;
        let mut scopes = 0;
        for field in Spans::within(input, rm) {
            let field = field?;
            match field.number {
                RESOURCE_METRICS_RESOURCE if rewrite_resource => {
                    if resource_written {
                        // Merged into the first one.
                        self.rw.drop_field(&field)?;
                        continue;
                    }
                    let out = self.rw.replace_field(&field)?;
                    let at = out.len();
                    let expected_len = resource.map_or(0, <[u8]>::len);
                    let placeholder = begin_message(out, RESOURCE_METRICS_RESOURCE, expected_len);
                    self.edit.write_resource(resource, out)?;
                    end_message(out, placeholder)?;
                    resource_written = true;
                    if let (true, Some(observer)) = (observe_in_place, self.observer.as_deref_mut())
                    {
                        let written = out.get(at..).ok_or(INTERNAL)?;
                        let resource = Spans::new(written).next().ok_or(INTERNAL)??;
                        observer.resource(resource.body);
                    }
                }
                // Several resource fields are filtered one by one: keeping a subset of each
                // is keeping a subset of their concatenation.
                RESOURCE_METRICS_RESOURCE if filter_attributes => {
                    self.filter_attributes(&field, RESOURCE_ATTRIBUTES, true, observe_in_place)?;
                    // Of several, the last one read is what a walk of the output reads.
                    if let (true, Some(observer)) = (observe_in_place, self.observer.as_deref_mut())
                    {
                        observer.resource(&self.kept);
                    }
                }
                RESOURCE_METRICS_SCOPE_METRICS if descend => {
                    field.expect_len()?;
                    if self.scope_metrics(&field, state)? {
                        scopes += 1;
                    }
                }
                // Kept whole under a resource that changed.
                RESOURCE_METRICS_SCOPE_METRICS => {
                    if let Some(observer) = self.observer.as_deref_mut() {
                        let observed = field
                            .expect_len()
                            .and_then(|()| wire::walk_scope_metrics(field.body, observer));
                        self.observation(observed);
                    }
                }
                _ => {}
            }
        }
        if self.edit.prunes(state) && descend && scopes == 0 {
            self.rw.leave_dropped()?;
            return Ok(false);
        }
        self.rw.leave()?;
        Ok(true)
    }

    /// Whether the `ScopeMetrics` stays.
    fn scope_metrics(&mut self, sm: &Span<'_>, resource: E::Resource) -> Result<bool, WireError> {
        let input = self.input;
        if !self.edit.may_change_scope(resource, sm.body) {
            // It goes with the next run of input.
            if let Some(observer) = self.observer.as_deref_mut() {
                let observed = wire::walk_scope_metrics(sm.body, observer);
                self.observation(observed);
            }
            return Ok(true);
        }
        if self.observer.is_some() {
            let observed = self.observe_scope(sm);
            self.observation(observed);
        }
        self.rw.enter(sm);
        let mut metrics = 0;
        for field in Spans::within(input, sm) {
            let field = field?;
            if field.number != SCOPE_METRICS_METRICS {
                continue;
            }
            field.expect_len()?;
            if self.metric(&field, resource)? {
                metrics += 1;
            }
        }
        if self.edit.prunes(resource) && metrics == 0 {
            self.rw.leave_dropped()?;
            return Ok(false);
        }
        self.rw.leave()?;
        Ok(true)
    }

    /// Whether the metric stays.
    fn metric(&mut self, metric: &Span<'_>, resource: E::Resource) -> Result<bool, WireError> {
        let input = self.input;
        // The name may follow the data on the wire: it takes a pass of its own.
        let mut name = "";
        if self.edit.reads_metric_names(resource) {
            for field in Spans::within(input, metric) {
                let field = field?;
                if field.number == METRIC_NAME {
                    field.expect_len()?;
                    name = std::str::from_utf8(field.body).map_err(|_| WireError::NameNotUtf8)?;
                }
            }
        }
        let decision = self.edit.metric(resource, name);
        // A walk of the output reports the points of the last data field only.
        let mut observed_data = None;
        if self.observer.is_some() {
            let observed = match &decision {
                MetricEdit::Drop => Ok(()),
                MetricEdit::KeepAll => self.observe_whole_metric(metric),
                MetricEdit::PerPoint(_) => self
                    .observe_metric(metric)
                    .map(|last_data| observed_data = last_data),
            };
            self.observation(observed);
        }
        let rule = match decision {
            MetricEdit::Drop => {
                self.dropped_points += metric_points(input, metric)?;
                self.rw.drop_field(metric)?;
                return Ok(false);
            }
            MetricEdit::KeepAll => None,
            MetricEdit::PerPoint(rule) => Some(rule),
        };
        let kept = match rule {
            // Nothing inside a metric kept whole is written: it needs no frame of its own. Its
            // points are counted only to prune it if it has none.
            None if self.edit.prunes(resource) => metric_points(input, metric)?,
            None => 1,
            Some(rule) => {
                self.rw.enter(metric);
                let mut kept = 0;
                let mut last_data = None;
                for field in Spans::within(input, metric) {
                    let field = field?;
                    if !is_metric_data(field.number) {
                        continue;
                    }
                    field.expect_len()?;
                    let observe = observed_data == Some(field.start);
                    let points = self.data(&field, rule, observe)?;
                    kept = if last_data == Some(field.number) {
                        kept + points
                    } else {
                        points
                    };
                    last_data = Some(field.number);
                }
                kept
            }
        };
        let pruned = self.edit.prunes(resource) && kept == 0;
        match (rule.is_some(), pruned) {
            (true, true) => self.rw.leave_dropped()?,
            (true, false) => {
                self.rw.leave()?;
            }
            (false, true) => self.rw.drop_field(metric)?,
            (false, false) => {}
        }
        Ok(!pruned)
    }

    /// Tells the observer about a metric kept whole.
    fn observe_whole_metric(&mut self, metric: &Span<'_>) -> Result<(), WireError> {
        match self.observer.as_deref_mut() {
            Some(observer) => wire::walk_metric(metric.body, observer),
            None => Ok(()),
        }
    }

    /// Tells the observer about a metric the walk goes into, returning where its last data
    /// field starts: the one whose points the observer is to see.
    fn observe_metric(&mut self, metric: &Span<'_>) -> Result<Option<usize>, WireError> {
        let Some(observer) = self.observer.as_deref_mut() else {
            return Ok(None);
        };
        let mut name: &[u8] = &[];
        let mut last_data = None;
        for field in Spans::within(self.input, metric) {
            let field = field?;
            if field.number == METRIC_NAME {
                field.expect_len()?;
                name = field.body;
            } else if is_metric_data(field.number) {
                last_data = Some(field.start);
            }
        }
        observer.metric(name);
        Ok(last_data)
    }

    /// Data points kept in one metric data field (gauge, sum...); `observe`: whether the
    /// observer is told about them.
    fn data(&mut self, data: &Span<'_>, rule: E::Point, observe: bool) -> Result<u64, WireError> {
        let input = self.input;
        let attribute_field = attribute_field(data.number);
        self.rw.enter(data);
        let mut kept = 0;
        for field in Spans::within(input, data) {
            let field = field?;
            if field.number != DATA_POINTS {
                continue;
            }
            field.expect_len()?;
            let attributes = Attributes::new(field.body, attribute_field);
            match self.edit.point(rule, attributes)? {
                PointEdit::Keep => {
                    kept += 1;
                    if let (true, Some(observer)) = (observe, self.observer.as_deref_mut()) {
                        observer.data_point(AttributeIter::new(field.body, attribute_field));
                    }
                }
                PointEdit::Drop => {
                    self.dropped_points += 1;
                    self.rw.drop_field(&field)?;
                }
                PointEdit::Rewrite => {
                    let out = self.rw.replace_field(&field)?;
                    let at = out.len();
                    let placeholder = begin_message(out, DATA_POINTS, field.body.len());
                    self.edit
                        .write_point(rule, field.body, attribute_field, out)?;
                    end_message(out, placeholder)?;
                    kept += 1;
                    if let (true, Some(observer)) = (observe, self.observer.as_deref_mut()) {
                        let written = out.get(at..).ok_or(INTERNAL)?;
                        let point = Spans::new(written).next().ok_or(INTERNAL)??;
                        observer.data_point(AttributeIter::new(point.body, attribute_field));
                    }
                }
                PointEdit::FilterAttributes => {
                    let observe = observe && self.observer.is_some();
                    self.filter_attributes(&field, attribute_field, false, observe)?;
                    kept += 1;
                    if let (true, Some(observer)) = (observe, self.observer.as_deref_mut()) {
                        observer.data_point(AttributeIter::new(&self.kept, attribute_field));
                    }
                }
            }
        }
        // An emptied data field stays; the metric holding it is what gets pruned.
        self.rw.leave()?;
        Ok(kept)
    }

    /// Leaves out of `message` the attributes (fields numbered `attribute_field`) that
    /// [`Edit::keep_attribute`] refuses; nothing is written if it keeps them all. `collect`:
    /// also gather the kept ones in `self.kept`, for the observer.
    fn filter_attributes(
        &mut self,
        message: &Span<'_>,
        attribute_field: u32,
        on_resource: bool,
        collect: bool,
    ) -> Result<(), WireError> {
        let input = self.input;
        if collect {
            self.kept.clear();
        }
        // Most messages keep every attribute: the frame is entered at the first one to go.
        let mut entered = false;
        for field in Spans::within(input, message) {
            let field = field?;
            if field.number != attribute_field {
                continue;
            }
            field.expect_len()?;
            if self
                .edit
                .keep_attribute(on_resource, KeyValueRef::parse(field.body)?)?
            {
                if collect {
                    let raw = input.get(field.start..field.end).ok_or(INTERNAL)?;
                    self.kept.extend_from_slice(raw);
                }
            } else {
                if !entered {
                    self.rw.enter(message);
                    entered = true;
                }
                self.rw.drop_field(&field)?;
            }
        }
        if entered {
            self.rw.leave()?;
        }
        Ok(())
    }
}

/// Data points in one `ResourceMetrics`.
fn resource_points(input: &[u8], rm: &Span<'_>) -> Result<u64, WireError> {
    let mut points = 0;
    for sm in Spans::within(input, rm) {
        let sm = sm?;
        if sm.number != RESOURCE_METRICS_SCOPE_METRICS {
            continue;
        }
        sm.expect_len()?;
        for metric in Spans::within(input, &sm) {
            let metric = metric?;
            if metric.number != SCOPE_METRICS_METRICS {
                continue;
            }
            metric.expect_len()?;
            points += metric_points(input, &metric)?;
        }
    }
    Ok(points)
}

/// Data points in one metric, as a decoder sees them: `data` is a oneof, so a repeat of the
/// same type merges with it and one of another type replaces it.
fn metric_points(input: &[u8], metric: &Span<'_>) -> Result<u64, WireError> {
    let mut points = 0;
    let mut last_data = None;
    for field in Spans::within(input, metric) {
        let field = field?;
        if !is_metric_data(field.number) {
            continue;
        }
        field.expect_len()?;
        let mut here = 0;
        for point in Spans::within(input, &field) {
            let point = point?;
            if point.number == DATA_POINTS {
                point.expect_len()?;
                here += 1;
            }
        }
        points = if last_data == Some(field.number) {
            points + here
        } else {
            here
        };
        last_data = Some(field.number);
    }
    Ok(points)
}

/// What [`rewrite_payload`] made of a payload.
#[derive(Debug)]
pub struct Output {
    pub payload: Payload,
    /// `ResourceMetrics` in it.
    pub resources: u64,
}

/// Runs `edit` over a payload. A payload nothing changes is passed on as it is (a shared
/// batch stays shared, no copy); a decoded one is encoded once first. The payload's data
/// point count is taken as exact: receivers count with [`super::wire::count`].
pub fn rewrite_payload<E: Edit>(input: Payload, edit: &mut E) -> Result<Output, WireError> {
    rewrite_payload_observed(input, edit, None::<&mut Unobserved>).map(|(output, _)| output)
}

/// [`rewrite_payload`] with an observer of its output, as in [`rewrite_observed`].
pub fn rewrite_payload_observed<E: Edit, V: Visitor>(
    input: Payload,
    edit: &mut E,
    observer: Option<&mut V>,
) -> Result<(Output, bool), WireError> {
    let encoded = match &input {
        Payload::Decoded(request) => Some(Bytes::from(request.encode_to_vec())),
        Payload::Shared(_) | Payload::Encoded { .. } => None,
    };
    let result = {
        let bytes: &[u8] = match (&input, &encoded) {
            (_, Some(bytes)) => bytes,
            (Payload::Shared(batch), None) => batch.bytes(),
            (Payload::Encoded { bytes, .. }, None) => bytes,
            (Payload::Decoded(_), None) => &[],
        };
        rewrite_observed(bytes, input.data_points(), edit, observer)?
    };
    let (result, observed) = result;
    let payload = match (result.bytes, encoded) {
        (Some(bytes), _) => Payload::Encoded {
            bytes: Bytes::from(bytes),
            data_points: result.data_points,
        },
        (None, Some(bytes)) => Payload::Encoded {
            bytes,
            data_points: result.data_points,
        },
        (None, None) => input,
    };
    let output = Output {
        payload,
        resources: result.resources,
    };
    Ok((output, observed))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use crate::otlp::testdata;
    use crate::otlp::{Batch, ExportMetricsServiceRequest};
    use opentelemetry_proto::tonic::common::v1::{
        any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
    };
    use opentelemetry_proto::tonic::metrics::v1::{
        exponential_histogram_data_point::Buckets, metric::Data, number_data_point,
        summary_data_point::ValueAtQuantile, ExponentialHistogram, ExponentialHistogramDataPoint,
        Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
        ScopeMetrics, Sum, Summary, SummaryDataPoint,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use rand::rngs::StdRng;
    use rand::seq::IndexedRandom;
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    // ---- random requests, shared with the processors' equivalence tests ----

    /// Attribute keys random requests draw from: few, so that criteria and actions hit.
    pub(crate) const KEYS: &[&str] = &["host.name", "pid", "state", "k", "env", "owner"];
    /// String values random requests draw from.
    pub(crate) const STRINGS: &[&str] = &["node-1", "node-2", "s0", "s1", "v", "12", "true", ""];
    /// Metric names random requests draw from.
    pub(crate) const NAMES: &[&str] = &["cpu.time", "cpu.util", "mem.rss", "io", "g", ""];

    fn random_value(rng: &mut StdRng, depth: u32) -> Option<AnyValue> {
        use any_value::Value as V;
        let value = match rng.random_range(0..if depth > 0 { 8 } else { 11 }) {
            0..=2 => V::StringValue(STRINGS.choose(rng).unwrap().to_string()),
            3 => V::IntValue(*[-12i64, 0, 12, 1234, i64::MIN].choose(rng).unwrap()),
            4 => V::DoubleValue(*[0.5, 2.0, -0.0, 1e300, f64::INFINITY].choose(rng).unwrap()),
            5 => V::BoolValue(rng.random()),
            6 => V::BytesValue(STRINGS.choose(rng).unwrap().as_bytes().to_vec()),
            7 => V::StringValueStrindex(rng.random_range(-3..3)),
            8 => V::ArrayValue(ArrayValue {
                values: (0..rng.random_range(0..3))
                    .filter_map(|_| random_value(rng, depth + 1))
                    .collect(),
            }),
            9 => V::KvlistValue(KeyValueList {
                values: random_attributes(rng, depth + 1),
            }),
            _ => {
                return if rng.random() {
                    None
                } else {
                    Some(AnyValue { value: None })
                }
            }
        };
        Some(AnyValue { value: Some(value) })
    }

    pub(crate) fn random_attributes(rng: &mut StdRng, depth: u32) -> Vec<KeyValue> {
        (0..rng.random_range(0..5))
            .map(|_| KeyValue {
                key: KEYS.choose(rng).unwrap().to_string(),
                value: random_value(rng, depth),
                key_strindex: if rng.random_ratio(1, 10) { 3 } else { 0 },
            })
            .collect()
    }

    fn random_number_points(rng: &mut StdRng) -> Vec<NumberDataPoint> {
        (0..rng.random_range(0..4))
            .map(|i| NumberDataPoint {
                attributes: random_attributes(rng, 0),
                time_unix_nano: 1_700_000_000_000_000_000 + i,
                value: Some(number_data_point::Value::AsInt(i as i64)),
                ..Default::default()
            })
            .collect()
    }

    fn random_metric(rng: &mut StdRng) -> Metric {
        let n = rng.random_range(0..4);
        let data = match rng.random_range(0..6) {
            0 => Data::Gauge(Gauge {
                data_points: random_number_points(rng),
            }),
            1 => Data::Sum(Sum {
                data_points: random_number_points(rng),
                aggregation_temporality: 2,
                is_monotonic: true,
            }),
            2 => Data::Histogram(Histogram {
                data_points: (0..n)
                    .map(|_| HistogramDataPoint {
                        attributes: random_attributes(rng, 0),
                        count: 3,
                        bucket_counts: vec![1, 2],
                        explicit_bounds: vec![1.0],
                        ..Default::default()
                    })
                    .collect(),
                aggregation_temporality: 1,
            }),
            3 => Data::ExponentialHistogram(ExponentialHistogram {
                data_points: (0..n)
                    .map(|_| ExponentialHistogramDataPoint {
                        attributes: random_attributes(rng, 0),
                        count: 2,
                        positive: Some(Buckets {
                            offset: 1,
                            bucket_counts: vec![2],
                        }),
                        ..Default::default()
                    })
                    .collect(),
                aggregation_temporality: 1,
            }),
            4 => Data::Summary(Summary {
                data_points: (0..n)
                    .map(|_| SummaryDataPoint {
                        attributes: random_attributes(rng, 0),
                        count: 1,
                        sum: 1.0,
                        quantile_values: vec![ValueAtQuantile {
                            quantile: 0.5,
                            value: 1.0,
                        }],
                        ..Default::default()
                    })
                    .collect(),
            }),
            _ => {
                return Metric {
                    name: NAMES.choose(rng).unwrap().to_string(),
                    ..Default::default()
                }
            }
        };
        Metric {
            name: NAMES.choose(rng).unwrap().to_string(),
            unit: "1".to_string(),
            data: Some(data),
            ..Default::default()
        }
    }

    /// A random request: every metric type, empty and missing parts, repeated keys, values of
    /// every type.
    pub(crate) fn random_request(rng: &mut StdRng) -> ExportMetricsServiceRequest {
        let resource_metrics = (0..rng.random_range(0..4))
            .map(|_| ResourceMetrics {
                resource: if rng.random_ratio(1, 8) {
                    None
                } else {
                    Some(Resource {
                        attributes: random_attributes(rng, 0),
                        dropped_attributes_count: rng.random_range(0..2),
                        ..Default::default()
                    })
                },
                scope_metrics: (0..rng.random_range(0..3))
                    .map(|_| ScopeMetrics {
                        scope: Some(InstrumentationScope {
                            name: "scope".to_string(),
                            ..Default::default()
                        }),
                        metrics: (0..rng.random_range(0..4))
                            .map(|_| random_metric(rng))
                            .collect(),
                        schema_url: String::new(),
                    })
                    .collect(),
                schema_url: "https://example.com/schema".to_string(),
            })
            .collect();
        ExportMetricsServiceRequest { resource_metrics }
    }

    /// A shared batch of `request`.
    pub(crate) fn shared(request: &ExportMetricsServiceRequest) -> Payload {
        Payload::Shared(Arc::new(Batch::from_request(request.clone())))
    }

    // ---- test edits ----

    /// Keeps everything; with `rewrite_points`, writes every point again as it was.
    struct Identity {
        rewrite_points: bool,
        rewrite_resources: bool,
    }

    impl Edit for Identity {
        type Resource = ();
        type Point = ();
        const PRUNE: bool = false;

        fn resource(&mut self, resource: Option<&[u8]>) -> Result<ResourceEdit<()>, WireError> {
            // Rewriting a missing resource would create one.
            Ok(if self.rewrite_resources && resource.is_some() {
                ResourceEdit::Rewrite(())
            } else {
                ResourceEdit::Keep(())
            })
        }
        fn write_resource(
            &mut self,
            resource: Option<&[u8]>,
            out: &mut Vec<u8>,
        ) -> Result<(), WireError> {
            out.extend_from_slice(resource.unwrap_or_default());
            Ok(())
        }
        fn descends(&self, _: ()) -> bool {
            true
        }
        fn reads_metric_names(&self, _: ()) -> bool {
            false
        }
        fn metric(&mut self, _: (), _: &str) -> MetricEdit<()> {
            MetricEdit::PerPoint(())
        }
        fn point(&mut self, _: (), _: Attributes<'_>) -> Result<PointEdit, WireError> {
            Ok(if self.rewrite_points {
                PointEdit::Rewrite
            } else {
                PointEdit::Keep
            })
        }
        fn keep_attribute(&mut self, _: bool, _: KeyValueRef<'_>) -> Result<bool, WireError> {
            Ok(true)
        }
        fn write_point(
            &mut self,
            _: (),
            point: &[u8],
            _: u32,
            out: &mut Vec<u8>,
        ) -> Result<(), WireError> {
            out.extend_from_slice(point);
            Ok(())
        }
    }

    /// Drops the data points that have attribute `drop`, the metrics named `drop` and the
    /// resources with attribute `drop`; prunes.
    struct Dropper;

    /// Drops the resources with attribute `drop` and looks no further.
    struct ResourceDropper;

    impl Edit for ResourceDropper {
        type Resource = ();
        type Point = ();
        const PRUNE: bool = true;

        fn resource(&mut self, resource: Option<&[u8]>) -> Result<ResourceEdit<()>, WireError> {
            Dropper.resource(resource)
        }
        fn write_resource(&mut self, _: Option<&[u8]>, _: &mut Vec<u8>) -> Result<(), WireError> {
            Ok(())
        }
        fn descends(&self, _: ()) -> bool {
            false
        }
        fn reads_metric_names(&self, _: ()) -> bool {
            unreachable!("not asked: the walk does not go into resources")
        }
        fn metric(&mut self, _: (), _: &str) -> MetricEdit<()> {
            unreachable!("not asked: the walk does not go into resources")
        }
        fn point(&mut self, _: (), _: Attributes<'_>) -> Result<PointEdit, WireError> {
            unreachable!("not asked: the walk does not go into resources")
        }
        fn keep_attribute(&mut self, _: bool, _: KeyValueRef<'_>) -> Result<bool, WireError> {
            Ok(true)
        }
        fn write_point(
            &mut self,
            _: (),
            _: &[u8],
            _: u32,
            _: &mut Vec<u8>,
        ) -> Result<(), WireError> {
            Ok(())
        }
    }

    impl Edit for Dropper {
        type Resource = ();
        type Point = ();
        const PRUNE: bool = true;

        fn resource(&mut self, resource: Option<&[u8]>) -> Result<ResourceEdit<()>, WireError> {
            let found = match resource {
                Some(r) => Attributes::of_resource(r).find(b"drop")?.is_some(),
                None => false,
            };
            Ok(if found {
                ResourceEdit::Drop
            } else {
                ResourceEdit::Keep(())
            })
        }
        fn write_resource(&mut self, _: Option<&[u8]>, _: &mut Vec<u8>) -> Result<(), WireError> {
            Ok(())
        }
        fn descends(&self, _: ()) -> bool {
            true
        }
        fn reads_metric_names(&self, _: ()) -> bool {
            true
        }
        fn metric(&mut self, _: (), name: &str) -> MetricEdit<()> {
            if name == "drop" {
                MetricEdit::Drop
            } else {
                MetricEdit::PerPoint(())
            }
        }
        fn point(&mut self, _: (), attributes: Attributes<'_>) -> Result<PointEdit, WireError> {
            Ok(if attributes.find(b"drop")?.is_some() {
                PointEdit::Drop
            } else {
                PointEdit::Keep
            })
        }
        fn keep_attribute(&mut self, _: bool, _: KeyValueRef<'_>) -> Result<bool, WireError> {
            Ok(true)
        }
        fn write_point(
            &mut self,
            _: (),
            _: &[u8],
            _: u32,
            _: &mut Vec<u8>,
        ) -> Result<(), WireError> {
            Ok(())
        }
    }

    fn run<E: Edit>(request: &ExportMetricsServiceRequest, edit: &mut E) -> Rewritten {
        let points = testdata::data_points(request);
        rewrite(&request.encode_to_vec(), points, edit).unwrap()
    }

    fn decode(bytes: &[u8]) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest::decode(bytes).unwrap()
    }

    #[test]
    fn no_edit_writes_nothing_and_counts_every_point() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let request = random_request(&mut rng);
            let result = run(
                &request,
                &mut Identity {
                    rewrite_points: false,
                    rewrite_resources: false,
                },
            );
            assert!(result.bytes.is_none());
            assert_eq!(result.data_points, testdata::data_points(&request));
            assert_eq!(result.resources, request.resource_metrics.len() as u64);
        }
    }

    #[test]
    fn rewriting_everything_as_it_was_reproduces_the_input_bytes() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut requests: Vec<_> = (0..200).map(|_| random_request(&mut rng)).collect();
        requests.push(testdata::all_types());
        requests.push(testdata::request(3, 4, 5));
        for request in requests {
            let input = request.encode_to_vec();
            for (rewrite_points, rewrite_resources) in [(true, false), (false, true), (true, true)]
            {
                let mut edit = Identity {
                    rewrite_points,
                    rewrite_resources,
                };
                let points = testdata::data_points(&request);
                let result = rewrite(&input, points, &mut edit).unwrap();
                let any_point = testdata::data_points(&request) > 0;
                let any_resource = request
                    .resource_metrics
                    .iter()
                    .any(|rm| rm.resource.is_some());
                let written = (rewrite_points && any_point) || (rewrite_resources && any_resource);
                assert_eq!(result.bytes.is_some(), written);
                if let Some(bytes) = result.bytes {
                    assert_eq!(bytes, input);
                }
                assert_eq!(result.data_points, testdata::data_points(&request));
            }
        }
    }

    /// A request of one `ResourceMetrics` whose body is `len` bytes: a schema URL filler and,
    /// if `with_marker`, a 3-byte unknown field.
    fn sized_request(len: usize, with_marker: bool) -> Vec<u8> {
        let marker = [0x7a, 0x01, 0x00]; // field 15, length-delimited, one byte
        let mut body = Vec::new();
        let filler_len = len - if with_marker { marker.len() } else { 0 };
        // schema_url (field 3): tag, length, bytes; the length varint grows with the filler.
        let text_len = (1..=filler_len)
            .rev()
            .find(|t| 1 + varint_len(*t as u64) + t == filler_len)
            .expect("a filler of that size exists");
        put_len_field(&mut body, 3, &vec![b'x'; text_len]);
        if with_marker {
            body.extend_from_slice(&marker);
        }
        assert_eq!(body.len(), len);
        let mut request = Vec::new();
        put_len_field(&mut request, REQUEST_RESOURCE_METRICS, &body);
        request
    }

    #[test]
    fn lengths_across_varint_boundaries() {
        for len in [127, 128, 129, 16383, 16384, 16385, 2_097_152] {
            // Shrinking: the marker goes, the length may need fewer bytes.
            let input = sized_request(len, true);
            let mut rw = Rewriter::new(&input);
            let rm = Spans::new(&input).next().unwrap().unwrap();
            rw.enter(&rm);
            let marker = Spans::within(&input, &rm).nth(1).unwrap().unwrap();
            rw.drop_field(&marker).unwrap();
            assert_eq!(rw.leave().unwrap(), Left::Rewritten);
            let out = rw.finish().unwrap().unwrap();
            assert_eq!(out, sized_request(len - 3, false), "shrink from {len}");

            // Growing: the marker comes back, the length may need more bytes.
            let input = sized_request(len - 3, false);
            let mut rw = Rewriter::new(&input);
            let rm = Spans::new(&input).next().unwrap().unwrap();
            rw.enter(&rm);
            rw.insert_at(rm.end)
                .unwrap()
                .extend_from_slice(&[0x7a, 0x01, 0x00]);
            rw.leave().unwrap();
            let out = rw.finish().unwrap().unwrap();
            assert_eq!(out, sized_request(len, true), "grow to {len}");
        }
    }

    #[test]
    fn placeholders_of_any_width_end_up_minimal() {
        for len in [0, 1, 127, 128, 16383, 16384, 2_097_151, 2_097_152] {
            for expected in [0, 127, 128, 16384, 2_097_152, 1 << 30] {
                let mut out = vec![0xaa];
                let placeholder = begin_message(&mut out, 2, expected);
                out.extend(std::iter::repeat_n(7u8, len));
                end_message(&mut out, placeholder).unwrap();
                let mut want = vec![0xaa];
                put_len_field(&mut want, 2, &vec![7u8; len]);
                assert_eq!(out, want, "body {len}, room for {expected}");
            }
        }
    }

    #[test]
    fn emptied_metrics_scopes_and_resources_are_pruned() {
        let drop = || testdata::string_attr("drop", "");
        let keep = || testdata::string_attr("keep", "");
        let mut request = testdata::request(3, 2, 2);
        // Resource 0: every point of metric 0 goes; metric 1 stays.
        let rm0 = &mut request.resource_metrics[0].scope_metrics[0];
        if let Some(Data::Sum(sum)) = &mut rm0.metrics[0].data {
            for p in &mut sum.data_points {
                p.attributes.push(drop());
            }
        }
        // Resource 1: every point of every metric goes, so its scope and itself go.
        for metric in &mut request.resource_metrics[1].scope_metrics[0].metrics {
            if let Some(Data::Sum(sum)) = &mut metric.data {
                for p in &mut sum.data_points {
                    p.attributes.push(drop());
                }
            }
        }
        // Resource 2: a second scope whose only metric is named `drop`; an empty scope, a
        // metric without data and one with an empty gauge were there from the start.
        let mut extra = request.resource_metrics[2].scope_metrics[0].clone();
        extra.metrics.truncate(1);
        extra.metrics[0].name = "drop".to_string();
        request.resource_metrics[2].scope_metrics.push(extra);
        let mut empty = request.resource_metrics[2].scope_metrics[0].clone();
        empty.metrics.clear();
        request.resource_metrics[2].scope_metrics.push(empty);
        request.resource_metrics[2].scope_metrics[0]
            .metrics
            .push(Metric {
                name: "no data".to_string(),
                ..Default::default()
            });
        request.resource_metrics[2].scope_metrics[0]
            .metrics
            .push(testdata::gauge_metric("empty", vec![]));
        request.resource_metrics[2]
            .resource
            .as_mut()
            .unwrap()
            .attributes
            .push(keep());

        let result = run(&request, &mut Dropper);
        let out = decode(&result.bytes.unwrap());
        let mut expected = request.clone();
        expected.resource_metrics[0].scope_metrics[0]
            .metrics
            .remove(0);
        expected.resource_metrics.remove(1);
        expected.resource_metrics[1].scope_metrics.truncate(1);
        expected.resource_metrics[1].scope_metrics[0]
            .metrics
            .truncate(2);
        assert_eq!(out, expected);
        assert_eq!(result.data_points, 2 + 2 * 2);
        assert_eq!(result.resources, 2);

        // Without pruning nothing empty goes: the identity edit leaves it all.
        let result = run(
            &request,
            &mut Identity {
                rewrite_points: false,
                rewrite_resources: false,
            },
        );
        assert!(result.bytes.is_none());

        // A resource with the attribute goes whole; when every one goes, nothing is left.
        let mut request = testdata::request(2, 1, 1);
        for rm in &mut request.resource_metrics {
            rm.resource.as_mut().unwrap().attributes.push(drop());
        }
        let result = run(&request, &mut Dropper);
        assert_eq!(result.bytes.unwrap(), Vec::<u8>::new());
        assert_eq!((result.data_points, result.resources), (0, 0));
    }

    #[test]
    fn resources_not_walked_are_kept_whole_and_counted_by_difference() {
        // Resource 1 goes; resource 0 holds an empty scope and a metric without points,
        // which a walk into it would prune.
        let mut request = testdata::all_types();
        request
            .resource_metrics
            .push(testdata::request(1, 2, 3).resource_metrics.remove(0));
        request.resource_metrics[1]
            .resource
            .as_mut()
            .unwrap()
            .attributes
            .push(testdata::string_attr("drop", ""));
        let mut empty = request.resource_metrics[0].scope_metrics[0].clone();
        empty.metrics.clear();
        request.resource_metrics[0].scope_metrics.push(empty);
        request.resource_metrics[0].scope_metrics[0]
            .metrics
            .push(testdata::gauge_metric("empty", vec![]));

        let result = run(&request, &mut ResourceDropper);
        let mut expected = request.clone();
        expected.resource_metrics.truncate(1);
        assert_eq!(decode(&result.bytes.unwrap()), expected);
        assert_eq!(result.data_points, testdata::data_points(&expected));
        assert_eq!(result.data_points, 6);
        assert_eq!(result.resources, 1);

        // Walked into, the same resource loses its empty parts.
        let result = run(&request, &mut Dropper);
        expected.resource_metrics[0].scope_metrics.truncate(1);
        expected.resource_metrics[0].scope_metrics[0].metrics.pop();
        assert_eq!(decode(&result.bytes.unwrap()), expected);
        assert_eq!(result.data_points, 6);
    }

    #[test]
    fn unknown_fields_are_kept_verbatim() {
        // An unknown field (99) at every level around a dropped point.
        let mut point_drop = Vec::new();
        put_len_field(&mut point_drop, 7, &{
            let mut kv = Vec::new();
            put_len_field(&mut kv, KEY_VALUE_KEY, b"drop");
            kv
        });
        let mut point_keep = Vec::new();
        put_len_field(&mut point_keep, 99, b"point");
        // The same request around two gauge bodies: with the dropped point and without.
        let request = |gauge: &[u8]| {
            let mut metric = Vec::new();
            put_len_field(&mut metric, 99, b"metric");
            put_len_field(&mut metric, METRIC_GAUGE, gauge);
            put_len_field(&mut metric, METRIC_NAME, b"m");
            let mut scope = Vec::new();
            put_len_field(&mut scope, SCOPE_METRICS_METRICS, &metric);
            put_len_field(&mut scope, 99, b"scope");
            let mut rm = Vec::new();
            put_len_field(&mut rm, RESOURCE_METRICS_SCOPE_METRICS, &scope);
            put_tag(&mut rm, 98, WT_VARINT);
            put_varint(&mut rm, 300);
            let mut request = Vec::new();
            put_len_field(&mut request, REQUEST_RESOURCE_METRICS, &rm);
            put_tag(&mut request, 97, WT_I64);
            request.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
            request
        };
        let mut gauge = Vec::new();
        put_len_field(&mut gauge, DATA_POINTS, &point_drop);
        put_len_field(&mut gauge, 99, b"gauge");
        put_len_field(&mut gauge, DATA_POINTS, &point_keep);
        let input = request(&gauge);

        let result = rewrite(&input, 2, &mut Dropper).unwrap();
        let out = result.bytes.unwrap();
        assert_eq!(result.data_points, 1);
        // Exactly the input without the dropped point's field.
        let mut gauge = Vec::new();
        put_len_field(&mut gauge, 99, b"gauge");
        put_len_field(&mut gauge, DATA_POINTS, &point_keep);
        assert_eq!(out, request(&gauge));
    }

    #[test]
    fn a_resource_in_several_fields_is_one_merged_resource() {
        let request = testdata::request(1, 1, 1);
        let resource = request.resource_metrics[0].resource.clone().unwrap();
        let mut rm = request.resource_metrics[0].clone();
        rm.resource = None;
        // Split the attributes over two resource fields, the second after the scopes.
        let (a, b) = resource.attributes.split_at(1);
        let mut body = Vec::new();
        put_len_field(
            &mut body,
            RESOURCE_METRICS_RESOURCE,
            &Resource {
                attributes: a.to_vec(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        body.extend_from_slice(&rm.encode_to_vec());
        put_len_field(
            &mut body,
            RESOURCE_METRICS_RESOURCE,
            &Resource {
                attributes: b.to_vec(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let mut input = Vec::new();
        put_len_field(&mut input, REQUEST_RESOURCE_METRICS, &body);
        assert_eq!(decode(&input), request);

        // The identity rewrite of the resource writes it once, merged.
        let mut edit = Identity {
            rewrite_points: false,
            rewrite_resources: true,
        };
        let result = rewrite(&input, 1, &mut edit).unwrap();
        let out = result.bytes.unwrap();
        assert_eq!(decode(&out), request);
        assert!(out.len() < input.len());
        // A decision on the resource sees the attributes of every field.
        put_len_field(
            &mut body,
            RESOURCE_METRICS_RESOURCE,
            &Resource {
                attributes: vec![testdata::string_attr("drop", "")],
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let mut input = Vec::new();
        put_len_field(&mut input, REQUEST_RESOURCE_METRICS, &body);
        let result = rewrite(&input, 1, &mut Dropper).unwrap();
        assert_eq!((result.resources, result.data_points), (0, 0));
    }

    #[test]
    fn values_of_every_type_are_read() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..2000 {
            let Some(value) = random_value(&mut rng, 0) else {
                continue;
            };
            let encoded = value.encode_to_vec();
            let read = Value::parse(&encoded).unwrap();
            use any_value::Value as V;
            let expected_array;
            let expected = match &value.value {
                None => Value::Empty,
                Some(V::StringValue(s)) => Value::String(s.as_bytes()),
                Some(V::BoolValue(b)) => Value::Bool(*b),
                Some(V::IntValue(i)) => Value::Int(*i),
                Some(V::DoubleValue(d)) => Value::Double(*d),
                Some(V::BytesValue(b)) => Value::Bytes(b),
                Some(V::StringValueStrindex(i)) => Value::StringStrindex(*i),
                Some(V::ArrayValue(a)) => {
                    expected_array = a.encode_to_vec();
                    Value::Array(&expected_array)
                }
                Some(V::KvlistValue(l)) => {
                    expected_array = l.encode_to_vec();
                    Value::Kvlist(&expected_array)
                }
            };
            assert_eq!(read, expected);
        }
    }

    /// Thousands of seeded corruptions of valid requests: an error or a result, never a
    /// panic; what a rewrite writes, the same rewrite walks again.
    #[test]
    fn corrupted_requests_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x5245_5752);
        let seeds = [
            testdata::request(3, 2, 2).encode_to_vec(),
            testdata::all_types().encode_to_vec(),
            random_request(&mut rng).encode_to_vec(),
        ];
        let mut ok = 0;
        for round in 0..20_000 {
            let mut bytes = seeds[round % seeds.len()].clone();
            if bytes.is_empty() {
                continue;
            }
            testdata::corrupt(&mut bytes, &mut rng);
            if let Ok(Some(out)) = rewrite(&bytes, 12, &mut Dropper).map(|r| r.bytes) {
                ok += 1;
                assert!(rewrite(&out, 12, &mut Dropper).is_ok());
            }
            let rewrite_points = rng.random();
            let mut identity = Identity {
                rewrite_points,
                rewrite_resources: !rewrite_points,
            };
            if let Ok(Some(out)) = rewrite(&bytes, 12, &mut identity).map(|r| r.bytes) {
                ok += 1;
                assert!(rewrite(&out, 12, &mut identity).is_ok());
            }
        }
        assert!(ok > 0);
    }

    #[test]
    fn hashes_follow_the_text_of_values() {
        // `printf %s alice | sha256sum | cut -c1-16` and so on.
        assert_eq!(
            &hash_hex::<16>(&Value::String(b"alice")),
            b"2bd806c97f0e00af"
        );
        assert_eq!(
            &hash_hex::<16>(&Value::Bytes(b"alice")),
            b"2bd806c97f0e00af"
        );
        assert_eq!(&hash_hex::<16>(&Value::Int(1234)), b"03ac674216f3e15c");
        assert_eq!(&hash_hex::<16>(&Value::Bool(true)), b"b5bea41b6c623f7c");
        assert_eq!(&hash_hex::<16>(&Value::Double(0.5)), b"d2cbad71ff333de6");
        assert_eq!(&hash_hex::<16>(&Value::Empty), b"e3b0c44298fc1c14");
        // An array hashes as the AnyValue holding it, encoded.
        let array = AnyValue {
            value: Some(any_value::Value::ArrayValue(ArrayValue {
                values: vec![AnyValue {
                    value: Some(any_value::Value::IntValue(1)),
                }],
            })),
        };
        let inner = match &array.value {
            Some(any_value::Value::ArrayValue(a)) => a.encode_to_vec(),
            _ => unreachable!(),
        };
        use sha2::{Digest, Sha256};
        let digest = hex::encode(Sha256::digest(array.encode_to_vec()));
        assert_eq!(
            &hash_hex::<16>(&Value::Array(&inner))[..],
            &digest.as_bytes()[..16]
        );
    }

    #[test]
    fn shared_payloads_nothing_changes_stay_shared() {
        let request = testdata::request(2, 2, 2);
        let input = shared(&request);
        let Payload::Shared(batch) = &input else {
            unreachable!()
        };
        let batch = Arc::clone(batch);
        let mut edit = Identity {
            rewrite_points: false,
            rewrite_resources: false,
        };
        let output = rewrite_payload(input, &mut edit).unwrap();
        match output.payload {
            Payload::Shared(out) => assert!(Arc::ptr_eq(&out, &batch)),
            other => panic!("expected the shared batch, got {other:?}"),
        }
        // A decoded payload is encoded once; unchanged, those bytes go on.
        let output = rewrite_payload(Payload::Decoded(request.clone()), &mut edit).unwrap();
        match output.payload {
            Payload::Encoded { bytes, data_points } => {
                assert_eq!(bytes, request.encode_to_vec());
                assert_eq!(data_points, 8);
            }
            other => panic!("expected encoded bytes, got {other:?}"),
        }
    }
}
