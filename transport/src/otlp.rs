//! OTLP/HTTP trace export: spans encoded as OpenTelemetry's protobuf
//! messages (`opentelemetry-proto`) and POSTed to `<endpoint>/v1/traces`, as
//! every OTLP receiver (the OpenTelemetry Collector, Jaeger, Tempo) takes
//! them. Spans here carry their own ids and times: the engine's come from
//! the event log, a worker's from the command it ran.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status, span, status};
use prost::Message;

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    /// Text.
    Str(String),
    /// A whole number.
    Int(i64),
    /// A number.
    Float(f64),
    /// Yes or no.
    Bool(bool),
}

/// What a span stands for (OpenTelemetry's span kinds used here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Work inside one process (the engine's spans of a job).
    Internal,
    /// Work done for a request from elsewhere (a worker running a command).
    Server,
}

/// One finished span.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanData {
    /// 16 bytes.
    pub trace_id: [u8; 16],
    /// 8 bytes.
    pub span_id: [u8; 8],
    /// The parent's span id; none for a trace's root.
    pub parent: Option<[u8; 8]>,
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: Kind,
    /// Start, ns since the epoch.
    pub start_ns: u64,
    /// End, ns since the epoch.
    pub end_ns: u64,
    /// Attributes.
    pub attributes: Vec<(String, Attr)>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// The parts of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`): trace id and parent span id.
pub fn parse_traceparent(header: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = header.trim().split('-');
    let (version, trace, span, _flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || parts.next().is_some() {
        return None;
    }
    let trace: [u8; 16] = hex::decode(trace).ok()?.try_into().ok()?;
    let span: [u8; 8] = hex::decode(span).ok()?.try_into().ok()?;
    (trace != [0; 16] && span != [0; 8]).then_some((trace, span))
}

/// Hex ids as bytes (`trace_id` 32 digits, `span_id` 16).
pub fn ids(trace_id: &str, span_id: &str) -> Option<([u8; 16], [u8; 8])> {
    Some((hex::decode(trace_id).ok()?.try_into().ok()?, hex::decode(span_id).ok()?.try_into().ok()?))
}

/// A new random span id (a worker's own spans).
pub fn random_span_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    while id == [0; 8] {
        // A v7 UUID's last 8 bytes are random (but for 2 variant bits).
        id = uuid::Uuid::now_v7().as_bytes()[8..].try_into().unwrap_or([1; 8]);
    }
    id
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn value(a: &Attr) -> AnyValue {
    let v = match a {
        Attr::Str(s) => any_value::Value::StringValue(s.clone()),
        Attr::Int(i) => any_value::Value::IntValue(*i),
        Attr::Float(f) => any_value::Value::DoubleValue(*f),
        Attr::Bool(b) => any_value::Value::BoolValue(*b),
    };
    AnyValue { value: Some(v) }
}

fn kv(key: &str, a: &Attr) -> KeyValue {
    KeyValue { key: key.to_string(), value: Some(value(a)), ..Default::default() }
}

/// The export request for `spans` of one service.
pub fn request(service: &str, spans: &[SpanData]) -> ExportTraceServiceRequest {
    let spans = spans
        .iter()
        .map(|s| opentelemetry_proto::tonic::trace::v1::Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name: s.name.clone(),
            kind: match s.kind {
                Kind::Internal => span::SpanKind::Internal,
                Kind::Server => span::SpanKind::Server,
            } as i32,
            start_time_unix_nano: s.start_ns,
            end_time_unix_nano: s.end_ns.max(s.start_ns),
            attributes: s.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
            status: Some(match &s.error {
                Some(why) => Status { message: why.clone(), code: status::StatusCode::Error as i32 },
                None => Status { message: String::new(), code: status::StatusCode::Ok as i32 },
            }),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource { attributes: vec![kv("service.name", &Attr::Str(service.to_string()))], ..Default::default() }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope { name: "flame".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Why an export did not go through.
#[derive(Debug, thiserror::Error)]
#[error("OTLP export to {url}: {why}")]
pub struct Error {
    /// Where it went.
    pub url: String,
    /// What happened.
    pub why: String,
}

/// An OTLP/HTTP trace receiver.
#[derive(Clone)]
pub struct Exporter {
    url: String,
    service: String,
    agent: ureq::Agent,
}

impl Exporter {
    /// Exports to `endpoint` (`http://host:4318`; `/v1/traces` is added
    /// unless the URL names a path) as service `service`.
    pub fn new(endpoint: &str, service: &str) -> Self {
        let endpoint = endpoint.trim_end_matches('/');
        let has_path = endpoint.split("://").nth(1).is_some_and(|rest| rest.contains('/'));
        let url = if has_path { endpoint.to_string() } else { format!("{endpoint}/v1/traces") };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Self { url, service: service.to_string(), agent }
    }

    /// Where spans go.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends spans (blocking), in requests of at most 512.
    pub fn export(&self, spans: &[SpanData]) -> Result<(), Error> {
        for chunk in spans.chunks(512) {
            let body = request(&self.service, chunk).encode_to_vec();
            let err = |why: String| Error { url: self.url.clone(), why };
            let mut resp = self
                .agent
                .post(&self.url)
                .header("content-type", "application/x-protobuf")
                .send(&body[..])
                .map_err(|e| err(e.to_string()))?;
            let code = resp.status().as_u16();
            if !(200..300).contains(&code) {
                let text = resp.body_mut().read_to_string().unwrap_or_default();
                return Err(err(format!("HTTP {code}: {}", text.chars().take(300).collect::<String>())));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_bad_ones_do_not() {
        let (t, s) = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").expect("valid");
        assert_eq!(hex::encode(t), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(hex::encode(s), "b7ad6b7169203331");
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_request_decodes_to_the_spans_it_was_made_of() {
        let span = SpanData {
            trace_id: [7; 16],
            span_id: [1; 8],
            parent: Some([2; 8]),
            name: "train".into(),
            kind: Kind::Server,
            start_ns: 10,
            end_ns: 5,
            attributes: vec![("flame.round".into(), Attr::Int(3))],
            error: Some("dropped".into()),
        };
        let bytes = request("flame-worker", std::slice::from_ref(&span)).encode_to_vec();
        let back = ExportTraceServiceRequest::decode(&bytes[..]).expect("decodes");
        let s = &back.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!((s.trace_id.as_slice(), s.span_id.as_slice(), s.parent_span_id.as_slice()), (&[7; 16][..], &[1; 8][..], &[2; 8][..]));
        assert_eq!((s.start_time_unix_nano, s.end_time_unix_nano), (10, 10), "an end before the start is clamped");
        assert_eq!(s.status.as_ref().map(|st| st.code), Some(status::StatusCode::Error as i32));
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        let service = &back.resource_spans[0].resource.as_ref().expect("resource").attributes[0];
        assert_eq!(service.key, "service.name");
    }

    #[test]
    fn the_endpoint_gets_the_traces_path_unless_it_names_one() {
        assert_eq!(Exporter::new("http://h:4318", "s").url(), "http://h:4318/v1/traces");
        assert_eq!(Exporter::new("http://h:4318/", "s").url(), "http://h:4318/v1/traces");
        assert_eq!(Exporter::new("http://h:4318/custom/traces", "s").url(), "http://h:4318/custom/traces");
    }
}
