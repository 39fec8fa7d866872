//! The `http` handler's pure parts (`docs/semantics.md`, "The http
//! handler"): its shape and validation, `${env:SKED_SECRET_*}` references in
//! header values, and the SSRF address check. The request itself is made by
//! `executor::http`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{FieldViolation, quote};

/// Longest URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// Most headers per handler.
pub const MAX_HEADERS: usize = 32;
/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 256;
/// Longest header value as written (before secrets are resolved), in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 8 * 1024;
/// Shortest request timeout, in seconds.
pub const MIN_HTTP_TIMEOUT_SECS: u32 = 1;
/// Longest request timeout, in seconds (1 h).
pub const MAX_HTTP_TIMEOUT_SECS: u32 = 3600;
/// The only environment variables a header may reference: a fixed prefix,
/// so a definition can never read e.g. `DATABASE_URL` off a node.
pub const SECRET_PREFIX: &str = "SKED_SECRET_";
/// Headers sked sets itself; a handler may not.
const RESERVED_HEADERS: [&str; 4] = ["host", "content-length", "transfer-encoding", "connection"];

/// Request method of an `http` handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// GET: params go to the query string.
    Get,
    /// POST (the default): params are the JSON body.
    Post,
    /// PUT: params are the JSON body.
    Put,
    /// PATCH: params are the JSON body.
    Patch,
    /// DELETE: params are the JSON body.
    Delete,
}

impl HttpMethod {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
        }
    }

    /// Parses the API spelling; empty means POST.
    ///
    /// # Errors
    /// A violation on `field` for anything but GET, POST, PUT, PATCH, DELETE.
    pub fn parse(field: &str, s: &str) -> Result<HttpMethod, FieldViolation> {
        Ok(match s {
            "" | "POST" => HttpMethod::Post,
            "GET" => HttpMethod::Get,
            "PUT" => HttpMethod::Put,
            "PATCH" => HttpMethod::Patch,
            "DELETE" => HttpMethod::Delete,
            other => {
                return Err(FieldViolation::new(
                    field,
                    format!("{} must be GET, POST, PUT, PATCH or DELETE", quote(other)),
                ));
            }
        })
    }
}

/// One HTTP request per attempt. Header values are stored as written: a
/// `${env:SKED_SECRET_*}` reference is resolved on the executing node only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpHandler {
    /// Request method.
    pub method: HttpMethod,
    /// Absolute http(s) URL, at most [`MAX_URL_BYTES`].
    pub url: String,
    /// Request headers by name (at most [`MAX_HEADERS`]).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request limit in seconds ([`MIN_HTTP_TIMEOUT_SECS`] ..=
    /// [`MAX_HTTP_TIMEOUT_SECS`]); `None` = the definition's timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
}

impl HttpHandler {
    /// Checks the handler; `prefix` is the path of the handler itself (e.g.
    /// `definition.http`).
    ///
    /// # Errors
    /// A [`FieldViolation`] naming the field, e.g. `definition.http.url`.
    pub fn validate(&self, prefix: &str) -> Result<(), FieldViolation> {
        validate_url(&format!("{prefix}.url"), &self.url)?;
        let field = format!("{prefix}.headers");
        if self.headers.len() > MAX_HEADERS {
            return Err(FieldViolation::new(
                field,
                format!("has {} headers; at most {MAX_HEADERS}", self.headers.len()),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (name, value) in &self.headers {
            let f = format!("{field}[{name:?}]");
            let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
            if name.is_empty() || name.len() > MAX_HEADER_NAME_BYTES || !name.bytes().all(token) {
                return Err(FieldViolation::new(
                    f,
                    format!(
                        "{} is not a header name (an HTTP token of 1 to {MAX_HEADER_NAME_BYTES} bytes)",
                        quote(name)
                    ),
                ));
            }
            let lower = name.to_ascii_lowercase();
            if RESERVED_HEADERS.contains(&lower.as_str()) {
                return Err(FieldViolation::new(f, "is set by sked and cannot be given"));
            }
            if !seen.insert(lower) {
                return Err(FieldViolation::new(
                    f,
                    "is given twice (header names are case-insensitive)",
                ));
            }
            if value.len() > MAX_HEADER_VALUE_BYTES {
                return Err(FieldViolation::new(
                    f,
                    format!(
                        "value is {} bytes; at most {MAX_HEADER_VALUE_BYTES}",
                        value.len()
                    ),
                ));
            }
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(FieldViolation::new(
                    f,
                    "value must not contain control characters",
                ));
            }
            secret_names(value).map_err(|reason| FieldViolation::new(f.clone(), reason))?;
        }
        if let Some(t) = self.timeout_secs
            && !(MIN_HTTP_TIMEOUT_SECS..=MAX_HTTP_TIMEOUT_SECS).contains(&t)
        {
            return Err(FieldViolation::new(
                format!("{prefix}.timeout"),
                "must be 1 s to 1 h, whole seconds",
            ));
        }
        Ok(())
    }

    /// The limit of one attempt's request: the smaller of the handler's
    /// timeout and the definition's (`definition_secs`); `None` = none.
    pub fn effective_timeout_secs(&self, definition_secs: Option<u32>) -> Option<u32> {
        match (self.timeout_secs, definition_secs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Checks an `http` handler's URL given for `field`.
///
/// # Errors
/// A violation unless an absolute http(s) URL with a host, no user info, at
/// most [`MAX_URL_BYTES`].
pub fn validate_url(field: &str, url: &str) -> Result<(), FieldViolation> {
    if url.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    if url.len() > MAX_URL_BYTES {
        return Err(FieldViolation::new(
            field,
            format!("is {} bytes; at most {MAX_URL_BYTES}", url.len()),
        ));
    }
    let parsed = url::Url::parse(url)
        .map_err(|e| FieldViolation::new(field, format!("{} is not a URL: {e}", quote(url))))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(FieldViolation::new(
            field,
            format!("{} must be an http:// or https:// URL", quote(url)),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(FieldViolation::new(field, "must name a host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(FieldViolation::new(
            field,
            "must not carry user info; put credentials in a header",
        ));
    }
    Ok(())
}

/// The variable names `${env:NAME}` references in `value`, in order.
///
/// # Errors
/// A sentence for an unterminated reference or a name that does not start
/// with [`SECRET_PREFIX`] or has characters outside `[A-Z0-9_]`.
pub fn secret_names(value: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut rest = value;
    while let Some(i) = rest.find("${env:") {
        let after = &rest[i + 6..];
        let Some(end) = after.find('}') else {
            return Err("has an unterminated ${env:...} reference".into());
        };
        let name = &after[..end];
        let ok = name.len() > SECRET_PREFIX.len()
            && name.starts_with(SECRET_PREFIX)
            && name
                .bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_');
        if !ok {
            return Err(format!(
                "references {}; only variables named {SECRET_PREFIX}[A-Z0-9_]+ may be used",
                quote(name)
            ));
        }
        names.push(name);
        rest = &after[end + 1..];
    }
    Ok(names)
}

/// `value` with every `${env:NAME}` replaced by `lookup(NAME)`; also
/// returns the values substituted (to redact them from logs).
///
/// # Errors
/// A sentence naming the first variable `lookup` does not know, or a
/// malformed reference (see [`secret_names`]).
pub fn resolve_secrets(
    value: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(String, Vec<String>), String> {
    let names = secret_names(value)?;
    let mut out = value.to_string();
    let mut secrets = Vec::new();
    for name in names {
        let v = lookup(name)
            .ok_or_else(|| format!("environment variable {name} is not set on this node"))?;
        out = out.replacen(&format!("${{env:{name}}}"), &v, 1);
        secrets.push(v);
    }
    Ok((out, secrets))
}

/// `text` with each of `secrets` (non-empty) replaced by `[redacted]`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "[redacted]");
    }
    out
}

/// Why the SSRF guard refuses an address by default, or `None` for a
/// public address. IPv4-mapped and IPv4-compatible-looking IPv6 forms
/// (`::ffff:a.b.c.d`) are judged as the IPv4 address they carry, so
/// `::ffff:127.0.0.1` is loopback.
pub fn forbidden_range(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(if ip == Ipv4Addr::new(169, 254, 169, 254) {
        "metadata"
    } else if ip.is_unspecified() || o[0] == 0 {
        "unspecified"
    } else if ip.is_loopback() {
        "loopback"
    } else if ip.is_private() {
        "private"
    } else if ip.is_link_local() {
        "link-local"
    } else if ip.is_multicast() {
        "multicast"
    } else if ip.is_broadcast() {
        "broadcast"
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        // 100.64.0.0/10: carrier-grade NAT, private in practice.
        "shared (CGNAT)"
    } else if o[0] >= 240 {
        "reserved"
    } else {
        return None;
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        // 64:ff9b::/96 (NAT64) carries an IPv4 address: judge that one.
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return forbidden_v4(Ipv4Addr::new(a, b, c, d));
    }
    Some(
        if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
            // The EC2 metadata service over IPv6.
            "metadata"
        } else if ip.is_unspecified() {
            "unspecified"
        } else if ip.is_loopback() {
            "loopback"
        } else if (s[0] & 0xfe00) == 0xfc00 {
            "private (unique local)"
        } else if (s[0] & 0xffc0) == 0xfe80 {
            "link-local"
        } else if ip.is_multicast() {
            "multicast"
        } else {
            return None;
        },
    )
}

/// The operator's `--http-allow` list: ranges the SSRF guard lets through
/// although [`forbidden_range`] refuses them by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpAllow(pub Vec<IpNet>);

impl HttpAllow {
    /// Parses `CIDR,CIDR,...` (a bare address is a /32 or /128); blanks are
    /// skipped.
    ///
    /// # Errors
    /// A sentence naming the first item that is not a CIDR or address.
    pub fn parse(list: &str) -> Result<HttpAllow, String> {
        let mut nets = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let net = item
                .parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{item:?} is not a CIDR range (e.g. 10.0.0.0/8)"))?;
            nets.push(net.trunc());
        }
        Ok(HttpAllow(nets))
    }

    /// Whether a connection to `ip` may be made: a public address, or one
    /// inside an allowed range (checked in its written form, its canonical
    /// IPv4 form and its IPv4-mapped IPv6 form).
    ///
    /// # Errors
    /// The [`forbidden_range`] category of a refused address.
    pub fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        let Some(why) = forbidden_range(ip) else {
            return Ok(());
        };
        let canonical = ip.to_canonical();
        let mapped = match canonical {
            IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
            v6 => v6,
        };
        if self
            .0
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&canonical) || n.contains(&mapped))
        {
            Ok(())
        } else {
            Err(why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn handler(url: &str) -> HttpHandler {
        HttpHandler {
            method: HttpMethod::Post,
            url: url.into(),
            headers: BTreeMap::new(),
            timeout_secs: None,
        }
    }

    #[test]
    fn the_guard_refuses_internal_ranges_by_default() {
        let none = HttpAllow::default();
        for (a, why) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("::1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("fc00::1", "private (unique local)"),
            ("fd12:3456::1", "private (unique local)"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("169.254.169.254", "metadata"),
            ("fd00:ec2::254", "metadata"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("100.64.0.1", "shared (CGNAT)"),
            // IPv4-mapped IPv6 forms are judged as the IPv4 they carry.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "metadata"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("64:ff9b::7f00:1", "loopback"),
        ] {
            assert_eq!(none.check(ip(a)), Err(why), "{a}");
        }
        for a in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert_eq!(none.check(ip(a)), Ok(()), "{a} is public");
        }
    }

    #[test]
    fn the_allow_list_lets_its_ranges_through_and_no_others() {
        let allow = HttpAllow::parse("127.0.0.0/8, 10.1.0.0/16,fd00::1").unwrap();
        for a in ["127.0.0.1", "::ffff:127.0.0.1", "10.1.200.3", "fd00::1"] {
            assert_eq!(allow.check(ip(a)), Ok(()), "{a} is allowed");
        }
        for a in [
            "10.2.0.1",
            "::1",
            "169.254.169.254",
            "fd00::2",
            "192.168.0.1",
        ] {
            assert!(allow.check(ip(a)).is_err(), "{a} stays refused");
        }
        // A mapped range in the list covers the plain IPv4 address too.
        let mapped = HttpAllow::parse("::ffff:127.0.0.0/104").unwrap();
        assert_eq!(mapped.check(ip("127.0.0.1")), Ok(()));
        assert!(HttpAllow::parse("10.0.0.0/33").is_err());
        assert!(HttpAllow::parse("localhost").is_err());
        assert_eq!(HttpAllow::parse(" , ").unwrap(), HttpAllow::default());
    }

    #[test]
    fn urls_are_checked() {
        assert!(
            handler("https://example.com/hook?a=1")
                .validate("d.http")
                .is_ok()
        );
        for (url, _) in [
            ("", "required"),
            ("ftp://example.com/", "scheme"),
            ("example.com/x", "relative"),
            ("http://user:pw@example.com/", "userinfo"),
            ("http://:80/x", "no host"),
        ] {
            let e = handler(url).validate("d.http").unwrap_err();
            assert_eq!(e.field, "d.http.url", "{url}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert_eq!(
            handler(&long).validate("d.http").unwrap_err().field,
            "d.http.url"
        );
    }

    #[test]
    fn headers_and_timeout_are_checked() {
        let with = |k: &str, v: &str| {
            let mut h = handler("https://example.com/");
            h.headers.insert(k.into(), v.into());
            h.validate("d.http")
        };
        assert!(with("Authorization", "Bearer ${env:SKED_SECRET_TOKEN}").is_ok());
        for (k, v) in [
            ("Authorization", "Bearer ${env:DATABASE_URL}"),
            ("Authorization", "${env:SKED_SECRET_}"),
            ("Authorization", "${env:SKED_SECRET_X"),
            ("Authorization", "${env:sked_secret_x}"),
            ("Bad Name", "v"),
            ("Host", "evil"),
            ("X-A", "line\r\nX-B: injected"),
        ] {
            let e = with(k, v).unwrap_err();
            assert!(e.field.starts_with("d.http.headers["), "{k}: {e}");
        }
        let mut h = handler("https://example.com/");
        h.headers.insert("X-A".into(), "1".into());
        h.headers.insert("x-a".into(), "2".into());
        assert!(h.validate("d.http").is_err(), "duplicate names");
        let mut h = handler("https://example.com/");
        for i in 0..=MAX_HEADERS {
            h.headers.insert(format!("X-{i}"), "v".into());
        }
        assert_eq!(h.validate("d.http").unwrap_err().field, "d.http.headers");
        for t in [0, 3601] {
            let mut h = handler("https://example.com/");
            h.timeout_secs = Some(t);
            assert_eq!(h.validate("d.http").unwrap_err().field, "d.http.timeout");
        }
        let mut h = handler("https://example.com/");
        h.timeout_secs = Some(5);
        assert_eq!(h.effective_timeout_secs(Some(2)), Some(2));
        assert_eq!(h.effective_timeout_secs(Some(60)), Some(5));
        assert_eq!(h.effective_timeout_secs(None), Some(5));
        h.timeout_secs = None;
        assert_eq!(h.effective_timeout_secs(Some(60)), Some(60));
    }

    #[test]
    fn secrets_resolve_at_execution_and_are_redacted() {
        let lookup = |n: &str| (n == "SKED_SECRET_TOKEN").then(|| "s3cr3t".to_string());
        let (v, secrets) = resolve_secrets("Bearer ${env:SKED_SECRET_TOKEN}", lookup).unwrap();
        assert_eq!(v, "Bearer s3cr3t");
        assert_eq!(
            redact("sent Bearer s3cr3t", &secrets),
            "sent Bearer [redacted]"
        );
        let e = resolve_secrets("${env:SKED_SECRET_OTHER}", lookup).unwrap_err();
        assert!(e.contains("SKED_SECRET_OTHER"), "{e}");
        assert_eq!(
            resolve_secrets("plain", lookup).unwrap(),
            ("plain".into(), vec![])
        );
    }
}
