//! "Have enough replicas answered?": consistency levels and a tiny vote counter.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How many replicas must answer a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConsistencyLevel {
    One,
    Quorum,
    All,
}

impl ConsistencyLevel {
    /// Replicas needed out of `replicas` (at least one).
    pub fn required(self, replicas: usize) -> usize {
        let needed = match self {
            ConsistencyLevel::One => 1,
            ConsistencyLevel::Quorum => replicas / 2 + 1,
            ConsistencyLevel::All => replicas,
        };
        needed.max(1)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConsistencyLevel::One => "one",
            ConsistencyLevel::Quorum => "quorum",
            ConsistencyLevel::All => "all",
        }
    }
}

impl fmt::Display for ConsistencyLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown consistency level {0:?}: use one, quorum or all")]
pub struct UnknownLevel(pub String);

impl FromStr for ConsistencyLevel {
    type Err = UnknownLevel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "one" | "1" => Ok(ConsistencyLevel::One),
            "quorum" => Ok(ConsistencyLevel::Quorum),
            "all" => Ok(ConsistencyLevel::All),
            _ => Err(UnknownLevel(s.to_string())),
        }
    }
}

/// Where a vote stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuorumStatus {
    Pending,
    Met,
    Failed,
}

/// Counts successes and failures of `total` replicas against `required`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quorum {
    pub required: usize,
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
}

impl Quorum {
    pub fn new(level: ConsistencyLevel, total: usize) -> Self {
        Quorum {
            required: level.required(total),
            total,
            succeeded: 0,
            failed: 0,
        }
    }

    pub fn record_success(&mut self) -> QuorumStatus {
        self.succeeded += 1;
        self.status()
    }

    pub fn record_failure(&mut self) -> QuorumStatus {
        self.failed += 1;
        self.status()
    }

    pub fn status(&self) -> QuorumStatus {
        if self.succeeded >= self.required {
            QuorumStatus::Met
        } else if self.total.saturating_sub(self.failed) < self.required {
            QuorumStatus::Failed
        } else {
            QuorumStatus::Pending
        }
    }

    /// Every replica has answered one way or the other.
    pub fn all_answered(&self) -> bool {
        self.succeeded + self.failed >= self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConsistencyLevel::*;
    use QuorumStatus::*;

    /// The quorum maths, as a table: (level, replicas, successes, failures) -> status.
    #[test]
    fn quorum_table() {
        let table = [
            (One, 3, 0, 0, Pending),
            (One, 3, 1, 0, Met),
            (One, 3, 0, 2, Pending),
            (One, 3, 0, 3, Failed),
            (Quorum, 3, 1, 0, Pending),
            (Quorum, 3, 2, 0, Met),
            (Quorum, 3, 1, 1, Pending),
            (Quorum, 3, 0, 2, Failed),
            (Quorum, 5, 3, 0, Met),
            (Quorum, 5, 2, 2, Pending),
            (Quorum, 5, 2, 3, Failed),
            (Quorum, 1, 1, 0, Met),
            (All, 3, 2, 0, Pending),
            (All, 3, 3, 0, Met),
            (All, 3, 2, 1, Failed),
            (Quorum, 2, 1, 0, Pending),
            (Quorum, 2, 2, 0, Met),
        ];
        for (level, total, ok, failed, expected) in table {
            let q = super::Quorum {
                required: level.required(total),
                total,
                succeeded: ok,
                failed,
            };
            assert_eq!(
                q.status(),
                expected,
                "{level} of {total}: {ok} ok, {failed} failed"
            );
        }
    }

    /// Levels parse from the names of the API and reject anything else.
    #[test]
    fn levels_parse() {
        assert_eq!("QUORUM".parse::<ConsistencyLevel>(), Ok(Quorum));
        assert_eq!("all".parse::<ConsistencyLevel>(), Ok(All));
        assert!("two".parse::<ConsistencyLevel>().is_err());
    }
}
