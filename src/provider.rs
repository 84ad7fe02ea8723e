//! The providers ordertrail understands: a closed set, named once. A leaf:
//! configuration, the mappers and the store all name providers, and none
//! of them needs another for it.

use serde::Deserialize;

use crate::proto;

/// The kinds Winkelstraat posts, each to its own URL.
pub const WINKELSTRAAT_KINDS: &[&str] = &["order", "shipment", "invoice", "rma", "creditmemo", "order-payment-request"];

/// The providers ordertrail understands: a closed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Withings,
    Winkelstraat,
    /// Spelled as the generated `proto::Provider::Ordermesh`, one name.
    Ordermesh,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Withings, Provider::Winkelstraat, Provider::Ordermesh];

    /// The provider of a name in config, URLs and exports.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The provider's name in config and URLs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Withings => "withings",
            Self::Winkelstraat => "winkelstraat",
            Self::Ordermesh => "ordermesh",
        }
    }

    pub fn to_proto(self) -> proto::Provider {
        match self {
            Self::Withings => proto::Provider::Withings,
            Self::Winkelstraat => proto::Provider::Winkelstraat,
            Self::Ordermesh => proto::Provider::Ordermesh,
        }
    }

    pub fn from_proto(p: proto::Provider) -> Option<Self> {
        match p {
            proto::Provider::Withings => Some(Self::Withings),
            proto::Provider::Winkelstraat => Some(Self::Winkelstraat),
            proto::Provider::Ordermesh => Some(Self::Ordermesh),
            proto::Provider::Unspecified => None,
        }
    }

    /// Whether `/webhooks/{source}/{kind}` is a path of this provider.
    /// Winkelstraat posts each kind to its own URL; the others post to one.
    /// An unknown Winkelstraat kind is still a webhook: it is quarantined.
    pub fn accepts_kind(self, kind: Option<&str>) -> bool {
        match self {
            Self::Winkelstraat => true,
            Self::Withings | Self::Ordermesh => kind.is_none(),
        }
    }
}
