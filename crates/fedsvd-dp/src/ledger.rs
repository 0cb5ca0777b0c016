//! A per-party privacy ledger: what a party has spent, and whether more
//! training would exceed its budget.

use serde::{Deserialize, Serialize};

use crate::history::{check_delta, check_epsilon};
use crate::{Accountant, AccountantKind, Error, HistoryEntry, Result};

/// The privacy spent by one party (one client) against its (ε, δ) budget.
/// Serializes to JSON (or any serde format); deserialization re-validates
/// every field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawLedger", into = "RawLedger")]
pub struct PrivacyLedger {
    party: String,
    budget_epsilon: f64,
    delta: f64,
    accountant: AccountantKind,
    history: Vec<HistoryEntry>,
}

#[derive(Serialize, Deserialize)]
struct RawLedger {
    party: String,
    budget_epsilon: f64,
    delta: f64,
    accountant: AccountantKind,
    history: Vec<HistoryEntry>,
}

impl TryFrom<RawLedger> for PrivacyLedger {
    type Error = Error;
    fn try_from(raw: RawLedger) -> Result<Self> {
        let mut ledger =
            PrivacyLedger::new(raw.party, raw.budget_epsilon, raw.delta, raw.accountant)?;
        ledger.history = raw.history;
        Ok(ledger)
    }
}

impl From<PrivacyLedger> for RawLedger {
    fn from(l: PrivacyLedger) -> Self {
        RawLedger {
            party: l.party,
            budget_epsilon: l.budget_epsilon,
            delta: l.delta,
            accountant: l.accountant,
            history: l.history,
        }
    }
}

impl PrivacyLedger {
    /// An empty ledger for `party` with budget (ε, δ), accounted with `accountant`.
    pub fn new(
        party: impl Into<String>,
        budget_epsilon: f64,
        delta: f64,
        accountant: AccountantKind,
    ) -> Result<Self> {
        check_epsilon(budget_epsilon)?;
        check_delta(delta)?;
        Ok(Self {
            party: party.into(),
            budget_epsilon,
            delta,
            accountant,
            history: Vec::new(),
        })
    }

    /// The party's name.
    pub fn party(&self) -> &str {
        &self.party
    }

    /// The ε budget.
    pub fn budget_epsilon(&self) -> f64 {
        self.budget_epsilon
    }

    /// δ at which ε is accounted.
    pub fn delta(&self) -> f64 {
        self.delta
    }

    /// The accountant kind.
    pub fn accountant(&self) -> AccountantKind {
        self.accountant
    }

    /// The recorded history (consecutive identical (σ, q) merged).
    pub fn history(&self) -> &[HistoryEntry] {
        &self.history
    }

    /// ε spent so far at the ledger's δ.
    pub fn spent_epsilon(&self) -> Result<f64> {
        self.epsilon_of(&self.history)
    }

    /// Would recording `further` (on top of what is spent) exceed the budget?
    pub fn would_exceed(&self, further: &[HistoryEntry]) -> Result<bool> {
        Ok(self.epsilon_after(further)? > self.budget_epsilon)
    }

    /// ε after recording `further` on top of the history.
    pub fn epsilon_after(&self, further: &[HistoryEntry]) -> Result<f64> {
        let mut all = self.history.clone();
        for e in further {
            push_merged(&mut all, *e);
        }
        self.epsilon_of(&all)
    }

    /// Records `entry` unconditionally (the steps were already taken).
    pub fn record(&mut self, entry: HistoryEntry) {
        push_merged(&mut self.history, entry);
    }

    /// Records `entry` only if that keeps ε within the budget; otherwise
    /// leaves the ledger unchanged and returns [`Error::BudgetExceeded`].
    pub fn try_record(&mut self, entry: HistoryEntry) -> Result<()> {
        let would_spend = self.epsilon_after(&[entry])?;
        if would_spend > self.budget_epsilon {
            return Err(Error::BudgetExceeded {
                party: self.party.clone(),
                would_spend,
                budget: self.budget_epsilon,
                delta: self.delta,
            });
        }
        self.record(entry);
        Ok(())
    }

    fn epsilon_of(&self, history: &[HistoryEntry]) -> Result<f64> {
        Ok(Accountant::new(self.accountant)
            .epsilon(history, self.delta)?
            .epsilon)
    }
}

/// Appends, merging with the last entry when σ and q are the same.
fn push_merged(history: &mut Vec<HistoryEntry>, entry: HistoryEntry) {
    if let Some(last) = history.last_mut()
        && last.noise_multiplier() == entry.noise_multiplier()
        && last.sample_rate() == entry.sample_rate()
    {
        // Both were validated; the sum of steps stays ≥ 1.
        *last = HistoryEntry::new(
            last.noise_multiplier(),
            last.sample_rate(),
            last.steps().saturating_add(entry.steps()),
        )
        .unwrap_or(*last);
        return;
    }
    history.push(entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_merge_and_spend_grows() {
        let mut l = PrivacyLedger::new("client-0", 6.0, 1e-5, AccountantKind::Rdp).unwrap();
        assert_eq!(l.spent_epsilon().unwrap(), 0.0);
        l.record(HistoryEntry::new(1.0, 0.01, 100).unwrap());
        let after_100 = l.spent_epsilon().unwrap();
        l.record(HistoryEntry::new(1.0, 0.01, 100).unwrap());
        assert_eq!(l.history().len(), 1);
        assert_eq!(l.history()[0].steps(), 200);
        assert!(l.spent_epsilon().unwrap() > after_100);
        l.record(HistoryEntry::new(1.2, 0.01, 5).unwrap());
        assert_eq!(l.history().len(), 2);
    }

    #[test]
    fn budget_is_enforced() {
        let mut l = PrivacyLedger::new("client-1", 1.0, 1e-5, AccountantKind::Rdp).unwrap();
        let small = HistoryEntry::new(2.0, 0.01, 100).unwrap();
        let huge = HistoryEntry::new(0.5, 0.5, 10_000).unwrap();
        assert!(!l.would_exceed(&[small]).unwrap());
        assert!(l.would_exceed(&[huge]).unwrap());
        l.try_record(small).unwrap();
        let before = l.clone();
        let err = l.try_record(huge).unwrap_err();
        assert!(matches!(err, Error::BudgetExceeded { .. }), "{err}");
        assert_eq!(l, before);
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let mut l = PrivacyLedger::new("c", 6.0, 1e-5, AccountantKind::Prv).unwrap();
        l.record(HistoryEntry::new(1.0, 0.02, 10).unwrap());
        let json = serde_json::to_string(&l).unwrap();
        let back: PrivacyLedger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
        let bad = json.replace("1e-5", "2.0").replace("0.00001", "2.0");
        assert!(
            serde_json::from_str::<PrivacyLedger>(&bad).is_err(),
            "{bad}"
        );
        assert!(PrivacyLedger::new("c", f64::NAN, 1e-5, AccountantKind::Rdp).is_err());
        assert!(PrivacyLedger::new("c", 1.0, 0.0, AccountantKind::Rdp).is_err());
    }
}
