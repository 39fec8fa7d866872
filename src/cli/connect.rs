//! Where sked is and who is asking: the connection flags every client
//! subcommand takes, the optional config file, and the gRPC clients built
//! from them.
//!
//! Each setting comes from, in order: its flag, its `SKED_*` environment
//! variable, the config file (`--config` / `SKED_CONFIG`, else
//! `$XDG_CONFIG_HOME/sked/config.yaml`, else `~/.config/sked/config.yaml`;
//! a missing default file is no error), then the default. The config file is
//! YAML with the keys `addr`, `token`, `token_file`, `tenant`, `ca_file`,
//! `cert_file`, `key_file` and `output`; any other key is an error naming
//! the file.
//!
//! The API key travels as `authorization: Bearer <token>` and the tenant as
//! `x-tenant-id`, as the server expects (`docs/semantics.md`, "Tenancy"). A
//! token on the command line is visible to other users of the machine (`ps`):
//! prefer `SKED_TOKEN`, `--token-file` or the config file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::output::Format;
use super::{Error, Result};
use crate::proto::v1 as pb;

/// The address used when none is configured.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// The address of this process's client, for error messages.
pub static ADDR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Connection and output flags of every client subcommand (also accepted
/// after the subcommand's own arguments).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// sked's gRPC address: `http://host:port`, `https://host:port` (TLS) or
    /// `host:port` (plaintext). Default http://127.0.0.1:50051.
    #[arg(long, env = "SKED_ADDR", global = true, help_heading = "Connection")]
    pub addr: Option<String>,
    /// API key, sent as `authorization: Bearer <token>` [env: SKED_TOKEN].
    /// Visible to `ps` on the command line: prefer SKED_TOKEN or
    /// --token-file.
    #[arg(long, global = true, help_heading = "Connection")]
    pub token: Option<String>,
    /// File holding the API key, surrounding whitespace ignored [env:
    /// SKED_TOKEN_FILE]. A flag wins over either variable.
    #[arg(
        long,
        global = true,
        conflicts_with = "token",
        help_heading = "Connection"
    )]
    pub token_file: Option<PathBuf>,
    /// Tenant to act for, sent as `x-tenant-id`: needed with a platform key
    /// (and in the development mode) for bindings, runs and events; a tenant
    /// key acts for its own tenant.
    #[arg(long, env = "SKED_TENANT", global = true, help_heading = "Connection")]
    pub tenant: Option<String>,
    /// PEM file of the CA(s) that signed sked's TLS certificate (https
    /// addresses; default: the system's roots).
    #[arg(long, env = "SKED_CA_FILE", global = true, help_heading = "Connection")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --key-file).
    #[arg(
        long,
        env = "SKED_CERT_FILE",
        global = true,
        requires = "key_file",
        help_heading = "Connection"
    )]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of --cert-file.
    #[arg(
        long,
        env = "SKED_KEY_FILE",
        global = true,
        requires = "cert_file",
        help_heading = "Connection"
    )]
    pub key_file: Option<PathBuf>,
    /// Config file (YAML: addr, token, token_file, tenant, ca_file,
    /// cert_file, key_file, output). Default:
    /// $XDG_CONFIG_HOME/sked/config.yaml, if it exists.
    #[arg(long, env = "SKED_CONFIG", global = true, help_heading = "Connection")]
    pub config: Option<PathBuf>,
    /// Output format: readable tables (default), or JSON / YAML of the API's
    /// messages (canonical proto3 JSON mapping) for scripts.
    #[arg(short = 'o', long, value_enum, global = true, help_heading = "Output")]
    pub output: Option<Format>,
    /// Shorthand for `-o json`.
    #[arg(
        long,
        global = true,
        conflicts_with = "output",
        help_heading = "Output"
    )]
    pub json: bool,
}

/// The config file's keys (module docs).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    addr: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    tenant: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    output: Option<Format>,
}

/// The default config file: `$XDG_CONFIG_HOME/sked/config.yaml`, else
/// `$HOME/.config/sked/config.yaml`.
pub fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("sked").join("config.yaml"))
}

fn read_config(explicit: Option<&Path>) -> Result<ConfigFile> {
    let (path, must_exist) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => match default_config_path() {
            Some(p) => (p, false),
            None => return Ok(ConfigFile::default()),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
            return Ok(ConfigFile::default());
        }
        Err(e) => {
            return Err(Error::Input(format!("config file {}: {e}", path.display())));
        }
    };
    if text.trim().is_empty() {
        return Ok(ConfigFile::default());
    }
    serde_saphyr::from_str(&text).map_err(|e| {
        Error::Input(format!(
            "config file {}: {}",
            path.display(),
            one_line(&e.to_string())
        ))
    })
}

/// `s` on one line (multi-line library messages, e.g. YAML snippets).
pub fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything resolved: where, who, how to print.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The URI connected to (`http://` or `https://`).
    pub addr: String,
    /// The API key, if any.
    pub token: Option<String>,
    /// The tenant named with `x-tenant-id`, if any.
    pub tenant: Option<String>,
    /// CA file for TLS.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// How to print.
    pub format: Format,
}

impl Settings {
    /// Flags and environment over the config file over defaults.
    ///
    /// # Errors
    /// [`Error::Input`] for an unreadable or invalid config file or token file.
    pub fn resolve(g: &GlobalArgs) -> Result<Settings> {
        let file = read_config(g.config.as_deref())?;
        let addr = g
            .addr
            .clone()
            .or(file.addr)
            .unwrap_or_else(|| DEFAULT_ADDR.to_string());
        let addr = if addr.contains("://") {
            addr
        } else {
            format!("http://{addr}")
        };
        // Flags, then the environment, then the config file; the token and
        // a token file from the same place are a contradiction.
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let token = match (&g.token, &g.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(read_token(f)?),
            (None, None) => match (env("SKED_TOKEN"), env("SKED_TOKEN_FILE")) {
                (Some(_), Some(_)) => {
                    return Err(Error::Input(
                        "SKED_TOKEN and SKED_TOKEN_FILE are both set: unset one".into(),
                    ));
                }
                (Some(t), None) => Some(t),
                (None, Some(f)) => Some(read_token(Path::new(&f))?),
                (None, None) => match (file.token, file.token_file) {
                    (Some(_), Some(_)) => {
                        return Err(Error::Input(
                            "the config file sets both token and token_file".into(),
                        ));
                    }
                    (Some(t), None) => Some(t),
                    (None, Some(f)) => Some(read_token(&f)?),
                    (None, None) => None,
                },
            },
        }
        .filter(|t| !t.is_empty());
        let cert = g.cert_file.clone().or(file.cert_file);
        let key = g.key_file.clone().or(file.key_file);
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(Error::Input(
                    "a client certificate needs both cert_file and key_file".into(),
                ));
            }
        };
        let format = if g.json {
            Format::Json
        } else {
            g.output.or(file.output).unwrap_or(Format::Table)
        };
        Ok(Settings {
            addr,
            token,
            tenant: g.tenant.clone().or(file.tenant).filter(|t| !t.is_empty()),
            ca_file: g.ca_file.clone().or(file.ca_file),
            identity,
            format,
        })
    }
}

fn read_token(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| Error::Input(format!("token file {}: {e}", path.display())))
}

/// Adds the API key and tenant headers to every call.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    authorization: Option<AsciiMetadataValue>,
    tenant: Option<AsciiMetadataValue>,
}

impl Interceptor for Headers {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(a) = &self.authorization {
            req.metadata_mut().insert("authorization", a.clone());
        }
        if let Some(t) = &self.tenant {
            req.metadata_mut().insert("x-tenant-id", t.clone());
        }
        Ok(req)
    }
}

/// A channel with the caller's headers, as every service client uses it.
pub type Svc = InterceptedService<Channel, Headers>;

/// The connection to one sked node and what to print with.
#[derive(Debug, Clone)]
pub struct Client {
    /// Where it is.
    pub settings: Settings,
    channel: Channel,
    headers: Headers,
}

impl Client {
    /// Resolves the settings and prepares the channel. The connection itself
    /// is made on the first call (and made again after it drops).
    ///
    /// # Errors
    /// [`Error::Input`] for unusable settings, [`Error::Connect`] for an
    /// address that is no URI or TLS files that cannot be read.
    pub fn new(g: &GlobalArgs) -> Result<Client> {
        let settings = Settings::resolve(g)?;
        let _ = ADDR.set(settings.addr.clone());
        let mut endpoint = Endpoint::from_shared(settings.addr.clone())
            .map_err(|e| Error::Input(format!("--addr {:?}: {e}", settings.addr)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            // Dead connections (a node killed, a cable pulled) are noticed
            // within ~40 s even while a stream is idle, so `tail` reconnects.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let https = settings.addr.starts_with("https://");
        if https {
            let mut tls = ClientTlsConfig::new();
            match &settings.ca_file {
                Some(ca) => {
                    let pem = std::fs::read(ca)
                        .map_err(|e| Error::Input(format!("--ca-file {}: {e}", ca.display())))?;
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                None => tls = tls.with_native_roots(),
            }
            if let Some((cert, key)) = &settings.identity {
                let c = std::fs::read(cert)
                    .map_err(|e| Error::Input(format!("--cert-file {}: {e}", cert.display())))?;
                let k = std::fs::read(key)
                    .map_err(|e| Error::Input(format!("--key-file {}: {e}", key.display())))?;
                tls = tls.identity(Identity::from_pem(c, k));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::Connect(format!("TLS for {}: {e}", settings.addr)))?;
        } else if settings.ca_file.is_some() || settings.identity.is_some() {
            return Err(Error::Input(format!(
                "TLS files given but the address {} is not https://",
                settings.addr
            )));
        }
        let header = |name: &str, v: String| {
            MetadataValue::try_from(v)
                .map_err(|_| Error::Input(format!("{name} must be printable ASCII")))
        };
        let headers = Headers {
            authorization: settings
                .token
                .clone()
                .map(|t| header("the API key", format!("Bearer {t}")))
                .transpose()?,
            tenant: settings
                .tenant
                .clone()
                .map(|t| header("--tenant", t))
                .transpose()?,
        };
        Ok(Client {
            channel: endpoint.connect_lazy(),
            settings,
            headers,
        })
    }

    /// How to print.
    pub fn format(&self) -> Format {
        self.settings.format
    }

    fn svc(&self) -> Svc {
        InterceptedService::new(self.channel.clone(), self.headers.clone())
    }

    /// DefinitionService.
    pub fn defs(&self) -> pb::definition_service_client::DefinitionServiceClient<Svc> {
        pb::definition_service_client::DefinitionServiceClient::new(self.svc())
    }
    /// BindingService.
    pub fn bindings(&self) -> pb::binding_service_client::BindingServiceClient<Svc> {
        pb::binding_service_client::BindingServiceClient::new(self.svc())
    }
    /// RunService.
    pub fn runs(&self) -> pb::run_service_client::RunServiceClient<Svc> {
        pb::run_service_client::RunServiceClient::new(self.svc())
    }
    /// LogService.
    pub fn logs(&self) -> pb::log_service_client::LogServiceClient<Svc> {
        pb::log_service_client::LogServiceClient::new(self.svc())
    }
    /// AdminService.
    pub fn admin(&self) -> pb::admin_service_client::AdminServiceClient<Svc> {
        pb::admin_service_client::AdminServiceClient::new(self.svc())
    }
}
