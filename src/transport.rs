//! The HTTP client every FHIR-facing request goes through, and the rules on where requests may go.
//!
//! Policy lives here so that `smart` and `bulk` cannot disagree on it: TLS verification is always
//! on; plain `http://` is allowed only to loopback hosts or with an explicit per-job opt-in; a
//! redirect may never downgrade to such a URL. reqwest drops the `Authorization` header when a
//! redirect leaves the original host, which keeps the bearer token on its own origin.

use std::net::IpAddr;
use std::time::Duration;

use url::Url;

/// Settings for one job's HTTP client.
#[derive(Debug, Clone, Copy)]
pub struct HttpOptions {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub allow_insecure_http: bool,
}

/// Builds a client that knows nothing of the job: redirects are judged against the request
/// they came from (see [`client_for`]).
pub fn client(options: HttpOptions) -> anyhow::Result<reqwest::Client> {
    client_for(options, OriginPolicy::default())
}

/// Builds the client for one job. Redirects are followed (at most 5) only where
/// [`OriginPolicy::check_fetch`] allows.
pub fn client_for(options: HttpOptions, origins: OriginPolicy) -> anyhow::Result<reqwest::Client> {
    let allow_insecure_http = options.allow_insecure_http;
    let resolver = GuardedResolver::new(origins.clone(), system_lookup);
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        let from = attempt.previous().last();
        let first = attempt.previous().first();
        if attempt.previous().len() >= 5 {
            attempt.error("too many redirects")
        } else if let Err(message) =
            origins.check_fetch(attempt.url(), from, first, allow_insecure_http)
        {
            attempt.error(format!("refusing redirect: {message}"))
        } else {
            attempt.follow()
        }
    });
    let client = reqwest::Client::builder()
        .user_agent(concat!("fhir-sync/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(options.connect_timeout)
        .read_timeout(options.read_timeout)
        .redirect(redirects)
        .dns_resolver(std::sync::Arc::new(resolver))
        .build()?;
    Ok(client)
}

/// Resolves host names for one job's client, and refuses for the hosts the job did not name
/// what [`OriginPolicy::check_fetch`] refuses as written: a name that resolves only to loopback,
/// private or link-local addresses. So a manifest cannot reach an internal service through a
/// DNS name (or a name rebound between checks: the addresses connected to are the ones judged).
/// The FHIR server's own host and the hosts of `fhir.file_origins` resolve as they are; once
/// the FHIR host itself resolves to an internal address, the server is at one, and so may its
/// files be (the same rule as for addresses written in the URL).
#[derive(Clone)]
struct GuardedResolver {
    policy: std::sync::Arc<OriginPolicy>,
    home_internal: std::sync::Arc<std::sync::atomic::AtomicBool>,
    lookup: Lookup,
}

/// How names become addresses: the system resolver, or a table in unit tests.
type Lookup =
    fn(String) -> futures::future::BoxFuture<'static, std::io::Result<Vec<std::net::SocketAddr>>>;

fn system_lookup(
    host: String,
) -> futures::future::BoxFuture<'static, std::io::Result<Vec<std::net::SocketAddr>>> {
    Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), 0)).await?.collect()) })
}

/// Whether a resolved host's addresses are taken as they are or only the public ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    Any,
    PublicOnly,
}

impl GuardedResolver {
    fn new(policy: OriginPolicy, lookup: Lookup) -> GuardedResolver {
        GuardedResolver {
            policy: std::sync::Arc::new(policy),
            home_internal: Default::default(),
            lookup,
        }
    }

    fn is_home(&self, host: &str) -> bool {
        self.policy
            .base
            .as_ref()
            .and_then(Url::host_str)
            .is_some_and(|home| home.eq_ignore_ascii_case(host))
    }

    fn trust(&self, host: &str) -> Trust {
        let Some(base) = &self.policy.base else {
            // A client that knows no job has no FHIR origin to judge by.
            return Trust::Any;
        };
        let listed = self.policy.listed.iter().any(|origin| match origin {
            url::Origin::Tuple(_, listed, _) => listed.to_string().eq_ignore_ascii_case(host),
            url::Origin::Opaque(_) => false,
        });
        if self.is_home(host)
            || listed
            || is_internal(base)
            || self
                .home_internal
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            Trust::Any
        } else {
            Trust::PublicOnly
        }
    }

    /// The addresses `host` may be connected at, from what it resolved to.
    fn judge(
        &self,
        host: &str,
        addrs: Vec<std::net::SocketAddr>,
    ) -> Result<Vec<std::net::SocketAddr>, String> {
        if self.is_home(host) && addrs.iter().any(|a| is_internal_ip(a.ip())) {
            self.home_internal
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        match self.trust(host) {
            Trust::Any => Ok(addrs),
            Trust::PublicOnly => {
                let public: Vec<_> = addrs
                    .iter()
                    .copied()
                    .filter(|a| !is_internal_ip(a.ip()))
                    .collect();
                if public.is_empty() && !addrs.is_empty() {
                    Err(format!(
                        "{host} resolves only to loopback, private or link-local addresses; list its origin in fhir.file_origins if it is meant"
                    ))
                } else {
                    Ok(public)
                }
            }
        }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = (this.lookup)(host.clone()).await?;
            let allowed = this.judge(&host, addrs)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Connection and read timeouts of [`token_client`]: a token response is a few hundred bytes.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// The client for token requests, which carry the client's credentials (a signed assertion
/// or the client secret): it never follows a redirect, so a 307 cannot forward them anywhere,
/// not even to the same host. A redirect is answered as the error it is.
pub fn token_client() -> anyhow::Result<reqwest::Client> {
    let client = reqwest::Client::builder()
        .user_agent(concat!("fhir-sync/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(TOKEN_TIMEOUT)
        .read_timeout(TOKEN_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    Ok(client)
}

/// Whether a request to `url` is allowed: `https`, or `http` to a loopback host, or `http`
/// anywhere when the job opted in.
pub fn check_url(url: &Url, allow_insecure_http: bool) -> Result<(), String> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_insecure_http || is_loopback(url) => Ok(()),
        "http" => Err(format!(
            "plain http to {} is refused (use https, or set fhir.allow_insecure_http = true for a test server)",
            url.host_str().unwrap_or("?")
        )),
        other => Err(format!("unsupported URL scheme {other:?}")),
    }
}

/// Where export files and redirects may lead, beyond what [`check_url`] allows: the FHIR
/// server's origin, origins the job lists (`fhir.file_origins`), and otherwise https to a
/// public address only. This is what keeps a manifest or a redirect from pointing fhir-sync
/// at another service on the same machine or network.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// The FHIR server's base URL; unknown, the first URL of a redirect chain stands in.
    pub base: Option<Url>,
    /// `fhir.file_origins`.
    pub listed: Vec<url::Origin>,
}

impl OriginPolicy {
    pub fn for_job(base: &Url, listed: &[Url]) -> OriginPolicy {
        OriginPolicy {
            base: Some(base.clone()),
            listed: listed.iter().map(Url::origin).collect(),
        }
    }

    /// Whether the job lists `url`'s origin.
    pub fn is_listed(&self, url: &Url) -> bool {
        self.listed.contains(&url.origin())
    }

    /// Whether `url` may be fetched: as an export file (`from` and `first` `None`) or as a
    /// redirect from `from` in a chain that started at `first`. In order: never from https to
    /// http; listed origins; the scheme rules of [`check_url`]; the FHIR origin; else
    /// https only, and not to a loopback, private or link-local address unless the FHIR
    /// server itself is at one. Addresses are judged here as written; a name that resolves
    /// only to such addresses is refused when it is resolved ([`GuardedResolver`]).
    pub fn check_fetch(
        &self,
        url: &Url,
        from: Option<&Url>,
        first: Option<&Url>,
        allow_insecure_http: bool,
    ) -> Result<(), String> {
        if from.is_some_and(|from| from.scheme() == "https") && url.scheme() != "https" {
            return Err(format!(
                "{} would leave https for plain http",
                endpoint(url)
            ));
        }
        // Listing an origin is the operator's explicit choice, plain http included.
        if self.is_listed(url) {
            return Ok(());
        }
        check_url(url, allow_insecure_http)?;
        let home = self.base.as_ref().or(first);
        if home.is_some_and(|home| same_origin(url, home)) {
            return Ok(());
        }
        if url.scheme() != "https" {
            return Err(format!(
                "plain http to {} is allowed only on the FHIR server's origin or an origin listed in fhir.file_origins",
                url.origin().ascii_serialization()
            ));
        }
        if is_internal(url) && !home.is_some_and(is_internal) {
            return Err(format!(
                "{} is a loopback, private or link-local address; list {} in fhir.file_origins if it is meant",
                url.host_str().unwrap_or("?"),
                url.origin().ascii_serialization()
            ));
        }
        Ok(())
    }
}

/// Whether `url`'s host is, as written, a loopback, private, link-local or unspecified
/// address (or `localhost`).
pub fn is_internal(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            domain == "localhost" || domain.ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) => is_internal_ip(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => is_internal_ip(IpAddr::V6(ip)),
        None => false,
    }
}

/// Whether `ip` is a loopback, private, link-local, unspecified or carrier-grade NAT address.
pub fn is_internal_ip(ip: IpAddr) -> bool {
    use std::net::{Ipv4Addr, Ipv6Addr};
    fn v4(ip: Ipv4Addr) -> bool {
        let [a, b, ..] = ip.octets();
        ip.is_loopback()
            || ip.is_private()
            || ip.is_link_local()
            || ip.is_unspecified()
            || ip.is_broadcast()
            // 100.64.0.0/10, carrier-grade NAT, often used inside clouds.
            || (a == 100 && (64..128).contains(&b))
    }
    fn v6(ip: Ipv6Addr) -> bool {
        let first = ip.segments()[0];
        ip.is_loopback()
            || ip.is_unspecified()
            || (first & 0xfe00) == 0xfc00
            || (first & 0xffc0) == 0xfe80
            || ip.to_ipv4_mapped().is_some_and(v4)
    }
    match ip {
        IpAddr::V4(ip) => v4(ip),
        IpAddr::V6(ip) => v6(ip),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Most bytes of an error body read: enough for any OperationOutcome's diagnostics, and a
/// 50 MB error page costs no more than this.
pub const ERROR_BODY_BYTES: usize = 4 * 1024;
/// Most bytes of a discovery document, CapabilityStatement or token response.
pub const DOCUMENT_BYTES: usize = 4 * 1024 * 1024;
/// Characters of server text kept in an error message.
pub const SERVER_TEXT_CHARS: usize = 200;

/// A response body read up to a cap.
#[derive(Debug, Clone, Default)]
pub struct CappedBody {
    pub bytes: Vec<u8>,
    /// Whether the whole body fit under the cap.
    pub complete: bool,
    /// The body's `Content-Length`, when the server sent one.
    pub declared_length: Option<u64>,
}

/// Reads at most `limit` bytes of `response`'s body. This is the one way a body is read from a
/// server (files excepted, which are streamed): nothing a server sends can make fhir-sync hold
/// more than the cap. The rest of an over-long body is never read (the connection is dropped).
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<CappedBody, reqwest::Error> {
    let declared_length = response.content_length();
    let mut bytes = Vec::with_capacity(declared_length.unwrap_or(0).min(limit as u64) as usize);
    while let Some(chunk) = response.chunk().await? {
        let room = limit - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            return Ok(CappedBody {
                bytes,
                complete: false,
                declared_length,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(CappedBody {
        bytes,
        complete: true,
        declared_length,
    })
}

/// The body of an error response, cut at [`ERROR_BODY_BYTES`]; a body that cannot be read
/// counts as empty (the status says enough).
pub async fn error_body(response: reqwest::Response) -> CappedBody {
    read_capped(response, ERROR_BODY_BYTES)
        .await
        .unwrap_or_default()
}

impl CappedBody {
    /// How much of the body was cut, for the end of a message, or `None` if nothing was.
    pub fn cut_note(&self) -> Option<String> {
        if self.complete {
            return None;
        }
        let kept = self.bytes.len() as u64;
        Some(match self.declared_length {
            Some(total) if total > kept => {
                format!("[{} of {total} bytes not read]", total - kept)
            }
            _ => format!("[cut after {kept} bytes]"),
        })
    }

    /// The first line of what the server said, for an error message: an OperationOutcome's
    /// `diagnostics` (or `details.text`), else the body's first non-blank line; on one line
    /// of at most [`SERVER_TEXT_CHARS`] characters without control characters, with a note
    /// of what was cut.
    pub fn server_said(&self) -> String {
        let text = outcome_diagnostics(&self.bytes).unwrap_or_else(|| {
            String::from_utf8_lossy(&self.bytes)
                .lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or_default()
                .to_string()
        });
        let mut said = crate::untrusted::one_line(&text, SERVER_TEXT_CHARS);
        if said.is_empty() {
            said = "no details given".into();
        }
        if let Some(note) = self.cut_note() {
            said.push(' ');
            said.push_str(&note);
        }
        said
    }
}

/// The `diagnostics` (or `details.text`) of an OperationOutcome body, joined.
fn outcome_diagnostics(body: &[u8]) -> Option<String> {
    let outcome = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    let texts: Vec<&str> = outcome["issue"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|issue| {
            issue["diagnostics"]
                .as_str()
                .or_else(|| issue["details"]["text"].as_str())
        })
        .collect();
    (!texts.is_empty()).then(|| texts.join("; "))
}

/// Where a request went, for messages: host, port and path, never the query
/// (`ehr.example.org:443/fhir/$export`).
pub fn endpoint(url: &Url) -> String {
    format!(
        "{}:{}{}",
        url.host_str().unwrap_or("?"),
        url.port_or_known_default().unwrap_or(0),
        url.path()
    )
}

/// Why a request failed before any response, with its causes: a DNS failure, a refused
/// connection, a TLS error and a timeout each read differently (`cannot connect: dns error:
/// failed to lookup address information: ...`).
pub fn failure(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else if error.is_body() || error.is_decode() {
        "the response broke off"
    } else {
        "request failed"
    };
    let mut causes: Vec<String> = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        // hyper and reqwest repeat a cause's text in their own; keep each once.
        if !causes
            .iter()
            .any(|c| c.contains(&text) || text.contains(c.as_str()))
        {
            causes.push(text);
        } else if let Some(last) = causes.last_mut()
            && text.len() > last.len()
        {
            *last = text;
        }
        source = cause.source();
    }
    let causes = crate::untrusted::one_line(&causes.join(": "), 400);
    if causes.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {causes}")
    }
}

/// Whether two URLs share scheme, host and port (the origin the bearer token belongs to).
pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.origin() == b.origin()
}

/// `base` with `path` appended to its path (`https://h/fhir` + `$export` → `https://h/fhir/$export`).
/// Unlike `Url::join`, this keeps the base's last path segment when it has no trailing slash.
pub fn append_path(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let joined = format!(
        "{}/{}",
        base.path().trim_end_matches('/'),
        path.trim_start_matches('/')
    );
    url.set_path(&joined);
    url.set_query(None);
    url
}

/// A URL fit for logs and the database: no query string (presigned URLs carry credentials
/// there), no fragment, no user info.
pub fn redacted(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_policy() {
        let cases = [
            ("https://ehr.example.org/fhir", false, true),
            ("http://127.0.0.1:8080/fhir", false, true),
            ("http://localhost/fhir", false, true),
            ("http://[::1]/fhir", false, true),
            ("http://ehr.example.org/fhir", false, false),
            ("http://ehr.example.org/fhir", true, true),
            ("ftp://ehr.example.org/fhir", true, false),
        ];
        for (url, opt_in, allowed) in cases {
            assert_eq!(
                check_url(&Url::parse(url).unwrap(), opt_in).is_ok(),
                allowed,
                "{url} opt_in={opt_in}"
            );
        }
    }

    #[test]
    fn server_text_is_one_capped_line_with_a_note_of_the_cut() {
        let body = |bytes: &[u8], complete: bool, declared_length: Option<u64>| CappedBody {
            bytes: bytes.to_vec(),
            complete,
            declared_length,
        };
        let outcome = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"bad _type"},{"code":"x","details":{"text":"also this"}}]}"#;
        let cases = [
            (
                body(outcome, true, None),
                "bad _type; also this".to_string(),
            ),
            (
                body(b"<html>\n<title>Token expired</title>", true, None),
                "<html>".to_string(),
            ),
            (
                body(b"\n\nInvalid token\nmore", true, None),
                "Invalid token".into(),
            ),
            (body(b"", true, None), "no details given".into()),
            (
                body(b"xxxx", false, Some(50_000_000)),
                "xxxx [49999996 of 50000000 bytes not read]".into(),
            ),
            (
                body(b"xxxx", false, None),
                "xxxx [cut after 4 bytes]".into(),
            ),
            (
                body("\u{1b}[2Jwiped".as_bytes(), true, None),
                "[2Jwiped".into(),
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(body.server_said(), expected);
        }
        let long = body("é".repeat(1000).as_bytes(), true, None);
        assert_eq!(long.server_said().chars().count(), SERVER_TEXT_CHARS + 1);
    }

    #[test]
    fn endpoints_name_host_port_and_path_only() {
        let url = Url::parse("https://u:p@ehr.example.org/fhir/$export?_type=Patient").unwrap();
        assert_eq!(endpoint(&url), "ehr.example.org:443/fhir/$export");
    }

    #[test]
    fn where_files_and_redirects_may_go() {
        let url = |s: &str| Url::parse(s).unwrap();
        let public = OriginPolicy::for_job(
            &url("https://ehr.example.org/fhir"),
            &[url("http://files.internal:8080")],
        );
        let local = OriginPolicy::for_job(&url("http://127.0.0.1:8080/fhir"), &[]);
        let https = url("https://ehr.example.org/fhir");
        let cases: &[(&OriginPolicy, &str, Option<&Url>, bool)] = &[
            (&public, "https://ehr.example.org/files/1", None, true),
            (&public, "https://s3.example.com/b/1?sig=x", None, true),
            (&public, "http://files.internal:8080/1", None, true),
            (&public, "https://127.0.0.1/1", None, false),
            (&public, "https://10.0.0.5/1", None, false),
            (&public, "https://169.254.169.254/latest", None, false),
            (&public, "https://[::1]/1", None, false),
            (&public, "https://[fd00::1]/1", None, false),
            (&public, "https://localhost/1", None, false),
            (&public, "http://127.0.0.1:5432/", None, false),
            (&public, "http://ehr.example.org/fhir", Some(&https), false),
            (&local, "http://127.0.0.1:8080/files/1", None, true),
            (&local, "http://127.0.0.1:5432/", None, false),
            (&local, "https://127.0.0.1:8443/files/1", None, true),
        ];
        for (policy, target, from, allowed) in cases {
            assert_eq!(
                policy.check_fetch(&url(target), *from, None, false).is_ok(),
                *allowed,
                "{target}"
            );
        }
        // Without a job, the first URL of the chain is the home origin.
        let first = url("http://127.0.0.1:8080/fhir/x");
        let unknown = OriginPolicy::default();
        assert!(
            unknown
                .check_fetch(
                    &url("http://127.0.0.1:8080/y"),
                    Some(&first),
                    Some(&first),
                    false
                )
                .is_ok()
        );
        assert!(
            unknown
                .check_fetch(
                    &url("http://127.0.0.1:5432/"),
                    Some(&first),
                    Some(&first),
                    false
                )
                .is_err()
        );
    }

    #[test]
    fn redaction_drops_query_and_credentials() {
        let url =
            Url::parse("https://u:p@files.example.org/a.ndjson?X-Amz-Signature=secret#x").unwrap();
        assert_eq!(redacted(&url), "https://files.example.org/a.ndjson");
    }

    #[test]
    fn append_keeps_the_base_path() {
        for base in [
            "https://h.example/apis/fhir",
            "https://h.example/apis/fhir/",
        ] {
            let url = append_path(
                &Url::parse(base).unwrap(),
                ".well-known/smart-configuration",
            );
            assert_eq!(
                url.as_str(),
                "https://h.example/apis/fhir/.well-known/smart-configuration"
            );
        }
        assert_eq!(
            append_path(&Url::parse("https://h.example").unwrap(), "$export").as_str(),
            "https://h.example/$export"
        );
    }

    #[test]
    fn origins() {
        let a = Url::parse("https://ehr.example.org/fhir").unwrap();
        assert!(same_origin(
            &a,
            &Url::parse("https://ehr.example.org/files/1").unwrap()
        ));
        assert!(!same_origin(
            &a,
            &Url::parse("https://ehr.example.org:8443/fhir").unwrap()
        ));
        assert!(!same_origin(
            &a,
            &Url::parse("https://cdn.example.org/fhir").unwrap()
        ));
    }

    fn addr(ip: &str) -> std::net::SocketAddr {
        std::net::SocketAddr::new(ip.parse().unwrap(), 0)
    }

    fn no_lookup(
        _: String,
    ) -> futures::future::BoxFuture<'static, std::io::Result<Vec<std::net::SocketAddr>>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn resolver(base: &str, listed: &[&str]) -> GuardedResolver {
        let listed: Vec<Url> = listed.iter().map(|u| Url::parse(u).unwrap()).collect();
        GuardedResolver::new(
            OriginPolicy::for_job(&Url::parse(base).unwrap(), &listed),
            no_lookup,
        )
    }

    #[test]
    fn a_file_host_that_resolves_only_inside_is_refused_naming_the_setting() {
        let guard = resolver("https://ehr.example.org/fhir", &[]);
        for inside in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.9",
            "169.254.169.254",
            "::1",
            "fd00::1",
        ] {
            let error = guard
                .judge("files.example.net", vec![addr(inside)])
                .unwrap_err();
            assert!(error.contains("fhir.file_origins"), "{inside}: {error}");
        }
        // A name with public and internal addresses keeps the public ones only.
        assert_eq!(
            guard.judge(
                "files.example.net",
                vec![addr("10.0.0.1"), addr("93.184.216.34")]
            ),
            Ok(vec![addr("93.184.216.34")])
        );
    }

    #[test]
    fn the_fhir_host_and_listed_hosts_resolve_as_they_are() {
        let guard = resolver(
            "https://ehr.example.org/fhir",
            &["https://storage.hospital.internal:8443"],
        );
        assert_eq!(
            guard.judge("storage.hospital.internal", vec![addr("10.9.9.9")]),
            Ok(vec![addr("10.9.9.9")])
        );
        assert!(
            guard
                .judge("files.example.net", vec![addr("10.9.9.9")])
                .is_err(),
            "another host is still judged"
        );
        // The FHIR server resolving inside puts it at an internal address: its files may be
        // at one too, as for a base URL written with an internal address.
        assert_eq!(
            guard.judge("EHR.example.org", vec![addr("10.0.0.2")]),
            Ok(vec![addr("10.0.0.2")])
        );
        assert_eq!(
            guard.judge("files.example.net", vec![addr("10.0.0.3")]),
            Ok(vec![addr("10.0.0.3")])
        );
    }

    #[test]
    fn a_client_that_knows_no_job_or_an_internal_base_resolves_as_is() {
        let guard = GuardedResolver::new(OriginPolicy::default(), no_lookup);
        assert_eq!(
            guard.judge("anything.example", vec![addr("127.0.0.1")]),
            Ok(vec![addr("127.0.0.1")])
        );
        let guard = resolver("http://127.0.0.1:8080/fhir", &[]);
        assert_eq!(
            guard.judge("files.example.net", vec![addr("127.0.0.1")]),
            Ok(vec![addr("127.0.0.1")])
        );
    }
}
