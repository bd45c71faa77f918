//! Keeps credentials out of everything `archiver` prints: URIs shown in logs and errors have their
//! password and credential-bearing options replaced, URIs that cannot be parsed are cut down to
//! their host list, and any text about to be displayed can be scrubbed of known secrets.
//!
//! The splitting here is deliberately more suspicious than the driver's: it must stay safe on
//! malformed URIs (an unencoded `?`, `/`, `@`, `#` or `:` in a password), because those are
//! exactly the ones that end up in error messages.

use std::sync::{Mutex, OnceLock};

/// What a password or a credential-bearing option value is replaced with.
pub const MASK: &str = "***";

/// Shown in place of a value that is not a URI at all (no `scheme://`): with nothing to tell a
/// host from a password, no part of it is printed.
pub const NOT_A_URI: &str = "<not a mongodb:// URI; value not shown>";

/// Pieces of a secret at least this long are registered on their own, so that an error quoting
/// only part of a malformed password (cut at a `?` or `@` by the driver) is still scrubbed.
/// Shorter pieces would mask ordinary words.
const MIN_PIECE_LEN: usize = 4;

/// Secrets seen in configured URIs, so that error text from the driver (which may quote a URI or
/// just a value) can be scrubbed before it is printed.
fn known_secrets() -> &'static Mutex<Vec<String>> {
    static SECRETS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    SECRETS.get_or_init(|| Mutex::new(Vec::new()))
}

/// A connection string split as far as redaction needs: every part is a slice of the original.
#[derive(Debug, PartialEq, Eq)]
struct UriParts<'a> {
    scheme: &'a str,
    /// Everything between `://` and the `@` that ends the user info.
    user_info: Option<&'a str>,
    /// The host list, up to the first `/` or `?` after the user info.
    hosts: &'a str,
    /// The `/database` part, with its slash, or empty.
    path: &'a str,
    /// What follows the `?` that starts the options.
    options: Option<&'a str>,
}

/// Splits `uri`, or `None` when it has no plausible `scheme://` (then the "scheme" could itself be
/// `user:password@host`).
fn split_uri(uri: &str) -> Option<UriParts<'_>> {
    let (scheme, rest) = uri.split_once("://")?;
    let scheme_ok =
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return None;
    }
    let (user_info, after_user) = match user_info_end(rest) {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let hosts_end = after_user.find(['/', '?']).unwrap_or(after_user.len());
    let (hosts, tail) = after_user.split_at(hosts_end);
    let (path, options) = match tail.split_once('?') {
        Some((path, options)) => (path, Some(options)),
        None => (tail, None),
    };
    Some(UriParts { scheme, user_info, hosts, path, options })
}

/// Finds the `@` that ends the user info, in the text after `://`.
///
/// The user info ends at the last `@` before the host list. Since a careless password may hold
/// `?`, `/`, `#` or `@`, and an option value may hold `@`, there are two readings, and the later
/// `@` of the two wins (it masks more):
/// - the driver's: the last `@` before the first `?`;
/// - the last `@` followed by something shaped like a host list (up to the next `/`, `?` or the
///   end), which finds the host after a password such as `p?ss`.
///
/// When neither applies (every `@` is after a `?` and none is followed by a host list), the last
/// `@` is taken anyway: over-masking an odd option is better than printing a password.
fn user_info_end(rest: &str) -> Option<usize> {
    let options_start = rest.find('?').unwrap_or(rest.len());
    let drivers = rest[..options_start].rfind('@');
    let before_hosts = rest.rmatch_indices('@').map(|(at, _)| at).find(|&at| {
        let after = &rest[at + 1..];
        is_host_list(&after[..after.find(['/', '?']).unwrap_or(after.len())])
    });
    drivers.max(before_hosts).or_else(|| rest.rfind('@'))
}

/// Whether `text` could be a host list: comma-separated host names, IPv4 or bracketed IPv6
/// literals or percent-encoded socket paths, each with an optional numeric port. The port must be
/// digits so that `user:password` is never taken for `host:port`.
fn is_host_list(text: &str) -> bool {
    let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '%');
    let port_ok = |port: &str| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    text.split(',').all(|host| match host.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((ip, after)) => {
                let ip_ok = ip.chars().all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.' | '%'));
                let after_ok = match after.strip_prefix(':') {
                    Some(port) => port_ok(port),
                    None => after.is_empty(),
                };
                ip_ok && after_ok
            }
            None => false,
        },
        None => match host.split_once(':') {
            Some((name, port)) => name.chars().all(name_char) && port_ok(port),
            None => host.chars().all(name_char),
        },
    })
}

/// Whether the option `key` carries a credential, so that its value is never shown.
fn is_secret_option(key: &str) -> bool {
    let key = percent_decode(key).to_ascii_lowercase();
    key == "authmechanismproperties" || ["password", "secret", "token"].iter().any(|word| key.contains(word))
}

/// The user info as it may be shown: the user name and a masked password. A user name holding a
/// character that cannot be in a well-formed one (`/`, `?`, `#`, `@`) means the split is in
/// doubt, so the whole user info is masked.
fn shown_user_info(user_info: &str) -> String {
    let (user, password) = match user_info.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (user_info, None),
    };
    if user.contains(['/', '?', '#', '@']) {
        return format!("{MASK}@");
    }
    match password {
        Some(_) => format!("{user}:{MASK}@"),
        None => format!("{user}@"),
    }
}

/// The host list as it may be shown: as is when it looks like one, masked otherwise (it may then
/// be the tail of a password).
fn shown_hosts(hosts: &str) -> &str {
    if is_host_list(hosts) {
        hosts
    } else {
        MASK
    }
}

/// The options with every credential-bearing value masked. A piece without `=` is not an option
/// (most likely the rest of a value that held an unencoded `&`), so it is masked too.
fn shown_options(options: &str) -> String {
    options
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret_option(key) => format!("{key}={MASK}"),
            Some(_) => pair.to_owned(),
            None if pair.is_empty() => String::new(),
            None => MASK.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Returns `uri` with the password of its user info and the values of its credential-bearing
/// options (`tlsCertificateKeyFilePassword`, `proxyPassword`, `authMechanismProperties`, and any
/// option whose name holds `password`, `secret` or `token`) replaced by [`MASK`].
///
/// Works on malformed URIs too, including passwords that were not percent-encoded as they should
/// be. A value without `scheme://` is not shown at all ([`NOT_A_URI`]).
pub fn redact_uri(uri: &str) -> String {
    let Some(parts) = split_uri(uri) else {
        return NOT_A_URI.to_owned();
    };
    let mut out = format!("{}://", parts.scheme);
    if let Some(user_info) = parts.user_info {
        out.push_str(&shown_user_info(user_info));
    }
    out.push_str(shown_hosts(parts.hosts));
    out.push_str(parts.path);
    if let Some(options) = parts.options {
        out.push('?');
        out.push_str(&shown_options(options));
    }
    out
}

/// A connection string, which may carry a password: its `Debug` and `Display` show it redacted
/// ([`redact_uri`]), so a configuration printed whole (a `{:?}` in a log, a panic message) never
/// shows the password. Only [`SecretUri::expose`] gives the text, for the driver.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct SecretUri(String);

impl SecretUri {
    /// Wraps `uri`.
    pub fn new(uri: impl Into<String>) -> Self {
        SecretUri(uri.into())
    }

    /// The connection string itself, credentials included: for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact_uri(&self.0))
    }
}

impl std::fmt::Display for SecretUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_uri(&self.0))
    }
}

/// Shows a URI that was rejected (by the driver or by validation): only its scheme and host list,
/// since how it was cut into user info, path and options is exactly what is in doubt.
pub fn redact_invalid_uri(uri: &str) -> String {
    match split_uri(uri) {
        Some(parts) => format!("{}://{}", parts.scheme, shown_hosts(parts.hosts)),
        None => NOT_A_URI.to_owned(),
    }
}

/// Whether the user info of `uri` holds a character that must be percent-encoded there
/// (`:` in the password; `/ ? # [ ] @` anywhere). The driver then splits the URI differently from
/// what was meant, and its errors may quote part of the password: such a URI is rejected first.
pub fn has_unencoded_user_info(uri: &str) -> bool {
    let Some(user_info) = split_uri(uri).and_then(|parts| parts.user_info) else {
        return false;
    };
    let (user, password) = user_info.split_once(':').unwrap_or((user_info, ""));
    let reserved = ['/', '?', '#', '[', ']', '@'];
    user.contains(reserved) || password.contains(reserved) || password.contains(':')
}

/// The secrets of `uri`, each with whether it is a whole value (kept whatever its length) or a
/// piece of one (kept only when long enough not to mask ordinary words).
fn uri_secrets(uri: &str) -> Vec<(&str, bool)> {
    let mut secrets = Vec::new();
    let Some(parts) = split_uri(uri) else {
        return secrets;
    };
    if let Some((_, password)) = parts.user_info.and_then(|u| u.split_once(':')) {
        secrets.push((password, true));
        // The driver cuts a malformed password at these and may quote a piece.
        secrets.extend(password.split(['?', '/', '@', '#', ':', '&', '=']).map(|piece| (piece, false)));
    }
    for (key, value) in parts.options.unwrap_or("").split('&').filter_map(|p| p.split_once('=')) {
        if is_secret_option(key) {
            secrets.push((value, true));
            // authMechanismProperties is `KEY:value,KEY:value`; the driver may quote one entry,
            // and an entry such as AWS_SESSION_TOKEN is a secret on its own.
            for entry in value.split(',') {
                secrets.push((entry, false));
                match entry.split_once(':') {
                    Some((entry_key, entry_value)) if is_secret_option(entry_key) => {
                        secrets.push((entry_value, true));
                    }
                    _ => {}
                }
            }
        }
    }
    secrets
}

/// Remembers the password and credential-bearing option values of `uri` (as written and
/// percent-decoded) so that [`scrub`] removes them from any text, even where the URI is not
/// quoted whole.
pub fn register_uri(uri: &str) {
    let found = uri_secrets(uri);
    if found.is_empty() {
        return;
    }
    let mut secrets = known_secrets().lock().unwrap_or_else(|e| e.into_inner());
    for (secret, whole) in found {
        for candidate in [secret.to_owned(), percent_decode(secret)] {
            let keep = if whole { !candidate.is_empty() } else { candidate.len() >= MIN_PIECE_LEN };
            if keep && candidate != MASK && !secrets.contains(&candidate) {
                secrets.push(candidate);
            }
        }
    }
    // Longest first, so that a secret containing another is masked whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Returns `text` with every URI in it redacted (see [`redact_uri`]) and every registered secret
/// masked.
pub fn scrub(text: &str) -> String {
    let mut out = redact_uris_in_text(text);
    let secrets = known_secrets().lock().unwrap_or_else(|e| e.into_inner());
    for secret in secrets.iter() {
        out = out.replace(secret.as_str(), MASK);
    }
    out
}

thread_local! {
    /// Set while a panic is expected and handled by the caller (see [`quietly`]).
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Replaces the default panic hook, which prints the panic message as it is: a message may hold
/// a configuration value, a URI with its password for one. Ours prints it scrubbed (see
/// [`scrub`]), and nothing for a panic that a caller expects and turns into an error.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        if QUIET_PANICS.with(std::cell::Cell::get) {
            return;
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("archiver: internal error{location}: {}", scrub(&message));
    }));
}

/// Runs `f`, catching a panic it may raise without anything printed: for third-party code known
/// to panic on some input, whose message may quote that input.
pub fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    let was = QUIET_PANICS.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was));
    result
}

/// Redacts every `mongodb://` or `mongodb+srv://` URI found inside free text. A URI runs to the
/// next whitespace or quote; closing punctuation of the sentence around it is left out of it, so
/// that `(at mongodb://h:1)` or `mongodb://h:1: refused` keeps its host visible.
fn redact_uris_in_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("mongodb") {
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        let end =
            candidate.find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '`').unwrap_or(candidate.len());
        let token = &candidate[..end];
        if token.starts_with("mongodb://") || token.starts_with("mongodb+srv://") {
            let uri = token.trim_end_matches([')', ',', '.', ';', ':']);
            out.push_str(&redact_uri(uri));
            out.push_str(&token[uri.len()..]);
        } else {
            out.push_str(token);
        }
        rest = &candidate[end..];
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
    fn a_secret_uri_prints_redacted_whatever_the_format() {
        let uri = SecretUri::new("mongodb://app:Hunter2x@db1:27017/?tls=true");
        for shown in [format!("{uri}"), format!("{uri:?}"), format!("{:#?}", Some(&uri))] {
            assert!(!shown.contains("Hunter2x"), "{shown}");
            assert!(shown.contains("app:***@db1:27017"), "{shown}");
        }
        assert_eq!(uri.expose(), "mongodb://app:Hunter2x@db1:27017/?tls=true");
    }

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
        assert_eq!(redact_uri("mongodb://[::1]:27017,%2Ftmp%2Fm.sock/db"), "mongodb://[::1]:27017,%2Ftmp%2Fm.sock/db");
    }

    #[test]
    fn leaves_uris_without_secrets_alone() {
        for uri in ["mongodb://localhost:27017", "mongodb://user@host/db", "mongodb://h/?w=majority&appName=x"] {
            assert_eq!(redact_uri(uri), uri);
        }
    }

    #[test]
    fn masks_credential_bearing_options() {
        let uri = "mongodb://h:1/db?tls=true&tlsCertificateKeyFilePassword=KEYPASS1&proxyHost=p\
                   &proxyPassword=PROXYPW1&authMechanismProperties=AWS_SESSION_TOKEN:SESSTOK1,X:y\
                   &appName=a&mySecretThing=OTHER1&ApiTOKEN=OTHER2&oidcPASSWORDfile=OTHER3";
        assert_eq!(
            redact_uri(uri),
            "mongodb://h:1/db?tls=true&tlsCertificateKeyFilePassword=***&proxyHost=p\
             &proxyPassword=***&authMechanismProperties=***&appName=a&mySecretThing=***\
             &ApiTOKEN=***&oidcPASSWORDfile=***"
        );
        // A value cut by an unencoded `&` leaves a piece that is no option: masked as well.
        assert_eq!(redact_uri("mongodb://h/?proxyPassword=ab&cdef&w=1"), "mongodb://h/?proxyPassword=***&***&w=1");
    }

    #[test]
    fn masks_passwords_holding_unencoded_delimiters() {
        for (uri, expected) in [
            ("mongodb://u:p?ss@h", "mongodb://u:***@h"),
            ("mongodb://u:p@ss@h/db?x=1", "mongodb://u:***@h/db?x=1"),
            ("mongodb://u:a/b@c@host/db", "mongodb://u:***@host/db"),
            ("mongodb://u:p#ss@h:27017", "mongodb://u:***@h:27017"),
            ("mongodb://u:p:ss@h", "mongodb://u:***@h"),
            ("mongodb://u:p?a/b#c:d@h1:1,h2/db?replicaSet=rs", "mongodb://u:***@h1:1,h2/db?replicaSet=rs"),
            ("mongodb://u:pw?x=1@h/?proxyPassword=PP", "mongodb://u:***@h/?proxyPassword=***"),
        ] {
            assert_eq!(redact_uri(uri), expected, "{uri}");
        }
    }

    #[test]
    fn an_at_sign_in_an_option_masks_more_never_less() {
        let shown = redact_uri("mongodb://u:pw12@h/?appName=a@b");
        assert!(!shown.contains("pw12"), "{shown}");
        // No user info at all, and the `@` is inside a secret option: the value stays hidden.
        let shown = redact_uri("mongodb://h/?authMechanismProperties=AWS_SESSION_TOKEN:ab@cd!");
        assert!(!shown.contains("ab") && !shown.contains("cd"), "{shown}");
    }

    #[test]
    fn a_host_list_that_is_not_one_is_masked() {
        // Cut by a space in free text: `u:pa` must not pass for host:port.
        assert_eq!(redact_uri("mongodb://u:pa"), "mongodb://***");
        assert_eq!(redact_uri("mongodb://u:p@h!x/db"), "mongodb://u:***@***/db");
    }

    #[test]
    fn shows_nothing_of_a_value_without_a_scheme() {
        for value in ["u:secret@h:27017/db", "secret", "u:secret@h://x", "://u:secret@h", ""] {
            assert_eq!(redact_uri(value), NOT_A_URI, "{value}");
            assert_eq!(redact_invalid_uri(value), NOT_A_URI, "{value}");
        }
    }

    #[test]
    fn invalid_uris_show_only_scheme_and_hosts() {
        assert_eq!(
            redact_invalid_uri("mongodb://u:p?ss@h:1,h2/db?tlsCertificateKeyFilePassword=X"),
            "mongodb://h:1,h2"
        );
        assert_eq!(redact_invalid_uri("http://user@host/path?x=1"), "http://host");
        assert_eq!(redact_invalid_uri("mongodb://u:p@h!x"), "mongodb://***");
    }

    #[test]
    fn detects_unencoded_user_info() {
        for bad in
            ["mongodb://u:p?ss@h", "mongodb://u:p@ss@h", "mongodb://u:p:ss@h", "mongodb://u:p/s@h", "mongodb://u:p#s@h"]
        {
            assert!(has_unencoded_user_info(bad), "{bad}");
        }
        for good in ["mongodb://u:p%3Fss@h", "mongodb://h/?appName=x", "mongodb://u@h", "not a uri"] {
            assert!(!has_unencoded_user_info(good), "{good}");
        }
    }

    #[test]
    fn scrub_masks_uris_and_registered_secrets() {
        register_uri("mongodb://carol:hunter%2142@h/");
        let text = "failed to connect to mongodb://carol:hunter%2142@h/ (password hunter!42)";
        let scrubbed = scrub(text);
        assert!(!scrubbed.contains("hunter"), "{scrubbed}");
        assert!(scrubbed.contains("mongodb://carol:***@h/"), "{scrubbed}");
    }

    #[test]
    fn registers_option_secrets_and_password_pieces() {
        register_uri(
            "mongodb://dave:Qz7vLm?Kx8wRt@h/?proxyPassword=PrXq%2F9wz\
             &authMechanismProperties=AWS_SESSION_TOKEN:SeSsT0kQ,SERVICE_NAME:mongodb\
             &tlsCertificateKeyFilePassword=KfPw4r7d",
        );
        // As the driver quotes them: without the URI, decoded, or as a piece.
        let text = "got PrXq/9wz and PrXq%2F9wz; entry AWS_SESSION_TOKEN:SeSsT0kQ; password KfPw4r7d; \
                    not a 'key=value' pair: Kx8wRt@h; userinfo Qz7vLm";
        let scrubbed = scrub(text);
        for secret in ["PrXq", "SeSsT0kQ", "KfPw4r7d", "Kx8wRt", "Qz7vLm"] {
            assert!(!scrubbed.contains(secret), "{secret} in {scrubbed}");
        }
        // What is not secret stays readable.
        assert!(scrub("SERVICE_NAME mongodb").contains("mongodb"));
    }

    #[test]
    fn scrub_redacts_options_of_uris_in_text() {
        let scrubbed = scrub("cannot reach mongodb://h:1/?proxyPassword=Zr8Wq2Lp). Retrying");
        assert_eq!(scrubbed, "cannot reach mongodb://h:1/?proxyPassword=***). Retrying");
        assert_eq!(scrub("invalid mongodb://h:1: no"), "invalid mongodb://h:1: no");
    }
}
