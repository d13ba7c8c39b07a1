//! Loading a job definition: a folder in Flame's layout (or the single-file
//! workflow form), every file read and parsed with its problems named by
//! file and line, datasets resolved, and the whole checked
//! ([`crate::validate`]).

use std::collections::BTreeMap;
use std::path::Path;

use crate::definition::{
    DataSpecEntry, Dataset, Design, JobDefinition, JobFile, ModelFile, ModelSpec, Problem, Problems, default_data_spec, default_model_spec,
    problem,
};

/// Reads and parses one JSON file of the folder, as a problem on failure.
fn read_json<T: serde::de::DeserializeOwned>(folder: &Path, name: &str) -> Result<T, Problem> {
    let path = folder.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        let (message, hint) = if e.kind() == std::io::ErrorKind::NotFound {
            (
                format!("file not found: {}", path.display()),
                "a job folder needs job.json, schema.json, the data spec, the model spec and the dataset files it names",
            )
        } else {
            (format!("cannot read {}: {e}", path.display()), "check the file's permissions")
        };
        problem(name, message, hint)
    })?;
    serde_json::from_str(&text).map_err(|e| {
        let hint = if e.is_syntax() || e.is_eof() {
            "fix the JSON syntax at that line and column"
        } else {
            "fix the field's value to match Flame's format"
        };
        problem(format!("{name}:{}:{}", e.line(), e.column()), format!("invalid JSON: {e}"), hint)
    })
}

/// A dataset URL that is a relative path to a file or folder in the job folder
/// (`digits.npz?part=0&of=3`, `file:data/site1.csv`, `images?size=28x28`) names it by its
/// absolute path, so that workers on this machine find it wherever they
/// run; other URLs (absolute paths, `builtin://`, paths the folder does not
/// hold, which workers resolve on their own machines) stay as written.
fn beside(folder: &Path, url: &str) -> String {
    if url.contains("://") {
        return url.to_string();
    }
    let (prefix, rest) = url.strip_prefix("file:").map_or(("", url), |r| ("file:", r));
    let (path, query) = rest.split_once('?').map_or((rest, None), |(p, q)| (p, Some(q)));
    let relative = Path::new(path);
    if path.is_empty() || relative.is_absolute() || !folder.join(relative).exists() {
        return url.to_string();
    }
    // Canonical: no '..' left in it (a worker refuses paths that climb).
    let absolute = folder.join(relative).canonicalize().unwrap_or_else(|_| folder.join(relative));
    format!("{prefix}{}{}", absolute.display(), query.map(|q| format!("?{q}")).unwrap_or_default())
}

/// The file a TorchScript model spec names (`baseModel.file`), read from the
/// folder; none for the built-in models.
fn model_file(folder: &Path, spec_path: &str, spec: &ModelSpec) -> Result<Option<ModelFile>, Problem> {
    let Some(base) = spec.base_model.as_ref().and_then(serde_json::Value::as_object) else { return Ok(None) };
    let Some(name) = base.get("file").and_then(serde_json::Value::as_str) else { return Ok(None) };
    let here = format!("{spec_path}#/baseModel/file");
    let relative = Path::new(name);
    if name.is_empty() || relative.is_absolute() || relative.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return Err(problem(
            here,
            format!("'{name}' is not a file in the job folder"),
            "name the model file relative to the folder, e.g. \"model.pt\"",
        ));
    }
    let path = folder.join(relative);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(ModelFile::new(name, bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(problem(
            here,
            format!("model file not found: {}", path.display()),
            "save the module into the job folder: torch.jit.script(model).save(\"model.pt\")",
        )),
        Err(e) => Err(problem(here, format!("cannot read {}: {e}", path.display()), "check the file's permissions")),
    }
}

impl JobDefinition {
    /// Loads a job folder and checks it, reporting every problem found.
    /// Datasets must be named by their file in the folder.
    /// A path to a `.json` file is read as the single-file workflow form.
    pub fn load(path: &Path) -> Result<Self, Problems> {
        if path.is_file() {
            return crate::workflow::Workflow::load(path);
        }
        Self::load_with(path, &BTreeMap::new())
    }

    /// Loads a job folder whose data spec may also name datasets by a
    /// registered id (Flame's way), resolved through `registered`.
    pub fn load_with(folder: &Path, registered: &BTreeMap<String, Dataset>) -> Result<Self, Problems> {
        if !folder.is_dir() {
            return Err(Problems(vec![problem(
                folder.display().to_string(),
                "not a folder",
                "pass a job folder holding job.json, schema.json, dataSpec.json, modelSpec.json and dataset files",
            )]));
        }
        let mut problems = Vec::new();
        let job: Option<JobFile> = read_json(folder, "job.json").map_err(|p| problems.push(p)).ok();
        let design: Option<Design> = read_json(folder, "schema.json").map_err(|p| problems.push(p)).ok();
        let (data_path, model_path) = job
            .as_ref()
            .map_or_else(|| (default_data_spec(), default_model_spec()), |j| (j.data_spec_path.clone(), j.model_spec_path.clone()));
        let data_spec: Option<Vec<DataSpecEntry>> = read_json(folder, &data_path).map_err(|p| problems.push(p)).ok();
        let model_spec: Option<ModelSpec> = read_json(folder, &model_path).map_err(|p| problems.push(p)).ok();

        let mut datasets = BTreeMap::new();
        for (i, entry) in data_spec.iter().flatten().enumerate() {
            for (group, refs) in &entry.dataset_groups {
                for (j, reference) in refs.iter().enumerate() {
                    if datasets.contains_key(reference) {
                        continue;
                    }
                    let here = format!("{data_path}#/{i}/datasetGroups/{group}/{j}");
                    if let Some(d) = registered.get(reference) {
                        datasets.insert(reference.clone(), d.clone());
                        continue;
                    }
                    if !reference.ends_with(".json") || reference.contains("..") {
                        problems.push(problem(
                            here,
                            format!("dataset '{reference}' is not a dataset file in the job folder"),
                            "name a dataset JSON file relative to the folder, e.g. \"dataset1.json\" (registered dataset ids need the management API)",
                        ));
                        continue;
                    }
                    match read_json::<Dataset>(folder, reference) {
                        Ok(mut d) => {
                            d.url = beside(folder, &d.url);
                            datasets.insert(reference.clone(), d);
                        }
                        Err(p) => problems.push(p),
                    }
                }
            }
        }
        let (Some(job), Some(design), Some(data_spec), Some(model_spec)) = (job, design, data_spec, model_spec) else {
            return Err(Problems(problems));
        };
        let model_file = model_file(folder, &model_path, &model_spec).map_err(|p| problems.push(p)).ok().flatten();
        let definition = Self { folder: folder.to_path_buf(), job, design, data_spec, model_spec, datasets, model_file };
        problems.extend(definition.check());
        if problems.is_empty() { Ok(definition) } else { Err(Problems(problems)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_dataset_paths_in_the_folder_become_absolute() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("digits.npz"), b"").expect("write");
        let absolute = std::path::absolute(dir.path().join("digits.npz")).expect("absolute");
        assert_eq!(beside(dir.path(), "digits.npz?part=1&of=3"), format!("{}?part=1&of=3", absolute.display()));
        assert_eq!(beside(dir.path(), "file:digits.npz"), format!("file:{}", absolute.display()));
        std::fs::create_dir(dir.path().join("images")).expect("mkdir");
        let images = std::path::absolute(dir.path().join("images")).expect("absolute");
        assert_eq!(beside(dir.path(), "images?size=8x8"), format!("{}?size=8x8", images.display()), "an image folder too");
        for kept in ["builtin://digits?part=0&of=3", "elsewhere.csv", "/data/site.csv", "https://example.org/d.npz"] {
            assert_eq!(beside(dir.path(), kept), kept, "{kept} is the worker's to find");
        }
    }
}
