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

/// Builds the client for one job. Redirects are followed (at most 5) only to URLs the same
/// policy allows.
pub fn client(options: HttpOptions) -> anyhow::Result<reqwest::Client> {
    let allow_insecure_http = options.allow_insecure_http;
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 5 {
            attempt.error("too many redirects")
        } else if let Err(message) = check_url(attempt.url(), allow_insecure_http) {
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

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
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
}
