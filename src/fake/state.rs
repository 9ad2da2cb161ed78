//! The fake server's shared state: registered clients, issued tokens, running exports and the
//! record of everything it saw, behind one `Arc<ServerState>` with one mutex.
//!
//! Keeping all mutable state in one place is what lets later tests script faults (expire tokens,
//! fail a file once) by reaching into a single struct. The mutex is a std one and must never be
//! held across an `.await` or while generating file contents; handlers copy what they need and
//! let go. Nothing here may log secrets: tokens and assertions are stored only so that leak tests
//! can search logs for them.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use jsonwebtoken::jwk::JwkSet;
use time::OffsetDateTime;
use url::Url;

use super::data::Dataset;
use super::exports::Export;
use super::faults::FaultState;
use super::{FakeOptions, RecordedKickOff, RecordedRequest, TokenAttempt};

pub(crate) struct ServerState {
    pub(crate) options: FakeOptions,
    pub(crate) dataset: Dataset,
    /// `http://127.0.0.1:PORT`, known once the listener is bound and fixed from then on.
    pub(crate) origin: Url,
    inner: Mutex<Inner>,
}

#[derive(Default)]
pub(crate) struct Inner {
    pub(crate) clients: HashMap<String, JwkSet>,
    /// `(iss, jti)` pairs already presented; SMART requires each assertion be used once.
    pub(crate) used_jtis: HashSet<(String, String)>,
    pub(crate) tokens: HashMap<String, IssuedToken>,
    pub(crate) token_attempts: Vec<TokenAttempt>,
    pub(crate) issued_tokens: Vec<String>,
    pub(crate) received_assertions: Vec<String>,
    pub(crate) exports: HashMap<String, Export>,
    pub(crate) requests: Vec<RecordedRequest>,
    /// `client_secret_basic` clients and their secrets.
    pub(crate) secret_clients: HashMap<String, String>,
    /// Registered JWKS URLs, the only `jku` values accepted per client.
    pub(crate) client_jkus: HashMap<String, String>,
    /// Token requests so far (for `token_server_errors`).
    pub(crate) token_requests: u32,
    /// Requests to protected endpoints so far (for the 401 and revocation knobs).
    pub(crate) protected_requests: u32,
    /// Where file downloads are redirected, if anywhere.
    pub(crate) redirect_files_to: Option<Url>,
    /// Presigned redirect keys and the `Authorization` value they stand in for.
    pub(crate) presigned: HashMap<String, Option<String>>,
    /// Every kick-off with its decoded parameters (query or `Parameters` body).
    pub(crate) kick_offs: Vec<RecordedKickOff>,
    /// Scripted-fault counters and the open-file gauge.
    pub(crate) faults: FaultState,
    /// Clients registered by JWKS URL (fetched at each token request).
    pub(crate) jwks_urls: HashMap<String, Url>,
    /// Each client's last export's transactionTime (AB2D's default `_since`).
    pub(crate) last_exports: HashMap<String, OffsetDateTime>,
    /// Groups whose members a test set (patient indices); [`super::ALL_PATIENTS_GROUP_ID`]
    /// not set here has every patient.
    pub(crate) groups: HashMap<String, Vec<usize>>,
    /// Resources deleted on the server, (type, index): absent from every later export, and
    /// listed in no `deleted[]` (a server that does not track deletions).
    pub(crate) removed: HashSet<(String, usize)>,
}

#[derive(Clone, Debug)]
pub(crate) struct IssuedToken {
    pub(crate) client_id: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) expires_at: OffsetDateTime,
}

impl ServerState {
    pub(crate) fn new(options: FakeOptions, dataset: Dataset, origin: Url) -> Self {
        ServerState {
            options,
            dataset,
            origin,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Locks the shared state. A panic while holding the lock (a failing assertion in a test
    /// that reached in) must not make every later request fail too, so poisoning is ignored:
    /// each critical section leaves the state consistent before anything can panic.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `http://127.0.0.1:PORT/fhir` (or `.../r4/<tenant>`), without a trailing slash.
    pub(crate) fn fhir_base_url(&self) -> Url {
        self.url(&self.base_path())
    }

    /// The path the FHIR endpoints live under: `/fhir`, or `/r4/<tenant>` with a tenant.
    pub(crate) fn base_path(&self) -> String {
        match &self.options.tenant {
            Some(tenant) => format!("/r4/{tenant}"),
            None => "/fhir".to_string(),
        }
    }

    pub(crate) fn token_url(&self) -> Url {
        self.url("/auth/token")
    }

    /// An absolute URL on this server for `path` (which starts with `/`).
    pub(crate) fn url(&self, path: &str) -> Url {
        let mut url = self.origin.clone();
        url.set_path(path);
        url
    }
}
