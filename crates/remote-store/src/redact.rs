//! Keeping credentials out of every URL, error and log line.
//!
//! Contract: [`redact`] removes userinfo from a URL-like string; [`Secrets`] holds every
//! credential value this process knows of (the store config's `[s3]` table and the `AWS_*`
//! environment) and scrubs them from text and from `object_store` errors (servers echo the
//! access key id in some error bodies). Values under 8 characters are left alone: test
//! dummies like `test` would mangle ordinary words, and real access key ids have 16 or more
//! characters, secrets 40.
//!
//! Scrubbing replaces an error's source with plain text, which would hide its type from
//! [`crate::classify`]; so errors are always classified before they are scrubbed.
//!
//! Stateless: no I/O, nothing to crash, retry or cancel.

use crate::StoreConfig;

/// Removes any userinfo from a URL-like string so credentials never reach logs or errors.
pub fn redact(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(_) => s.to_string(),
        Err(_) => s.split('@').next_back().unwrap_or_default().to_string(),
    }
}

/// A non-empty environment variable.
pub(crate) fn env_var(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// The credential values to scrub, shared by all clones of a store.
#[derive(Clone, Debug, Default)]
pub(crate) struct Secrets(Vec<String>);

impl Secrets {
    /// Every credential value of `cfg` and the `AWS_*` environment (8 characters or more).
    pub(crate) fn known(cfg: &StoreConfig) -> Self {
        let s3 = &cfg.s3;
        let known = [
            s3.access_key_id.as_ref().map(|s| s.expose().to_string()),
            s3.secret_access_key
                .as_ref()
                .map(|s| s.expose().to_string()),
            s3.session_token.as_ref().map(|s| s.expose().to_string()),
            env_var("AWS_ACCESS_KEY_ID"),
            env_var("AWS_SECRET_ACCESS_KEY"),
            env_var("AWS_SESSION_TOKEN"),
        ];
        Self(
            known
                .into_iter()
                .flatten()
                .filter(|s| s.len() >= 8)
                .collect(),
        )
    }

    #[cfg(test)]
    pub(crate) fn of(values: &[&str]) -> Self {
        Self(values.iter().map(|s| s.to_string()).collect())
    }

    /// `text` with every known credential replaced by `<redacted>`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut m = text.to_string();
        for s in &self.0 {
            m = m.replace(s.as_str(), "<redacted>");
        }
        m
    }

    fn found_in(&self, text: &str) -> bool {
        self.0.iter().any(|s| text.contains(s.as_str()))
    }

    /// `e`, rebuilt with a plain-text source if its text contains a known credential.
    pub(crate) fn scrub_error(&self, e: object_store::Error) -> object_store::Error {
        if !self.found_in(&e.to_string()) {
            return e;
        }
        let clean = |source: Box<dyn std::error::Error + Send + Sync>| -> Box<dyn std::error::Error + Send + Sync> {
            self.scrub(&source.to_string()).into()
        };
        match e {
            object_store::Error::Generic { store, source } => object_store::Error::Generic {
                store,
                source: clean(source),
            },
            object_store::Error::PermissionDenied { path, source } => {
                object_store::Error::PermissionDenied {
                    path,
                    source: clean(source),
                }
            }
            object_store::Error::Unauthenticated { path, source } => {
                object_store::Error::Unauthenticated {
                    path,
                    source: clean(source),
                }
            }
            // The rest never carry a server's response body (and not-found, exists and
            // precondition errors are reported without their source).
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_userinfo_and_errors_their_credentials() {
        assert_eq!(redact("s3://AKIA:SECRET@bucket/p"), "s3://bucket/p");
        assert_eq!(redact("not a url with k:s@host"), "host");
        let secrets = Secrets::of(&["AKIDSECRETISH"]);
        let e = object_store::Error::Generic {
            store: "S3",
            source: "403 Forbidden: <AWSAccessKeyId>AKIDSECRETISH</AWSAccessKeyId>".into(),
        };
        let shown = secrets.scrub_error(e).to_string();
        assert!(
            !shown.contains("AKIDSECRETISH") && shown.contains("403"),
            "{shown}"
        );
    }
}
