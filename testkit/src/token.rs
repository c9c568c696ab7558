//! An OAuth2 token endpoint for tests (client credentials grant, RFC 6749 §4.4): a small HTTP/1.1
//! server on a free loopback port that answers each token request as told (a token with its lifetime,
//! or an error status) and records each request (its `Authorization` and its form body).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the endpoint answers the next requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenAnswer {
    /// 200 with `{"access_token": token, "token_type": "Bearer", "expires_in": expires_in}`.
    Token { token: String, expires_in: u64 },
    /// This status with `{"error": "temporarily_unavailable"}`.
    Status(u16),
}

/// One token request as the endpoint saw it.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub authorization: Option<String>,
    pub body: String,
}

#[derive(Default)]
struct State {
    answer: Option<TokenAnswer>,
    requests: Vec<TokenRequest>,
}

/// A running token endpoint; stops when dropped.
pub struct TokenEndpoint {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenEndpoint {
    pub async fn start(answer: TokenAnswer) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the token endpoint")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            answer: Some(answer),
            requests: Vec::new(),
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = serve(sock, st).await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}/oauth2/token", self.addr)
    }

    pub fn set_answer(&self, answer: TokenAnswer) {
        self.state.lock().unwrap().answer = Some(answer);
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.lock().unwrap().requests.clone()
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut sock: TcpStream, st: Arc<Mutex<State>>) -> Result<()> {
    let mut buf = Vec::new();
    loop {
        // One request per read loop: head, then Content-Length bytes of body.
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let header = |name: &str| {
            head.split("\r\n").skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        while buf.len() < head_end + 4 + len {
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&buf[head_end + 4..head_end + 4 + len]).into_owned();
        buf.drain(..head_end + 4 + len);
        let answer = {
            let mut s = st.lock().unwrap();
            s.requests.push(TokenRequest {
                authorization: header("authorization"),
                body,
            });
            s.answer.clone()
        };
        let (status, json) = match answer {
            Some(TokenAnswer::Token { token, expires_in }) => (
                200,
                format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{expires_in}}}"#),
            ),
            Some(TokenAnswer::Status(s)) => (s, r#"{"error":"temporarily_unavailable"}"#.to_owned()),
            None => (500, "{}".to_owned()),
        };
        let resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
            json.len()
        );
        sock.write_all(resp.as_bytes()).await?;
    }
}
