//! Asking DNS for a TXT record, through the system's resolvers or one
//! named server (`dns_server`), with hickory's resolver. Nothing is cached
//! here: each refresh asks again, and the record's TTL says when.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;

/// One answer: the record's strings (a record's character strings joined
/// by a space, one string per record) and how long it may be kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub strings: Vec<String>,
    pub ttl: Duration,
}

/// A resolver for TXT records.
pub struct Lookup {
    resolver: TokioResolver,
}

impl Lookup {
    /// Asks `server`, or the system's resolvers (`/etc/resolv.conf`) when
    /// there is none; a question gets `timeout`, twice.
    pub fn new(server: Option<SocketAddr>, timeout: Duration) -> Result<Self, String> {
        let mut options = ResolverOpts::default();
        options.timeout = timeout;
        options.attempts = 2;
        options.cache_size = 0;
        let builder = match server {
            Some(server) => {
                let servers = NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
                let config = ResolverConfig::from_parts(None, Vec::new(), servers);
                TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            }
            None => {
                TokioResolver::builder_tokio().map_err(|e| format!("cannot read the system's DNS settings: {e}"))?
            }
        };
        Ok(Self { resolver: builder.with_options(options).build() })
    }

    /// The TXT records of `name` (fully qualified: a trailing dot is added).
    pub async fn txt(&self, name: &str) -> Result<Answer, String> {
        let absolute = if name.ends_with('.') { name.to_string() } else { format!("{name}.") };
        let lookup = self.resolver.txt_lookup(absolute).await.map_err(|e| e.to_string())?;
        let ttl = lookup.valid_until().saturating_duration_since(Instant::now());
        let strings = lookup
            .iter()
            .map(|txt| txt.txt_data().iter().map(|part| String::from_utf8_lossy(part)).collect::<Vec<_>>().join(" "))
            .collect();
        Ok(Answer { strings, ttl })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{DnsServer, dns::Answer as Says};

    #[tokio::test]
    async fn a_record_its_change_and_failures_come_from_the_named_server() {
        let server = DnsServer::start();
        let lookup = Lookup::new(Some(server.addr), Duration::from_millis(200)).unwrap();
        let name = "ipblock-notify.example";
        server.set(name, Says::Txt(vec!["198.51.100.0/24".into(), "2001:db8::/48".into()], 300));
        let answer = lookup.txt(name).await.unwrap();
        assert_eq!(answer.strings, ["198.51.100.0/24 2001:db8::/48"]);
        assert!(answer.ttl <= Duration::from_secs(300) && answer.ttl > Duration::from_secs(250), "{:?}", answer.ttl);
        server.set(name, Says::Txt(vec!["203.0.113.0/24".into()], 60));
        assert_eq!(lookup.txt(name).await.unwrap().strings, ["203.0.113.0/24"], "asked again, not cached");
        server.set(name, Says::Failure);
        assert!(lookup.txt(name).await.is_err());
        server.set(name, Says::Silence);
        assert!(lookup.txt(name).await.is_err());
        assert!(lookup.txt("nothing-here.example").await.is_err(), "no such name");
    }
}
