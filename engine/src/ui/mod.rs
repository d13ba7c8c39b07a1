//! The web dashboard under `/ui`, served by `flame-engine serve`: the job
//! list, each job's page (live round progress, charts, lineage, trace,
//! audit log) and a new job from a job folder upload. Server-rendered HTML
//! ([`render`]) with a little JavaScript, everything served from here.
//!
//! Sign-in takes an API token and keeps it in an HttpOnly, SameSite=Strict
//! cookie, which the API accepts as it accepts `Authorization: Bearer`: the
//! pages and their script call the same API with the same scopes.

pub mod render;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path as UrlPath, Query, State};
use axum::http::{StatusCode, header, request::Parts};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use flame_events::Actor;
use flame_events::resource::Kind;
use flame_projections::{render as text, trace, view};

use crate::api::{Api, ApiError, COOKIE, Scope, User, cookie_token};

/// A signed-in user of the dashboard: else the page sends them to sign in.
struct Viewer(String);

impl FromRequestParts<Api> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Self, Response> {
        let token = cookie_token(parts).unwrap_or_default();
        match api.tokens.authorize(&token, Scope::Read, chrono::Utc::now()) {
            Ok(user) => Ok(Viewer(user.to_string())),
            Err(_) => Err(Redirect::to("/ui/login").into_response()),
        }
    }
}

/// The dashboard's routes.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/ui", get(jobs))
        .route("/ui/", get(|| async { Redirect::to("/ui") }))
        .route("/ui/login", get(|| async { Html(render::login(None)) }).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/jobs/{id}", get(job))
        .route("/ui/jobs/{id}/live", get(live))
        .route("/ui/new", get(new_job))
        .route("/ui/upload", post(upload).layer(axum::extract::DefaultBodyLimit::max(256 << 20)))
        .route("/ui/assets/app.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("app.css")) }))
        .route("/ui/assets/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("app.js")) }))
}

#[derive(Deserialize)]
struct Fragment {
    #[serde(default)]
    fragment: Option<u8>,
}

async fn jobs(State(api): State<Api>, Viewer(user): Viewer, Query(f): Query<Fragment>) -> Result<Html<String>, ApiError> {
    let list = render::job_list(&api.summaries().await?);
    Ok(Html(if f.fragment.is_some() { list } else { render::page("Jobs", Some(&user), &list) }))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(api): State<Api>, axum::Form(form): axum::Form<LoginForm>) -> Response {
    let token = form.token.trim();
    match api.tokens.authorize(token, Scope::Read, chrono::Utc::now()) {
        Ok(_) => {
            let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
            (StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), (header::LOCATION, "/ui".to_string())]).into_response()
        }
        Err(e) => (StatusCode::UNAUTHORIZED, Html(render::login(Some(&e.detail)))).into_response(),
    }
}

async fn logout() -> Response {
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    (StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), (header::LOCATION, "/ui/login".to_string())]).into_response()
}

async fn job(
    State(api): State<Api>,
    Viewer(user): Viewer,
    UrlPath(id): UrlPath<String>,
    Query(f): Query<Fragment>,
) -> Result<Response, ApiError> {
    let events = api.store.read_stream(&flame_events::job::stream_id(&id), 1).await?;
    if events.is_empty() {
        let body = format!(r#"<h1>No job '{}'</h1><p><a href="/ui">All jobs</a></p>"#, render::esc(&id));
        return Ok((StatusCode::NOT_FOUND, Html(render::page("No such job", Some(&user), &body))).into_response());
    }
    let v = view::fold(&events);
    let rows = text::metrics(&v);
    let tree = trace::build(&events);
    let audit = text::audit_lines(&v, &events);
    let body = render::job_body(&render::JobPage { view: &v, rows: &rows, trace: tree.as_ref(), audit: &audit, events: &events });
    Ok(Html(if f.fragment.is_some() { body } else { render::page(&v.status.name, Some(&user), &body) }).into_response())
}

/// Server-sent events for a job's page: one (unnamed, data = the stream's
/// version) whenever the job's stream grows, from the version the page shows.
async fn live(
    State(api): State<Api>,
    _: Viewer,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let shown: u64 = q.get("version").and_then(|v| v.parse().ok()).unwrap_or(0);
    let stream_id = flame_events::job::stream_id(&id);
    let stream = futures::stream::unfold((api.store.clone(), stream_id, shown), |(store, stream_id, shown)| async move {
        loop {
            match store.read_stream(&stream_id, shown + 1).await {
                Ok(events) if !events.is_empty() => {
                    let version = events.last().map_or(shown, |e| e.version);
                    let event = SseEvent::default().data(version.to_string());
                    return Some((Ok(event), (store, stream_id, version)));
                }
                Ok(_) => store.wait_for_append(Duration::from_millis(500)).await,
                Err(e) => {
                    tracing::warn!("dashboard live {stream_id}: {e}");
                    return None;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn new_job(Viewer(user): Viewer) -> Html<String> {
    Html(render::page("New job", Some(&user), &render::upload()))
}

/// A job folder as the browser read it.
#[derive(Deserialize)]
struct Upload {
    /// Relative path (the folder's own name first, as browsers give it) -> base64 of the bytes.
    files: BTreeMap<String, String>,
    /// Start the job once created.
    #[serde(default)]
    start: bool,
}

/// Where an uploaded file goes under `root`: its path without the folder's
/// own name, refused if it would leave the folder.
fn upload_path(root: &std::path::Path, name: &str) -> Result<std::path::PathBuf, String> {
    let mut parts: Vec<&str> = name.split(['/', '\\']).filter(|p| !p.is_empty()).collect();
    if parts.len() > 1 {
        parts.remove(0);
    }
    if parts.is_empty() || parts.iter().any(|p| *p == ".." || *p == "." || p.contains(':')) {
        return Err(format!("'{name}' is not a file inside the folder"));
    }
    Ok(parts.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// Creates a job from an uploaded job folder (a POST: the operator scope): registers its design and its
/// datasets (unless the same are registered), creates the job and, if asked, starts it.
async fn upload(State(api): State<Api>, User(user): User, Json(up): Json<Upload>) -> Result<Response, ApiError> {
    let actor = Actor::user(&user);
    let folder = up.files.keys().next().and_then(|k| k.split(['/', '\\']).find(|p| !p.is_empty())).unwrap_or("upload").to_string();
    let dir = tempfile::tempdir().map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    for (name, data) in &up.files {
        let path = upload_path(dir.path(), name).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("{name}: not base64: {e}")))?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        }
        std::fs::write(&path, bytes).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    }
    let mut def = crate::JobDefinition::load(dir.path()).map_err(|p| ApiError::invalid(p.0))?;
    def.folder = std::path::PathBuf::from(format!("upload:{folder}"));
    let design = api.register_design(&def, &actor).await?;
    let datasets = api.register_datasets(&def, &actor).await?;
    let id = api.runner.submit(&def, &actor).await?;
    if up.start {
        api.runner.start(&id, &actor).await?;
        api.drive(&id);
    }
    Ok((StatusCode::CREATED, Json(json!({ "id": id, "design": design, "datasets": datasets, "url": format!("/ui/jobs/{id}") })))
        .into_response())
}

impl Api {
    /// Registers the definition's design under its `designId` unless a design of that id exists; returns the id.
    async fn register_design(&self, def: &crate::JobDefinition, actor: &Actor) -> Result<String, ApiError> {
        let id = if def.job.design_id.is_empty() { def.name() } else { def.job.design_id.clone() };
        if flame_transport::check_id(&id).is_err() || self.resource(Kind::Design, &id).await?.is_some() {
            return Ok(id);
        }
        let body = json!({ "id": id, "name": def.design.name, "description": "", "schema": def.design });
        self.put_new(Kind::Design, &id, body, actor).await?;
        Ok(id)
    }

    /// Registers each of the definition's datasets that is not registered yet (same URL and realm); returns their ids.
    async fn register_datasets(&self, def: &crate::JobDefinition, actor: &Actor) -> Result<Vec<String>, ApiError> {
        let known = self.resources(Kind::Dataset).await?;
        let mut ids = Vec::new();
        for d in def.datasets.values() {
            let body = serde_json::to_value(d).unwrap_or_default();
            let same = known.iter().find(|k| k.get("url") == body.get("url") && k.get("realm") == body.get("realm"));
            if let Some(id) = same.and_then(|k| k.get("id")).and_then(|v| v.as_str()) {
                ids.push(id.to_string());
                continue;
            }
            let id = uuid::Uuid::now_v7().to_string();
            let mut body = body;
            body["id"] = json!(id);
            self.put_new(Kind::Dataset, &id, body, actor).await?;
            ids.push(id);
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploaded_paths_stay_inside_the_folder() {
        let root = std::path::Path::new("/tmp/up");
        assert_eq!(upload_path(root, "digits/job.json"), Ok(root.join("job.json")));
        assert_eq!(upload_path(root, "digits/data/a.json"), Ok(root.join("data").join("a.json")));
        assert_eq!(upload_path(root, "job.json"), Ok(root.join("job.json")));
        for bad in ["digits/../etc/passwd", "digits/./x", "", "d/c:evil"] {
            assert!(upload_path(root, bad).is_err(), "{bad}");
        }
    }
}
