//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`,
//! one per secret, space-separated (so a receiver can rotate keys).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Secrets from `HOOKFLEET_SIGNING_SECRET`: space-separated, each `whsec_<base64>` or raw bytes.
pub fn parse_secrets(s: &str) -> Result<Vec<Vec<u8>>, String> {
    s.split_whitespace()
        .map(|one| match one.strip_prefix("whsec_") {
            Some(b64) => STANDARD
                .decode(b64)
                .map_err(|_| "a whsec_ secret is not valid base64".to_owned()),
            None => Ok(one.as_bytes().to_vec()),
        })
        .collect()
}

/// Signs with every secret. Each key's HMAC state (the key hashed into its inner and outer pads) is
/// computed once, at start, and cloned for each message.
#[derive(Clone)]
pub struct Signer {
    keys: Vec<Hmac<Sha256>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("keys", &self.keys.len()).finish()
    }
}

impl Signer {
    /// `None` without secrets: nothing is signed.
    pub fn new(secrets: &[Vec<u8>]) -> Option<Self> {
        (!secrets.is_empty()).then(|| Self {
            keys: secrets
                .iter()
                .map(|key| Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length"))
                .collect(),
        })
    }

    /// The `webhook-signature` header value for one delivery attempt; `timestamp` is the text of its
    /// `webhook-timestamp` header (formatted once, for both).
    pub fn sign(&self, id: &str, timestamp: &str, body: &[u8]) -> String {
        // "v1," and 44 base64 characters per key, a space between.
        let mut out = String::with_capacity(self.keys.len() * 48);
        for (i, key) in self.keys.iter().enumerate() {
            let mut mac = key.clone();
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.as_bytes());
            mac.update(b".");
            mac.update(body);
            if i > 0 {
                out.push(' ');
            }
            out.push_str("v1,");
            STANDARD.encode_string(mac.finalize().into_bytes(), &mut out);
        }
        out
    }
}

/// The `webhook-signature` header value for one delivery attempt (empty without secrets).
pub fn signature(secrets: &[Vec<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    Signer::new(secrets).map_or_else(String::new, |s| s.sign(id, &timestamp.to_string(), body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference libraries.
    #[test]
    fn matches_the_standard_webhooks_example() {
        let secrets = parse_secrets("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = signature(
            &secrets,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn several_secrets_give_several_signatures() {
        let secrets = parse_secrets("raw-one whsec_c2Vjb25k").unwrap();
        assert_eq!(secrets[1], b"second");
        let sig = signature(&secrets, "id", 1, b"{}");
        assert_eq!(sig.split(' ').count(), 2);
        assert!(sig.split(' ').all(|s| s.starts_with("v1,")));
        assert!(parse_secrets("whsec_!!!").is_err());
    }

    /// The signer's keyed states, cloned per message, give each key's own signature, in order, and
    /// stay unchanged by signing (the second message signs like a fresh signer would).
    #[test]
    fn a_signer_signs_like_one_hmac_per_key() {
        let secrets = parse_secrets("raw-one whsec_c2Vjb25k").unwrap();
        let signer = Signer::new(&secrets).expect("two keys");
        let one = |key: &[u8], body: &[u8]| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
            mac.update(b"id-9.-42.");
            mac.update(body);
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
        };
        for body in [&b"{}"[..], b"second body"] {
            assert_eq!(
                signer.sign("id-9", "-42", body),
                format!("{} {}", one(&secrets[0], body), one(&secrets[1], body))
            );
        }
        assert!(Signer::new(&[]).is_none());
        assert_eq!(signature(&[], "id", 1, b"{}"), "");
    }
}
