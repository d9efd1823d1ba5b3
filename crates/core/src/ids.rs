//! Identifiers. Names (tenant, database) are validated so they are safe inside object
//! keys and file names; numbers are typed so a generation cannot be passed as an LSN.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

fn validate_name(what: &'static str, name: &str) -> Result<(), CoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(CoreError::InvalidName {
            what,
            name: name.to_string(),
        })
    }
}

macro_rules! name_id {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Validates and wraps a name.
            pub fn new(name: impl Into<String>) -> Result<Self, CoreError> {
                let name = name.into();
                validate_name($what, &name)?;
                Ok(Self(name))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = CoreError;
            fn try_from(s: String) -> Result<Self, CoreError> {
                Self::new(s)
            }
        }

        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = CoreError;
            fn from_str(s: &str) -> Result<Self, CoreError> {
                Self::new(s)
            }
        }
    };
}

name_id!(
    /// A tenant: the top level of the byte-budget hierarchy and of the object key space.
    TenantId,
    "tenant"
);
name_id!(
    /// A database within a tenant.
    DbId,
    "database"
);

macro_rules! num_id {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $ty(pub u64);

        impl $ty {
            /// The raw number.
            pub fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

num_id!(
    /// One published checkpoint of one database: 1, 2, 3 …
    Generation
);
num_id!(
    /// A log sequence number: for segment sources, a byte offset in the concatenated log.
    Lsn
);

impl Generation {
    /// The generation after this one.
    pub fn next(self) -> Generation {
        Generation(self.0 + 1)
    }
}

/// A job's identity; printed as 16 hex digits, which is also its scratch directory name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(DbId::new("orders-2024.v1_a").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", "ü", &"x".repeat(129)] {
            let err = DbId::new(bad).unwrap_err().to_string();
            assert!(err.contains("database"), "{err}");
        }
        assert!(TenantId::new("../x").is_err());
    }

    #[test]
    fn serde_rejects_bad_names() {
        let r: Result<DbId, _> = serde_json::from_str("\"a/b\"");
        assert!(r.is_err());
        let ok: DbId = serde_json::from_str("\"main\"").unwrap();
        assert_eq!(ok.as_str(), "main");
    }

    #[test]
    fn job_id_prints_as_fixed_hex() {
        assert_eq!(JobId(255).to_string(), "00000000000000ff");
    }
}
