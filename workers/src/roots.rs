//! Where a worker may read datasets: the folders its owner shares (`--data-root`).
//! A job names a dataset by URL; a path in it resolves inside one of the
//! roots or not at all, so a job cannot make an edge node read what its
//! owner did not share (`/etc/passwd`, `../../secrets.csv`, a symlink out).
//! What is refused is refused with the same words whether or not the path
//! exists, so a job cannot probe the disk either.

use std::path::{Component, Path, PathBuf};

/// The folders a worker reads datasets from; `None`: anywhere (a library
/// user's choice, never the binaries' default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataRoots(Option<Vec<PathBuf>>);

/// A dataset URL this worker will not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("dataset '{url}': {reason}")]
pub struct Refused {
    /// The URL as the job gave it.
    pub url: String,
    /// Why.
    pub reason: String,
}

impl DataRoots {
    /// No restriction.
    pub fn anywhere() -> Self {
        Self(None)
    }

    /// Only under these folders (each must exist).
    pub fn new(dirs: &[PathBuf]) -> Result<Self, String> {
        let mut roots = Vec::new();
        for d in dirs {
            let c = d.canonicalize().map_err(|e| format!("data root '{}': {e}", d.display()))?;
            if !c.is_dir() {
                return Err(format!("data root '{}' is not a folder", d.display()));
            }
            roots.push(c);
        }
        if roots.is_empty() {
            return Err("give at least one data root".into());
        }
        Ok(Self(Some(roots)))
    }

    /// The roots, when restricted.
    pub fn dirs(&self) -> Option<&[PathBuf]> {
        self.0.as_deref()
    }

    /// The URL to read for a dataset URL: built-in and synthetic datasets as
    /// they are; a path (relative: to each root in turn; absolute: as given)
    /// made absolute and canonical inside a root, its query kept.
    pub fn resolve(&self, url: &str) -> Result<String, Refused> {
        let Some(roots) = &self.0 else { return Ok(url.to_string()) };
        if let Some((scheme, _)) = url.split_once("://")
            && scheme != "file"
        {
            // builtin://, synthetic://: nothing on disk; any other scheme fails to load by itself.
            return Ok(url.to_string());
        }
        let refuse = |reason: String| Refused { url: url.to_string(), reason };
        let rest = url.strip_prefix("file://").or_else(|| url.strip_prefix("file:")).unwrap_or(url);
        let (path, query) = rest.split_once('?').map_or((rest, None), |(p, q)| (p, Some(q)));
        let given = Path::new(path);
        if path.is_empty() {
            return Err(refuse("names no file".into()));
        }
        if given.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(refuse("a dataset path may not climb out with '..': name it inside the worker's data roots".into()));
        }
        let outside = || {
            refuse(format!(
                "is not under this worker's data roots ({}): its owner shares datasets there (flame-worker --data-root)",
                roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
            ))
        };
        let inside = |candidate: &Path| -> Option<PathBuf> {
            // Canonical: symlinks followed, so one that points out is out.
            let c = candidate.canonicalize().ok()?;
            roots.iter().any(|r| c.starts_with(r)).then_some(c)
        };
        let found = if given.is_absolute() {
            // Only a path that is lexically under a root is even looked at.
            if !roots.iter().any(|r| given.starts_with(r)) {
                return Err(outside());
            }
            inside(given)
        } else {
            roots.iter().find_map(|r| inside(&r.join(given)))
        };
        let Some(found) = found else {
            return Err(if given.is_absolute() || roots.iter().any(|r| r.join(given).exists()) {
                outside()
            } else {
                refuse(format!(
                    "no such file under this worker's data roots ({})",
                    roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
                ))
            });
        };
        Ok(format!("{}{}", found.display(), query.map(|q| format!("?{q}")).unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dataset_resolves_inside_the_roots_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (shared, private) = (dir.path().join("shared"), dir.path().join("private"));
        std::fs::create_dir_all(shared.join("sub")).expect("mkdir");
        std::fs::create_dir_all(&private).expect("mkdir");
        std::fs::write(shared.join("sub/a.csv"), "1,0\n").expect("write");
        std::fs::write(private.join("secret.csv"), "42,1\n").expect("write");
        std::os::unix::fs::symlink(private.join("secret.csv"), shared.join("link.csv")).expect("symlink");
        let roots = DataRoots::new(std::slice::from_ref(&shared)).expect("roots");
        let canonical = shared.canonicalize().expect("canonical");

        // Relative and absolute paths inside, with their query.
        let want = format!("{}?part=0&of=2", canonical.join("sub/a.csv").display());
        assert_eq!(roots.resolve("sub/a.csv?part=0&of=2").expect("relative"), want);
        assert_eq!(roots.resolve(&format!("file:{}?part=0&of=2", canonical.join("sub/a.csv").display())).expect("absolute"), want);
        assert_eq!(roots.resolve("builtin://digits?part=0&of=3").expect("builtin"), "builtin://digits?part=0&of=3");

        // Out: '..', an absolute path elsewhere, a symlink that points out.
        assert!(roots.resolve("../private/secret.csv").expect_err("climbs").reason.contains("'..'"));
        let elsewhere = roots.resolve(&private.join("secret.csv").display().to_string()).expect_err("outside");
        assert!(elsewhere.reason.contains("not under this worker's data roots"), "{elsewhere}");
        let missing = roots.resolve(&private.join("nothing.csv").display().to_string()).expect_err("outside too");
        assert_eq!(elsewhere.reason, missing.reason, "a path outside reads the same whether or not it exists");
        assert!(roots.resolve("/etc/passwd").expect_err("system").reason.contains("not under"));
        assert!(roots.resolve("link.csv").expect_err("symlink").reason.contains("not under"));
        assert!(roots.resolve("sub/none.csv").expect_err("missing inside").reason.contains("no such file"));

        assert_eq!(DataRoots::anywhere().resolve("/etc/passwd").expect("unrestricted"), "/etc/passwd");
        assert!(DataRoots::new(&[dir.path().join("absent")]).is_err());
    }
}
