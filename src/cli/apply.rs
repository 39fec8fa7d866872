//! `sked apply -f FILE`: definitions as code. A YAML file (the API's field
//! names, snake_case or camelCase) of definitions and, per tenant, bindings:
//!
//! ```yaml
//! definitions:
//!   - name: hello
//!     command: {program: sh, args: [-c, "echo hello"]}
//!     schedule: {interval: {every: 60s}}
//! bindings:
//!   acme:                       # tenant id
//!     - definition: hello       # the key: (tenant, definition)
//!       params: {who: acme}
//! ```
//!
//! Upserts through the API: a definition is keyed by its name, a binding by
//! (tenant, definition) — at most one binding per pair in the file, and
//! sked must hold at most one for the pair. Each object is read, compared
//! field by field, and updated with only the changed top-level fields in
//! the update mask and the etag just read (a concurrent change is ABORTED
//! and stops the apply). Apply owns the fields the file names: a field the
//! file leaves out is left as it is (`labels` and `params` are compared
//! whole). Every definition apply writes carries the label
//! [`MANAGED_LABEL`]`=true`.
//!
//! `--prune` deletes the definitions carrying that label that the file no
//! longer lists (with their bindings), and, in each tenant the file lists
//! under `bindings`, the bindings of labelled definitions the file no
//! longer lists. Nothing else is touched.
//!
//! Unknown keys and bad values are errors naming the file, line and field;
//! nothing is sent then.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use prost_reflect::DynamicMessage;
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::connect::{Client, GlobalArgs};
use super::output::{POOL, to_json_named};
use super::{EXIT_OK, Error, Result};
use crate::proto::v1 as pb;

/// The label apply puts on every definition it writes; `--prune` deletes
/// only definitions (and their bindings) that carry it.
pub const MANAGED_LABEL: &str = "sked.apply/managed";

const DEF: &str = "sked.v1.TaskDefinition";
const BINDING: &str = "sked.v1.Binding";

/// Fields of a definition sked sets; a file may not.
const DEF_SERVER_FIELDS: &[&str] = &["etag", "createTime", "updateTime"];
/// Fields of a binding the file may set.
const BINDING_FIELDS: &[&str] = &[
    "definition",
    "schedule",
    "params",
    "effectiveFrom",
    "effectiveUntil",
    "enabled",
    "timeout",
    "retryPolicy",
    "priority",
    "maxActiveRuns",
];
/// Handler fields: one mask path (`command`) replaces whichever kind.
const HANDLERS: &[&str] = &["command", "event", "http", "worker", "workflow"];

/// `sked apply`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  sked apply -f examples/definitions.yaml --dry-run   # what would change
  sked apply -f examples/definitions.yaml             # create / update
  sked apply -f examples/definitions.yaml --prune     # also delete what the file dropped

Definitions are keyed by name, bindings by (tenant, definition). Only changed
fields are updated, with the etag just read. Definitions apply writes carry the
label sked.apply/managed=true; --prune deletes only those (and their bindings).
Needs a platform admin key.")]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    /// The YAML file of definitions and bindings (`-` for stdin).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: String,
    /// Print what would change (created / updated with the fields /
    /// unchanged / deleted) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Also delete definitions and bindings an earlier apply created that
    /// the file no longer lists.
    #[arg(long)]
    prune: bool,
}

/// A message of the API read straight from the YAML deserializer, so that
/// errors carry the line and column.
#[derive(Debug)]
struct Msg<const B: bool> {
    json: serde_json::Value,
}

impl<'de, const B: bool> Deserialize<'de> for Msg<B> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let desc = POOL
            .get_message_by_name(if B { BINDING } else { DEF })
            .expect("in the descriptor set");
        let m = DynamicMessage::deserialize(desc, d)?;
        let json = m
            .serialize_with_options(
                serde_json::value::Serializer,
                &prost_reflect::SerializeOptions::new(),
            )
            .map_err(serde::de::Error::custom)?;
        Ok(Msg { json })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default)]
    definitions: Vec<Spanned<Msg<false>>>,
    #[serde(default)]
    bindings: BTreeMap<String, Vec<Spanned<Msg<true>>>>,
}

/// One definition of the file, in proto3 JSON (camelCase), labelled.
#[derive(Debug, Clone)]
pub struct FileDefinition {
    /// Its name.
    pub name: String,
    /// The definition, with [`MANAGED_LABEL`] added.
    pub definition: pb::TaskDefinition,
    json: serde_json::Map<String, serde_json::Value>,
}

/// One binding of the file.
#[derive(Debug, Clone)]
pub struct FileBinding {
    /// Its tenant.
    pub tenant: String,
    /// Its definition's name.
    pub definition: String,
    json: serde_json::Map<String, serde_json::Value>,
}

/// A parsed definitions file.
#[derive(Debug, Clone, Default)]
pub struct File {
    /// Definitions, in file order.
    pub definitions: Vec<FileDefinition>,
    /// Bindings, by tenant in name order, then file order.
    pub bindings: Vec<FileBinding>,
    /// The tenants listed under `bindings`.
    pub tenants: BTreeSet<String>,
}

/// Parses a definitions file; `origin` (the path) names it in errors.
///
/// # Errors
/// [`Error::Input`] naming `origin`, the line and the field: unknown keys,
/// bad values, fields sked sets, duplicate names or (tenant, definition)
/// pairs, a binding without `definition`.
pub fn parse(origin: &str, text: &str) -> Result<File> {
    let doc: Doc = serde_saphyr::from_str(text).map_err(|e| yaml_error(origin, text, &e))?;
    let at = |line: u64, what: String| Error::Input(format!("{origin}:{line}: {what}"));
    let mut out = File::default();
    let mut names = BTreeSet::new();
    for (i, d) in doc.definitions.into_iter().enumerate() {
        let line = d.referenced.line();
        let serde_json::Value::Object(mut json) = d.value.json else {
            return Err(at(line, format!("definitions[{i}]: expected a mapping")));
        };
        for f in DEF_SERVER_FIELDS {
            if json.contains_key(*f) {
                return Err(at(
                    line,
                    format!("definitions[{i}].{}: set by sked, not by a file", snake(f)),
                ));
            }
        }
        let name = match json.get("name") {
            Some(serde_json::Value::String(n)) if !n.is_empty() => n.clone(),
            _ => return Err(at(line, format!("definitions[{i}].name: required"))),
        };
        if !names.insert(name.clone()) {
            return Err(at(
                line,
                format!("definitions[{i}].name: {name:?} is listed twice"),
            ));
        }
        let labels = json
            .entry("labels")
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if let serde_json::Value::Object(l) = labels {
            l.insert(MANAGED_LABEL.into(), "true".into());
        }
        let definition = super::output::from_json_named(DEF, json.clone().into())
            .map_err(|e| at(line, format!("definitions[{i}]: {e}")))?;
        out.definitions.push(FileDefinition {
            name,
            definition,
            json,
        });
    }
    for (tenant, list) in doc.bindings {
        out.tenants.insert(tenant.clone());
        let mut seen = BTreeSet::new();
        for (i, b) in list.into_iter().enumerate() {
            let line = b.referenced.line();
            let field = format!("bindings.{tenant}[{i}]");
            let serde_json::Value::Object(json) = b.value.json else {
                return Err(at(line, format!("{field}: expected a mapping")));
            };
            if let Some(k) = json.keys().find(|k| !BINDING_FIELDS.contains(&k.as_str())) {
                return Err(at(
                    line,
                    format!(
                        "{field}.{}: not set by a file (one of {})",
                        snake(k),
                        BINDING_FIELDS
                            .iter()
                            .map(|f| snake(f))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            let definition = match json.get("definition") {
                Some(serde_json::Value::String(n)) if !n.is_empty() => n.clone(),
                _ => return Err(at(line, format!("{field}.definition: required"))),
            };
            if !seen.insert(definition.clone()) {
                return Err(at(
                    line,
                    format!(
                        "{field}.definition: a second binding of {definition:?} in tenant {tenant:?} (bindings are keyed by tenant and definition)"
                    ),
                ));
            }
            out.bindings.push(FileBinding {
                tenant: tenant.clone(),
                definition,
                json,
            });
        }
    }
    Ok(out)
}

/// One line `FILE:LINE:COLUMN: reason` for a YAML error. An unknown key
/// inside a definition is reported at the mapping's start; its own line is
/// the first line from there that starts with the key.
fn yaml_error(origin: &str, text: &str, e: &serde_saphyr::Error) -> Error {
    let full = e.without_snippet().to_string();
    let first = full.lines().next().unwrap_or_default();
    // "error: line 2 column 5: reason" → "reason"
    let reason = first
        .split_once(": ")
        .map(|(_, r)| r)
        .and_then(|r| r.strip_prefix("line ").and_then(|r| r.split_once(": ")))
        .map_or(first, |(_, r)| r)
        .trim();
    let Some(loc) = e.location() else {
        return Error::Input(format!("{origin}: {reason}"));
    };
    let (mut line, mut col) = (loc.line(), loc.column());
    let key = reason
        .split(['\'', '`'])
        .nth(1)
        .filter(|_| reason.contains("field"));
    if let Some(key) = key {
        for (i, l) in text
            .lines()
            .enumerate()
            .skip(line.saturating_sub(1) as usize)
        {
            let t = l.trim_start().trim_start_matches("- ").trim_start();
            if t.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'))
            {
                line = i as u64 + 1;
                col = (l.len() - t.len()) as u64 + 1;
                break;
            }
        }
    }
    let reason = match reason.rfind(" at line ") {
        Some(i) => &reason[..i],
        None => reason,
    };
    // A bad value: name the key of its line.
    let field = match key {
        Some(_) => None,
        None => text
            .lines()
            .nth(line.saturating_sub(1) as usize)
            .and_then(|l| l.trim_start().trim_start_matches("- ").split_once(':'))
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && !k.contains(' ')),
    };
    let field = field.map(|k| format!("{k}: ")).unwrap_or_default();
    Error::Input(format!(
        "{origin}:{line}:{col}: {field}{}",
        super::connect::one_line(reason)
    ))
}

fn snake(s: &str) -> String {
    super::input::snake_case(s)
}

/// Whether `want` (from the file) holds in `have` (from sked): objects by
/// the keys `want` names, everything else equal. sked fills defaults the
/// file leaves out (a schedule's time zone, say); those do not count.
fn holds(want: &serde_json::Value, have: Option<&serde_json::Value>) -> bool {
    use serde_json::Value;
    match (want, have) {
        (Value::Object(w), Some(Value::Object(h))) => w.iter().all(|(k, v)| holds(v, h.get(k))),
        (Value::Object(w), None) => w.values().all(|v| holds(v, None)),
        (w, None) => is_default(w),
        (w, Some(h)) => w == h || (is_default(w) && is_default(h)),
    }
}

fn is_default(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// The top-level fields of `want` that differ in `have`, as update mask
/// paths (snake_case; handlers as `command`). `exact` fields are compared
/// whole (maps where a removed key matters).
fn changed(
    want: &serde_json::Map<String, serde_json::Value>,
    have: &serde_json::Value,
    exact: &[&str],
    skip: &[&str],
) -> Vec<String> {
    let mut out = Vec::new();
    let empty = serde_json::Value::Object(Default::default());
    for (k, v) in want {
        if skip.contains(&k.as_str()) {
            continue;
        }
        let h = have.get(k);
        let same = if exact.contains(&k.as_str()) {
            v == h.unwrap_or(&empty) || (is_default(v) && h.is_none_or(is_default))
        } else {
            holds(v, h)
        };
        if !same {
            let path = if HANDLERS.contains(&k.as_str()) {
                "command".to_string()
            } else {
                snake(k)
            };
            if !out.contains(&path) {
                out.push(path);
            }
        }
    }
    out
}

/// What apply did (or, with `--dry-run`, would do).
#[derive(Debug, Default)]
pub struct Report {
    /// One line per object: `definition NAME: created|updated (fields)|unchanged|deleted`.
    pub lines: Vec<String>,
    /// Objects created.
    pub created: usize,
    /// Objects updated.
    pub updated: usize,
    /// Objects left as they were.
    pub unchanged: usize,
    /// Objects deleted (`--prune`).
    pub deleted: usize,
}

impl Report {
    fn note(&mut self, what: &str, verb: &str, fields: &[String]) {
        let mut l = format!("{what}: {verb}");
        if !fields.is_empty() {
            let _ = write!(l, " ({})", fields.join(", "));
        }
        match verb {
            "created" => self.created += 1,
            "updated" => self.updated += 1,
            "deleted" => self.deleted += 1,
            _ => self.unchanged += 1,
        }
        self.lines.push(l);
    }
}

/// Reads the file and applies it (module docs).
///
/// # Errors
/// [`Error::Input`] for a bad file (nothing sent), [`Error::Status`] for the
/// first call sked refuses (what was done before it stays done).
pub async fn run(a: Args) -> Result<i32> {
    let (origin, text) = if a.file == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Error::Input(format!("-f: stdin: {e}")))?;
        ("stdin".to_string(), s)
    } else {
        let t = std::fs::read_to_string(&a.file)
            .map_err(|e| Error::Input(format!("-f: {}: {e}", a.file)))?;
        (a.file.clone(), t)
    };
    let file = parse(&origin, &text)?;
    let client = Client::new(&a.global)?;
    let mut report = Report::default();
    let result = apply(&client, &file, a.dry_run, a.prune, &mut report).await;
    if let Err(e) = result {
        // What was done before the error stays done: say so, then fail.
        for l in &report.lines {
            println!("{l}");
        }
        return Err(e);
    }
    let mut out = report.lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    let changes = report.created + report.updated + report.deleted;
    let _ = writeln!(
        out,
        "{}{} created, {} updated, {} unchanged, {} deleted{}",
        if a.dry_run { "dry run: " } else { "" },
        report.created,
        report.updated,
        report.unchanged,
        report.deleted,
        if changes == 0 { " (no changes)" } else { "" }
    );
    std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes())?;
    Ok(EXIT_OK)
}

/// The calls apply makes: a gRPC client (`sked apply`), or the node's own
/// service handlers in-process (`sked serve --definitions`), so both go
/// through the same validation and use cases.
#[allow(async_fn_in_trait)]
pub trait Api {
    /// ListDefinitions.
    async fn list_definitions(
        &self,
        r: pb::ListDefinitionsRequest,
    ) -> Result<pb::ListDefinitionsResponse>;
    /// CreateDefinition.
    async fn create_definition(&self, r: pb::CreateDefinitionRequest) -> Result<()>;
    /// UpdateDefinition.
    async fn update_definition(&self, r: pb::UpdateDefinitionRequest) -> Result<()>;
    /// DeleteDefinition.
    async fn delete_definition(&self, r: pb::DeleteDefinitionRequest) -> Result<()>;
    /// ListBindings of `tenant`.
    async fn list_bindings(
        &self,
        tenant: &str,
        r: pb::ListBindingsRequest,
    ) -> Result<pb::ListBindingsResponse>;
    /// CreateBinding for `tenant`.
    async fn create_binding(&self, tenant: &str, r: pb::CreateBindingRequest) -> Result<()>;
    /// UpdateBinding of `tenant`.
    async fn update_binding(&self, tenant: &str, r: pb::UpdateBindingRequest) -> Result<()>;
    /// DeleteBinding of `tenant`.
    async fn delete_binding(&self, tenant: &str, r: pb::DeleteBindingRequest) -> Result<()>;
}

impl Api for Client {
    async fn list_definitions(
        &self,
        r: pb::ListDefinitionsRequest,
    ) -> Result<pb::ListDefinitionsResponse> {
        Ok(self.defs().list_definitions(r).await?.into_inner())
    }
    async fn create_definition(&self, r: pb::CreateDefinitionRequest) -> Result<()> {
        self.defs().create_definition(r).await?;
        Ok(())
    }
    async fn update_definition(&self, r: pb::UpdateDefinitionRequest) -> Result<()> {
        self.defs().update_definition(r).await?;
        Ok(())
    }
    async fn delete_definition(&self, r: pb::DeleteDefinitionRequest) -> Result<()> {
        self.defs().delete_definition(r).await?;
        Ok(())
    }
    async fn list_bindings(
        &self,
        tenant: &str,
        r: pb::ListBindingsRequest,
    ) -> Result<pb::ListBindingsResponse> {
        Ok(self
            .bindings()
            .list_bindings(tenant_req(tenant, r)?)
            .await?
            .into_inner())
    }
    async fn create_binding(&self, tenant: &str, r: pb::CreateBindingRequest) -> Result<()> {
        self.bindings()
            .create_binding(tenant_req(tenant, r)?)
            .await?;
        Ok(())
    }
    async fn update_binding(&self, tenant: &str, r: pb::UpdateBindingRequest) -> Result<()> {
        self.bindings()
            .update_binding(tenant_req(tenant, r)?)
            .await?;
        Ok(())
    }
    async fn delete_binding(&self, tenant: &str, r: pb::DeleteBindingRequest) -> Result<()> {
        self.bindings()
            .delete_binding(tenant_req(tenant, r)?)
            .await?;
        Ok(())
    }
}

fn tenant_req<T>(tenant: &str, msg: T) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    let v = tonic::metadata::MetadataValue::try_from(tenant)
        .map_err(|_| Error::Input(format!("bindings.{tenant:?}: not a tenant id")))?;
    r.metadata_mut().insert("x-tenant-id", v);
    Ok(r)
}

async fn all_definitions(client: &impl Api) -> Result<Vec<pb::TaskDefinition>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_definitions(pb::ListDefinitionsRequest {
                page_size: 1000,
                page_token: token,
            })
            .await?;
        out.extend(page.definitions);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

async fn bindings_of(b: &impl Api, tenant: &str, definition: &str) -> Result<Vec<pb::Binding>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = b
            .list_bindings(
                tenant,
                pb::ListBindingsRequest {
                    page_size: 1000,
                    page_token: token,
                    definition: definition.to_string(),
                    ..Default::default()
                },
            )
            .await?;
        out.extend(page.bindings);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// Applies `file` through `client` (module docs); what was done (or, with
/// `dry_run`, would be) is noted in `report`.
///
/// # Errors
/// The first call sked refuses; what was done before it stays done.
pub async fn apply(
    client: &impl Api,
    file: &File,
    dry_run: bool,
    prune: bool,
    report: &mut Report,
) -> Result<()> {
    let existing: BTreeMap<String, pb::TaskDefinition> = all_definitions(client)
        .await?
        .into_iter()
        .map(|d| (d.name.clone(), d))
        .collect();
    let defs = client;
    for d in &file.definitions {
        let what = format!("definition {}", d.name);
        match existing.get(&d.name) {
            None => {
                if !dry_run {
                    defs.create_definition(pb::CreateDefinitionRequest {
                        definition: Some(d.definition.clone()),
                    })
                    .await?;
                }
                report.note(&what, "created", &[]);
            }
            Some(cur) => {
                let have = to_json_named(DEF, cur);
                let fields = changed(&d.json, &have, &["labels", "params"], &["name"]);
                if fields.is_empty() {
                    report.note(&what, "unchanged", &[]);
                    continue;
                }
                if !dry_run {
                    let mut def = d.definition.clone();
                    def.etag = cur.etag.clone();
                    defs.update_definition(pb::UpdateDefinitionRequest {
                        definition: Some(def),
                        update_mask: Some(prost_types::FieldMask {
                            paths: fields.clone(),
                        }),
                    })
                    .await?;
                }
                report.note(&what, "updated", &fields);
            }
        }
    }
    let bindings = client;
    let listed: BTreeSet<(&str, &str)> = file
        .bindings
        .iter()
        .map(|b| (b.tenant.as_str(), b.definition.as_str()))
        .collect();
    for b in &file.bindings {
        let what = format!("binding {}/{}", b.tenant, b.definition);
        // A definition only the dry run would create has no bindings yet.
        let have = if existing.contains_key(&b.definition) {
            bindings_of(bindings, &b.tenant, &b.definition).await?
        } else {
            Vec::new()
        };
        let msg: pb::Binding = super::output::from_json_named(BINDING, b.json.clone().into())?;
        match have.as_slice() {
            [] => {
                if !dry_run {
                    let mut m = msg;
                    m.tenant_id = b.tenant.clone();
                    bindings
                        .create_binding(&b.tenant, pb::CreateBindingRequest { binding: Some(m) })
                        .await?;
                }
                report.note(&what, "created", &[]);
            }
            [cur] => {
                let have = to_json_named(BINDING, cur);
                let fields = changed(&b.json, &have, &["params"], &["definition"]);
                if fields.is_empty() {
                    report.note(&what, "unchanged", &[]);
                    continue;
                }
                if !dry_run {
                    let mut m = msg;
                    m.id = cur.id.clone();
                    m.tenant_id = b.tenant.clone();
                    m.etag = cur.etag.clone();
                    bindings
                        .update_binding(
                            &b.tenant,
                            pb::UpdateBindingRequest {
                                binding: Some(m),
                                update_mask: Some(prost_types::FieldMask {
                                    paths: fields.clone(),
                                }),
                            },
                        )
                        .await?;
                }
                report.note(&what, "updated", &fields);
            }
            many => {
                return Err(Error::Input(format!(
                    "{what}: tenant {:?} has {} bindings of {:?}; apply keys bindings by (tenant, definition) and needs at most one",
                    b.tenant,
                    many.len(),
                    b.definition
                )));
            }
        }
    }
    if !prune {
        return Ok(());
    }
    let in_file: BTreeSet<&str> = file.definitions.iter().map(|d| d.name.as_str()).collect();
    let managed = existing
        .values()
        .filter(|d| d.labels.get(MANAGED_LABEL).map(String::as_str) == Some("true"));
    let mut dropped = Vec::new();
    for d in managed {
        if !in_file.contains(d.name.as_str()) {
            dropped.push(d.name.clone());
            continue;
        }
        for tenant in &file.tenants {
            for cur in bindings_of(bindings, tenant, &d.name).await? {
                if listed.contains(&(tenant.as_str(), d.name.as_str())) {
                    continue;
                }
                if !dry_run {
                    bindings
                        .delete_binding(
                            tenant,
                            pb::DeleteBindingRequest {
                                binding_id: cur.id.clone(),
                            },
                        )
                        .await?;
                }
                report.note(&format!("binding {tenant}/{}", d.name), "deleted", &[]);
            }
        }
    }
    for name in dropped {
        if !dry_run {
            defs.delete_definition(pb::DeleteDefinitionRequest {
                name: name.clone(),
                force: true,
            })
            .await?;
        }
        report.note(&format!("definition {name}"), "deleted", &[]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_file_line_and_field() {
        let text =
            "definitions:\n  - name: a\n    command: {program: sh}\n    schedul: {manual: {}}\n";
        let e = parse("defs.yaml", text).unwrap_err().to_string();
        assert!(e.contains("defs.yaml"), "{e}");
        assert!(e.contains("schedul"), "{e}");
        assert!(e.starts_with("defs.yaml:4:5: "), "{e}");
        let text = "definitions: []\nbindigns: {}\n";
        let e = parse("d.yaml", text).unwrap_err().to_string();
        assert!(e.contains("bindigns") && e.starts_with("d.yaml:2:"), "{e}");
    }

    #[test]
    fn bad_value_names_its_field() {
        let e = parse("f.yaml", "definitions:\n  - name: a\n    timeout: abc\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.yaml:3:"), "{e}");
        assert!(e.contains("timeout: "), "{e}");
    }

    #[test]
    fn file_parses_and_is_labelled() {
        let text = "definitions:\n  - name: a\n    command: {program: sh}\n    timeout: 30s\nbindings:\n  acme:\n    - definition: a\n      params: {x: 1}\n";
        let f = parse("f", text).unwrap();
        assert_eq!(f.definitions[0].definition.labels[MANAGED_LABEL], "true");
        assert_eq!(f.bindings[0].tenant, "acme");
        let dup = "bindings:\n  acme:\n    - definition: a\n    - definition: a\n";
        assert!(parse("f", dup).unwrap_err().to_string().contains("f:4"));
    }

    #[test]
    fn changed_ignores_defaults_sked_fills() {
        let want = serde_json::json!({"schedule": {"cron": {"expression": "* * * * *"}}, "labels": {"a": "1"}});
        let have = serde_json::json!({"schedule": {"cron": {"expression": "* * * * *"}, "timezone": "UTC"}, "labels": {"a": "1", "b": "2"}});
        let want = want.as_object().unwrap();
        assert_eq!(changed(want, &have, &["labels"], &[]), vec!["labels"]);
        assert!(changed(want, &have, &[], &[]).is_empty());
    }
}
