//! The management API (axum), mirroring Flame's resources: designs (and
//! their schemas), datasets, jobs (and their status, tasks and events) and
//! computes. Every request but `/openapi.json` and `/healthz` needs a bearer
//! token; the token's user becomes the actor of the events it causes.
//! Errors are RFC 9457 problem details.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path as UrlPath, Query, State};
use axum::http::{StatusCode, header, request::Parts};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::{OpenApi, ToSchema};

use flame_events::resource::{self, Kind, ResourceEvent};
use flame_events::store::{EventStore, ExpectedVersion};
use flame_events::{Actor, Envelope};

use crate::definition::{Dataset, Design, Problem};
use crate::job::{Job, Status};
use crate::runner::{self, Runner};
use crate::supervisor::Supervisor;
use crate::workflow::Workflow;

/// What a token may do: `read` (every GET), `operator` (also create, update,
/// start and stop), `admin` (also delete). Each includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Look: list and get everything, follow events.
    Read,
    /// Run jobs: also create and update designs, datasets and jobs, start and stop jobs.
    Operator,
    /// Everything: also remove designs, datasets and jobs.
    Admin,
}

impl Scope {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    /// The scope a request with this method needs.
    pub fn needed(method: &axum::http::Method) -> Self {
        use axum::http::Method;
        if method == Method::GET || method == Method::HEAD {
            Self::Read
        } else if method == Method::DELETE {
            Self::Admin
        } else {
            Self::Operator
        }
    }
}

/// A token's grant: its user, scope and expiry.
#[derive(Clone, Debug, PartialEq)]
struct Grant {
    user: String,
    scope: Scope,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Bearer tokens by their sha256 (hex) -> their grant. Tokens themselves are never stored.
#[derive(Clone, Debug, Default)]
pub struct Tokens(HashMap<String, Grant>);

/// Tokens written before scopes existed could do everything; they keep that.
fn admin() -> Scope {
    Scope::Admin
}

#[derive(Serialize, Deserialize)]
struct TokenLine {
    user: String,
    sha256: String,
    #[serde(default = "admin")]
    scope: Scope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Tokens {
    /// Reads a tokens file: one JSON object per line, `{"user", "sha256", "scope", "expires_at"?}`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read tokens file {}: {e}", path.display()))?;
        let mut map = HashMap::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let t: TokenLine =
                serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}:{}: not a token line ({e})", path.display(), i + 1))?;
            map.insert(t.sha256, Grant { user: t.user, scope: t.scope, expires_at: t.expires_at });
        }
        Ok(Self(map))
    }

    /// Adds a new random token for `user` with `scope`, valid for `lifetime`
    /// (none: until its line is removed), and returns it (shown once).
    pub fn add(path: &Path, user: &str, scope: Scope, lifetime: Option<Duration>) -> anyhow::Result<String> {
        use std::io::Write;
        anyhow::ensure!(!user.is_empty() && !user.contains(char::is_whitespace), "user names have no spaces");
        let token = format!("flm_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let expires_at = match lifetime {
            Some(d) => Some(chrono::Utc::now() + chrono::Duration::from_std(d).map_err(|e| anyhow::anyhow!("lifetime: {e}"))?),
            None => None,
        };
        let line = serde_json::to_string(&TokenLine { user: user.into(), sha256: hash(&token), scope, expires_at })?;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{line}")?;
        Ok(token)
    }

    /// A table with one admin user and token (tests, embedded servers).
    pub fn single(user: &str, token: &str) -> Self {
        Self(HashMap::from([(hash(token), Grant { user: user.to_string(), scope: Scope::Admin, expires_at: None })]))
    }

    /// Who a token speaks for, if it may make a request that needs `needed` at `now`.
    pub(crate) fn authorize(&self, token: &str, needed: Scope, now: chrono::DateTime<chrono::Utc>) -> Result<&str, ApiError> {
        let Some(g) = self.0.get(&hash(token)) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or unknown bearer token: send 'Authorization: Bearer <token>' (flame-engine token add --user NAME makes one)",
            ));
        };
        if let Some(at) = g.expires_at.filter(|at| *at <= now) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                format!(
                    "the token of '{}' expired at {}: make a new one (flame-engine token add --user {})",
                    g.user,
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    g.user
                ),
            ));
        }
        if g.scope < needed {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "this call needs a token with the {} scope; the token of '{}' has {} (flame-engine token add --scope {})",
                    needed.name(),
                    g.user,
                    g.scope.name(),
                    needed.name()
                ),
            ));
        }
        Ok(&g.user)
    }
}

/// Shared state of the API server.
#[derive(Clone)]
pub struct Api {
    pub(crate) runner: Runner,
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) tokens: Arc<Tokens>,
    supervisor: Supervisor,
}

impl Api {
    /// An API over a runner and its store.
    pub fn new(runner: Runner, store: Arc<dyn EventStore>, tokens: Tokens) -> Self {
        Self { supervisor: Supervisor::new(runner.clone()), runner, store, tokens: Arc::new(tokens) }
    }

    /// The same API as one of several engine replicas: jobs are driven under leases.
    pub fn with_leases(mut self, leases: flame_transport::lease::Leases) -> Self {
        self.supervisor = self.supervisor.with_leases(leases);
        self
    }

    /// Drives a job in the background unless this server already does.
    pub fn drive(&self, job_id: &str) {
        self.supervisor.drive(job_id);
    }

    /// Every job not deleted, oldest first.
    pub(crate) async fn summaries(&self) -> Result<Vec<JobSummary>, ApiError> {
        let mut out = Vec::new();
        for id in self.runner.job_ids().await? {
            let job = self.runner.load(&id).await?;
            if job.status != Status::Deleted {
                out.push(JobSummary::from(&job));
            }
        }
        Ok(out)
    }

    /// A design's or dataset's current body, if it exists.
    pub(crate) async fn resource(&self, kind: Kind, id: &str) -> Result<Option<Value>, ApiError> {
        Ok(resource(self.store.as_ref(), kind, id).await?.map(|(_, v)| v))
    }

    /// Every design or dataset.
    pub(crate) async fn resources(&self, kind: Kind) -> Result<Vec<Value>, ApiError> {
        list_resources(self.store.as_ref(), kind).await
    }

    /// Stores a new design or dataset.
    pub(crate) async fn put_new(&self, kind: Kind, id: &str, body: Value, actor: &Actor) -> Result<(), ApiError> {
        put_resource(self.store.as_ref(), kind, id, ExpectedVersion::NoStream, body, actor).await
    }

    /// Resumes every job the log says is active; returns their ids.
    pub async fn resume(&self) -> Result<Vec<String>, runner::Error> {
        self.supervisor.resume().await
    }

    /// The HTTP routes.
    pub fn router(self) -> Router {
        self.router_with(Router::new())
    }

    /// The HTTP routes and `extra` ones over the same state (the dashboard, `crate::ui::routes`).
    pub fn router_with(self, extra: Router<Api>) -> Router {
        Router::new()
            .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
            .route("/healthz", get(|| async { "ok" }))
            .route("/metrics", get(metrics_text))
            .route("/designs", get(list_designs).post(create_design))
            .route("/designs/{id}", get(get_design).delete(delete_design))
            .route("/designs/{id}/schema", get(get_schema).put(put_schema))
            .route("/datasets", get(list_datasets).post(create_dataset))
            .route("/datasets/{id}", get(get_dataset).delete(delete_dataset))
            .route("/jobs", get(list_jobs).post(create_job))
            .route("/jobs/{id}", get(get_job).put(update_job).delete(delete_job))
            .route("/jobs/{id}/status", put(change_status))
            .route("/jobs/{id}/fork", axum::routing::post(fork_job))
            .route("/jobs/{id}/tasks", get(list_tasks))
            .route("/jobs/{id}/tasks/{task}", get(get_task))
            .route("/jobs/{id}/events", get(job_events))
            .route("/jobs/{id}/events/stream", get(stream_events))
            .route("/computes", get(list_computes))
            .merge(extra)
            .with_state(self)
    }
}

/// An error as RFC 9457 problem details.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Short summary.
    pub title: String,
    /// What happened, for people.
    pub detail: String,
    /// Validation problems, each with the file and JSON path, message and hint.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub errors: Vec<Problem>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self { status: status.as_u16(), title: status.canonical_reason().unwrap_or("error").into(), detail: detail.into(), errors: vec![] }
    }
    fn not_found(what: &str, id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("no {what} '{id}'"))
    }
    pub(crate) fn invalid(problems: Vec<Problem>) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, format!("the definition has {} problem(s)", problems.len()));
        e.errors = problems;
        e
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (status, [(header::CONTENT_TYPE, "application/problem+json")], body).into_response()
    }
}

impl From<runner::Error> for ApiError {
    fn from(e: runner::Error) -> Self {
        use runner::Error as E;
        match e {
            E::Invalid(p) => Self::invalid(p.0),
            E::Definition(m) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, m),
            E::UnknownJob(id) => Self::not_found("job", &id),
            e @ E::Fork { .. } => Self::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
            E::Refused { rejection, job } => Self::new(StatusCode::CONFLICT, format!("job {job}: {rejection}")),
            other => Self::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

impl From<flame_events::store::Error> for ApiError {
    fn from(e: flame_events::store::Error) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// The cookie the dashboard keeps a signed-in user's token in.
pub const COOKIE: &str = "flame_token";

/// The token a request carries in the dashboard's cookie, if any.
pub fn cookie_token(parts: &Parts) -> Option<String> {
    parts.headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == COOKIE).then(|| v.to_string())
    })
}

/// The authenticated user, from `Authorization: Bearer <token>` (or the
/// dashboard's cookie, which holds the same token).
pub struct User(pub String);

impl User {
    fn actor(&self) -> Actor {
        Actor::user(&self.0)
    }
}

impl FromRequestParts<Api> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Self, ApiError> {
        let bearer = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let token = bearer.map(str::to_string).or_else(|| cookie_token(parts)).unwrap_or_default();
        let needed = Scope::needed(&parts.method);
        let user = api.tokens.authorize(token.trim(), needed, chrono::Utc::now())?;
        Ok(User(user.to_string()))
    }
}

// ---- designs and datasets: small event-sourced resources ----------------------------------

async fn resource(store: &dyn EventStore, kind: Kind, id: &str) -> Result<Option<(u64, Value)>, ApiError> {
    Ok(resource::current(&store.read_stream(&kind.stream_id(id), 1).await?))
}

async fn put_resource(
    store: &dyn EventStore,
    kind: Kind,
    id: &str,
    expected: ExpectedVersion,
    body: Value,
    actor: &Actor,
) -> Result<(), ApiError> {
    let event = ResourceEvent::Put(body).to_new_event(kind, id, actor);
    match store.append(&kind.stream_id(id), expected, vec![event]).await {
        Ok(_) => Ok(()),
        Err(flame_events::store::Error::Conflict { .. }) => {
            Err(ApiError::new(StatusCode::CONFLICT, format!("{} '{id}' changed meanwhile or exists", kind.name())))
        }
        Err(e) => Err(e.into()),
    }
}

async fn remove_resource(store: &dyn EventStore, kind: Kind, id: &str, actor: &Actor) -> Result<StatusCode, ApiError> {
    let (version, _) = resource(store, kind, id).await?.ok_or_else(|| ApiError::not_found(kind.name(), id))?;
    let event = ResourceEvent::Removed.to_new_event(kind, id, actor);
    store.append(&kind.stream_id(id), ExpectedVersion::Exact(version), vec![event]).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_resources(store: &dyn EventStore, kind: Kind) -> Result<Vec<Value>, ApiError> {
    let ids = flame_events::store::stream_ids(store, &kind.stream_prefix()).await?;
    let mut out = Vec::new();
    for id in ids {
        if let Some((_, v)) = resource(store, kind, &id).await? {
            out.push(v);
        }
    }
    Ok(out)
}

/// A request body that does not parse: 422 with the line and column.
fn bad_body(e: &serde_json::Error, what: &str, hint: &str) -> ApiError {
    ApiError::invalid(vec![crate::definition::problem(format!("request body:{}:{}", e.line(), e.column()), format!("{what}: {e}"), hint)])
}

fn check_id(id: &str) -> Result<(), ApiError> {
    flame_transport::check_id(id).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
}

/// A design: Flame's topology (its schema is set separately).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DesignInfo {
    /// Id (letters, digits, '-', '_').
    pub id: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The design's schema (roles and channels), once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Value>,
}

#[utoipa::path(post, path = "/designs", request_body = DesignInfo, responses((status = 201, body = DesignInfo), (status = 409, body = ApiError)))]
async fn create_design(State(api): State<Api>, user: User, Json(d): Json<DesignInfo>) -> Result<(StatusCode, Json<DesignInfo>), ApiError> {
    check_id(&d.id)?;
    let body = serde_json::to_value(&d).unwrap_or_default();
    put_resource(api.store.as_ref(), Kind::Design, &d.id, ExpectedVersion::NoStream, body, &user.actor()).await?;
    Ok((StatusCode::CREATED, Json(d)))
}

#[utoipa::path(get, path = "/designs", responses((status = 200, body = Vec<DesignInfo>)))]
async fn list_designs(State(api): State<Api>, _: User) -> Result<Json<Vec<Value>>, ApiError> {
    Ok(Json(list_resources(api.store.as_ref(), Kind::Design).await?))
}

#[utoipa::path(get, path = "/designs/{id}", responses((status = 200, body = DesignInfo), (status = 404, body = ApiError)))]
async fn get_design(State(api): State<Api>, _: User, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(resource(api.store.as_ref(), Kind::Design, &id).await?.ok_or_else(|| ApiError::not_found("design", &id))?.1))
}

#[utoipa::path(delete, path = "/designs/{id}", responses((status = 204), (status = 404, body = ApiError)))]
async fn delete_design(State(api): State<Api>, user: User, UrlPath(id): UrlPath<String>) -> Result<StatusCode, ApiError> {
    remove_resource(api.store.as_ref(), Kind::Design, &id, &user.actor()).await
}

#[utoipa::path(put, path = "/designs/{id}/schema", request_body(content = Object, description = "Flame's schema.json: roles and channels"),
    responses((status = 200, body = DesignInfo), (status = 404, body = ApiError), (status = 422, body = ApiError)))]
async fn put_schema(State(api): State<Api>, user: User, UrlPath(id): UrlPath<String>, body: String) -> Result<Json<Value>, ApiError> {
    let (version, mut design) = resource(api.store.as_ref(), Kind::Design, &id).await?.ok_or_else(|| ApiError::not_found("design", &id))?;
    let schema: Design =
        serde_json::from_str(&body).map_err(|e| bad_body(&e, "not a design schema", "send Flame's schema.json (name, roles, channels)"))?;
    design["schema"] = serde_json::to_value(schema).unwrap_or_default();
    put_resource(api.store.as_ref(), Kind::Design, &id, ExpectedVersion::Exact(version), design.clone(), &user.actor()).await?;
    Ok(Json(design))
}

#[utoipa::path(get, path = "/designs/{id}/schema", responses((status = 200, body = Object), (status = 404, body = ApiError)))]
async fn get_schema(State(api): State<Api>, _: User, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    let (_, design) = resource(api.store.as_ref(), Kind::Design, &id).await?.ok_or_else(|| ApiError::not_found("design", &id))?;
    design.get("schema").cloned().map(Json).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("design '{id}' has no schema yet")))
}

/// A registered dataset: Flame's dataset.json plus its id.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DatasetInfo {
    /// Id, assigned on registration.
    #[serde(default)]
    pub id: String,
    /// The dataset (name, url, realm, ...).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub dataset: Dataset,
}

#[utoipa::path(post, path = "/datasets", request_body(content = Object, description = "Flame's dataset.json"),
    responses((status = 201, body = DatasetInfo), (status = 422, body = ApiError)))]
async fn create_dataset(State(api): State<Api>, user: User, body: String) -> Result<(StatusCode, Json<DatasetInfo>), ApiError> {
    let dataset: Dataset =
        serde_json::from_str(&body).map_err(|e| bad_body(&e, "not a dataset", "send Flame's dataset.json (name, url, realm)"))?;
    let info = DatasetInfo { id: uuid::Uuid::now_v7().to_string(), dataset };
    let body = serde_json::to_value(&info).unwrap_or_default();
    put_resource(api.store.as_ref(), Kind::Dataset, &info.id, ExpectedVersion::NoStream, body, &user.actor()).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(get, path = "/datasets", responses((status = 200, body = Vec<DatasetInfo>)))]
async fn list_datasets(State(api): State<Api>, _: User) -> Result<Json<Vec<Value>>, ApiError> {
    Ok(Json(list_resources(api.store.as_ref(), Kind::Dataset).await?))
}

#[utoipa::path(get, path = "/datasets/{id}", responses((status = 200, body = DatasetInfo), (status = 404, body = ApiError)))]
async fn get_dataset(State(api): State<Api>, _: User, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(resource(api.store.as_ref(), Kind::Dataset, &id).await?.ok_or_else(|| ApiError::not_found("dataset", &id))?.1))
}

#[utoipa::path(delete, path = "/datasets/{id}", responses((status = 204), (status = 404, body = ApiError)))]
async fn delete_dataset(State(api): State<Api>, user: User, UrlPath(id): UrlPath<String>) -> Result<StatusCode, ApiError> {
    remove_resource(api.store.as_ref(), Kind::Dataset, &id, &user.actor()).await
}

// ---- jobs ---------------------------------------------------------------------------------

/// A job as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobSummary {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// State (ready, starting, deploying, running, stopping, completed, failed, terminated).
    #[schema(value_type = String)]
    pub state: Status,
    /// Latest round started.
    pub round: u32,
    /// Rounds aggregated.
    pub rounds_completed: u32,
    /// Rounds the job runs.
    pub total_rounds: u32,
    /// Metrics of the latest global model.
    #[schema(value_type = Object)]
    pub metrics: flame_events::job::Metrics,
    /// Digest of the latest global model.
    pub global_model: Option<String>,
    /// Why it failed or was stopped.
    pub failure: Option<String>,
    /// Reports refused so far.
    pub rejected_reports: u64,
    /// Events in the job's stream.
    pub version: u64,
    /// Where the job was forked from (parent job, round, model), if it is a fork.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub forked_from: Option<flame_events::job::ForkOrigin>,
}

impl From<&Job> for JobSummary {
    fn from(j: &Job) -> Self {
        Self {
            id: j.job_id.clone(),
            name: j.name.clone(),
            state: j.status,
            round: j.round.number,
            rounds_completed: j.rounds_completed,
            total_rounds: j.total_rounds(),
            metrics: j.metrics.clone(),
            global_model: j.global_model.clone(),
            failure: j.failure.clone(),
            rejected_reports: j.rejected,
            version: j.version,
            forked_from: j.forked_from.clone(),
        }
    }
}

async fn live_job(api: &Api, id: &str) -> Result<Job, ApiError> {
    let job = api.runner.load(id).await?;
    if job.status == Status::Deleted {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("job '{id}' was deleted (its events remain at /jobs/{id}/events)")));
    }
    Ok(job)
}

/// Reads a workflow body; a design given only by `job.designId` comes from the stored designs,
/// datasets named by registered id from the stored datasets.
async fn definition(api: &Api, body: &str) -> Result<crate::JobDefinition, ApiError> {
    let mut value: Value =
        serde_json::from_str(body).map_err(|e| bad_body(&e, "invalid JSON", "send a workflow document (docs/workflow.schema.json)"))?;
    if value.get("design").is_none()
        && let Some(design_id) = value.pointer("/job/designId").and_then(Value::as_str).map(str::to_string)
    {
        let (_, design) = resource(api.store.as_ref(), Kind::Design, &design_id).await?.ok_or_else(|| {
            ApiError::invalid(vec![crate::definition::problem(
                "request body#/job/designId",
                format!("no design '{design_id}'"),
                "create it with POST /designs and PUT /designs/{id}/schema, or inline \"design\"",
            )])
        })?;
        let schema = design.get("schema").cloned().ok_or_else(|| {
            ApiError::invalid(vec![crate::definition::problem(
                "request body#/job/designId",
                format!("design '{design_id}' has no schema"),
                "PUT /designs/{id}/schema first",
            )])
        })?;
        value["design"] = schema;
    }
    let mut registered = BTreeMap::new();
    for d in list_resources(api.store.as_ref(), Kind::Dataset).await? {
        if let Ok(info) = serde_json::from_value::<DatasetInfo>(d) {
            registered.insert(info.id.clone(), info.dataset);
        }
    }
    Workflow::parse(&value.to_string(), "request body", &registered).map_err(|p| ApiError::invalid(p.0))
}

#[utoipa::path(post, path = "/jobs", request_body(content = Object, description = "a workflow (docs/workflow.schema.json); `design` may be left out when `job.designId` names a stored design"),
    responses((status = 201, body = JobSummary), (status = 401, body = ApiError), (status = 422, body = ApiError)))]
async fn create_job(State(api): State<Api>, user: User, body: String) -> Result<(StatusCode, Json<JobSummary>), ApiError> {
    let def = definition(&api, &body).await?;
    let id = api.runner.submit(&def, &user.actor()).await?;
    Ok((StatusCode::CREATED, Json(JobSummary::from(&api.runner.load(&id).await?))))
}

#[utoipa::path(get, path = "/jobs", responses((status = 200, body = Vec<JobSummary>)))]
async fn list_jobs(State(api): State<Api>, _: User) -> Result<Json<Vec<JobSummary>>, ApiError> {
    Ok(Json(api.summaries().await?))
}

#[utoipa::path(get, path = "/jobs/{id}", responses((status = 200, body = JobSummary), (status = 404, body = ApiError)))]
async fn get_job(State(api): State<Api>, _: User, UrlPath(id): UrlPath<String>) -> Result<Json<JobSummary>, ApiError> {
    Ok(Json(JobSummary::from(&live_job(&api, &id).await?)))
}

#[utoipa::path(put, path = "/jobs/{id}", request_body(content = Object, description = "a workflow"),
    responses((status = 200, body = JobSummary), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 422, body = ApiError)))]
async fn update_job(State(api): State<Api>, user: User, UrlPath(id): UrlPath<String>, body: String) -> Result<Json<JobSummary>, ApiError> {
    live_job(&api, &id).await?;
    let def = definition(&api, &body).await?;
    Ok(Json(JobSummary::from(&api.runner.update(&id, &def, &user.actor()).await?)))
}

#[utoipa::path(delete, path = "/jobs/{id}", responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn delete_job(State(api): State<Api>, user: User, UrlPath(id): UrlPath<String>) -> Result<StatusCode, ApiError> {
    live_job(&api, &id).await?;
    api.runner.delete(&id, &user.actor()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The name of the engine's relay (its checkpoint is `relay:<name>`).
pub const RELAY: &str = "engine";

/// Prometheus' text exposition of the engine's metrics (`crate::metrics`), with the jobs by state read now.
async fn metrics_text(State(api): State<Api>) -> Result<([(axum::http::header::HeaderName, &'static str); 1], String), ApiError> {
    let m = crate::metrics::get();
    let mut by_state: BTreeMap<String, i64> = BTreeMap::new();
    for id in api.runner.job_ids().await? {
        let job = api.runner.load(&id).await?;
        let state = serde_json::to_value(job.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        *by_state.entry(state).or_default() += 1;
    }
    m.jobs.reset();
    for (state, n) in by_state {
        m.jobs.with_label_values(&[state.as_str()]).set(n);
    }
    m.heartbeat_age.reset();
    match api.runner.heartbeat_ages().await {
        Ok(ages) => {
            for (worker, age) in ages {
                m.heartbeat_age.with_label_values(&[worker.as_str()]).set(age);
            }
        }
        Err(e) => tracing::warn!("metrics: cannot read the worker registry: {e}"),
    }
    let relayed = api.store.load_checkpoint(&format!("relay:{RELAY}")).await?;
    m.relay_lag.set(api.store.read_all(relayed + 1, 10_000).await?.len() as i64);
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()))
}

/// A fork asked for (`POST /jobs/{id}/fork`): see `flamectl fork`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForkRequest {
    /// The first round the fork runs (from the parent's model after the round before).
    #[serde(default)]
    pub from_round: Option<u32>,
    /// Trainer tasks or workers to leave out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Trainer tasks or workers to unlearn (forked from before their first update, without them).
    #[serde(default)]
    pub unlearn: Vec<String>,
    /// Hyperparameters to change (rounds, learningRate, epochs, batchSize, minClients, roundTimeout, evalEvery).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub set: serde_json::Map<String, serde_json::Value>,
}

#[utoipa::path(post, path = "/jobs/{id}/fork", request_body = ForkRequest,
    responses((status = 201, body = JobSummary), (status = 404, body = ApiError), (status = 422, body = ApiError)))]
async fn fork_job(
    State(api): State<Api>,
    user: User,
    UrlPath(id): UrlPath<String>,
    body: String,
) -> Result<(StatusCode, Json<JobSummary>), ApiError> {
    live_job(&api, &id).await?;
    let req: ForkRequest = serde_json::from_str(if body.trim().is_empty() { "{}" } else { &body })
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("request body: {e}")))?;
    let request = crate::fork::Request { from_round: req.from_round, exclude: req.exclude, unlearn: req.unlearn, set: req.set };
    let forked = api.runner.fork(&id, &request, &user.actor()).await?;
    Ok((StatusCode::CREATED, Json(JobSummary::from(&api.runner.load(&forked).await?))))
}

/// A state change asked for.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StatusChange {
    /// `start` or `stop`.
    pub state: String,
    /// Why (for `stop`).
    #[serde(default)]
    pub reason: Option<String>,
}

#[utoipa::path(put, path = "/jobs/{id}/status", request_body = StatusChange,
    responses((status = 200, body = JobSummary), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 422, body = ApiError)))]
async fn change_status(
    State(api): State<Api>,
    user: User,
    UrlPath(id): UrlPath<String>,
    Json(change): Json<StatusChange>,
) -> Result<Json<JobSummary>, ApiError> {
    live_job(&api, &id).await?;
    let job = match change.state.as_str() {
        "start" => {
            let job = api.runner.start(&id, &user.actor()).await?;
            api.drive(&id);
            job
        }
        "stop" => api.runner.stop(&id, change.reason.as_deref().unwrap_or("no reason given"), &user.actor()).await?,
        other => {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("unknown state '{other}': use \"start\" or \"stop\"")));
        }
    };
    Ok(Json(JobSummary::from(&job)))
}

/// A task of a job and where it runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskView {
    /// Task id.
    pub task_id: String,
    /// Role.
    pub role: String,
    /// Worker it is placed on.
    pub worker_id: Option<String>,
    /// Dataset URL, for trainers.
    pub dataset: Option<String>,
    /// Dataset realm.
    pub realm: Option<String>,
    /// Whether its worker confirmed it.
    pub deployed: bool,
    /// Whether it sits out because its worker was lost.
    pub orphaned: bool,
    /// Whether its update for the open round arrived.
    pub reported_this_round: bool,
}

fn tasks_of(job: &Job) -> Vec<TaskView> {
    job.tasks
        .iter()
        .map(|t| TaskView {
            task_id: t.task_id.clone(),
            role: t.role.clone(),
            worker_id: job.assignments.get(&t.task_id).cloned(),
            dataset: t.dataset.clone(),
            realm: t.realm.clone(),
            deployed: job.deployed.contains(&t.task_id),
            orphaned: job.orphaned.contains(&t.task_id),
            reported_this_round: job.round.updates.contains_key(&t.task_id),
        })
        .collect()
}

#[utoipa::path(get, path = "/jobs/{id}/tasks", responses((status = 200, body = Vec<TaskView>), (status = 404, body = ApiError)))]
async fn list_tasks(State(api): State<Api>, _: User, UrlPath(id): UrlPath<String>) -> Result<Json<Vec<TaskView>>, ApiError> {
    Ok(Json(tasks_of(&live_job(&api, &id).await?)))
}

#[utoipa::path(get, path = "/jobs/{id}/tasks/{task}", responses((status = 200, body = TaskView), (status = 404, body = ApiError)))]
async fn get_task(State(api): State<Api>, _: User, UrlPath((id, task)): UrlPath<(String, String)>) -> Result<Json<TaskView>, ApiError> {
    let job = live_job(&api, &id).await?;
    tasks_of(&job).into_iter().find(|t| t.task_id == task).map(Json).ok_or_else(|| ApiError::not_found("task", &task))
}

/// Paging through a job's events.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct Page {
    /// First stream version to return (1 = the start).
    #[serde(default)]
    pub from: Option<u64>,
    /// Most events to return (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// One page of a job's events.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    /// Events in stream order.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<Envelope>,
    /// `from` for the next page, if there may be more.
    pub next: Option<u64>,
}

#[utoipa::path(get, path = "/jobs/{id}/events", params(Page), responses((status = 200, body = EventPage), (status = 404, body = ApiError)))]
async fn job_events(
    State(api): State<Api>,
    _: User,
    UrlPath(id): UrlPath<String>,
    Query(page): Query<Page>,
) -> Result<Json<EventPage>, ApiError> {
    api.runner.load(&id).await?;
    let (from, limit) = (page.from.unwrap_or(1).max(1), page.limit.unwrap_or(100).clamp(1, 1000));
    let mut events = api.store.read_stream(&flame_events::job::stream_id(&id), from).await?;
    let more = events.len() > limit;
    events.truncate(limit);
    let next = if more { events.last().map(|e| e.version + 1) } else { None };
    Ok(Json(EventPage { events, next }))
}

#[utoipa::path(get, path = "/jobs/{id}/events/stream", params(Page),
    responses((status = 200, description = "server-sent events, one per job event (event name = event type, data = the envelope as JSON)"), (status = 404, body = ApiError)))]
async fn stream_events(
    State(api): State<Api>,
    _: User,
    UrlPath(id): UrlPath<String>,
    Query(page): Query<Page>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError> {
    api.runner.load(&id).await?;
    let stream_id = flame_events::job::stream_id(&id);
    let state = (api.store.clone(), stream_id, page.from.unwrap_or(1).max(1), std::collections::VecDeque::<Envelope>::new());
    let stream = futures::stream::unfold(state, |(store, stream_id, mut next, mut buffer)| async move {
        loop {
            if let Some(e) = buffer.pop_front() {
                next = e.version + 1;
                let event = SseEvent::default()
                    .event(e.event_type.clone())
                    .id(e.version.to_string())
                    .data(serde_json::to_string(&e).unwrap_or_default());
                return Some((Ok(event), (store, stream_id, next, buffer)));
            }
            match store.read_stream(&stream_id, next).await {
                Ok(events) if !events.is_empty() => buffer.extend(events),
                Ok(_) => store.wait_for_append(Duration::from_millis(500)).await,
                Err(e) => {
                    tracing::warn!("event stream {stream_id}: {e}");
                    return None;
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// A live worker (Flame's compute).
#[derive(Debug, Serialize, ToSchema)]
pub struct ComputeView {
    /// Worker id.
    pub id: String,
    /// Roles it offers.
    pub roles: Vec<String>,
    /// Realm it runs in.
    pub realm: String,
    /// Device it trains on.
    pub device: String,
}

#[utoipa::path(get, path = "/computes", responses((status = 200, body = Vec<ComputeView>)))]
async fn list_computes(State(api): State<Api>, _: User) -> Result<Json<Vec<ComputeView>>, ApiError> {
    let workers = api.runner.workers().await?;
    Ok(Json(workers.into_iter().map(|w| ComputeView { id: w.id, roles: w.roles, realm: w.realm, device: w.device }).collect()))
}

/// The OpenAPI document of this API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Flame for Rust management API", description = "Designs, datasets, jobs, tasks, events and computes. Every path but /openapi.json and /healthz needs `Authorization: Bearer <token>`."),
    paths(
        create_design, list_designs, get_design, delete_design, put_schema, get_schema,
        create_dataset, list_datasets, get_dataset, delete_dataset,
        create_job, list_jobs, get_job, update_job, delete_job, change_status, fork_job, list_tasks, get_task, job_events, stream_events,
        list_computes
    ),
    components(schemas(ApiError, DesignInfo, DatasetInfo, JobSummary, StatusChange, ForkRequest, TaskView, EventPage, ComputeView)),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
        openapi.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
    }
}

/// The OpenAPI document as pretty JSON (checked in as docs/openapi.json).
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_does_what_its_scope_allows_until_it_expires() {
        use axum::http::Method;
        let now = chrono::Utc::now();
        let grant = |scope, expires_at| Grant { user: "ada".into(), scope, expires_at };
        let tokens = Tokens(HashMap::from([
            (hash("r"), grant(Scope::Read, None)),
            (hash("o"), grant(Scope::Operator, Some(now + chrono::Duration::hours(1)))),
            (hash("x"), grant(Scope::Admin, Some(now - chrono::Duration::seconds(1)))),
        ]));
        assert_eq!(Scope::needed(&Method::GET), Scope::Read);
        assert_eq!(Scope::needed(&Method::POST), Scope::Operator);
        assert_eq!(Scope::needed(&Method::PUT), Scope::Operator);
        assert_eq!(Scope::needed(&Method::DELETE), Scope::Admin);
        assert_eq!(tokens.authorize("r", Scope::Read, now).ok(), Some("ada"));
        let e = tokens.authorize("r", Scope::Operator, now).expect_err("read cannot write");
        assert_eq!(e.status, 403);
        assert!(e.detail.contains("operator scope") && e.detail.contains("has read"), "{}", e.detail);
        assert!(tokens.authorize("o", Scope::Operator, now).is_ok());
        assert_eq!(tokens.authorize("o", Scope::Admin, now).expect_err("no delete").status, 403);
        assert_eq!(tokens.authorize("o", Scope::Read, now + chrono::Duration::hours(2)).expect_err("expired").status, 401);
        let e = tokens.authorize("x", Scope::Read, now).expect_err("expired");
        assert!(e.status == 401 && e.detail.contains("expired at"), "{}", e.detail);
        assert_eq!(tokens.authorize("nope", Scope::Read, now).expect_err("unknown").status, 401);
    }

    #[test]
    fn token_lines_written_before_scopes_keep_every_right() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("{{\"user\":\"old\",\"sha256\":\"{}\"}}\n", hash("t"))).expect("write");
        let made = Tokens::add(&path, "new", Scope::Read, Some(Duration::from_secs(3600))).expect("add");
        let tokens = Tokens::load(&path).expect("load");
        assert!(tokens.authorize("t", Scope::Admin, chrono::Utc::now()).is_ok());
        assert!(tokens.authorize(&made, Scope::Read, chrono::Utc::now()).is_ok());
        assert!(tokens.authorize(&made, Scope::Operator, chrono::Utc::now()).is_err());
    }
}
