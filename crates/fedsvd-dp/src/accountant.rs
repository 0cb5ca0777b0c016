//! One interface over both accountants.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, HistoryEntry, PrvAccountant, RdpAccountant, Result};

/// Which accountant to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountantKind {
    /// Rényi DP with Opacus's default orders.
    Rdp,
    /// Privacy random variables (tighter; the default).
    Prv,
}

impl AccountantKind {
    /// The lowercase name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            AccountantKind::Rdp => "rdp",
            AccountantKind::Prv => "prv",
        }
    }
}

impl fmt::Display for AccountantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AccountantKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "rdp" => Ok(AccountantKind::Rdp),
            "prv" => Ok(AccountantKind::Prv),
            _ => Err(Error::UnknownAccountant(s.to_string())),
        }
    }
}

/// ε spent at a δ, as an accountant reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spent {
    /// The ε to report (for PRV the upper bound).
    pub epsilon: f64,
    /// The optimal Rényi order (RDP only).
    pub order: Option<f64>,
}

/// An RDP or PRV accountant with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Accountant {
    /// Rényi DP.
    Rdp(RdpAccountant),
    /// Privacy random variables.
    Prv(PrvAccountant),
}

impl Accountant {
    /// The accountant of that kind with default settings.
    pub fn new(kind: AccountantKind) -> Self {
        match kind {
            AccountantKind::Rdp => Accountant::Rdp(RdpAccountant::default()),
            AccountantKind::Prv => Accountant::Prv(PrvAccountant::default()),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> AccountantKind {
        match self {
            Accountant::Rdp(_) => AccountantKind::Rdp,
            Accountant::Prv(_) => AccountantKind::Prv,
        }
    }

    /// ε of a history at δ (0 for an empty history).
    pub fn epsilon(&self, history: &[HistoryEntry], delta: f64) -> Result<Spent> {
        match self {
            Accountant::Rdp(a) => {
                let e = a.epsilon(history, delta)?;
                Ok(Spent {
                    epsilon: e.epsilon,
                    order: Some(e.order),
                })
            }
            Accountant::Prv(a) => Ok(Spent {
                epsilon: a.epsilon(history, delta)?.upper,
                order: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in [AccountantKind::Rdp, AccountantKind::Prv] {
            assert_eq!(k.name().parse::<AccountantKind>().unwrap(), k);
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.name())
            );
        }
        assert_eq!(
            "gdp".parse::<AccountantKind>(),
            Err(Error::UnknownAccountant("gdp".into()))
        );
    }
}
