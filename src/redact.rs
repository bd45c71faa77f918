//! Keeps credentials out of everything `archiver` prints: URIs shown in logs and errors have their
//! password replaced, and any text about to be displayed can be scrubbed of known secrets.

use std::sync::{Mutex, OnceLock};

/// What a password is replaced with.
pub const MASK: &str = "***";

/// Secrets seen in configured URIs, so that error text from the driver (which may quote a URI)
/// can be scrubbed before it is printed.
fn known_secrets() -> &'static Mutex<Vec<String>> {
    static SECRETS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    SECRETS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Returns `uri` with the password of its user info replaced by `***`.
///
/// Works on anything shaped like `scheme://user:password@hosts/...`, including passwords that
/// were not percent-encoded as they should be; a URI without a password is returned unchanged.
pub fn redact_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return uri.to_owned();
    };
    let authority_start = scheme_end + 3;
    let rest = &uri[authority_start..];
    let Some(at) = user_info_end(rest) else {
        return uri.to_owned();
    };
    let user_info = &rest[..at];
    match user_info.find(':') {
        Some(colon) => format!(
            "{}{}:{}{}",
            &uri[..authority_start],
            &user_info[..colon],
            MASK,
            &rest[at..]
        ),
        None => uri.to_owned(),
    }
}

/// Finds the `@` that ends the user info: the last one before the path or options, or, when a
/// careless password holds a `/` or `?`, the last one before the options.
fn user_info_end(rest: &str) -> Option<usize> {
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    rest[..authority_end].rfind('@').or_else(|| {
        let options_start = rest.find('?').unwrap_or(rest.len());
        rest[..options_start].rfind('@')
    })
}

/// Extracts the password of a URI, raw and percent-decoded, if it has one.
fn uri_password(uri: &str) -> Option<String> {
    let rest = &uri[uri.find("://")? + 3..];
    let user_info = &rest[..user_info_end(rest)?];
    let password = &user_info[user_info.find(':')? + 1..];
    (!password.is_empty()).then(|| password.to_owned())
}

/// Remembers the password of `uri` so that [`scrub`] removes it from any text.
pub fn register_uri(uri: &str) {
    if let Some(password) = uri_password(uri) {
        let decoded = percent_decode(&password);
        let mut secrets = known_secrets().lock().unwrap_or_else(|e| e.into_inner());
        for secret in [password, decoded] {
            if !secrets.contains(&secret) {
                secrets.push(secret);
            }
        }
        // Longest first, so that a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Returns `text` with every URI password redacted and every registered secret masked.
pub fn scrub(text: &str) -> String {
    let mut out = redact_uris_in_text(text);
    let secrets = known_secrets().lock().unwrap_or_else(|e| e.into_inner());
    for secret in secrets.iter() {
        out = out.replace(secret.as_str(), MASK);
    }
    out
}

/// Redacts every `mongodb://` or `mongodb+srv://` URI found inside free text.
fn redact_uris_in_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("mongodb") {
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        let end = candidate
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '`')
            .unwrap_or(candidate.len());
        let token = &candidate[..end];
        if token.starts_with("mongodb://") || token.starts_with("mongodb+srv://") {
            out.push_str(&redact_uri(token));
        } else {
            out.push_str(token);
        }
        rest = &candidate[end..];
        if end == 0 {
            // `find` matched at a boundary we did not consume; move past it.
            out.push_str(&rest[..1]);
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() && s.is_char_boundary(i + 3) {
            if let Ok(byte) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_and_keeps_the_rest() {
        assert_eq!(
            redact_uri("mongodb://alice:s3cret@db1:27017,db2/livraison?replicaSet=rs0"),
            "mongodb://alice:***@db1:27017,db2/livraison?replicaSet=rs0"
        );
        assert_eq!(
            redact_uri("mongodb+srv://bob:p%40ss@cluster.example.net/?retryWrites=true"),
            "mongodb+srv://bob:***@cluster.example.net/?retryWrites=true"
        );
    }

    #[test]
    fn leaves_uris_without_password_alone() {
        for uri in ["mongodb://localhost:27017", "mongodb://user@host/db", "not a uri"] {
            assert_eq!(redact_uri(uri), uri);
        }
    }

    #[test]
    fn handles_unencoded_characters_in_password() {
        assert_eq!(redact_uri("mongodb://u:a/b@c@host/db"), "mongodb://u:***@host/db");
    }

    #[test]
    fn scrub_masks_uris_and_registered_secrets() {
        register_uri("mongodb://carol:hunter%2142@h/");
        let text = "failed to connect to mongodb://carol:hunter%2142@h/ (password hunter!42)";
        let scrubbed = scrub(text);
        assert!(!scrubbed.contains("hunter"), "{scrubbed}");
        assert!(scrubbed.contains("mongodb://carol:***@h/"), "{scrubbed}");
    }
}
