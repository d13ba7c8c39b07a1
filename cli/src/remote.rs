//! Management commands against a running engine's API (`--api URL`), with
//! Flame's verbs: create, get, update, remove, start, stop.
//!
//! Exit codes: 0 done; 1 the engine or the network failed; 2 the request was
//! invalid (422, the validation list is printed); 3 not found (404);
//! 4 illegal in the job's state (409); 5 unauthorized (401: no valid token; 403: the token's scope does not allow the call).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};

use flame_engine::JobDefinition;
use flame_engine::workflow::Workflow;

/// Where the API is and who calls it.
#[derive(clap::Args, Debug, Clone)]
pub struct Remote {
    /// The engine's management API.
    #[arg(long, env = "FLAME_API", default_value = "http://127.0.0.1:8080", global = true)]
    pub api: String,
    /// Bearer token (`flame-engine token add` makes one).
    #[arg(long, env = "FLAME_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

/// What to create.
#[derive(Subcommand, Debug)]
pub enum Create {
    /// A design (then give it a schema).
    Design {
        /// Design id.
        id: String,
        /// Name.
        #[arg(long)]
        name: Option<String>,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// A design's schema, from Flame's schema.json.
    Schema {
        /// schema.json.
        file: PathBuf,
        /// The design it belongs to.
        #[arg(long)]
        design: String,
    },
    /// A dataset, from Flame's dataset.json.
    Dataset {
        /// dataset.json.
        file: PathBuf,
    },
    /// A job, from a job folder or a workflow file.
    Job {
        /// Job folder or workflow .json.
        path: PathBuf,
    },
}

/// What to show.
#[derive(Subcommand, Debug)]
pub enum Get {
    /// All designs.
    Designs,
    /// One design.
    Design {
        /// Design id.
        id: String,
    },
    /// A design's schema.
    Schema {
        /// Design id.
        id: String,
    },
    /// All datasets.
    Datasets,
    /// One dataset.
    Dataset {
        /// Dataset id.
        id: String,
    },
    /// All jobs.
    Jobs,
    /// One job.
    Job {
        /// Job id.
        id: String,
    },
    /// A job's tasks.
    Tasks {
        /// Job id.
        job: String,
    },
    /// One task of a job.
    Task {
        /// Job id.
        job: String,
        /// Task id.
        task: String,
    },
    /// Live workers.
    Computes,
}

/// What to remove.
#[derive(Subcommand, Debug)]
pub enum Remove {
    /// A design.
    Design {
        /// Design id.
        id: String,
    },
    /// A dataset.
    Dataset {
        /// Dataset id.
        id: String,
    },
    /// A job that is not active.
    Job {
        /// Job id.
        id: String,
    },
}

/// A management request.
#[derive(Debug)]
pub enum Request {
    /// Create something.
    Create(Create),
    /// Show something.
    Get(Get),
    /// Replace a job's definition.
    UpdateJob {
        /// Job id.
        id: String,
        /// Job folder or workflow file.
        path: PathBuf,
    },
    /// Remove something.
    Remove(Remove),
    /// Start a job.
    Start(String),
    /// Stop a job.
    Stop(String, String),
}

fn workflow(path: &Path) -> Result<String, String> {
    if path.is_file() {
        return std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    }
    let def = JobDefinition::load(path).map_err(|p| p.to_string())?;
    serde_json::to_string(&Workflow::from_definition(&def)).map_err(|e| e.to_string())
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Sends the request and prints the answer (JSON on stdout, problems on stderr).
pub fn run(api: &Remote, request: Request) -> ExitCode {
    let call = || -> Result<(&'static str, String, Option<String>), String> {
        use Request as R;
        Ok(match request {
            R::Create(Create::Design { id, name, description }) => {
                let name = name.unwrap_or_else(|| id.clone());
                ("POST", "/designs".into(), Some(json!({"id": id, "name": name, "description": description}).to_string()))
            }
            R::Create(Create::Schema { file, design }) => ("PUT", format!("/designs/{design}/schema"), Some(read(&file)?)),
            R::Create(Create::Dataset { file }) => ("POST", "/datasets".into(), Some(read(&file)?)),
            R::Create(Create::Job { path }) => ("POST", "/jobs".into(), Some(workflow(&path)?)),
            R::Get(g) => (
                "GET",
                match g {
                    Get::Designs => "/designs".into(),
                    Get::Design { id } => format!("/designs/{id}"),
                    Get::Schema { id } => format!("/designs/{id}/schema"),
                    Get::Datasets => "/datasets".into(),
                    Get::Dataset { id } => format!("/datasets/{id}"),
                    Get::Jobs => "/jobs".into(),
                    Get::Job { id } => format!("/jobs/{id}"),
                    Get::Tasks { job } => format!("/jobs/{job}/tasks"),
                    Get::Task { job, task } => format!("/jobs/{job}/tasks/{task}"),
                    Get::Computes => "/computes".into(),
                },
                None,
            ),
            R::UpdateJob { id, path } => ("PUT", format!("/jobs/{id}"), Some(workflow(&path)?)),
            R::Remove(r) => (
                "DELETE",
                match r {
                    Remove::Design { id } => format!("/designs/{id}"),
                    Remove::Dataset { id } => format!("/datasets/{id}"),
                    Remove::Job { id } => format!("/jobs/{id}"),
                },
                None,
            ),
            R::Start(id) => ("PUT", format!("/jobs/{id}/status"), Some(json!({"state": "start"}).to_string())),
            R::Stop(id, reason) => ("PUT", format!("/jobs/{id}/status"), Some(json!({"state": "stop", "reason": reason}).to_string())),
        })
    };
    let (method, path, body) = match call() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into();
    let url = format!("{}{path}", api.api.trim_end_matches('/'));
    let auth = api.token.as_ref().map(|t| format!("Bearer {t}")).unwrap_or_default();
    let result = match (method, body) {
        ("GET", _) => agent.get(&url).header("authorization", &auth).call(),
        ("DELETE", _) => agent.delete(&url).header("authorization", &auth).call(),
        ("POST", b) => {
            agent.post(&url).header("authorization", &auth).header("content-type", "application/json").send(b.unwrap_or_default())
        }
        (_, b) => agent.put(&url).header("authorization", &auth).header("content-type", "application/json").send(b.unwrap_or_default()),
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {method} {url}: {e} (is flame-engine serve running there? set --api or FLAME_API)");
            return ExitCode::from(1);
        }
    };
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if (200..300).contains(&status) {
        if !value.is_null() && value != Value::String(String::new()) {
            println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        }
        return ExitCode::SUCCESS;
    }
    eprintln!("error: {} ({status})", value["detail"].as_str().unwrap_or("request failed"));
    for p in value["errors"].as_array().into_iter().flatten() {
        eprintln!(
            "  {}: {} ({})",
            p["path"].as_str().unwrap_or("?"),
            p["message"].as_str().unwrap_or(""),
            p["hint"].as_str().unwrap_or("")
        );
    }
    ExitCode::from(match status {
        422 | 400 => 2,
        404 => 3,
        409 => 4,
        401 | 403 => 5,
        _ => 1,
    })
}
