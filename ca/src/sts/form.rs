//! The endpoint's requests: `application/x-www-form-urlencoded` bodies (strictly
//! decoded and bounded), then the token-exchange (RFC 8693 §2.1) and introspection
//! (RFC 7662 §2.1) parameters, checked for presence, pairing and size. Pure: whether
//! the tokens are valid is for the exchange to decide.
//!
//! Uses only `super::{error, scope, chain, token}` and external crates, never `crate::`:
//! fuzz/fuzz_targets/sts_request.rs includes these files by path.

use super::error::{OAuthError, OAuthErrorCode};
use super::scope::Scopes;

/// Most parameters in one body.
pub const MAX_PAIRS: usize = 32;
/// Longest parameter name, in bytes (decoded).
pub const MAX_NAME_LEN: usize = 64;
/// Longest parameter value, in bytes (decoded).
pub const MAX_VALUE_LEN: usize = 16 * 1024;
/// Longest token (subject, actor, assertion, introspected), in bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Longest `resource`, in bytes.
pub const MAX_RESOURCE_LEN: usize = 2048;
/// Longest `audience`, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 512;
/// Longest `client_id` or `may_act`, in bytes (SPIFFE IDs).
pub const MAX_ID_LEN: usize = 2048;

/// The only `grant_type` this endpoint serves.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The token type of a JWT (here: a JWT-SVID).
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// The token type of an access token (here: one this server issued).
pub const ACCESS_TOKEN_TYPE: &str = super::token::ACCESS_TOKEN_TYPE;
/// The only `client_assertion_type` (RFC 7523 §2.2).
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn invalid_request(description: impl Into<String>) -> OAuthError {
    OAuthError::invalid_request(description)
}

fn invalid_target(description: impl Into<String>) -> OAuthError {
    OAuthError::new(OAuthErrorCode::InvalidTarget, description)
}

/// A decoded form: its name/value pairs in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form {
    pairs: Vec<(String, String)>,
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes one name or value: `+` is a space, `%XX` a byte; a `%` without two hex
/// digits, or bytes that are not UTF-8, are refused (lenient decoders would substitute
/// and let two spellings mean one thing).
fn decode(raw: &[u8], max: usize, what: &str) -> Result<String, OAuthError> {
    // Every decoded byte takes at least one raw byte, so this bounds the work too.
    let mut out = Vec::with_capacity(raw.len().min(max));
    let mut bytes = raw.iter().copied();
    while let Some(b) = bytes.next() {
        let decoded = match b {
            b'+' => b' ',
            b'%' => {
                let hi = bytes.next().and_then(hex_digit);
                let lo = bytes.next().and_then(hex_digit);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => (hi << 4) | lo,
                    _ => return Err(invalid_request(format!("{what} has a bad percent-escape"))),
                }
            }
            _ => b,
        };
        if out.len() >= max {
            return Err(invalid_request(format!(
                "{what} is longer than {max} bytes"
            )));
        }
        out.push(decoded);
    }
    String::from_utf8(out).map_err(|_| invalid_request(format!("{what} is not UTF-8")))
}

/// Decodes an `application/x-www-form-urlencoded` body: at most [`MAX_PAIRS`]
/// parameters, names up to [`MAX_NAME_LEN`] bytes, values up to [`MAX_VALUE_LEN`],
/// UTF-8. Empty pieces (`a=1&&b=2`) are skipped; anything else malformed is
/// `invalid_request`.
pub fn parse_form(body: &[u8]) -> Result<Form, OAuthError> {
    let mut pairs = Vec::new();
    for piece in body.split(|b| *b == b'&') {
        if piece.is_empty() {
            continue;
        }
        if pairs.len() >= MAX_PAIRS {
            return Err(invalid_request(format!("more than {MAX_PAIRS} parameters")));
        }
        let (raw_name, raw_value) = match piece.iter().position(|b| *b == b'=') {
            Some(eq) => (piece.get(..eq), piece.get(eq + 1..)),
            None => (Some(piece), Some(&[][..])),
        };
        let (Some(raw_name), Some(raw_value)) = (raw_name, raw_value) else {
            return Err(invalid_request("malformed form body"));
        };
        let name = decode(raw_name, MAX_NAME_LEN, "a parameter name")?;
        if name.is_empty() {
            return Err(invalid_request("a parameter has no name"));
        }
        let value = decode(raw_value, MAX_VALUE_LEN, &format!("parameter {name}"))?;
        pairs.push((name, value));
    }
    Ok(Form { pairs })
}

impl Form {
    /// The value of a parameter that may appear once (RFC 6749 §3.2: repeated is
    /// `invalid_request`). A parameter with an empty value counts as absent (§3.1).
    pub fn single(&self, name: &str) -> Result<Option<&str>, OAuthError> {
        let mut values = self.all(name).into_iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(invalid_request(format!("parameter {name} is repeated")));
        }
        Ok(first)
    }

    /// Every non-empty value of a parameter, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The token types this endpoint takes (RFC 8693 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// `urn:ietf:params:oauth:token-type:jwt`: a JWT-SVID.
    Jwt,
    /// `urn:ietf:params:oauth:token-type:access_token`: an access token this server issued.
    AccessToken,
}

impl TokenType {
    /// Parses a `*_token_type` value; any other type is `invalid_request` naming it.
    pub fn parse(s: &str) -> Result<TokenType, OAuthError> {
        match s {
            JWT_TOKEN_TYPE => Ok(TokenType::Jwt),
            ACCESS_TOKEN_TYPE => Ok(TokenType::AccessToken),
            other => Err(invalid_request(format!(
                "token type {} is not supported",
                bounded(other)
            ))),
        }
    }

    /// The URN.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::Jwt => JWT_TOKEN_TYPE,
            TokenType::AccessToken => ACCESS_TOKEN_TYPE,
        }
    }
}

/// A client-chosen value quoted in a description, cut so a description stays short.
fn bounded(s: &str) -> String {
    const MAX: usize = 128;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s.get(..end).unwrap_or_default())
}

/// What the token is for: exactly one per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// RFC 8707 `resource`: an absolute URI without fragment.
    Resource(String),
    /// RFC 8693 `audience`: a logical name.
    Audience(String),
}

impl Target {
    /// The resource URI or audience name (the token's `aud`).
    pub fn as_str(&self) -> &str {
        match self {
            Target::Resource(s) | Target::Audience(s) => s,
        }
    }
}

/// RFC 3986 absolute URI, shallowly: a scheme (`ALPHA *( ALPHA / DIGIT / "+" / "-" /
/// "." )`), `:`, something, printable ASCII throughout and no fragment (RFC 8707 §2).
fn check_resource(resource: &str) -> Result<(), OAuthError> {
    if resource.len() > MAX_RESOURCE_LEN {
        return Err(invalid_target(format!(
            "resource is longer than {MAX_RESOURCE_LEN} bytes"
        )));
    }
    if !resource.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid_target(
            "resource is not an absolute URI (characters outside printable ASCII)",
        ));
    }
    if resource.contains('#') {
        return Err(invalid_target("resource must not have a fragment"));
    }
    let Some((scheme, rest)) = resource.split_once(':') else {
        return Err(invalid_target(
            "resource is not an absolute URI (no scheme)",
        ));
    };
    let mut scheme_bytes = scheme.bytes();
    let scheme_ok = scheme_bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && scheme_bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok || rest.is_empty() {
        return Err(invalid_target("resource is not an absolute URI"));
    }
    Ok(())
}

fn check_audience(audience: &str) -> Result<(), OAuthError> {
    if audience.len() > MAX_AUDIENCE_LEN {
        return Err(invalid_target(format!(
            "audience is longer than {MAX_AUDIENCE_LEN} bytes"
        )));
    }
    if !audience.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid_target(
            "audience must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

/// A token-exchange request (RFC 8693 §2.1), its parameters well-formed and paired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// `resource` or `audience`.
    pub target: Target,
    /// `scope`; `None` when absent (every scope the grant allows).
    pub scope: Option<Scopes>,
    /// `subject_token` and `subject_token_type`.
    pub subject_token: Option<(String, TokenType)>,
    /// `actor_token` and `actor_token_type`.
    pub actor_token: Option<(String, TokenType)>,
    /// `client_assertion` (its type checked to be JWT bearer, RFC 7523).
    pub client_assertion: Option<String>,
    /// `client_id`, as sent (the exchange checks it against the authenticated caller).
    pub client_id: Option<String>,
    /// `may_act`: who the subject lets act for it (a SPIFFE ID).
    pub may_act: Option<String>,
}

fn check_token_size(token: &str, what: &str) -> Result<(), OAuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(invalid_request(format!(
            "{what}: token too large (more than {MAX_TOKEN_LEN} bytes)"
        )));
    }
    Ok(())
}

/// A token and its type, both or neither.
fn token_pair(
    form: &Form,
    token_name: &str,
    type_name: &str,
) -> Result<Option<(String, TokenType)>, OAuthError> {
    match (form.single(token_name)?, form.single(type_name)?) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid_request(format!(
            "{token_name} requires {type_name}"
        ))),
        (None, Some(_)) => Err(invalid_request(format!(
            "{type_name} requires {token_name}"
        ))),
        (Some(token), Some(kind)) => {
            check_token_size(token, token_name)?;
            Ok(Some((token.to_string(), TokenType::parse(kind)?)))
        }
    }
}

fn bounded_id(form: &Form, name: &str) -> Result<Option<String>, OAuthError> {
    match form.single(name)? {
        Some(v) if v.len() > MAX_ID_LEN => Err(invalid_request(format!(
            "parameter {name} is longer than {MAX_ID_LEN} bytes"
        ))),
        v => Ok(v.map(str::to_string)),
    }
}

/// Parses and checks a `POST /token` body.
pub fn token_request(body: &[u8]) -> Result<TokenRequest, OAuthError> {
    let form = parse_form(body)?;
    match form.single("grant_type")? {
        None => return Err(invalid_request("grant_type is missing")),
        Some(TOKEN_EXCHANGE_GRANT) => {}
        Some(other) => {
            return Err(OAuthError::new(
                OAuthErrorCode::UnsupportedGrantType,
                format!("grant_type {} is not supported", bounded(other)),
            ))
        }
    }
    if let Some(requested) = form.single("requested_token_type")? {
        if requested != ACCESS_TOKEN_TYPE {
            return Err(invalid_request(format!(
                "requested_token_type {} is not supported (only {ACCESS_TOKEN_TYPE})",
                bounded(requested)
            )));
        }
    }
    let subject_token = token_pair(&form, "subject_token", "subject_token_type")?;
    let actor_token = token_pair(&form, "actor_token", "actor_token_type")?;
    if actor_token.is_some() && subject_token.is_none() {
        return Err(invalid_request("actor_token requires subject_token"));
    }
    let client_assertion = match (
        form.single("client_assertion")?,
        form.single("client_assertion_type")?,
    ) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid_request(
                "client_assertion requires client_assertion_type",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid_request(
                "client_assertion_type requires client_assertion",
            ))
        }
        (Some(assertion), Some(kind)) => {
            if kind != JWT_BEARER_ASSERTION {
                return Err(invalid_request(format!(
                    "client_assertion_type {} is not supported (only {JWT_BEARER_ASSERTION})",
                    bounded(kind)
                )));
            }
            check_token_size(assertion, "client_assertion")?;
            Some(assertion.to_string())
        }
    };

    let resources = form.all("resource");
    let audiences = form.all("audience");
    if resources.len() + audiences.len() > 1 {
        return Err(invalid_target(
            "one target per request (resource or audience)",
        ));
    }
    let target = match (resources.first(), audiences.first()) {
        (Some(resource), _) => {
            check_resource(resource)?;
            Target::Resource(resource.to_string())
        }
        (None, Some(audience)) => {
            check_audience(audience)?;
            Target::Audience(audience.to_string())
        }
        (None, None) => return Err(invalid_request("resource or audience is required")),
    };
    let scope = form.single("scope")?.map(Scopes::parse).transpose()?;

    Ok(TokenRequest {
        target,
        scope,
        subject_token,
        actor_token,
        client_assertion,
        client_id: bounded_id(&form, "client_id")?,
        may_act: bounded_id(&form, "may_act")?,
    })
}

/// Parses a `POST /introspect` body: its `token` (required, at most
/// [`MAX_TOKEN_LEN`] bytes). `token_type_hint` is ignored (RFC 7662 §2.1 allows it).
pub fn introspect_request(body: &[u8]) -> Result<String, OAuthError> {
    let form = parse_form(body)?;
    let token = form
        .single("token")?
        .ok_or_else(|| invalid_request("token is missing"))?;
    check_token_size(token, "token")?;
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TE: &str = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange";
    const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
    const AT: &str = "urn:ietf:params:oauth:token-type:access_token";

    fn req(extra: &str) -> Result<TokenRequest, OAuthError> {
        token_request(format!("{TE}&{extra}").as_bytes())
    }

    fn refused(extra: &str, code: OAuthErrorCode, phrase: &str) {
        let e = req(extra).unwrap_err();
        assert_eq!(e.code, code, "{extra}: {e}");
        assert!(e.description.contains(phrase), "{extra}: {e}");
    }

    #[test]
    fn decodes_strictly() {
        let f = parse_form(b"a=1+2%20%41&b=&c&&d=%C3%A9").unwrap();
        assert_eq!(f.single("a").unwrap(), Some("1 2 A"));
        assert_eq!(f.single("b").unwrap(), None, "empty is absent");
        assert_eq!(f.single("c").unwrap(), None);
        assert_eq!(f.single("d").unwrap(), Some("é"));
        assert_eq!(f.single("zz").unwrap(), None);
        assert_eq!(parse_form(b"").unwrap(), Form::default());

        let bad = |body: &[u8], phrase: &str| {
            let e = parse_form(body).unwrap_err();
            assert_eq!(e.code, OAuthErrorCode::InvalidRequest);
            assert!(e.description.contains(phrase), "{e}");
        };
        bad(b"a=%4", "bad percent-escape");
        bad(b"a=%zz", "bad percent-escape");
        bad(b"a=%C3", "not UTF-8");
        bad(b"a=\xff", "not UTF-8");
        bad(b"=x", "no name");
        bad(format!("{}=1", "n".repeat(65)).as_bytes(), "longer than 64");
        assert!(parse_form(format!("{}=1", "n".repeat(64)).as_bytes()).is_ok());
        bad(
            format!("v={}", "x".repeat(MAX_VALUE_LEN + 1)).as_bytes(),
            "parameter v is longer than 16384",
        );
        let many: Vec<String> = (0..33).map(|i| format!("p{i}=1")).collect();
        bad(many.join("&").as_bytes(), "more than 32 parameters");
        assert!(parse_form(many[..32].join("&").as_bytes()).is_ok());
    }

    #[test]
    fn single_refuses_repeats_and_all_lists() {
        let f = parse_form(b"a=1&a=2&b=1&b=").unwrap();
        let e = f.single("a").unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidRequest);
        assert!(e.description.contains("parameter a is repeated"));
        assert_eq!(f.single("b").unwrap(), Some("1"));
        assert_eq!(f.all("a"), vec!["1", "2"]);
    }

    #[test]
    fn token_types() {
        assert_eq!(TokenType::parse(JWT).unwrap(), TokenType::Jwt);
        assert_eq!(TokenType::parse(AT).unwrap(), TokenType::AccessToken);
        assert_eq!(TokenType::Jwt.as_str(), JWT);
        let e = TokenType::parse("urn:ietf:params:oauth:token-type:saml2").unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidRequest);
        assert!(e.description.contains("token-type:saml2"));
    }

    #[test]
    fn parses_a_full_request() {
        let r = req(&format!(
            "resource=https%3A%2F%2Fmcp.example%2Ftools&scope=b+a\
             &subject_token=at.x.y&subject_token_type={AT}\
             &actor_token=j.w.t&actor_token_type={JWT}\
             &client_id=spiffe%3A%2F%2Ft%2Fa&may_act=spiffe%3A%2F%2Ft%2Fb\
             &requested_token_type={AT}"
        ))
        .unwrap();
        assert_eq!(
            r.target,
            Target::Resource("https://mcp.example/tools".into())
        );
        assert_eq!(r.target.as_str(), "https://mcp.example/tools");
        assert_eq!(r.scope.unwrap().to_string(), "a b");
        assert_eq!(
            r.subject_token,
            Some(("at.x.y".into(), TokenType::AccessToken))
        );
        assert_eq!(r.actor_token, Some(("j.w.t".into(), TokenType::Jwt)));
        assert_eq!(r.client_id.as_deref(), Some("spiffe://t/a"));
        assert_eq!(r.may_act.as_deref(), Some("spiffe://t/b"));
        assert_eq!(r.client_assertion, None);

        let r = req(&format!(
            "audience=tools&client_assertion=a.b.c&client_assertion_type={JWT_BEARER_ASSERTION}"
        ))
        .unwrap();
        assert_eq!(r.target, Target::Audience("tools".into()));
        assert_eq!(r.scope, None);
        assert_eq!(r.client_assertion.as_deref(), Some("a.b.c"));
        // An empty scope parameter is absent.
        assert_eq!(req("audience=tools&scope=").unwrap().scope, None);
    }

    #[test]
    fn grant_type_refusals() {
        let e = token_request(b"audience=x").unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidRequest);
        assert!(e.description.contains("grant_type is missing"));
        let e = token_request(b"grant_type=client_credentials&audience=x").unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::UnsupportedGrantType);
        assert!(e.description.contains("client_credentials"));
        refused(
            &format!("audience=x&{TE}"),
            OAuthErrorCode::InvalidRequest,
            "grant_type is repeated",
        );
    }

    #[test]
    fn target_refusals() {
        use OAuthErrorCode::{InvalidRequest, InvalidTarget};
        refused(
            "scope=a",
            InvalidRequest,
            "resource or audience is required",
        );
        refused(
            "audience=a&audience=b",
            InvalidTarget,
            "one target per request",
        );
        refused("audience=a&resource=https://x", InvalidTarget, "one target");
        refused(
            "resource=https://x&resource=https://y",
            InvalidTarget,
            "one target",
        );
        refused(
            "resource=relative/path",
            InvalidTarget,
            "not an absolute URI",
        );
        refused("resource=1http://x", InvalidTarget, "not an absolute URI");
        refused("resource=https:", InvalidTarget, "not an absolute URI");
        refused("resource=https://x/%23frag", InvalidTarget, "fragment");
        refused("resource=https://x/a+b", InvalidTarget, "printable ASCII");
        let long = format!("resource=https://x/{}", "p".repeat(2048));
        refused(&long, InvalidTarget, "longer than 2048");
        refused("audience=a+b", InvalidTarget, "printable ASCII");
        refused(
            &format!("audience={}", "a".repeat(513)),
            InvalidTarget,
            "longer than 512",
        );
        assert!(req(&format!("audience={}", "a".repeat(512))).is_ok());
        assert!(req("resource=urn:example:tools").is_ok());
    }

    #[test]
    fn token_pairing_refusals() {
        use OAuthErrorCode::{InvalidRequest, InvalidScope};
        refused(
            "audience=x&subject_token=t",
            InvalidRequest,
            "subject_token requires subject_token_type",
        );
        refused(
            &format!("audience=x&subject_token_type={JWT}"),
            InvalidRequest,
            "subject_token_type requires subject_token",
        );
        refused(
            &format!("audience=x&subject_token=t&subject_token_type={JWT}&actor_token=a"),
            InvalidRequest,
            "actor_token requires actor_token_type",
        );
        refused(
            &format!("audience=x&subject_token=t&subject_token_type={JWT}&actor_token_type={JWT}"),
            InvalidRequest,
            "actor_token_type requires actor_token",
        );
        refused(
            &format!("audience=x&actor_token=a&actor_token_type={JWT}"),
            InvalidRequest,
            "actor_token requires subject_token",
        );
        refused(
            "audience=x&subject_token=t&subject_token_type=urn:x",
            InvalidRequest,
            "token type urn:x is not supported",
        );
        refused(
            "audience=x&client_assertion=a",
            InvalidRequest,
            "requires client_assertion_type",
        );
        refused(
            &format!("audience=x&client_assertion_type={JWT_BEARER_ASSERTION}"),
            InvalidRequest,
            "requires client_assertion",
        );
        refused(
            "audience=x&client_assertion=a&client_assertion_type=urn:saml",
            InvalidRequest,
            "client_assertion_type urn:saml is not supported",
        );
        refused(
            &format!("audience=x&requested_token_type={JWT}"),
            InvalidRequest,
            "requested_token_type",
        );
        let big = "t".repeat(MAX_TOKEN_LEN + 1);
        refused(
            &format!("audience=x&subject_token={big}&subject_token_type={JWT}"),
            InvalidRequest,
            "token too large",
        );
        refused(
            &format!("audience=x&subject_token=t&subject_token_type={JWT}&actor_token={big}&actor_token_type={JWT}"),
            InvalidRequest,
            "token too large",
        );
        refused(
            &format!(
                "audience=x&client_assertion={big}&client_assertion_type={JWT_BEARER_ASSERTION}"
            ),
            InvalidRequest,
            "token too large",
        );
        let ok = "t".repeat(MAX_TOKEN_LEN);
        assert!(req(&format!(
            "audience=x&subject_token={ok}&subject_token_type={JWT}"
        ))
        .is_ok());
        refused("audience=x&scope=a++b", InvalidScope, "empty");
        refused(
            "audience=x&scope=a&scope=b",
            InvalidRequest,
            "scope is repeated",
        );
        refused(
            &format!("audience=x&client_id={}", "c".repeat(MAX_ID_LEN + 1)),
            InvalidRequest,
            "client_id is longer",
        );
    }

    #[test]
    fn introspection_requests() {
        assert_eq!(
            introspect_request(b"token=a.b.c&token_type_hint=access_token").unwrap(),
            "a.b.c"
        );
        let e = introspect_request(b"token_type_hint=x").unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidRequest);
        assert!(e.description.contains("token is missing"));
        let e = introspect_request(b"token=a&token=b").unwrap_err();
        assert!(e.description.contains("token is repeated"));
        let big = format!("token={}", "t".repeat(MAX_TOKEN_LEN + 1));
        let e = introspect_request(big.as_bytes()).unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidRequest);
        assert!(e.description.contains("token too large"));
    }
}
