//! The little of the W3C WebDriver protocol the status page test speaks to chromedriver: a
//! session, navigation, finding elements and reading them, running a script.
//!
//! Written here rather than taken from a WebDriver crate because the one in use (fantoccini)
//! pulled in a second ICU with its proc macros, whose extra `syn` features made `cargo test`
//! rebuild about a hundred crates right after `cargo run` had built them. Each call is one
//! HTTP request with a JSON body; errors carry the driver's own message.

use serde::Serialize;
use serde_json::{Value, json};

/// The key under which WebDriver names an element (W3C WebDriver, "web element identifier").
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How to find elements; only CSS selectors are needed.
pub enum Locator<'a> {
    Css(&'a str),
}

/// A WebDriver session.
pub struct Client {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    session: String,
}

/// An element found on the current page.
pub struct Element<'a> {
    client: &'a Client,
    id: String,
}

/// What went wrong, as the driver said it.
#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Element<'_> {
    /// As a script argument: the element reference the driver handed out.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        json!({ ELEMENT_KEY: self.id }).serialize(serializer)
    }
}

/// The `value` of a WebDriver response, or the driver's error message.
async fn value(request: reqwest::RequestBuilder) -> Result<Value, Error> {
    let response = request
        .send()
        .await
        .map_err(|e| Error(format!("no answer from the driver: {e}")))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|e| Error(format!("the driver's answer is not JSON: {e}")))?;
    let value = body.get("value").cloned().unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(Error(format!(
            "HTTP {status}: {} {}",
            value["error"].as_str().unwrap_or(""),
            value["message"].as_str().unwrap_or("")
        )));
    }
    Ok(value)
}

fn string(value: Value) -> Result<String, Error> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(Error(format!(
            "expected a string from the driver, got {other}"
        ))),
    }
}

impl Client {
    /// Opens a session on the driver at `url` with these capabilities (`alwaysMatch`).
    pub async fn connect(
        url: &str,
        capabilities: serde_json::Map<String, Value>,
    ) -> Result<Client, Error> {
        let http = reqwest::Client::new();
        let created = value(
            http.post(format!("{url}/session"))
                .json(&json!({ "capabilities": { "alwaysMatch": capabilities } })),
        )
        .await?;
        let id = string(created["sessionId"].clone())?;
        Ok(Client {
            http,
            session: format!("{url}/session/{id}"),
        })
    }

    pub async fn goto(&self, url: &str) -> Result<(), Error> {
        value(
            self.http
                .post(format!("{}/url", self.session))
                .json(&json!({ "url": url })),
        )
        .await
        .map(drop)
    }

    pub async fn title(&self) -> Result<String, Error> {
        string(value(self.http.get(format!("{}/title", self.session))).await?)
    }

    /// The page's current markup.
    pub async fn source(&self) -> Result<String, Error> {
        string(value(self.http.get(format!("{}/source", self.session))).await?)
    }

    /// Runs `script` as a function body with `args` as `arguments`; returns what it returns.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value, Error> {
        value(
            self.http
                .post(format!("{}/execute/sync", self.session))
                .json(&json!({ "script": script, "args": args })),
        )
        .await
    }

    pub async fn find(&self, locator: Locator<'_>) -> Result<Element<'_>, Error> {
        let Locator::Css(css) = locator;
        let found = value(
            self.http
                .post(format!("{}/element", self.session))
                .json(&json!({ "using": "css selector", "value": css })),
        )
        .await?;
        self.element(found)
    }

    pub async fn find_all(&self, locator: Locator<'_>) -> Result<Vec<Element<'_>>, Error> {
        let Locator::Css(css) = locator;
        let found = value(
            self.http
                .post(format!("{}/elements", self.session))
                .json(&json!({ "using": "css selector", "value": css })),
        )
        .await?;
        match found {
            Value::Array(elements) => elements.into_iter().map(|e| self.element(e)).collect(),
            other => Err(Error(format!("expected a list of elements, got {other}"))),
        }
    }

    fn element(&self, reference: Value) -> Result<Element<'_>, Error> {
        Ok(Element {
            client: self,
            id: string(reference[ELEMENT_KEY].clone())?,
        })
    }

    /// Ends the session; chromedriver then quits the browser.
    pub async fn close(self) -> Result<(), Error> {
        value(self.http.delete(&self.session)).await.map(drop)
    }
}

impl Element<'_> {
    fn url(&self, what: &str) -> String {
        format!("{}/element/{}/{what}", self.client.session, self.id)
    }

    /// The element's visible text.
    pub async fn text(&self) -> Result<String, Error> {
        string(value(self.client.http.get(self.url("text"))).await?)
    }

    /// An attribute's value; `None` when the element has no such attribute.
    pub async fn attr(&self, name: &str) -> Result<Option<String>, Error> {
        match value(self.client.http.get(self.url(&format!("attribute/{name}")))).await? {
            Value::Null => Ok(None),
            other => string(other).map(Some),
        }
    }

    /// A CSS property's computed value, e.g. `rgba(207, 34, 46, 1)`.
    pub async fn css_value(&self, property: &str) -> Result<String, Error> {
        string(value(self.client.http.get(self.url(&format!("css/{property}")))).await?)
    }
}
