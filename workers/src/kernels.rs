//! Which CPU kernels libtorch trains with.
//!
//! libtorch picks its kernels by the CPU it runs on: ATen's vectorised
//! kernels by instruction set (AVX2, AVX-512), MKL's matrix products and
//! oneDNN's convolutions by instruction set and CPU vendor. Sums then run in
//! a different order, so the same job on the same build ends at a model that
//! differs in the last bits from one CPU model to another (the digits example
//! ends at four different digests on four x86-64 CPU models). Training on one
//! machine is still deterministic.
//!
//! [`Kernels::Portable`] pins all three libraries to their baseline code paths
//! so that every x86-64 CPU computes the same bits, at some cost in speed.
//! The libraries read their settings from the environment once, when first
//! used; the only safe way to set them for this process is to start it again
//! with them, which [`Kernels::select`] does (before anything else runs).

use std::ffi::OsString;

/// The CPU kernels a worker process trains with.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernels {
    /// The fastest kernels for this CPU: deterministic on one machine, last
    /// bits differ between CPU models.
    #[default]
    Native,
    /// Baseline kernels: the same bits on every x86-64 CPU, slower.
    Portable,
}

/// The environment that pins libtorch's libraries to their baseline code
/// paths: ATen's dispatch, MKL's conditional numerical reproducibility mode,
/// and oneDNN's instruction set.
pub const PORTABLE_ENV: [(&str, &str); 3] =
    [("ATEN_CPU_CAPABILITY", "default"), ("MKL_CBWR", "COMPATIBLE"), ("ONEDNN_MAX_CPU_ISA", "SSE41")];

/// What can go wrong selecting kernels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The environment already sets one of the variables to something else.
    #[error("portable kernels need {name}={want}, but the environment sets {name}={got}: unset {name} or run with --kernels native")]
    Conflict {
        /// The variable.
        name: &'static str,
        /// The value portable kernels need.
        want: &'static str,
        /// The value found.
        got: String,
    },
    /// The process could not start itself again with the settings.
    #[error("cannot restart {exe} with portable kernels: {source}")]
    Restart {
        /// This program.
        exe: String,
        /// Why.
        source: std::io::Error,
    },
}

impl Kernels {
    /// The kernels this process trains with, read from its environment.
    pub fn current() -> Self {
        if PORTABLE_ENV.iter().all(|(name, want)| std::env::var_os(name).is_some_and(|v| v == *want)) {
            Kernels::Portable
        } else {
            Kernels::Native
        }
    }

    /// The name used on the command line and in summaries.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Native => "native",
            Kernels::Portable => "portable",
        }
    }

    /// Makes this process train with these kernels. For portable kernels
    /// that are not yet in the environment this starts the program again
    /// with the same arguments and the settings added, and does not return
    /// unless that fails. Call it first thing in `main`, before libtorch or
    /// any thread starts.
    pub fn select(self) -> Result<(), Error> {
        if self == Kernels::Native || Kernels::current() == Kernels::Portable {
            return Ok(());
        }
        let missing = missing_settings(|name| std::env::var_os(name))?;
        let exe = std::env::current_exe().map_err(|source| Error::Restart { exe: "this program".into(), source })?;
        restart(&exe, &missing)
    }
}

/// The portable settings the environment still lacks; an error for one it
/// sets to another value.
fn missing_settings(get: impl Fn(&str) -> Option<OsString>) -> Result<Vec<(&'static str, &'static str)>, Error> {
    let mut missing = Vec::new();
    for (name, want) in PORTABLE_ENV {
        match get(name) {
            None => missing.push((name, want)),
            Some(v) if v == want => {}
            Some(v) => return Err(Error::Conflict { name, want, got: v.to_string_lossy().into_owned() }),
        }
    }
    Ok(missing)
}

#[cfg(unix)]
fn restart(exe: &std::path::Path, settings: &[(&str, &str)]) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    let source = cmd.args(args).envs(settings.iter().copied()).exec();
    Err(Error::Restart { exe: exe.display().to_string(), source })
}

#[cfg(not(unix))]
fn restart(exe: &std::path::Path, _: &[(&str, &str)]) -> Result<(), Error> {
    Err(Error::Restart {
        exe: exe.display().to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "set ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=SSE41 yourself",
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_settings_are_added_and_conflicts_named() {
        let none = |_: &str| None;
        assert_eq!(missing_settings(none).expect("nothing set"), PORTABLE_ENV.to_vec());
        let some = |name: &str| (name == "MKL_CBWR").then(|| OsString::from("COMPATIBLE"));
        assert_eq!(missing_settings(some).expect("one set").len(), 2);
        let conflict = |name: &str| (name == "ATEN_CPU_CAPABILITY").then(|| OsString::from("avx2"));
        let err = missing_settings(conflict).expect_err("conflict").to_string();
        assert!(err.contains("ATEN_CPU_CAPABILITY=avx2") && err.contains("--kernels native"), "{err}");
    }
}
