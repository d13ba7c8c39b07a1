//! A small client of MLflow's tracking REST API (`/api/2.0/mlflow/...`) and
//! its artifact proxy (`/api/2.0/mlflow-artifacts/...`): just the calls the
//! MLflow projection makes. Blocking; the exporter calls it off the runtime.

use std::time::Duration;

use serde_json::{Value, json};

/// Why a call did not go through.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server is away or failing (no answer, or a 5xx): try again later.
    #[error("MLflow at {url} is unavailable: {why}")]
    Unavailable {
        /// The call.
        url: String,
        /// What happened.
        why: String,
    },
    /// The server refused the call (a 4xx): trying again will not help.
    #[error("MLflow refused {what}: {code}: {message}")]
    Refused {
        /// The call.
        what: String,
        /// MLflow's error code (`INVALID_PARAMETER_VALUE`, ...).
        code: String,
        /// Its message.
        message: String,
    },
}

impl Error {
    /// MLflow's error code, for a refusal.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Refused { code, .. } => Some(code),
            Self::Unavailable { .. } => None,
        }
    }
}

/// A run as MLflow knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    /// Its id.
    pub run_id: String,
    /// Where its artifacts go (`mlflow-artifacts:/<experiment>/<run>/artifacts`).
    pub artifact_uri: String,
}

/// A version of a registered model.
#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    /// The registered model's name.
    pub name: String,
    /// The version number.
    pub version: String,
    /// Its tags.
    pub tags: Vec<(String, String)>,
}

/// One metric point.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    /// Key.
    pub key: String,
    /// Value.
    pub value: f64,
    /// ms since the epoch.
    pub timestamp: i64,
    /// Step.
    pub step: u32,
}

/// MLflow's limit of metrics in one `log-batch`.
const BATCH: usize = 1000;
/// And of params or tags.
const BATCH_PARAMS: usize = 100;

/// A tracking server.
#[derive(Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// The server at `url` (`http://host:5000`).
    pub fn new(url: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Self { base: url.trim_end_matches('/').to_string(), agent }
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn answer(&self, url: &str, what: &str, result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Value, Error> {
        let mut resp = result.map_err(|e| Error::Unavailable { url: url.to_string(), why: e.to_string() })?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(|e| Error::Unavailable { url: url.to_string(), why: e.to_string() })?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match status {
            200..=299 => Ok(value),
            400..=499 => Err(Error::Refused {
                what: what.to_string(),
                code: value["error_code"].as_str().unwrap_or(&status.to_string()).to_string(),
                message: value["message"].as_str().map_or_else(|| text.chars().take(300).collect(), str::to_string),
            }),
            _ => Err(Error::Unavailable {
                url: url.to_string(),
                why: format!("HTTP {status}: {}", text.chars().take(300).collect::<String>()),
            }),
        }
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value, Error> {
        let url = format!("{}/api/2.0/mlflow/{path}", self.base);
        let result = self.agent.post(&url).header("content-type", "application/json").send(body.to_string());
        self.answer(&url, path, result)
    }

    fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, Error> {
        let url = format!("{}/api/2.0/mlflow/{path}", self.base);
        let mut req = self.agent.get(&url);
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        self.answer(&url, path, req.call())
    }

    /// The id of the experiment named `name`, made if it is missing.
    pub fn experiment(&self, name: &str) -> Result<String, Error> {
        match self.get("experiments/get-by-name", &[("experiment_name", name)]) {
            Ok(v) => return Ok(v["experiment"]["experiment_id"].as_str().unwrap_or_default().to_string()),
            Err(e) if e.code() == Some("RESOURCE_DOES_NOT_EXIST") => {}
            Err(e) => return Err(e),
        }
        match self.post("experiments/create", &json!({ "name": name })) {
            Ok(v) => Ok(v["experiment_id"].as_str().unwrap_or_default().to_string()),
            // Made meanwhile by someone else.
            Err(e) if e.code() == Some("RESOURCE_ALREADY_EXISTS") => {
                let v = self.get("experiments/get-by-name", &[("experiment_name", name)])?;
                Ok(v["experiment"]["experiment_id"].as_str().unwrap_or_default().to_string())
            }
            Err(e) => Err(e),
        }
    }

    /// The runs of `experiment` whose tag `key` is `value`, oldest first.
    pub fn runs_tagged(&self, experiment: &str, key: &str, value: &str) -> Result<Vec<Run>, Error> {
        let filter = format!("tags.`{key}` = '{}'", value.replace('\'', "\\'"));
        let v = self.post(
            "runs/search",
            &json!({ "experiment_ids": [experiment], "filter": filter, "max_results": 100, "order_by": ["attributes.start_time ASC"] }),
        )?;
        Ok(v["runs"].as_array().into_iter().flatten().map(|r| run(&r["info"])).collect())
    }

    /// A new run.
    pub fn create_run(&self, experiment: &str, name: &str, start_ms: i64, tags: &[(String, String)]) -> Result<Run, Error> {
        let tags: Vec<Value> = tags.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
        let v =
            self.post("runs/create", &json!({ "experiment_id": experiment, "run_name": name, "start_time": start_ms, "tags": tags }))?;
        Ok(run(&v["run"]["info"]))
    }

    /// Logs params, in batches MLflow accepts.
    pub fn log_params(&self, run_id: &str, params: &[(String, String)]) -> Result<(), Error> {
        for chunk in params.chunks(BATCH_PARAMS) {
            let params: Vec<Value> = chunk.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
            self.post("runs/log-batch", &json!({ "run_id": run_id, "params": params }))?;
        }
        Ok(())
    }

    /// Sets tags.
    pub fn set_tags(&self, run_id: &str, tags: &[(String, String)]) -> Result<(), Error> {
        for chunk in tags.chunks(BATCH_PARAMS) {
            let tags: Vec<Value> = chunk.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
            self.post("runs/log-batch", &json!({ "run_id": run_id, "tags": tags }))?;
        }
        Ok(())
    }

    /// Logs metric points (a point already stored, same key, step, time and value, is stored once).
    pub fn log_metrics(&self, run_id: &str, metrics: &[Metric]) -> Result<(), Error> {
        for chunk in metrics.chunks(BATCH) {
            let metrics: Vec<Value> =
                chunk.iter().map(|m| json!({ "key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step })).collect();
            self.post("runs/log-batch", &json!({ "run_id": run_id, "metrics": metrics }))?;
        }
        Ok(())
    }

    /// Ends a run with `status` (`FINISHED`, `FAILED`, `KILLED`) at `end_ms`.
    pub fn end_run(&self, run_id: &str, status: &str, end_ms: i64) -> Result<(), Error> {
        self.post("runs/update", &json!({ "run_id": run_id, "status": status, "end_time": end_ms })).map(|_| ())
    }

    /// Stores `bytes` as the run's artifact at `path` (`model/model.safetensors`)
    /// through the server's artifact proxy.
    pub fn put_artifact(&self, run: &Run, path: &str, bytes: &[u8]) -> Result<(), Error> {
        let root = proxied_root(&run.artifact_uri).ok_or_else(|| Error::Refused {
            what: format!("the artifact {path}"),
            code: "NO_ARTIFACT_PROXY".into(),
            message: format!(
                "run {} keeps its artifacts at {}, which this client cannot write; start the server so that it serves artifacts (mlflow server --artifacts-destination DIR)",
                run.run_id, run.artifact_uri
            ),
        })?;
        let url = format!("{}/api/2.0/mlflow-artifacts/artifacts/{root}/{path}", self.base);
        let result = self.agent.put(&url).header("content-type", "application/octet-stream").send(bytes);
        self.answer(&url, &format!("the artifact {path}"), result).map(|_| ())
    }

    /// Makes the registered model `name` unless it exists.
    pub fn registered_model(&self, name: &str) -> Result<(), Error> {
        match self.post("registered-models/create", &json!({ "name": name })) {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("RESOURCE_ALREADY_EXISTS") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The versions of any registered model made from `run_id`.
    pub fn versions_of_run(&self, run_id: &str) -> Result<Vec<Version>, Error> {
        let v = self.get("model-versions/search", &[("filter", &format!("run_id = '{run_id}'")), ("max_results", "100")])?;
        Ok(v["model_versions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                let tags = m["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| (t["key"].as_str().unwrap_or_default().to_string(), t["value"].as_str().unwrap_or_default().to_string()))
                    .collect();
                Version {
                    name: m["name"].as_str().unwrap_or_default().to_string(),
                    version: m["version"].as_str().unwrap_or_default().to_string(),
                    tags,
                }
            })
            .collect())
    }

    /// A new version of the registered model `name` from the run's artifacts at `path`; returns the version.
    pub fn create_version(&self, name: &str, run: &Run, path: &str, tags: &[(String, String)], description: &str) -> Result<String, Error> {
        let tags: Vec<Value> = tags.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
        let v = self.post(
            "model-versions/create",
            &json!({
                "name": name,
                "source": format!("{}/{path}", run.artifact_uri.trim_end_matches('/')),
                "run_id": run.run_id,
                "tags": tags,
                "description": description,
            }),
        )?;
        Ok(v["model_version"]["version"].as_str().unwrap_or_default().to_string())
    }
}

fn run(info: &Value) -> Run {
    Run {
        run_id: info["run_id"].as_str().or_else(|| info["run_uuid"].as_str()).unwrap_or_default().to_string(),
        artifact_uri: info["artifact_uri"].as_str().unwrap_or_default().to_string(),
    }
}

/// The path under the artifact proxy of an `mlflow-artifacts:` URI
/// (`mlflow-artifacts:/1/abc/artifacts` or `mlflow-artifacts://host:5000/1/abc/artifacts`).
pub fn proxied_root(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("mlflow-artifacts:")?;
    let path = match rest.strip_prefix("//") {
        Some(authority_and_path) => &authority_and_path[authority_and_path.find('/')?..],
        None => rest,
    };
    let path = path.trim_matches('/');
    (!path.is_empty()).then(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_roots_under_the_proxy_come_from_either_uri_form() {
        assert_eq!(proxied_root("mlflow-artifacts:/1/abc/artifacts").as_deref(), Some("1/abc/artifacts"));
        assert_eq!(proxied_root("mlflow-artifacts://h:5000/1/abc/artifacts/").as_deref(), Some("1/abc/artifacts"));
        assert_eq!(proxied_root("file:///tmp/mlruns/1/abc/artifacts"), None);
        assert_eq!(proxied_root("mlflow-artifacts:/"), None);
    }
}
