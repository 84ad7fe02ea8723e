//! What a DNS TXT record that publishes a sender's address ranges says.
//!
//! The format is nobody's standard (Withings documents only "refer to the
//! TXT record"), so entries are read the way the config reads a pasted
//! record: IPv4 and IPv6 addresses and CIDRs, separated by whitespace,
//! commas or semicolons, quotes ignored. A token that is not a network
//! (an `include:`, a version tag) is skipped and reported, never fatal.
//! An answer that gives no network at all, or one broader than the
//! configured minimum prefix, is refused as a whole: the caller keeps the
//! last good list (never fail open, never fail empty).

use crate::config::{MinPrefix, Network};

/// A usable answer: its networks, and the tokens that were skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranges {
    pub networks: Vec<Network>,
    pub skipped: Vec<String>,
}

/// Why an answer is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No network in it (empty, or only unknown tokens).
    Empty { skipped: Vec<String> },
    /// A network broader than the minimum prefix.
    TooBroad(Network),
    /// More networks than any sender publishes ([`MAX_NETWORKS`]).
    TooMany(usize),
}

/// The most networks an answer may hold: a sender publishes a handful; a
/// record of thousands is a mistake, and each would be checked per webhook.
pub const MAX_NETWORKS: usize = 1024;

impl Refused {
    /// The reason as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Empty { .. } => "empty",
            Self::TooBroad(_) => "too_broad",
            Self::TooMany(_) => "too_many",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty { skipped } if skipped.is_empty() => write!(f, "the record holds no address range"),
            Self::Empty { skipped } => {
                write!(f, "the record holds no address range (skipped: {})", skipped.join(" "))
            }
            Self::TooBroad(network) => write!(f, "the record allows {}, broader than the minimum prefix", network.0),
            Self::TooMany(count) => write!(f, "the record holds {count} ranges, more than {MAX_NETWORKS}"),
        }
    }
}

/// Reads the strings of a TXT answer (a record may be split into several
/// character strings; they are read as one list).
pub fn parse<'a>(strings: impl IntoIterator<Item = &'a str>, min: MinPrefix) -> Result<Ranges, Refused> {
    let (mut networks, mut skipped) = (Vec::new(), Vec::new());
    for token in strings
        .into_iter()
        .flat_map(|text| text.split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '"')))
        .filter(|token| !token.is_empty())
    {
        match token.parse::<Network>() {
            Ok(network) => networks.push(network),
            Err(_) => skipped.push(token.to_string()),
        }
    }
    if networks.is_empty() {
        return Err(Refused::Empty { skipped });
    }
    if let Some(broad) = networks.iter().find(|network| too_broad(network, min)) {
        return Err(Refused::TooBroad(*broad));
    }
    networks.sort_by_key(|network| network.0);
    networks.dedup();
    if networks.len() > MAX_NETWORKS {
        return Err(Refused::TooMany(networks.len()));
    }
    Ok(Ranges { networks, skipped })
}

fn too_broad(network: &Network, min: MinPrefix) -> bool {
    match network.0 {
        ipnet::IpNet::V4(v4) => v4.prefix_len() < min.v4,
        ipnet::IpNet::V6(v6) => v6.prefix_len() < min.v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn networks(ranges: &Ranges) -> Vec<String> {
        ranges.networks.iter().map(|n| n.0.to_string()).collect()
    }

    #[test]
    fn ipv4_ipv6_cidrs_and_bare_addresses_with_any_separator() {
        let answer = ["\"198.51.100.0/24, 2001:db8::/48; 203.0.113.7\"", "192.0.2.0/25\t2001:db8:1::1"];
        let ranges = parse(answer, MinPrefix::default()).unwrap();
        assert_eq!(
            networks(&ranges),
            ["192.0.2.0/25", "198.51.100.0/24", "203.0.113.7/32", "2001:db8::/48", "2001:db8:1::1/128"]
        );
        assert!(ranges.skipped.is_empty());
    }

    #[test]
    fn unknown_tokens_are_skipped_and_reported() {
        let ranges = parse(["v=ipblock1 include:_spf.example.com 198.51.100.0/24"], MinPrefix::default()).unwrap();
        assert_eq!(networks(&ranges), ["198.51.100.0/24"]);
        assert_eq!(ranges.skipped, ["v=ipblock1", "include:_spf.example.com"]);
    }

    #[test]
    fn an_answer_without_a_range_is_refused() {
        assert_eq!(parse([""], MinPrefix::default()), Err(Refused::Empty { skipped: vec![] }));
        assert_eq!(parse(["  \"\" "], MinPrefix::default()), Err(Refused::Empty { skipped: vec![] }));
        let garbage = parse(["include:example.com"], MinPrefix::default()).unwrap_err();
        assert_eq!(garbage, Refused::Empty { skipped: vec!["include:example.com".into()] });
        assert!(garbage.to_string().contains("include:example.com"), "{garbage}");
    }

    #[test]
    fn a_range_broader_than_the_minimum_is_refused() {
        let min = MinPrefix::default();
        assert!(parse(["10.0.0.0/8"], min).is_ok(), "the minimum itself is allowed");
        let broad = parse(["198.51.100.0/24 0.0.0.0/0"], min).unwrap_err();
        assert_eq!(broad, Refused::TooBroad("0.0.0.0/0".parse().unwrap()));
        assert!(matches!(parse(["2001:db8::/31"], min), Err(Refused::TooBroad(_))));
        assert!(parse(["2001:db8::/32"], min).is_ok());
        let strict = MinPrefix { v4: 16, v6: 48 };
        assert!(matches!(parse(["10.0.0.0/15"], strict), Err(Refused::TooBroad(_))));
    }

    #[test]
    fn an_answer_of_too_many_ranges_is_refused() {
        let many = |n: usize| (0..n).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256)).collect::<Vec<_>>().join(" ");
        assert_eq!(parse([many(MAX_NETWORKS).as_str()], MinPrefix::default()).unwrap().networks.len(), MAX_NETWORKS);
        let refused = parse([many(MAX_NETWORKS + 1).as_str()], MinPrefix::default()).unwrap_err();
        assert_eq!(refused, Refused::TooMany(MAX_NETWORKS + 1));
        assert_eq!(refused.reason(), "too_many");
    }
}
