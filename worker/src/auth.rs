//! Credentials on outgoing calls: the `Authorization` header of basic and bearer auth (built once, from
//! variables the kubelet fills from Secrets), and OAuth2 client credentials: a token fetched from the
//! token endpoint, cached until shortly before it expires, shared by every delivery, refreshed by one of
//! them at a time, and dropped when the destination answers 401 to it.
//!
//! OAuth2 is written on the worker's own reqwest client rather than with the `oauth2` crate: the client
//! credentials grant is one form POST and one JSON answer, and the crate would bring its own HTTP client
//! (and TLS settings) next to ours, while the token request must go through the same SSRF-guarded
//! resolver, CA bundle and client certificate as the deliveries.
//!
//! No secret reaches a log line, a `Debug` output or an error message: errors name the endpoint and
//! the status, and the `Authorization` values are marked sensitive.

use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Client, RequestBuilder, Response, Url};

/// `Authorization: Basic base64(user:password)`, marked sensitive.
pub fn basic(username: &str, password: &str) -> Result<HeaderValue, String> {
    let encoded = STANDARD.encode(format!("{username}:{password}"));
    sensitive(&format!("Basic {encoded}"))
}

/// `Authorization: Bearer <token>`, marked sensitive.
pub fn bearer(token: &str) -> Result<HeaderValue, String> {
    sensitive(&format!("Bearer {}", token.trim()))
}

fn sensitive(value: &str) -> Result<HeaderValue, String> {
    let mut v =
        HeaderValue::from_str(value).map_err(|_| "the credential is not a valid header value".to_owned())?;
    v.set_sensitive(true);
    Ok(v)
}

/// OAuth2 client credentials (RFC 6749 §4.4).
#[derive(Clone)]
pub struct OAuth2Config {
    pub token_url: Url,
    pub client_id: String,
    pub client_secret: String,
    pub scopes: Vec<String>,
}

impl fmt::Debug for OAuth2Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Config")
            .field("token_url", &self.token_url.as_str())
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// How long a token counts as valid: its lifetime less a margin (a tenth of it, between 1 s and 60 s),
/// so that no request leaves with a token about to expire in flight. A token without `expires_in` is
/// used for 5 minutes (and dropped earlier if the destination refuses it).
pub fn usable_for(expires_in: Option<u64>) -> Duration {
    let lifetime = Duration::from_secs(expires_in.unwrap_or(300));
    let margin = (lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    lifetime.saturating_sub(margin)
}

/// A failed token request: retryable (the message goes through a delay queue, never to the dead
/// letters for this).
#[derive(Clone, Debug, thiserror::Error)]
#[error("OAuth2 token endpoint {endpoint}: {problem}")]
pub struct TokenError {
    endpoint: String,
    problem: String,
}

struct Token {
    value: HeaderValue,
    valid_until: Instant,
}

/// After a failed token request, deliveries get the same error for this long instead of each asking
/// the endpoint again (a hundred in-flight deliveries must not become a hundred token requests).
const FAILURE_HOLD: Duration = Duration::from_secs(1);

/// The cached token of one worker.
pub struct TokenSource {
    cfg: OAuth2Config,
    cached: std::sync::Mutex<Option<Token>>,
    last_failure: std::sync::Mutex<Option<(Instant, TokenError)>>,
    /// One refresh at a time.
    refresh: tokio::sync::Mutex<()>,
    fetches: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    pub fn new(cfg: OAuth2Config) -> Self {
        Self {
            cfg,
            cached: std::sync::Mutex::new(None),
            last_failure: std::sync::Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
            fetches: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Token requests made so far (successful or not).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn current(&self) -> Option<HeaderValue> {
        let cached = self.cached.lock().expect("lock");
        cached
            .as_ref()
            .filter(|t| Instant::now() < t.valid_until)
            .map(|t| t.value.clone())
    }

    /// The `Authorization` value to send: the cached token, or a fresh one.
    pub async fn authorization(&self, http: &Client) -> Result<HeaderValue, TokenError> {
        if let Some(v) = self.current() {
            return Ok(v);
        }
        let _one = self.refresh.lock().await;
        // Someone else may have refreshed (or failed) while we waited.
        if let Some(v) = self.current() {
            return Ok(v);
        }
        if let Some((at, e)) = self.last_failure.lock().expect("lock").as_ref()
            && at.elapsed() < FAILURE_HOLD
        {
            return Err(e.clone());
        }
        self.fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.fetch(http).await {
            Ok(token) => {
                let value = token.value.clone();
                *self.cached.lock().expect("lock") = Some(token);
                *self.last_failure.lock().expect("lock") = None;
                Ok(value)
            }
            Err(e) => {
                *self.last_failure.lock().expect("lock") = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// The destination refused `used` (401): forget it, unless a newer token already replaced it.
    pub fn invalidate(&self, used: &HeaderValue) {
        let mut cached = self.cached.lock().expect("lock");
        if cached.as_ref().is_some_and(|t| t.value == *used) {
            *cached = None;
        }
    }

    async fn fetch(&self, http: &Client) -> Result<Token, TokenError> {
        let fail = |problem: String| TokenError {
            endpoint: self.cfg.token_url.to_string(),
            problem,
        };
        // client_secret_basic: id and secret form-urlencoded, then HTTP Basic (RFC 6749 §2.3.1).
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let credentials = basic(&enc(&self.cfg.client_id), &enc(&self.cfg.client_secret)).map_err(fail)?;
        let form = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            if !self.cfg.scopes.is_empty() {
                form.append_pair("scope", &self.cfg.scopes.join(" "));
            }
            form.finish()
        };
        let started = Instant::now();
        let resp = http
            .post(self.cfg.token_url.clone())
            .header(AUTHORIZATION, credentials)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| fail(crate::outcome::error_chain(&e)))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| fail(format!("reading the answer: {e}")))?;
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            // RFC 6749 §5.2: `error` is a code, safe to show; the rest of the body is not echoed.
            let code = json
                .get("error")
                .and_then(|e| e.as_str())
                .map(|e| format!(" ({})", e.chars().take(64).collect::<String>()))
                .unwrap_or_default();
            return Err(fail(format!("answered {status}{code}")));
        }
        let token = json
            .get("access_token")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail(format!("answered {status} without an access_token")))?;
        if let Some(kind) = json.get("token_type").and_then(|t| t.as_str())
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(fail(format!("token_type {kind:?} is not Bearer")));
        }
        let expires_in = json
            .get("expires_in")
            .and_then(|e| e.as_u64().or_else(|| e.as_str().and_then(|s| s.parse().ok())));
        Ok(Token {
            value: bearer(token).map_err(fail)?,
            valid_until: started + usable_for(expires_in),
        })
    }
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

/// Sends `req`, with a token from `tokens` when OAuth2 is configured. A 401 drops the token it was
/// sent with and the request is sent once more with a fresh one; a second 401 is the answer.
pub async fn send(
    http: &Client,
    tokens: Option<&TokenSource>,
    req: RequestBuilder,
) -> Result<Response, SendError> {
    let Some(tokens) = tokens else {
        return Ok(req.send().await?);
    };
    let again = req.try_clone();
    let token = tokens.authorization(http).await?;
    let resp = req.header(AUTHORIZATION, token.clone()).send().await?;
    match again {
        Some(again) if resp.status() == reqwest::StatusCode::UNAUTHORIZED => {
            tokens.invalidate(&token);
            let fresh = tokens.authorization(http).await?;
            Ok(again.header(AUTHORIZATION, fresh).send().await?)
        }
        _ => Ok(resp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins() {
        assert_eq!(usable_for(Some(3600)), Duration::from_secs(3540));
        assert_eq!(usable_for(Some(100)), Duration::from_secs(90));
        assert_eq!(usable_for(Some(5)), Duration::from_secs(4));
        assert_eq!(usable_for(Some(0)), Duration::ZERO);
        assert_eq!(usable_for(None), Duration::from_secs(270));
    }

    #[test]
    fn headers_are_sensitive_and_debug_is_redacted() {
        let b = basic("user", "p@ss").unwrap();
        assert!(b.is_sensitive());
        assert_eq!(b.to_str().unwrap(), "Basic dXNlcjpwQHNz");
        assert!(format!("{b:?}").contains("Sensitive"));
        assert!(bearer("t0k").unwrap().is_sensitive());
        let cfg = OAuth2Config {
            token_url: Url::parse("https://login.example/token").unwrap(),
            client_id: "the-id".into(),
            client_secret: "s3cret".into(),
            scopes: vec!["a".into()],
        };
        let shown = format!("{:?}", TokenSource::new(cfg));
        assert!(!shown.contains("s3cret") && !shown.contains("the-id"), "{shown}");
    }
}
