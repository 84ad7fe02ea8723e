//! Helpers every provider mapper shares: status table lookup with the
//! documented matching rule, and lenient timestamp parsing.

use chrono::{DateTime, NaiveDateTime};

/// The matching form of a status value: lowercase, without spaces, `_` and
/// `-` (`ADDRESS ERROR` = `address_error`).
pub fn match_key(value: &str) -> String {
    value.chars().filter(|c| !matches!(c, ' ' | '_' | '-')).flat_map(char::to_lowercase).collect()
}

/// The media type of a `Content-Type` value, lowercase, without parameters.
pub(crate) fn media_type(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// A JSON media type, or none at all (some senders omit the header; the
/// body decides then).
pub(crate) fn is_json(content_type: &str) -> bool {
    let essence = media_type(content_type);
    essence.is_empty() || essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// Looks `value` up in a table of (provider value, canonical) pairs.
pub(crate) fn lookup<S: Copy>(table: &[(&str, S)], value: &str) -> Option<S> {
    let key = match_key(value);
    table.iter().find(|(v, _)| match_key(v) == key).map(|(_, s)| *s)
}

/// Parses an RFC 3339 timestamp or a zone-less one (`2024-02-20 15:28:51`,
/// `2022-04-10T15:20:00`), which is taken as UTC.
pub(crate) fn parse_time(value: &str) -> Option<prost_types::Timestamp> {
    let value = value.trim();
    let utc = DateTime::parse_from_rfc3339(value)
        .map(|t| t.to_utc())
        .or_else(|_| DateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f%z").map(|t| t.to_utc()))
        .ok()
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(value, f).ok())
                .map(|t| t.and_utc())
        })?;
    Some(prost_types::Timestamp { seconds: utc.timestamp(), nanos: utc.timestamp_subsec_nanos() as i32 })
}

/// Writes `value` as JSON with object keys sorted and no whitespace, so the
/// same content always gives the same bytes whatever order it was sent in.
pub(crate) fn canonical_json(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(key.clone()), out);
                out.push(b':');
                canonical_json(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(item, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &serde_json::Value, out: &mut Vec<u8>) {
    // Serializing a scalar into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// A content-based dedup key: `prefix` plus the SHA-256 of the canonical JSON.
pub(crate) fn content_key(prefix: &str, value: &serde_json::Value) -> String {
    let mut bytes = Vec::new();
    canonical_json(value, &mut bytes);
    format!("{prefix}:{}", super::sha256_hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_key_ignores_case_spaces_underscores_and_dashes() {
        assert_eq!(match_key("ADDRESS ERROR"), match_key("address_error"));
        assert_eq!(match_key("Ready-For_Fulfillment"), "readyforfulfillment");
    }

    #[test]
    fn parses_both_timestamp_forms() {
        let zoned = parse_time("2024-03-11T10:58:51.000+00:00").unwrap();
        let bare = parse_time("2024-03-11 10:58:51").unwrap();
        let t = parse_time("2024-03-11T10:58:51").unwrap();
        assert_eq!(zoned, bare);
        assert_eq!(zoned, t);
        assert_eq!(zoned.seconds, 1_710_154_731);
        assert_eq!(parse_time("2024-03-11T12:58:51+02:00").unwrap(), zoned);
        assert!(parse_time("yesterday").is_none());
    }

    #[test]
    fn content_key_ignores_key_order_and_whitespace() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":{"y":[1,2],"x":"s"}}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{ "a": {"x": "s", "y": [1, 2]}, "b": 1 }"#).unwrap();
        let c: serde_json::Value = serde_json::from_str(r#"{"b":2,"a":{"y":[1,2],"x":"s"}}"#).unwrap();
        assert_eq!(content_key("k", &a), content_key("k", &b));
        assert_ne!(content_key("k", &a), content_key("k", &c));
    }
}
