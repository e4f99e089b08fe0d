//! The agent's configuration file (TOML).
//!
//! Loading checks everything it can before anything runs, the rules included (through
//! [`Policy::new`]), so `mds-agent check` and a reload reject a bad file and name the line to
//! fix; a bad reload changes nothing (design invariant 6). Unknown keys are errors everywhere: a
//! typo must not be silently ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use http::Uri;
use serde::de::{Error as _, IgnoredAny};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::policy::{Policy, PolicyError};

/// Why a configuration cannot be used. Every message starts with `PATH[:LINE[:COLUMN]]:` and
/// says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error(
        "{}: cannot read the configuration: {error}; check the path given to --config and \
         that the agent may read it",
        .path.display()
    )]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Not TOML, an unknown key, a value of the wrong type or out of range, or keys that are
    /// fine one by one but not together.
    #[error("{}{}: {message}", .path.display(), Position(.at))]
    Invalid {
        path: PathBuf,
        at: Option<(usize, usize)>,
        message: String,
    },
    /// A rule the policy cannot use.
    #[error("{}:{}: {error}", .path.display(), .error.line())]
    Rule {
        path: PathBuf,
        error: Box<PolicyError>,
    },
}

/// `:LINE:COLUMN`, or nothing when the position is unknown (a default value).
struct Position<'a>(&'a Option<(usize, usize)>);

impl fmt::Display for Position<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, ":{line}:{column}"),
            None => Ok(()),
        }
    }
}

/// The whole configuration. Every key is optional; the defaults suit a GCE VM.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the agent accepts intercepted connections. Default `127.0.0.1:12972`.
    #[serde(deserialize_with = "fixed_address")]
    pub listen: SocketAddrV4,
    /// The metadata server address whose connections are intercepted. Default
    /// `169.254.169.254:80`.
    #[serde(deserialize_with = "fixed_address")]
    pub intercept: SocketAddrV4,
    /// The metadata server's IPv6 address, intercepted on the same port (GCE serves IPv6-only
    /// VMs there, and anyone may dial it directly). Default `fd20:ce::254`; `""` turns it off.
    #[serde(deserialize_with = "optional_ipv6")]
    pub intercept6: Option<Ipv6Addr>,
    /// cgroup v2 directory the kernel programs attach to. Default `None`: the root of the
    /// cgroup2 mount, found in /proc/self/mountinfo.
    #[serde(deserialize_with = "absolute_path_option")]
    pub cgroup: Option<PathBuf>,
    /// Where requests the broker does not answer go. Default `http://169.254.169.254`.
    pub upstream: UpstreamKind,
    /// Ports of the metadata address reachable without interception. Default `[53]` (DNS).
    pub open_ports: Vec<u16>,
    /// Callers the kernel programs leave alone. Default: none.
    pub exempt: Exempt,
    /// SO_MARK of the agent's own upstream sockets, which the kernel programs let through; must
    /// be nonzero. Default `0x4d44` ("MD").
    #[serde(deserialize_with = "upstream_mark")]
    pub upstream_mark: u32,
    /// Entries of each kernel record map. Default 65536.
    #[serde(deserialize_with = "map_entries")]
    pub map_entries: u32,
    /// bpffs directory for pinned links. Default `/sys/fs/bpf/mds-agent`.
    #[serde(deserialize_with = "absolute_path")]
    pub pin_dir: PathBuf,
    /// IAM Service Account Credentials API base URL, without a trailing slash; `http://` is
    /// accepted for test servers. Default `https://iamcredentials.googleapis.com`.
    #[serde(deserialize_with = "iam_endpoint")]
    pub iam_endpoint: String,
    /// Off GCE: a service-account key file for the agent's own token. Default `None`: the
    /// gcp_auth defaults (or the upstream metadata server on GCE).
    pub credentials: Option<PathBuf>,
    /// `[token]`.
    pub token: TokenConfig,
    /// `[emulator]`: what the built-in metadata server reports when `upstream = "emulator"`.
    pub emulator: EmulatorConfig,
    /// The `[[rule]]` tables, in file order. Default: none, so every caller is denied.
    #[serde(rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 12972),
            intercept: SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80),
            intercept6: Some(Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254)),
            cgroup: None,
            upstream: UpstreamKind::Url(Uri::from_static("http://169.254.169.254")),
            open_ports: vec![53],
            exempt: Exempt::default(),
            upstream_mark: 0x4d44,
            map_entries: 65536,
            pin_dir: PathBuf::from("/sys/fs/bpf/mds-agent"),
            iam_endpoint: "https://iamcredentials.googleapis.com".to_owned(),
            credentials: None,
            token: TokenConfig::default(),
            emulator: EmulatorConfig::default(),
            rules: Vec::new(),
        }
    }
}

/// `upstream = "http://HOST[:PORT]"` or `upstream = "emulator"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamKind {
    /// The real metadata server (plain HTTP), reached with the agent's marked sockets.
    Url(Uri),
    /// The built-in metadata server, configured by `[emulator]`.
    Emulator,
}

impl<'de> Deserialize<'de> for UpstreamKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == "emulator" {
            return Ok(UpstreamKind::Emulator);
        }
        if text.starts_with("https://") {
            return Err(D::Error::custom(format!(
                "upstream {text:?}: the metadata server speaks plain HTTP; write \
                 \"http://169.254.169.254\""
            )));
        }
        let expected = "write \"http://HOST[:PORT]\" for a metadata server (default \
                        \"http://169.254.169.254\") or \"emulator\" for the built-in one";
        let uri = text
            .parse::<Uri>()
            .ok()
            .filter(|uri| {
                uri.scheme_str() == Some("http") && uri.host().is_some_and(|h| !h.is_empty())
            })
            .ok_or_else(|| {
                D::Error::custom(format!("upstream {text:?} is not usable; {expected}"))
            })?;
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(D::Error::custom(format!(
                "upstream {text:?} has a path or query; requests keep their own paths, so \
                 give only the server: \"http://HOST[:PORT]\""
            )));
        }
        Ok(UpstreamKind::Url(uri))
    }
}

/// `[exempt]`: callers the kernel programs never intercept. They reach the real metadata server
/// as the VM itself, even while the agent is down, so keep the lists short.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Exempt {
    /// Default: none.
    pub uids: Vec<u32>,
    /// User names. Default: none.
    pub users: Vec<String>,
    /// cgroup paths relative to the cgroup2 mount, e.g. `/system.slice/google-guest-agent.service`.
    /// Default: none.
    #[serde(deserialize_with = "cgroup_paths")]
    pub cgroups: Vec<String>,
}

/// `[token]`: access tokens the broker mints.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// A cached token is refreshed this long before it expires; less than `lifetime_secs`.
    /// Default 300.
    pub refresh_before_secs: u64,
    /// Lifetime asked of IAM, 1..=43200 (over 3600 needs the organization policy
    /// constraints/iam.allowServiceAccountCredentialLifetimeExtension). Default 3600.
    #[serde(deserialize_with = "token_lifetime")]
    pub lifetime_secs: u64,
    /// Scopes of a token request that names none; at least one. Default
    /// `["https://www.googleapis.com/auth/cloud-platform"]`.
    #[serde(deserialize_with = "default_scopes")]
    pub default_scopes: Vec<String>,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            refresh_before_secs: 300,
            lifetime_secs: 3600,
            default_scopes: vec!["https://www.googleapis.com/auth/cloud-platform".to_owned()],
        }
    }
}

/// `[emulator]`: the VM the built-in metadata server describes. The defaults describe a
/// made-up demo VM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmulatorConfig {
    /// Default `demo-project`.
    pub project_id: String,
    /// Digits only (gcloud checks). Default `123456789012`.
    #[serde(deserialize_with = "digits")]
    pub numeric_project_id: String,
    /// Default `us-central1-a`.
    pub zone: String,
    /// Digits only. Default `1234567890123456789`.
    #[serde(deserialize_with = "digits")]
    pub instance_id: String,
    /// Default `mds-demo`.
    pub instance_name: String,
    /// Default `mds-demo.us-central1-a.c.demo-project.internal`.
    pub hostname: String,
    /// The VM's own service account. Default `vm@demo-project.iam.gserviceaccount.com`.
    #[serde(deserialize_with = "email")]
    pub service_account: String,
    /// `[emulator.attributes]`: instance attributes. Default: none.
    pub attributes: BTreeMap<String, String>,
    /// `[emulator.project_attributes]`: project attributes. Default: none.
    pub project_attributes: BTreeMap<String, String>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            project_id: "demo-project".to_owned(),
            numeric_project_id: "123456789012".to_owned(),
            zone: "us-central1-a".to_owned(),
            instance_id: "1234567890123456789".to_owned(),
            instance_name: "mds-demo".to_owned(),
            hostname: "mds-demo.us-central1-a.c.demo-project.internal".to_owned(),
            service_account: "vm@demo-project.iam.gserviceaccount.com".to_owned(),
            attributes: BTreeMap::new(),
            project_attributes: BTreeMap::new(),
        }
    }
}

/// One `[[rule]]` table, as written; [`Policy::new`] compiles and checks it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: Option<String>,
    pub uid: Option<u32>,
    pub user: Option<String>,
    pub gid: Option<u32>,
    pub group: Option<String>,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    pub slice: Option<String>,
    pub container: Option<String>,
    pub pod: Option<String>,
    /// Exactly one of `service_account` and `action`.
    pub service_account: Option<String>,
    pub action: Option<Action>,
    pub scopes: Option<Vec<String>>,
    pub audiences: Option<Vec<String>>,
    #[serde(default)]
    pub conceal: Vec<String>,
    /// 1-based line of the `[[rule]]` header, for messages; set by [`Config::parse`].
    #[serde(skip)]
    pub line: usize,
}

/// `action = "passthrough"` (the VM's own identity, an explicit choice) or `action = "deny"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Passthrough,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Passthrough => "passthrough",
            Action::Deny => "deny",
        })
    }
}

/// Where the keys that take part in checks across keys are written, from a second, lenient
/// pass over the same text.
#[derive(Deserialize)]
struct Positions {
    listen: Option<Spanned<IgnoredAny>>,
    intercept: Option<Spanned<IgnoredAny>>,
    open_ports: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    token: TokenPositions,
    #[serde(default)]
    rule: Vec<Spanned<IgnoredAny>>,
}

#[derive(Default, Deserialize)]
struct TokenPositions {
    refresh_before_secs: Option<Spanned<IgnoredAny>>,
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks `text`; `origin` names it in messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let invalid = |at: Option<&Spanned<IgnoredAny>>, message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            at: at.map(|spanned| position(text, spanned.span().start)),
            message,
        };
        let toml_error = |e: toml::de::Error| ConfigError::Invalid {
            path: origin.to_owned(),
            at: e.span().map(|span| position(text, span.start)),
            message: e.message().trim_end().replace('\n', "; "),
        };
        let mut config: Config = toml::from_str(text).map_err(toml_error)?;
        let Positions {
            listen,
            intercept,
            open_ports,
            token,
            rule,
        } = toml::from_str(text).map_err(toml_error)?;
        for (config, header) in config.rules.iter_mut().zip(&rule) {
            config.line = position(text, header.span().start).0;
        }

        if config.listen == config.intercept {
            return Err(invalid(
                listen.as_ref().or(intercept.as_ref()),
                format!(
                    "listen and intercept are both {}; the agent must listen elsewhere than the \
                     address it intercepts, e.g. listen = \"127.0.0.1:12972\"",
                    config.listen
                ),
            ));
        }
        if config.open_ports.contains(&config.intercept.port()) {
            return Err(invalid(
                open_ports.as_ref(),
                format!(
                    "open_ports lists {}, the intercepted port: workloads would reach the real \
                     metadata server around the agent; remove it",
                    config.intercept.port()
                ),
            ));
        }
        let TokenConfig {
            refresh_before_secs,
            lifetime_secs,
            ..
        } = config.token;
        if refresh_before_secs >= lifetime_secs {
            return Err(invalid(
                token.refresh_before_secs.as_ref(),
                format!(
                    "[token] refresh_before_secs = {refresh_before_secs} is not less than \
                     lifetime_secs = {lifetime_secs}: every token would be refreshed at once; \
                     use a smaller value (default 300)"
                ),
            ));
        }
        Policy::new(&config.rules).map_err(|error| ConfigError::Rule {
            path: origin.to_owned(),
            error: Box::new(error),
        })?;
        Ok(config)
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    // Count characters, not bytes: skip UTF-8 continuation bytes.
    let column = 1 + before[line_start..]
        .iter()
        .filter(|&&b| b & 0xc0 != 0x80)
        .count();
    (line, column)
}

fn fixed_address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddrV4, D::Error> {
    let text = String::deserialize(deserializer)?;
    let address: SocketAddrV4 = text.parse().map_err(|_| {
        D::Error::custom(format!(
            "{text:?} is not an IPv4 address with a port; write e.g. \"127.0.0.1:12972\""
        ))
    })?;
    if address.port() == 0 || address.ip().is_unspecified() {
        return Err(D::Error::custom(format!(
            "{address} is not a fixed address: connections are rewritten to and from exact \
             addresses, so give a concrete IPv4 address and a nonzero port, e.g. \
             \"127.0.0.1:12972\""
        )));
    }
    Ok(address)
}

fn upstream_mark<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    match u32::deserialize(deserializer)? {
        0 => Err(D::Error::custom(
            "upstream_mark = 0 marks nothing, and the kernel programs let the agent's own \
             upstream connections through by their mark; use a nonzero value no other software \
             on the host sets (default 0x4d44)",
        )),
        mark => Ok(mark),
    }
}

fn map_entries<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    match u32::deserialize(deserializer)? {
        0 => Err(D::Error::custom(
            "map_entries = 0 leaves no room to record callers; give the number of concurrent \
             metadata connections to plan for (default 65536)",
        )),
        entries => Ok(entries),
    }
}

fn absolute_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    let path = PathBuf::deserialize(deserializer)?;
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(D::Error::custom(format!(
            "{} is a relative path; the agent's working directory is arbitrary, so write an \
             absolute path",
            path.display()
        )))
    }
}

fn optional_ipv6<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Ipv6Addr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        D::Error::custom(format!(
            "{text:?} is not an IPv6 address; write intercept6 = \"fd20:ce::254\", or \"\" to intercept IPv4 only"
        ))
    })
}

fn absolute_path_option<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<PathBuf>, D::Error> {
    absolute_path(deserializer).map(Some)
}

fn iam_endpoint<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let text = String::deserialize(deserializer)?;
    let usable = text.parse::<Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("https" | "http"))
            && uri.host().is_some_and(|h| !h.is_empty())
            && uri.query().is_none()
    });
    if usable {
        Ok(text.trim_end_matches('/').to_owned())
    } else {
        Err(D::Error::custom(format!(
            "iam_endpoint {text:?} is not an http(s) URL without a query; write e.g. \
             \"https://iamcredentials.googleapis.com\" (the default)"
        )))
    }
}

fn cgroup_paths<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let paths = Vec::<String>::deserialize(deserializer)?;
    match paths.iter().find(|path| !path.starts_with('/')) {
        Some(path) => Err(D::Error::custom(format!(
            "cgroup {path:?} does not start with '/'; cgroup paths are relative to the cgroup2 \
             mount and start with '/', e.g. \"/system.slice/google-guest-agent.service\""
        ))),
        None => Ok(paths),
    }
}

fn token_lifetime<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    match u64::deserialize(deserializer)? {
        secs @ 1..=43200 => Ok(secs),
        secs => Err(D::Error::custom(format!(
            "lifetime_secs = {secs} is outside 1..=43200, the range IAM accepts (over 3600 only \
             with the organization policy that allows it); the default is 3600"
        ))),
    }
}

fn default_scopes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let scopes = Vec::<String>::deserialize(deserializer)?;
    if scopes.is_empty() || scopes.iter().any(|s| s.trim().is_empty()) {
        Err(D::Error::custom(
            "default_scopes needs at least one non-empty scope (IAM mints no token without \
             one); the default is [\"https://www.googleapis.com/auth/cloud-platform\"]",
        ))
    } else {
        Ok(scopes)
    }
}

fn digits<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let text = String::deserialize(deserializer)?;
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        Ok(text)
    } else {
        Err(D::Error::custom(format!(
            "{text:?} is not a number; GCE's numeric ids are digits only (clients check), e.g. \
             \"123456789012\""
        )))
    }
}

fn email<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let text = String::deserialize(deserializer)?;
    match text.split_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => Ok(text),
        _ => Err(D::Error::custom(format!(
            "{text:?} is not a service-account email; write e.g. \
             \"vm@demo-project.iam.gserviceaccount.com\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "/etc/mds-agent/config.toml";

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new(ORIGIN)).unwrap_or_else(|e| panic!("should parse: {e}"))
    }

    /// The error message, which must start with the file name.
    fn error(text: &str) -> String {
        match Config::parse(text, Path::new(ORIGIN)) {
            Ok(config) => panic!("should be rejected:\n{text}\ngot {config:#?}"),
            Err(e) => {
                let message = e.to_string();
                assert!(message.starts_with(ORIGIN), "{message}");
                message
            }
        }
    }

    fn assert_contains(message: &str, parts: &[&str]) {
        for part in parts {
            assert!(
                message.contains(part),
                "{message:?} should contain {part:?}"
            );
        }
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let config = parse("");
        assert_eq!(config, Config::default());
        assert_eq!(config.listen.to_string(), "127.0.0.1:12972");
        assert_eq!(config.intercept.to_string(), "169.254.169.254:80");
        assert_eq!(
            config.upstream,
            UpstreamKind::Url(Uri::from_static("http://169.254.169.254"))
        );
        assert_eq!(config.open_ports, [53]);
        assert_eq!(config.upstream_mark, 0x4d44);
        assert_eq!(config.token.lifetime_secs, 3600);
        assert!(config.rules.is_empty());
    }

    #[test]
    fn every_key() {
        let config = parse(
            r#"
listen = "127.0.0.2:9000"
intercept = "169.254.169.254:80"
cgroup = "/sys/fs/cgroup/test"
upstream = "emulator"
open_ports = [53, 8080]
upstream_mark = 0x1234
map_entries = 1024
pin_dir = "/sys/fs/bpf/test"
iam_endpoint = "http://127.0.0.1:8081/"
credentials = "/etc/mds-agent/key.json"

[exempt]
uids = [0]
users = ["root"]
cgroups = ["/system.slice/google-guest-agent.service"]

[token]
refresh_before_secs = 60
lifetime_secs = 600
default_scopes = ["s1", "s2"]

[emulator]
project_id = "p"
numeric_project_id = "42"
zone = "europe-west1-b"
instance_id = "7"
instance_name = "vm"
hostname = "vm.internal"
service_account = "vm@p.iam.gserviceaccount.com"
[emulator.attributes]
ssh-keys = "alice:ssh-ed25519 AAAA"
[emulator.project_attributes]
enable-oslogin = "TRUE"

[[rule]]
name = "app"
uid = 1000
user = "alice"
gid = 1000
group = "alice"
cgroup = "/system.slice/app.service"
unit = "app.service"
slice = "system.slice"
container = "abc*"
pod = "1234*"
service_account = "app@p.iam.gserviceaccount.com"
scopes = ["s1"]
audiences = ["https://x"]
conceal = ["instance/attributes/ssh-keys"]

[[rule]]
action = "passthrough"
"#,
        );
        assert_eq!(
            config.listen,
            SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 9000)
        );
        assert_eq!(
            config.cgroup.as_deref(),
            Some(Path::new("/sys/fs/cgroup/test"))
        );
        assert_eq!(config.upstream, UpstreamKind::Emulator);
        assert_eq!(config.open_ports, [53, 8080]);
        assert_eq!((config.upstream_mark, config.map_entries), (0x1234, 1024));
        assert_eq!(config.pin_dir, Path::new("/sys/fs/bpf/test"));
        assert_eq!(
            config.iam_endpoint, "http://127.0.0.1:8081",
            "trailing '/' trimmed"
        );
        assert_eq!(
            config.credentials.as_deref(),
            Some(Path::new("/etc/mds-agent/key.json"))
        );
        assert_eq!(
            config.exempt,
            Exempt {
                uids: vec![0],
                users: vec!["root".into()],
                cgroups: vec!["/system.slice/google-guest-agent.service".into()],
            }
        );
        assert_eq!(
            config.token,
            TokenConfig {
                refresh_before_secs: 60,
                lifetime_secs: 600,
                default_scopes: vec!["s1".into(), "s2".into()],
            }
        );
        assert_eq!(config.emulator.numeric_project_id, "42");
        assert_eq!(
            config.emulator.attributes["ssh-keys"],
            "alice:ssh-ed25519 AAAA"
        );
        assert_eq!(config.emulator.project_attributes["enable-oslogin"], "TRUE");
        let [app, rest] = &config.rules[..] else {
            panic!("two rules: {:?}", config.rules)
        };
        assert_eq!(
            app,
            &RuleConfig {
                name: Some("app".into()),
                uid: Some(1000),
                user: Some("alice".into()),
                gid: Some(1000),
                group: Some("alice".into()),
                cgroup: Some("/system.slice/app.service".into()),
                unit: Some("app.service".into()),
                slice: Some("system.slice".into()),
                container: Some("abc*".into()),
                pod: Some("1234*".into()),
                service_account: Some("app@p.iam.gserviceaccount.com".into()),
                action: None,
                scopes: Some(vec!["s1".into()]),
                audiences: Some(vec!["https://x".into()]),
                conceal: vec!["instance/attributes/ssh-keys".into()],
                line: 36,
            }
        );
        assert_eq!((rest.action, rest.line), (Some(Action::Passthrough), 52));
    }

    #[test]
    fn rule_lines_are_header_lines() {
        let config = parse(
            "listen = \"127.0.0.1:1\"\n\n[[rule]]\nuid = 1\naction = \"deny\"\n\n  [[ rule ]] # x\n\
             action = \"deny\"\n[exempt]\nuids = []\n[[rule]]\naction = \"deny\"\n",
        );
        let lines: Vec<usize> = config.rules.iter().map(|r| r.line).collect();
        assert_eq!(lines, [3, 7, 11]);
    }

    #[test]
    fn shipped_example_is_valid() {
        let config = parse(include_str!("../../deploy/config.toml"));
        assert!(!config.rules.is_empty());
    }

    #[test]
    fn unreadable_file_names_path_and_os_error() {
        let path = Path::new("/nonexistent/mds-agent.toml");
        let Err(e) = Config::load(path) else {
            panic!("a missing file cannot load")
        };
        assert_contains(
            &e.to_string(),
            &[
                "/nonexistent/mds-agent.toml: cannot read",
                "No such file or directory",
                "--config",
            ],
        );
    }

    #[test]
    fn load_reads_the_file() {
        let dir = std::env::temp_dir().join(format!("mds-agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let path = dir.join("config.toml");
        std::fs::write(&path, "map_entries = 7\n[[rule]]\naction = \"deny\"\n")
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let config = Config::load(&path);
        let _ = std::fs::remove_dir_all(&dir);
        let config = config.unwrap_or_else(|e| panic!("should load: {e}"));
        assert_eq!((config.map_entries, config.rules[0].line), (7, 2));
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let message = error("map_entries = 1\nlisten = \n");
        assert_contains(&message, &[&format!("{ORIGIN}:2:10: "), "invalid string"]);
        assert!(!message.contains('\n'), "one line: {message:?}");
    }

    #[test]
    fn type_error_has_line_and_column() {
        let message = error("\n[[rule]]\nuid = \"alice\"\naction = \"deny\"\n");
        assert_contains(&message, &[&format!("{ORIGIN}:3:7: "), "expected u32"]);
        let message = error("[[rule]]\nuid = -1\naction = \"deny\"\n");
        assert_contains(&message, &[&format!("{ORIGIN}:2:7: ")]);
    }

    #[test]
    fn unknown_keys_are_named() {
        let message = error("lisen = \"127.0.0.1:1\"\n");
        assert_contains(
            &message,
            &[
                &format!("{ORIGIN}:1:1: "),
                "unknown field `lisen`",
                "`listen`",
            ],
        );
        let message = error("[token]\nlifetime = 3\n");
        assert_contains(
            &message,
            &[&format!("{ORIGIN}:2:1: "), "`lifetime`", "`lifetime_secs`"],
        );
        let message = error("[[rule]]\naction = \"deny\"\nservice_acount = \"a@b\"\n");
        assert_contains(&message, &[&format!("{ORIGIN}:3:1: "), "`service_acount`"]);
        let message = error("[[rule]]\naction = \"deny\"\nline = 3\n");
        assert_contains(&message, &["unknown field `line`"]);
        let message = error("[exempt]\ngid = [1]\n");
        assert_contains(&message, &["unknown field `gid`"]);
        let message = error("[emulator.attributes]\nx = \"1\"\n[emulator]\nregion = \"x\"\n");
        assert_contains(&message, &["unknown field `region`"]);
    }

    #[test]
    fn unknown_action_lists_the_choices() {
        let message = error("[[rule]]\naction = \"allow\"\n");
        assert_contains(&message, &[":2:10: ", "`allow`", "`passthrough`", "`deny`"]);
    }

    #[test]
    fn upstream() {
        assert_eq!(
            parse("upstream = \"http://127.0.0.1:8080\"").upstream,
            UpstreamKind::Url(Uri::from_static("http://127.0.0.1:8080"))
        );
        assert!(matches!(
            parse("upstream = \"http://metadata/\"").upstream,
            UpstreamKind::Url(_)
        ));
        let message = error("\nupstream = \"https://169.254.169.254\"");
        assert_contains(
            &message,
            &[":2:12: ", "plain HTTP", "\"http://169.254.169.254\""],
        );
        for bad in [
            "metadata",
            "ftp://x",
            "http://",
            "169.254.169.254:80",
            "Emulator",
        ] {
            let message = error(&format!("upstream = {bad:?}"));
            assert_contains(&message, &[":1:12: ", "\"emulator\"", "http://HOST[:PORT]"]);
        }
        let message = error("upstream = \"http://169.254.169.254/computeMetadata/v1\"");
        assert_contains(&message, &["path or query"]);
    }

    #[test]
    fn nonzero_numbers() {
        let message = error("upstream_mark = 0");
        assert_contains(&message, &[":1:17: ", "upstream_mark = 0", "nonzero"]);
        let message = error("map_entries = 0");
        assert_contains(&message, &[":1:15: ", "map_entries = 0", "65536"]);
    }

    #[test]
    fn listen_and_intercept_need_fixed_addresses() {
        assert_contains(
            &error("listen = \"127.0.0.1:0\""),
            &[":1:10: ", "nonzero port"],
        );
        assert_contains(
            &error("listen = \"0.0.0.0:12972\""),
            &["concrete IPv4 address"],
        );
        assert_contains(
            &error("intercept = \"169.254.169.254\""),
            &[":1:13: ", "with a port"],
        );
        assert_contains(&error("listen = \"[::1]:12972\""), &["IPv4 address"]);
    }

    #[test]
    fn the_ipv6_metadata_address_is_intercepted_unless_turned_off() {
        assert_eq!(
            parse("").intercept6,
            Some("fd20:ce::254".parse().expect("address"))
        );
        assert_eq!(parse("intercept6 = \"\"").intercept6, None);
        assert_eq!(
            parse("intercept6 = \"fd00::1\"").intercept6,
            Some("fd00::1".parse().expect("address"))
        );
        let message = error("intercept6 = \"169.254.169.254\"");
        assert!(
            message.contains("is not an IPv6 address") && message.contains(":1:"),
            "{message}"
        );
    }

    #[test]
    fn listen_must_differ_from_intercept() {
        let message = error("map_entries = 9\nlisten = \"169.254.169.254:80\"\n");
        assert_contains(
            &message,
            &[
                ":2:10: ",
                "listen and intercept are both 169.254.169.254:80",
            ],
        );
    }

    #[test]
    fn open_ports_must_not_include_the_intercepted_port() {
        let message = error("open_ports = [53, 80]");
        assert_contains(&message, &[":1:14: ", "open_ports lists 80", "remove it"]);
        let message = error("intercept = \"169.254.169.254:53\"");
        assert_contains(&message, &[&format!("{ORIGIN}: open_ports lists 53")]);
    }

    #[test]
    fn token_limits() {
        let message = error("[token]\nrefresh_before_secs = 3600\n");
        assert_contains(
            &message,
            &[
                ":2:23: ",
                "refresh_before_secs = 3600",
                "lifetime_secs = 3600",
            ],
        );
        assert_contains(
            &error("[token]\nlifetime_secs = 0\n"),
            &[":2:17: ", "1..=43200"],
        );
        assert_contains(&error("[token]\nlifetime_secs = 43201\n"), &["1..=43200"]);
        assert_contains(
            &error("[token]\ndefault_scopes = []\n"),
            &[":2:18: ", "at least one"],
        );
    }

    #[test]
    fn paths_and_endpoints() {
        assert_contains(&error("pin_dir = \"bpf\""), &[":1:11: ", "absolute path"]);
        assert_contains(
            &error("cgroup = \"sys/fs/cgroup\""),
            &[":1:10: ", "absolute path"],
        );
        assert_contains(
            &error("[exempt]\ncgroups = [\"system.slice\"]"),
            &[":2:11: ", "start with '/'"],
        );
        for bad in ["iamcredentials.googleapis.com", "ftp://x", "https://x/?a=b"] {
            assert_contains(
                &error(&format!("iam_endpoint = {bad:?}")),
                &[":1:16: ", "iam_endpoint"],
            );
        }
    }

    #[test]
    fn emulator_ids_and_account() {
        assert_contains(
            &error("[emulator]\nnumeric_project_id = \"demo\""),
            &[":2:22: ", "digits"],
        );
        assert_contains(&error("[emulator]\ninstance_id = \"\""), &["digits"]);
        assert_contains(
            &error("[emulator]\nservice_account = \"vm\""),
            &[":2:19: ", "email"],
        );
    }

    #[test]
    fn rule_errors_name_the_rule_line() {
        let text =
            "map_entries = 1\n\n[[rule]]\naction = \"deny\"\nuid = 0\n\n[[rule]]\nname = \"app\"\n\
                    service_account = \"app\"\n";
        assert_contains(
            &error(text),
            &[&format!(
                "{ORIGIN}:7: rule 2 \"app\" (line 7): service_account \"app\""
            )],
        );
        let both = "[[rule]]\naction = \"deny\"\nservice_account = \"a@b\"\n";
        assert_contains(
            &error(both),
            &[":1: rule 1 (line 1): sets both", "keep one"],
        );
        let neither = "[[rule]]\nuid = 3\n";
        assert_contains(&error(neither), &[":1: rule 1 (line 1): sets neither"]);
        let glob = "\n\n[[rule]]\ncgroup = \"/system.slice/[app\"\naction = \"deny\"\n";
        assert_contains(
            &error(glob),
            &[":3: rule 1 (line 3): cgroup = \"/system.slice/[app\""],
        );
    }

    #[test]
    fn positions_count_characters() {
        assert_eq!(position("", 0), (1, 1));
        assert_eq!(position("ab\ncd", 4), (2, 2));
        assert_eq!(
            position("é = 1", 2),
            (1, 2),
            "a 2-byte character is one column"
        );
        assert_eq!(position("ab", 99), (1, 3));
    }
}
