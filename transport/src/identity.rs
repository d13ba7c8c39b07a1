//! Worker identities on NATS: one NKey user per worker, issued by the
//! platform, with server-side permissions that let a worker consume only its
//! own commands, report only on a subject that carries its own id, write only
//! its own registry entry, and read and write model blobs. A device that
//! speaks only MQTT gets a user with a password (MQTT has no NKeys) that may
//! use only its own topics. The engine's user may do everything.
//!
//! The server is told in its own configuration language: [`config`] renders
//! an `authorization` block that `nats-server.conf` includes; the folder that
//! [`Identities`] keeps holds the keys it is rendered from.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{COMMAND_STREAM, REPORT_STREAM, WORKER_BUCKET, blob, check_id};

/// The inbox prefix of a worker's connection: replies to its requests (and
/// the commands its pull consumer fetches) arrive under it, and it may
/// subscribe to nothing else.
pub fn inbox_prefix(worker_id: &str) -> String {
    format!("_INBOX_{worker_id}")
}

/// What a NATS user may publish and subscribe to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to (wildcards allowed); all others are denied.
    pub publish: Vec<String>,
    /// Subjects it may subscribe to; all others are denied.
    pub subscribe: Vec<String>,
}

/// A worker's permissions. What each line is for:
///
/// - its reports, only on `flame.report.<job>.<its id>` (the engine refuses a
///   report whose subject names another worker than its `worker_id`);
/// - its registry entry (heartbeats) under its own key only;
/// - its own durable command consumer: created only with the filter of its
///   own command subject (the filter is part of the API subject, so the server
///   checks it), fetched from and acknowledged;
/// - the stream and bucket descriptions it binds to;
/// - the model blob store: chunks and descriptions written, blobs read
///   by direct gets (small ones) or through ordered consumers (every reader checks each blob against its
///   sha256 name, so a blob written over by another worker is refused, never
///   used).
///
/// It may subscribe only under its own inbox prefix, so it cannot listen to
/// other workers' commands, replies or fetches.
pub fn worker_permissions(worker_id: &str) -> Permissions {
    let cmd = COMMAND_STREAM;
    let kv = format!("KV_{WORKER_BUCKET}");
    let bucket = blob::BUCKET;
    let obj = format!("OBJ_{bucket}");
    let consumer = format!("worker-{worker_id}");
    let publish = vec![
        format!("flame.report.*.{worker_id}"),
        format!("$KV.{WORKER_BUCKET}.{worker_id}"),
        // Its own registration read back, to see that no other live process holds its id.
        format!("$JS.API.DIRECT.GET.{kv}.$KV.{WORKER_BUCKET}.{worker_id}"),
        format!("$JS.API.STREAM.INFO.{cmd}"),
        format!("$JS.API.STREAM.INFO.{REPORT_STREAM}"),
        format!("$JS.API.STREAM.INFO.{kv}"),
        format!("$JS.API.STREAM.INFO.{obj}"),
        format!("$JS.API.CONSUMER.CREATE.{cmd}.{consumer}.flame.cmd.{worker_id}"),
        format!("$JS.API.CONSUMER.INFO.{cmd}.{consumer}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{cmd}.{consumer}"),
        format!("$JS.ACK.{cmd}.{consumer}.>"),
        format!("$O.{bucket}.C.>"),
        format!("$O.{bucket}.M.>"),
        // A blob's description: by name (Rust), or the last on its subject (Python).
        format!("$JS.API.DIRECT.GET.{obj}.$O.{bucket}.M.>"),
        format!("$JS.API.STREAM.MSG.GET.{obj}"),
        // A small blob's chunks one by one, by subject and sequence (no consumer).
        format!("$JS.API.DIRECT.GET.{obj}"),
        // Its chunks, through an ordered (ephemeral) consumer with flow control
        // (nats-py looks the stream up by subject first).
        "$JS.API.STREAM.NAMES".to_string(),
        format!("$JS.API.CONSUMER.CREATE.{obj}"),
        format!("$JS.FC.{obj}.>"),
    ];
    Permissions { publish, subscribe: vec![format!("{}.>", inbox_prefix(worker_id))] }
}

/// An MQTT device's permissions: its own topics only (the server applies
/// them to topics as subjects, `flame/mqtt/<kind>/<id>` being
/// `flame.mqtt.<kind>.<id>`). It says hello, asks for and stores blobs and
/// reports under its own id, and hears its commands and the answers to its
/// blob requests under its own id; the adapter on the engine's connection
/// does everything else. (The server's own MQTT session and retained-message
/// streams need no permission of the device's user: the test runs a job
/// with none refused.)
pub fn device_permissions(device_id: &str) -> Permissions {
    let p = crate::mqtt::PREFIX;
    Permissions {
        publish: ["hello", "get", "put", "report"].iter().map(|k| format!("{p}.{k}.{device_id}")).collect(),
        subscribe: vec![
            format!("{p}.cmd.{device_id}"),
            format!("{p}.blob.{device_id}.>"),
            format!("{p}.missing.{device_id}.>"),
            format!("{p}.stored.{device_id}"),
        ],
    }
}

/// How a user proves who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// An NKey public key (`U...`): the engine and NATS workers.
    NKey(String),
    /// A user name and a bcrypt hash of its password: MQTT devices.
    Password {
        /// The user name (the device's id).
        user: String,
        /// The bcrypt hash the server checks the password against.
        bcrypt: String,
    },
}

/// A user in the rendered configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Who it is, for the comment above its entry.
    pub name: String,
    /// How it proves it.
    pub credential: Credential,
    /// `None`: everything (the engine).
    pub permissions: Option<Permissions>,
}

fn quoted(list: &[String]) -> String {
    // Quoted: an unquoted `$` starts a variable in NATS's configuration language.
    list.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
}

/// The `authorization` block for `nats-server.conf`.
pub fn config(users: &[User]) -> String {
    let mut out = String::from(
        "# Flame's NATS identities, written by `flame-engine worker add` and `remove`:\n\
         # change them with those commands, not here. Include this file in\n\
         # nats-server.conf (`include auth.conf`) and reload the server\n\
         # (`nats-server --signal reload`, or SIGHUP) after each change.\n\
         authorization {\n  users = [\n",
    );
    for user in users {
        out.push_str(&format!("    # {}\n", user.name));
        let who = match &user.credential {
            Credential::NKey(key) => format!("nkey: \"{key}\""),
            Credential::Password { user, bcrypt } => format!("user: \"{user}\", password: \"{bcrypt}\""),
        };
        match &user.permissions {
            None => out.push_str(&format!("    {{ {who} }}\n")),
            Some(p) => out.push_str(&format!(
                "    {{ {who}, permissions: {{\n        publish: {{ allow: [{}] }}\n        subscribe: {{ allow: [{}] }}\n    }} }}\n",
                quoted(&p.publish),
                quoted(&p.subscribe)
            )),
        }
    }
    out.push_str("  ]\n}\n");
    out
}

/// Errors of the identities folder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// Bad input: an id, a key, a worker that is (not) there.
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Io(format!("cannot {what} '{}': {e}", path.display()))
}

/// Writes `text` to `path` through a temporary file, readable only by its
/// owner when `secret`.
fn write(path: &Path, text: &str, secret: bool) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(|e| io(&tmp, "write", e))?;
    file.write_all(text.as_bytes()).and_then(|_| file.sync_all()).map_err(|e| io(&tmp, "write", e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, "write", e))
}

/// A new user key pair's seed and public key.
fn new_user() -> Result<(String, String), Error> {
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().map_err(|e| Error::Invalid(format!("cannot encode a new NKey seed: {e}")))?;
    Ok((seed, pair.public_key()))
}

/// The public key of a seed file's first user seed.
fn public_of_seed(path: &Path) -> Result<String, Error> {
    let text = fs::read_to_string(path).map_err(|e| io(path, "read", e))?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU"))
        .ok_or_else(|| Error::Invalid(format!("'{}' holds no user NKey seed (a line starting with SU)", path.display())))?;
    let pair = nkeys::KeyPair::from_seed(seed).map_err(|e| Error::Invalid(format!("'{}': not a valid NKey seed: {e}", path.display())))?;
    Ok(pair.public_key())
}

/// Checks a user public key given by a site (`U` and 55 more characters).
pub fn check_public_key(key: &str) -> Result<(), Error> {
    if !key.starts_with('U') {
        return Err(Error::Invalid(format!("'{key}' is not a user public key: those start with U (`nk -gen user -pubout` makes one)")));
    }
    nkeys::KeyPair::from_public_key(key).map(|_| ()).map_err(|e| Error::Invalid(format!("'{key}' is not a valid NKey public key: {e}")))
}

/// A new device password: 40 random hex digits.
fn new_password() -> Result<String, Error> {
    let mut bytes = [0u8; 20];
    getrandom::fill(&mut bytes).map_err(|e| Error::Invalid(format!("no randomness from the operating system for a password: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What `add_device` made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedDevice {
    /// The file holding the device's password (readable by its owner only), for the site.
    pub password_file: PathBuf,
    /// The engine's seed file (made on first use).
    pub engine_seed: PathBuf,
    /// The rendered configuration.
    pub config: PathBuf,
}

/// What `add` made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Added {
    /// The worker's public key.
    pub public_key: String,
    /// Its seed file, when the platform made the key (none when the site gave
    /// its public key and keeps the seed).
    pub seed_file: Option<PathBuf>,
    /// The engine's seed file (made on first use).
    pub engine_seed: PathBuf,
    /// The rendered configuration.
    pub config: PathBuf,
}

/// The identities folder: `engine.nk` (the engine's seed), `workers/<id>.nk`
/// (a worker's seed, when the platform made it) or `workers/<id>.pub` (its
/// public key, when its site made the key), `workers/<id>.bcrypt` and
/// `workers/<id>.password` (an MQTT device's password hash, and the password
/// for its site), and `auth.conf` rendered from them.
pub struct Identities {
    dir: PathBuf,
}

impl Identities {
    /// The folder (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The engine's seed file.
    pub fn engine_seed(&self) -> PathBuf {
        self.dir.join("engine.nk")
    }

    /// The rendered configuration.
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("auth.conf")
    }

    fn workers_dir(&self) -> PathBuf {
        self.dir.join("workers")
    }

    fn ensure_engine(&self) -> Result<String, Error> {
        let path = self.engine_seed();
        if path.exists() {
            return public_of_seed(&path);
        }
        let (seed, public) = new_user()?;
        write(&path, &format!("{seed}\n"), true)?;
        Ok(public)
    }

    /// The files of the workers folder, as (id, extension, path).
    fn files(&self) -> Result<Vec<(String, String, PathBuf)>, Error> {
        let dir = self.workers_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&dir, "read", e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| io(&dir, "read", e))?.path();
            if let (Some(id), Some(ext)) = (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|s| s.to_str())) {
                out.push((id.to_string(), ext.to_string(), path.clone()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The workers registered, by id, with their public keys.
    pub fn workers(&self) -> Result<Vec<(String, String)>, Error> {
        let mut out = Vec::new();
        for (id, ext, path) in self.files()? {
            let public = match ext.as_str() {
                "nk" => public_of_seed(&path)?,
                "pub" => {
                    let key = fs::read_to_string(&path).map_err(|e| io(&path, "read", e))?.trim().to_string();
                    check_public_key(&key).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
                    key
                }
                _ => continue,
            };
            out.push((id, public));
        }
        Ok(out)
    }

    /// The MQTT devices registered, by id, with their password hashes.
    pub fn devices(&self) -> Result<Vec<(String, String)>, Error> {
        let mut out = Vec::new();
        for (id, ext, path) in self.files()? {
            if ext == "bcrypt" {
                out.push((id, fs::read_to_string(&path).map_err(|e| io(&path, "read", e))?.trim().to_string()));
            }
        }
        Ok(out)
    }

    fn taken(&self, id: &str) -> Result<(), Error> {
        check_id(id).map_err(|_| Error::Invalid(format!("'{id}' is not a worker id: letters, digits, '-' and '_', at most 128")))?;
        if self.workers()?.iter().chain(self.devices()?.iter()).any(|(w, _)| w == id) {
            return Err(Error::Invalid(format!(
                "worker '{id}' already has an identity in {}; `flame-engine worker remove --id {id}` first to issue a new one",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Issues an identity for MQTT device `id`: a new password (written to
    /// `workers/<id>.password` for the site, its bcrypt hash to
    /// `workers/<id>.bcrypt`), then renders `auth.conf` again.
    pub fn add_device(&self, id: &str) -> Result<AddedDevice, Error> {
        self.taken(id)?;
        fs::create_dir_all(self.workers_dir()).map_err(|e| io(&self.workers_dir(), "create", e))?;
        self.ensure_engine()?;
        let password = new_password()?;
        let hash = bcrypt::hash_with_result(&password, 10)
            .map_err(|e| Error::Invalid(format!("cannot hash the device's password: {e}")))?
            .format_for_version(bcrypt::Version::TwoA);
        let password_file = self.workers_dir().join(format!("{id}.password"));
        write(&password_file, &format!("{password}\n"), true)?;
        write(&self.workers_dir().join(format!("{id}.bcrypt")), &format!("{hash}\n"), false)?;
        let config = self.render()?;
        Ok(AddedDevice { password_file, engine_seed: self.engine_seed(), config })
    }

    /// Issues an identity for worker `id`: a new key pair (its seed in
    /// `workers/<id>.nk`) or, given the site's `public_key`, that key; then
    /// renders `auth.conf` again. Refuses an id that is already there.
    pub fn add(&self, id: &str, public_key: Option<&str>) -> Result<Added, Error> {
        self.taken(id)?;
        fs::create_dir_all(self.workers_dir()).map_err(|e| io(&self.workers_dir(), "create", e))?;
        self.ensure_engine()?;
        let (public, seed_file) = match public_key {
            Some(key) => {
                check_public_key(key)?;
                write(&self.workers_dir().join(format!("{id}.pub")), &format!("{key}\n"), false)?;
                (key.to_string(), None)
            }
            None => {
                let (seed, public) = new_user()?;
                let path = self.workers_dir().join(format!("{id}.nk"));
                write(&path, &format!("{seed}\n"), true)?;
                (public, Some(path))
            }
        };
        let config = self.render()?;
        Ok(Added { public_key: public, seed_file, engine_seed: self.engine_seed(), config })
    }

    /// Withdraws worker `id`'s identity and renders `auth.conf` again (the
    /// server forgets it at its next reload).
    pub fn remove(&self, id: &str) -> Result<PathBuf, Error> {
        let mut removed = false;
        for ext in ["nk", "pub", "bcrypt", "password"] {
            let path = self.workers_dir().join(format!("{id}.{ext}"));
            if path.exists() {
                fs::remove_file(&path).map_err(|e| io(&path, "remove", e))?;
                removed = true;
            }
        }
        if !removed {
            return Err(Error::Invalid(format!("worker '{id}' has no identity in {}", self.dir.display())));
        }
        self.render()
    }

    /// Writes `auth.conf` from the folder's keys.
    pub fn render(&self) -> Result<PathBuf, Error> {
        fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, "create", e))?;
        let mut users = vec![User {
            name: "the engine (and `flamectl run --nats`)".into(),
            credential: Credential::NKey(self.ensure_engine()?),
            permissions: None,
        }];
        for (id, nkey) in self.workers()? {
            users.push(User {
                name: format!("worker {id}"),
                credential: Credential::NKey(nkey),
                permissions: Some(worker_permissions(&id)),
            });
        }
        for (id, bcrypt) in self.devices()? {
            users.push(User {
                name: format!("MQTT device {id}"),
                credential: Credential::Password { user: id.clone(), bcrypt },
                permissions: Some(device_permissions(&id)),
            });
        }
        let path = self.config_file();
        write(&path, &config(&users), false)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_may_touch_only_its_own_subjects() {
        let p = worker_permissions("site-1");
        assert!(p.publish.contains(&"flame.report.*.site-1".to_string()));
        assert!(p.publish.contains(&"$KV.flame-workers.site-1".to_string()));
        assert!(p.publish.contains(&"$JS.API.CONSUMER.CREATE.FLAME_CMDS.worker-site-1.flame.cmd.site-1".to_string()));
        // Nothing that reaches another worker's commands, reports, registry entry or the engine's streams.
        for s in &p.publish {
            assert!(!s.starts_with("flame.cmd"), "{s}");
            assert!(!s.contains("FLAME_REPORTS") || s.starts_with("$JS.API.STREAM.INFO."), "{s}");
            assert!(
                !s.contains("PURGE") && !s.contains("STREAM.CREATE") && !s.contains("STREAM.UPDATE") && !s.contains("STREAM.DELETE"),
                "{s}"
            );
            assert!(!s.starts_with("$KV.") || s.ends_with(".site-1"), "{s}");
            assert!(!s.contains("DIRECT.GET.KV_") || s.ends_with(".$KV.flame-workers.site-1"), "only its own registration is read: {s}");
            assert!(!s.contains("FLAME_CMDS") || s.contains("site-1") || s.starts_with("$JS.API.STREAM.INFO."), "{s}");
        }
        assert_eq!(p.subscribe, vec!["_INBOX_site-1.>".to_string()]);
    }

    #[test]
    fn the_config_quotes_every_subject_and_gives_the_engine_everything() {
        let text = config(&[
            User { name: "engine".into(), credential: Credential::NKey("UENGINE".into()), permissions: None },
            User { name: "worker a".into(), credential: Credential::NKey("UA".into()), permissions: Some(worker_permissions("a")) },
        ]);
        assert!(text.contains("{ nkey: \"UENGINE\" }"), "{text}");
        assert!(text.contains("\"$KV.flame-workers.a\""), "{text}");
        assert!(!text.contains(" $"), "an unquoted $ is a variable in NATS's config: {text}");
    }

    #[test]
    fn identities_are_issued_listed_and_withdrawn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = Identities::new(dir.path().join("nats"));
        let a = ids.add("site-1", None).expect("add");
        let seed = a.seed_file.clone().expect("a seed");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&seed).expect("seed").permissions().mode() & 0o777, 0o600);
        assert_eq!(public_of_seed(&seed).expect("public"), a.public_key);
        let site = nkeys::KeyPair::new_user().public_key();
        let b = ids.add("site-2", Some(&site)).expect("add with a public key");
        assert_eq!((b.public_key.as_str(), b.seed_file), (site.as_str(), None));
        assert_eq!(ids.workers().expect("list").iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>(), ["site-1", "site-2"]);
        let conf = fs::read_to_string(ids.config_file()).expect("conf");
        assert!(conf.contains(&a.public_key) && conf.contains(&site) && conf.contains("flame.report.*.site-2"), "{conf}");

        assert!(ids.add("site-1", None).expect_err("refused").to_string().contains("already has an identity"));
        assert!(ids.add("bad.id", None).expect_err("refused").to_string().contains("not a worker id"));
        assert!(ids.add("site-3", Some("SUAAAA")).expect_err("refused").to_string().contains("not a user public key"));
        // The engine's key stays across calls.
        let engine = public_of_seed(&ids.engine_seed()).expect("engine");
        ids.remove("site-1").expect("remove");
        assert_eq!(public_of_seed(&ids.engine_seed()).expect("engine"), engine);
        let conf = fs::read_to_string(ids.config_file()).expect("conf");
        assert!(!conf.contains(&a.public_key) && conf.contains(&engine));
        assert!(ids.remove("site-1").expect_err("refused").to_string().contains("has no identity"));

        // An MQTT device: a password for the site, only its hash in the server's configuration.
        let d = ids.add_device("dev-1").expect("add a device");
        assert_eq!(fs::metadata(&d.password_file).expect("password").permissions().mode() & 0o777, 0o600);
        let password = fs::read_to_string(&d.password_file).expect("password").trim().to_string();
        assert_eq!(password.len(), 40);
        let conf = fs::read_to_string(ids.config_file()).expect("conf");
        assert!(conf.contains("user: \"dev-1\", password: \"$2a$10$") && !conf.contains(&password), "{conf}");
        let (_, hash) = ids.devices().expect("devices").into_iter().find(|(id, _)| id == "dev-1").expect("listed");
        assert!(bcrypt::verify(&password, &hash).expect("bcrypt"));
        assert!(ids.add("dev-1", None).expect_err("refused").to_string().contains("already has an identity"));
        assert!(ids.add_device("site-2").expect_err("refused").to_string().contains("already has an identity"));
        ids.remove("dev-1").expect("remove the device");
        assert!(!d.password_file.exists() && ids.devices().expect("devices").is_empty());
        assert!(!fs::read_to_string(ids.config_file()).expect("conf").contains("dev-1"));
    }

    #[test]
    fn a_device_may_use_only_its_own_topics() {
        let p = device_permissions("dev-1");
        for s in p.publish.iter().chain(p.subscribe.iter()) {
            assert!(s.starts_with("flame.mqtt.") && (s.ends_with(".dev-1") || s.contains(".dev-1.")), "{s}");
        }
        assert!(p.publish.contains(&"flame.mqtt.report.dev-1".to_string()));
        assert!(p.subscribe.contains(&"flame.mqtt.cmd.dev-1".to_string()));
        assert!(!p.subscribe.iter().any(|s| s.contains("report") || s.contains("hello")), "{:?}", p.subscribe);
    }
}
