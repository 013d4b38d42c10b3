//! Flight SQL's authentication: basic (any user name, the server's password) at the handshake
//! or on any call, then the bearer token the handshake gave; password checks are few at a
//! time, and a wrong password is answered late.

use std::pin::Pin;
use std::time::{Duration, Instant};

use arrow_flight::{HandshakeRequest, HandshakeResponse};
use base64::Engine;
use futures::Stream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use super::conn::{admitted, logged_in};
use super::{expire, lock, Flight, FlightResult, IDLE_TTL, MAX_TOKENS};

/// How many password checks run at once (each is thousands of HMACs, off the async workers),
/// and how long a wrong password waits for its answer: guessing is slow and cannot starve
/// the queries.
pub(super) const PASSWORD_CHECKS: usize = 2;
const WRONG_PASSWORD_DELAY: Duration = Duration::from_millis(500);

impl Flight {
    /// Admits a request that carries a bearer token from a handshake or the password (basic).
    pub(super) async fn check<T>(&self, request: &Request<T>) -> std::result::Result<(), Status> {
        self.authenticate(request).await?;
        logged_in(request);
        Ok(())
    }

    /// [`Flight::check`] but for recording the login.
    async fn authenticate<T>(&self, request: &Request<T>) -> std::result::Result<(), Status> {
        admitted(request)?;
        if self.password.is_none() {
            return Ok(());
        }
        let refused = || {
            Status::unauthenticated(
                "this server takes a password: log in with basic authentication (any user \
                 name, the server's password) or send the bearer token the handshake gave",
            )
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(refused)?;
        if let Some(token) = header.strip_prefix("Bearer ") {
            let mut tokens = lock(&self.tokens);
            return match tokens.get_mut(token.trim()) {
                Some(used) if used.elapsed() < IDLE_TTL => {
                    *used = Instant::now();
                    Ok(())
                }
                _ => Err(refused()),
            };
        }
        match header.strip_prefix("Basic ").and_then(basic_password) {
            Some(password) => match self.verify(password).await {
                true => Ok(()),
                false => Err(refused()),
            },
            None => Err(refused()),
        }
    }

    /// True when `password` is the server's; checked off the async workers, a few at a time,
    /// and a wrong one answered late.
    async fn verify(&self, password: String) -> bool {
        let Some(secret) = self.password.clone() else {
            return true;
        };
        let right = {
            let _turn = self.checking.acquire().await;
            tokio::task::spawn_blocking(move || secret.verify(&password))
                .await
                .unwrap_or(false)
        };
        if !right {
            tokio::time::sleep(WRONG_PASSWORD_DELAY).await;
        }
        right
    }

    /// A new bearer token.
    fn new_token(&self) -> String {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut tokens = lock(&self.tokens);
        expire(&mut tokens, IDLE_TTL, MAX_TOKENS, |at| *at);
        tokens.insert(token.clone(), Instant::now());
        token
    }

    /// Answers a handshake: with a password, checks it (basic authentication) and gives a new
    /// bearer token, in the reply's payload and its `authorization` header.
    pub(super) async fn answer_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> FlightResult<Response<Pin<Box<dyn Stream<Item = FlightResult<HandshakeResponse>> + Send>>>>
    {
        admitted(&request)?;
        let token = match &self.password {
            None => String::new(),
            Some(_) => {
                let password = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|h| h.strip_prefix("Basic "))
                    .and_then(basic_password);
                let right = match password {
                    Some(p) => self.verify(p).await,
                    None => false,
                };
                if !right {
                    return Err(Status::unauthenticated(
                        "password authentication failed: give the server's password (basic \
                         authentication, any user name)",
                    ));
                }
                self.new_token()
            }
        };
        logged_in(&request);
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into_bytes().into(),
        };
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(futures::stream::iter([Ok(reply)])));
        if !token.is_empty() {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|e| Status::internal(e.to_string()))?;
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }
}

/// The password of a basic `authorization` header's credentials (`user:password`, base64).
fn basic_password(credentials: &str) -> Option<String> {
    // With or without padding: Go's Flight client (ADBC) sends it unpadded.
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let decoded = engine.decode(credentials.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, p)| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_give_their_password() {
        let header = base64::engine::general_purpose::STANDARD.encode("analyst:s3cret:x");
        assert_eq!(basic_password(&header).as_deref(), Some("s3cret:x"));
        let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode("analyst:s3cret");
        assert_eq!(basic_password(&unpadded).as_deref(), Some("s3cret"));
        assert_eq!(basic_password("not base64!"), None);
    }
}
