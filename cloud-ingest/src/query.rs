//! Reading stored records back: the filter, the JSON-lines and stats output
//! shared by `cloud-ingest query|stats` and the admin endpoint, and the small
//! HTTP client behind `--url`.
//!
//! One record per line:
//! `{"agent":"gw-1","seq":1,"source":"mqtt","device":"d1","timestamp_ns":..,"signals":{"temp":21.5}}`
//! or, for a raw payload, `..."raw_base64":"AAE=","content_type":"application/x-can-frame"}`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use edgefleet_proto::{record, signal, Record};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::sink::SinkError;

/// Which records to return. Results are ordered by agent, then seq.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub agent: Option<String>,
    pub device: Option<String>,
    /// Only records whose measurement time (`timestamp_ns`) is at or after this.
    pub since_ns: Option<i64>,
    pub limit: Option<usize>,
}

impl Query {
    /// Whether `record` passes the device and time filters (the agent filter
    /// is applied by the store's key range).
    pub fn matches(&self, record: &Record) -> bool {
        self.device.as_ref().is_none_or(|d| &record.device_id == d)
            && self
                .since_ns
                .is_none_or(|since| record.timestamp_ns >= since)
    }
}

/// Per-agent numbers printed by `cloud-ingest stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Stats {
    /// Keyed by agent id.
    pub agents: BTreeMap<String, AgentStats>,
    pub total_records: u64,
    /// Bytes retention counts (keys and values), not the store's file size.
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AgentStats {
    /// Records of this agent in the store now (after retention).
    pub records: u64,
    /// Highest seq ever stored for this agent; retention does not lower it.
    pub stored_through: u64,
}

/// A store that can be browsed (today the embedded one; external sinks have
/// their own query tools).
pub trait RecordSource: Send + Sync + 'static {
    /// Calls `emit` for each matching record in (agent, seq) order, at most
    /// `query.limit` times; stops early when `emit` returns false.
    fn query(
        &self,
        query: &Query,
        emit: &mut dyn FnMut(&str, Record) -> bool,
    ) -> Result<(), SinkError>;
    fn stats(&self) -> Result<Stats, SinkError>;
}

/// One record as a JSON line (no trailing newline).
pub fn record_json(agent: &str, record: &Record) -> String {
    let row = Row { agent, record };
    // Serializing plain strings and numbers into a String cannot fail.
    serde_json::to_string(&row).unwrap_or_default()
}

struct Row<'a> {
    agent: &'a str,
    record: &'a Record,
}

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let r = self.record;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("agent", self.agent)?;
        map.serialize_entry("seq", &r.seq)?;
        map.serialize_entry("source", &r.source)?;
        map.serialize_entry("device", &r.device_id)?;
        map.serialize_entry("timestamp_ns", &r.timestamp_ns)?;
        match &r.value {
            Some(record::Value::Signals(signals)) => {
                map.serialize_entry("signals", &SignalMap(&signals.signals))?
            }
            Some(record::Value::Raw(raw)) => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(&raw.data);
                map.serialize_entry("raw_base64", &encoded)?;
                map.serialize_entry("content_type", &raw.content_type)?;
            }
            None => {}
        }
        map.end()
    }
}

/// Signals as `{name: value}` in the decoder's order (a plain map would sort them).
struct SignalMap<'a>(&'a [edgefleet_proto::Signal]);

impl Serialize for SignalMap<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for s in self.0 {
            match &s.value {
                Some(signal::Value::F64(v)) => map.serialize_entry(&s.name, v)?,
                Some(signal::Value::I64(v)) => map.serialize_entry(&s.name, v)?,
                Some(signal::Value::Bool(v)) => map.serialize_entry(&s.name, v)?,
                Some(signal::Value::Str(v)) => map.serialize_entry(&s.name, v)?,
                None => map.serialize_entry(&s.name, &())?,
            }
        }
        map.end()
    }
}

/// `--since`: an RFC 3339 time (`2025-01-31T12:00:00Z`, offsets allowed) or a
/// duration ago (`10m`, `2h 30m`, `7d`), as nanoseconds since the Unix epoch.
pub fn parse_since(text: &str, now: SystemTime) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return i64::try_from(t.unix_timestamp_nanos())
            .map_err(|_| format!("--since `{text}` is out of range"));
    }
    let ago = humantime::parse_duration(text).map_err(|e| {
        format!("--since `{text}` is neither an RFC 3339 time (2025-01-31T12:00:00Z) nor a duration ago (10m, 2h, 7d): {e}")
    })?;
    let at = now.checked_sub(ago).unwrap_or(UNIX_EPOCH);
    Ok(at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos()
        .min(i64::MAX as u128) as i64)
}

/// Query parameters of `GET /query`, with the same names as the CLI flags.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct QueryParams {
    pub agent: Option<String>,
    pub device: Option<String>,
    pub since: Option<String>,
    pub limit: Option<usize>,
}

impl QueryParams {
    /// Empty parameters count as absent (`?agent=&device=d1`).
    pub fn to_query(&self, now: SystemTime) -> Result<Query, String> {
        let present = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        Ok(Query {
            agent: present(&self.agent),
            device: present(&self.device),
            since_ns: present(&self.since)
                .map(|s| parse_since(&s, now))
                .transpose()?,
            limit: self.limit,
        })
    }

    /// The URL query string for these parameters (`agent=..&limit=..`).
    pub fn to_query_string(&self) -> String {
        let mut parts = Vec::new();
        for (name, value) in [
            ("agent", &self.agent),
            ("device", &self.device),
            ("since", &self.since),
        ] {
            if let Some(v) = value {
                parts.push(format!("{name}={}", percent_encode(v)));
            }
        }
        if let Some(limit) = self.limit {
            parts.push(format!("limit={limit}"));
        }
        parts.join("&")
    }
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum HttpGetError {
    #[error("`{0}` is not an http:// URL (the admin endpoint speaks plain HTTP, e.g. http://127.0.0.1:9465)")]
    BadUrl(String),
    #[error("cannot reach {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

/// `GET base + path_and_query` over plain HTTP/1.1; the body on 200.
pub async fn http_get(base: &str, path_and_query: &str) -> Result<String, HttpGetError> {
    use http_body_util::{BodyExt, Empty};
    let base = base.trim_end_matches('/');
    let authority = base
        .strip_prefix("http://")
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| HttpGetError::BadUrl(base.to_string()))?;
    let url = format!("{base}{path_and_query}");
    let http = |e: &dyn std::fmt::Display| HttpGetError::Http {
        url: url.clone(),
        message: e.to_string(),
    };
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|source| HttpGetError::Connect {
            url: url.clone(),
            source,
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| http(&e))?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(path_and_query)
        .header(hyper::header::HOST, authority)
        .body(Empty::<hyper::body::Bytes>::new())
        .map_err(|e| http(&e))?;
    let response = sender.send_request(request).await.map_err(|e| http(&e))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| http(&e))?
        .to_bytes();
    driver.abort();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        return Err(HttpGetError::Status {
            url,
            status: status.as_u16(),
            body: body.trim().to_string(),
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_proto::{RawPayload, Signal, Signals};

    #[test]
    fn records_print_as_one_json_object_with_signals_in_order() {
        let record = Record {
            seq: 3,
            source: "can0".into(),
            device_id: "truck-7".into(),
            timestamp_ns: 42,
            value: Some(record::Value::Signals(Signals {
                signals: vec![
                    Signal::f64("speed", 12.5),
                    Signal::i64("gear", -1),
                    Signal::bool("brake", true),
                    Signal::str("mode", "Drive"),
                ],
            })),
        };
        assert_eq!(
            record_json("gw-1", &record),
            r#"{"agent":"gw-1","seq":3,"source":"can0","device":"truck-7","timestamp_ns":42,"signals":{"speed":12.5,"gear":-1,"brake":true,"mode":"Drive"}}"#
        );
        let raw = Record {
            value: Some(record::Value::Raw(RawPayload {
                data: vec![0, 1, 2],
                content_type: "application/x-can-frame".into(),
            })),
            ..record
        };
        let line = record_json("gw-1", &raw);
        assert!(
            line.ends_with(r#""raw_base64":"AAEC","content_type":"application/x-can-frame"}"#),
            "{line}"
        );
    }

    #[test]
    fn since_takes_rfc3339_or_a_duration_ago() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(parse_since("10m", now).unwrap(), 9_400 * 1_000_000_000);
        assert_eq!(
            parse_since("1970-01-01T00:00:10Z", now).unwrap(),
            10_000_000_000
        );
        assert_eq!(
            parse_since("1970-01-01T01:00:10+01:00", now).unwrap(),
            10_000_000_000
        );
        let err = parse_since("yesterday", now).unwrap_err();
        assert!(err.contains("yesterday"), "{err}");
    }

    #[test]
    fn query_params_round_trip_through_the_url() {
        let params = QueryParams {
            agent: Some("gw-1".into()),
            device: Some("site/a b".into()),
            since: None,
            limit: Some(5),
        };
        assert_eq!(
            params.to_query_string(),
            "agent=gw-1&device=site%2Fa%20b&limit=5"
        );
        let q = QueryParams {
            agent: Some(String::new()),
            ..params
        }
        .to_query(SystemTime::now())
        .unwrap();
        assert_eq!(q.agent, None);
        assert_eq!(q.device.as_deref(), Some("site/a b"));
    }
}
