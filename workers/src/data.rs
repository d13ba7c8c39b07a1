//! Datasets a worker can load from a dataset URL.
//!
//! - `builtin://digits?part=I&of=N[&split=iid|dirichlet|shards][&alpha=A][&shards=S][&seed=S]`:
//!   the bundled UCI digits (1,797 8x8 images, 10 classes). A fixed, seeded
//!   20% is held out as the test split (the same for every part); the rest is
//!   dealt into N parts (round robin; Dirichlet(alpha) label skew; or S label
//!   shards per part, see `partition`) and part I is the train split.
//!   Without `part`/`of`, all of the train split.
//! - `synthetic://fedprox?alpha=A&beta=B&device=K[&devices=30][&seed=S]`:
//!   device K of the FedProx paper's Synthetic(alpha, beta) (see `synthetic`).
//! - `file:PATH` or a path ending in `.csv`: numeric CSV, label in the last
//!   column (classes 0..K-1), no header; the last 20% of rows is the test split.
//! - a path ending in `.safetensors`: tensors `x` (F32, [rows, features]) and
//!   `y` (I64 or I32, [rows]); the last 20% of rows is the test split.
//! - a path ending in `.npz` (NumPy): arrays `x` ([rows, ...], any numeric
//!   dtype, e.g. [N, 1, 28, 28] images) and `y` (class numbers), and
//!   optionally `x_test`, `y_test`; or `<name>x.npy` with `<name>y.npy`.
//! - files take `?part=I&of=N[&split=..][&alpha=..][&shards=..][&seed=..]`
//!   as the digits do: this worker's share of the training rows.

use std::io::Read;

use crate::partition::Scheme;
pub use crate::split::{Data, Split};

/// Errors loading data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is not one this worker understands.
    #[error("dataset URL '{url}': {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The data could not be read or parsed.
    #[error("dataset '{url}': {reason}")]
    Read {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

const DIGITS_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");
const TEST_FRACTION: f64 = 0.2;
const SPLIT_SEED: u64 = 0x5eed;

use flame_events::rng::SplitMix;

fn parse_csv(url: &str, text: &str, scale: f32) -> Result<Split, Error> {
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut features = None;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let values: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Read { url: url.into(), reason: format!("line {}: {e}", i + 1) })?;
        let Some((label, row)) = values.split_last() else {
            continue;
        };
        if *features.get_or_insert(row.len()) != row.len() {
            return Err(Error::Read {
                url: url.into(),
                reason: format!("line {} has {} columns, earlier lines {}", i + 1, values.len(), features.unwrap_or(0) + 1),
            });
        }
        if *label < 0.0 || label.fract() != 0.0 {
            return Err(Error::Read {
                url: url.into(),
                reason: format!("line {}: label {label} is not a class number 0, 1, 2, ...", i + 1),
            });
        }
        x.extend(row.iter().map(|v| v / scale));
        y.push(*label as i64);
    }
    let features = features.ok_or_else(|| Error::Read { url: url.into(), reason: "no rows".into() })?;
    Ok(Split::classes(x, y, features))
}

fn query(url: &str, q: &str, key: &str) -> Result<Option<usize>, Error> {
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == key {
            return v
                .parse()
                .map(Some)
                .map_err(|_| Error::Url { url: url.into(), reason: format!("'{key}' must be a whole number, not '{v}'") });
        }
    }
    Ok(None)
}

/// Loads the dataset a URL names, refusing NaN or infinite features. A
/// file is parsed once per process while it is unchanged and fits the
/// process's budget (see `sources`); each call deals its part anew.
pub fn load(url: &str) -> Result<Data, Error> {
    read(url)
}

/// `data` if every feature is finite.
fn finite(url: &str, data: Data) -> Result<Data, Error> {
    for (which, split) in [("train", &data.train), ("test", &data.test)] {
        if let Some(at) = split.x.iter().position(|v| !v.is_finite()) {
            let f = split.features.max(1);
            return Err(Error::Read {
                url: url.into(),
                reason: format!(
                    "feature {} of {which} row {} is {}: fill or drop missing values before training",
                    at % f,
                    at / f,
                    split.x[at]
                ),
            });
        }
    }
    Ok(data)
}

/// The built-in digits, train and test split, decompressed and parsed once
/// per process: every trainer reads them every round, and a process of
/// virtual workers holds thousands of trainers.
fn digits(url: &str) -> Result<&'static Data, Error> {
    static DIGITS: std::sync::OnceLock<Data> = std::sync::OnceLock::new();
    if let Some(d) = DIGITS.get() {
        return Ok(d);
    }
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::Read { url: url.into(), reason: e.to_string() })?;
    let all = parse_csv(url, &text, 16.0)?;
    let mut rows: Vec<usize> = (0..all.len()).collect();
    SplitMix::new(SPLIT_SEED).shuffle(&mut rows);
    let n_test = (all.len() as f64 * TEST_FRACTION).round() as usize;
    let (test_rows, train_rows) = rows.split_at(n_test);
    Ok(DIGITS.get_or_init(|| Data { train: all.select(train_rows), test: all.select(test_rows), classes: 10 }))
}

fn read(url: &str) -> Result<Data, Error> {
    if let Some(rest) = url.strip_prefix("builtin://") {
        let (name, q) = rest.split_once('?').unwrap_or((rest, ""));
        if name != "digits" {
            return Err(Error::Url { url: url.into(), reason: format!("no built-in dataset '{name}'; the built-in one is 'digits'") });
        }
        return deal(url, q, digits(url)?);
    }
    if let Some(rest) = url.strip_prefix("synthetic://") {
        let (name, q) = rest.split_once('?').unwrap_or((rest, ""));
        if name != "fedprox" {
            return Err(Error::Url { url: url.into(), reason: format!("no synthetic dataset '{name}'; the one there is 'fedprox'") });
        }
        let float = |key: &str| -> Result<f64, Error> {
            let v = q.split('&').filter_map(|p| p.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v).unwrap_or("");
            v.parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0).ok_or_else(|| Error::Url {
                url: url.into(),
                reason: format!("'{key}' must be a number >= 0 (Synthetic(alpha, beta) takes both)"),
            })
        };
        let devices = query(url, q, "devices")?.unwrap_or(crate::synthetic::DEVICES);
        let device = query(url, q, "device")?.ok_or_else(|| Error::Url { url: url.into(), reason: "name the device: device=K".into() })?;
        if device >= devices {
            return Err(Error::Url {
                url: url.into(),
                reason: format!("need 0 <= device < devices, got device={device} devices={devices}"),
            });
        }
        let seed = query(url, q, "seed")?.unwrap_or(0) as u64;
        return finite(url, crate::synthetic::fedprox(float("alpha")?, float("beta")?, device, seed));
    }
    let path = url.strip_prefix("file://").or_else(|| url.strip_prefix("file:")).unwrap_or(url);
    // Files take the same `?part=I&of=N[&split=...]` as the digits: this worker's share of the file's rows.
    let (path, q) = path.split_once('?').unwrap_or((path, ""));
    // Parsed once per process while unchanged: a `.npy` source is read with its labels file beside it.
    let labels_file = path.strip_suffix("x.npy").map(|stem| std::path::PathBuf::from(format!("{stem}y.npy")));
    let files: Vec<&std::path::Path> = std::iter::once(std::path::Path::new(path)).chain(labels_file.as_deref()).collect();
    let options: Vec<&str> =
        q.split('&').filter(|p| !p.is_empty() && !DEALING.contains(&p.split_once('=').map_or(*p, |(k, _)| k))).collect();
    let data = match crate::sources::Key::new(path, &options.join("&"), &files) {
        Some(key) => crate::sources::get_or_read(key, || parse_file(url, path, q))?,
        // What cannot be looked at is read as it is, to say why it cannot be read.
        None => std::sync::Arc::new(parse_file(url, path, q)?),
    };
    deal(url, q, &data)
}

/// The URL options that say which part of a source a trainer takes, not how the source is read.
const DEALING: [&str; 6] = ["part", "of", "split", "alpha", "shards", "seed"];

/// A dataset file (or image folder) parsed whole, every feature checked finite.
fn parse_file(url: &str, path: &str, q: &str) -> Result<Data, Error> {
    let read = |p: &str| std::fs::read(p).map_err(|e| Error::Read { url: url.into(), reason: format!("{p}: {e}") });
    let data = if std::path::Path::new(path).is_dir() {
        // torchvision's ImageFolder layout, decoded as the URL says (size=WxH, channels=1|3, mean=, std=).
        let t = crate::images::Transform::from_query(q).map_err(|reason| Error::Url { url: url.into(), reason })?;
        crate::images::load(std::path::Path::new(path), &t).map_err(|reason| Error::Read { url: url.into(), reason })?
    } else if path.ends_with(".safetensors") {
        held_out(safetensors_rows(url, &read(path)?)?)
    } else if path.ends_with(".npz") {
        npz(url, &read(path)?)?
    } else if path.ends_with(".npy") {
        // Features in `<name>x.npy`, labels beside them in `<name>y.npy` (`train_x.npy`, `train_y.npy`).
        let Some(stem) = path.strip_suffix("x.npy") else {
            return Err(Error::Url {
                url: url.into(),
                reason: "name the features file '<name>x.npy' (its labels are '<name>y.npy')".into(),
            });
        };
        let bad = |reason: String| Error::Read { url: url.into(), reason };
        let x = crate::numpy::read_npy(&read(path)?).map_err(|e| bad(format!("{path}: {e}")))?;
        let labels = format!("{stem}y.npy");
        let y = crate::numpy::read_npy(&read(&labels)?).map_err(|e| bad(format!("{labels}: {e}")))?;
        held_out(arrays(url, x, y)?)
    } else if path.ends_with(".csv") {
        let text = String::from_utf8(read(path)?).map_err(|_| Error::Read { url: url.into(), reason: "not UTF-8 text".into() })?;
        match labels(q) {
            // A header row and named label columns: `table.csv?label=price`.
            Some(labels) => held_out(table(url, &csv_columns(url, &text)?, &labels)?),
            None => held_out(parse_csv(url, &text, 1.0)?),
        }
    } else if path.ends_with(".parquet") {
        let labels = labels(q).ok_or_else(|| Error::Url {
            url: url.into(),
            reason: "name the label column(s) of a Parquet table: table.parquet?label=price".into(),
        })?;
        held_out(table(
            url,
            &crate::tables::parquet_columns(&read(path)?).map_err(|reason| Error::Read { url: url.into(), reason })?,
            &labels,
        )?)
    } else {
        return Err(Error::Url {
            url: url.into(),
            reason: "use builtin://digits?part=I&of=N, synthetic://fedprox?alpha=A&beta=B&device=K, or a path to a .csv, .safetensors, .npz or <name>x.npy file".into(),
        });
    };
    finite(url, data)
}

/// The label columns a table URL names (`label=price` or `label=a,b`).
fn labels(q: &str) -> Option<Vec<String>> {
    q.split('&').filter_map(|p| p.split_once('=')).find(|(k, _)| *k == "label").map(|(_, v)| v.split(',').map(str::to_string).collect())
}

/// A CSV file with a header row, as named numeric columns.
fn csv_columns(url: &str, text: &str) -> Result<Vec<(String, Vec<f64>)>, Error> {
    let bad = |reason: String| Error::Read { url: url.into(), reason };
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| bad("the file is empty".into()))?;
    let names: Vec<String> = header.split(',').map(|n| n.trim().trim_matches('"').to_string()).collect();
    let mut columns: Vec<(String, Vec<f64>)> = names.iter().map(|n| (n.clone(), Vec::new())).collect();
    for (i, line) in lines {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != names.len() {
            return Err(bad(format!("line {} has {} columns, the header {}", i + 1, cells.len(), names.len())));
        }
        for ((name, column), cell) in columns.iter_mut().zip(cells) {
            // The cell itself is not repeated: an error never echoes a file's contents.
            let v = cell.trim_matches('"').parse::<f64>().map_err(|_| {
                bad(format!("line {}, column '{name}' is not a number (fill or drop missing values; encode categories as numbers)", i + 1))
            })?;
            column.push(v);
        }
    }
    Ok(columns)
}

/// Rows from named columns: the label columns are the targets (and the class
/// labels when there is one of whole numbers >= 0), the others the features.
fn table(url: &str, columns: &[(String, Vec<f64>)], labels: &[String]) -> Result<Split, Error> {
    let bad = |reason: String| Error::Read { url: url.into(), reason };
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(missing) = labels.iter().find(|l| !names.contains(&l.as_str())) {
        return Err(bad(format!("no column '{missing}'; the columns are {}", names.join(", "))));
    }
    let (target_cols, feature_cols): (Vec<_>, Vec<_>) = columns.iter().partition(|(n, _)| labels.contains(n));
    let rows = columns.first().map_or(0, |(_, c)| c.len());
    if feature_cols.is_empty() || rows == 0 {
        return Err(bad(format!("{rows} rows and {} feature columns: nothing to train on", feature_cols.len())));
    }
    // Targets in the order the URL names them.
    let target_cols: Vec<&(String, Vec<f64>)> = labels.iter().filter_map(|l| target_cols.iter().find(|(n, _)| n == l).copied()).collect();
    let x = (0..rows).flat_map(|r| feature_cols.iter().map(move |(_, c)| c[r] as f32)).collect();
    let targets: Vec<f32> = (0..rows).flat_map(|r| target_cols.iter().map(move |(_, c)| c[r] as f32)).collect();
    if let Some(at) = targets.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("label '{}' of row {} is {}", target_cols[at % target_cols.len()].0, at / target_cols.len(), targets[at])));
    }
    let y = match &target_cols[..] {
        [(_, c)] if c.iter().all(|v| v.fract() == 0.0 && *v >= 0.0) => c.iter().map(|v| *v as i64).collect(),
        _ => Vec::new(),
    };
    Ok(Split { y, targets, target_width: target_cols.len(), ..Split::classes(x, Vec::new(), feature_cols.len()) })
}

/// This worker's part of a dataset's training rows (`part=I&of=N`, dealt by
/// `split=iid|dirichlet|shards` with `alpha`, `shards`, `seed`); all of them
/// without `part`/`of`. The test split stays whole.
/// The part of `data`'s training rows the url's `part`/`of` names, with the whole test split.
/// (Borrowed: the built-in digits are shared by every trainer of the process, and copying
/// all of them for each trainer's part cost more than its training.)
fn deal(url: &str, q: &str, data: &Data) -> Result<Data, Error> {
    let of = query(url, q, "of")?.unwrap_or(1);
    let part = query(url, q, "part")?.unwrap_or(0);
    if of == 0 || part >= of {
        return Err(Error::Url { url: url.into(), reason: format!("need 0 <= part < of, got part={part} of={of}") });
    }
    if of == 1 {
        return Ok(data.clone());
    }
    let value = |key: &str| q.split('&').filter_map(|p| p.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v);
    let scheme = match value("split") {
        None | Some("iid") => Scheme::Iid,
        Some("dirichlet") => match value("alpha").and_then(|v| v.parse::<f64>().ok()) {
            Some(alpha) if alpha > 0.0 && alpha.is_finite() => Scheme::Dirichlet { alpha },
            _ => return Err(Error::Url { url: url.into(), reason: "split=dirichlet needs alpha > 0 (e.g. alpha=0.5)".into() }),
        },
        Some("shards") => Scheme::Shards { shards: query(url, q, "shards")?.unwrap_or(2).max(1) },
        Some(other) => {
            return Err(Error::Url {
                url: url.into(),
                reason: format!("unknown split '{other}': use iid, dirichlet (alpha=) or shards (shards=)"),
            });
        }
    };
    let seed = query(url, q, "seed")?.unwrap_or(0) as u64;
    if data.train.y.is_empty() && scheme != Scheme::Iid {
        return Err(Error::Url {
            url: url.into(),
            reason: "label-skewed deals need class labels; these targets are numbers: use split=iid".into(),
        });
    }
    let labels = if data.train.y.is_empty() { vec![0; data.train.len()] } else { data.train.y.clone() };
    let mine = crate::partition::deal(&labels, of, part, &scheme, seed);
    Ok(Data { train: data.train.select(&mine), test: data.test.clone(), classes: data.classes })
}

/// Rows from arrays `x` ([rows, ...], any numeric dtype) and `y` ([rows], class numbers).
fn arrays(url: &str, x: crate::numpy::Array, y: crate::numpy::Array) -> Result<Split, Error> {
    let bad = |reason: String| Error::Read { url: url.into(), reason };
    let Some((&rows, shape)) = x.shape.split_first() else { return Err(bad("array 'x' is a scalar; it needs [rows, features...]".into())) };
    if y.shape != [rows] {
        return Err(bad(format!("array 'y' has shape {:?}; 'x' has {rows} rows, so 'y' must be [{rows}]", y.shape)));
    }
    let labels: Vec<i64> = y
        .values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            (v.fract() == 0.0 && *v >= 0.0)
                .then_some(*v as i64)
                .ok_or_else(|| bad(format!("label {v} of row {i} is not a class number 0, 1, 2, ...")))
        })
        .collect::<Result<_, _>>()?;
    let features = shape.iter().product::<usize>().max(1);
    let shape = if shape.len() > 1 { shape.to_vec() } else { Vec::new() };
    Ok(Split { shape, ..Split::classes(x.values.iter().map(|v| *v as f32).collect(), labels, features) })
}

/// A `.npz` archive with arrays `x` and `y`, and optionally `x_test` and
/// `y_test` (the test split; otherwise the last 20% of rows).
fn npz(url: &str, bytes: &[u8]) -> Result<Data, Error> {
    let bad = |reason: String| Error::Read { url: url.into(), reason };
    let mut arrays_by_name: std::collections::BTreeMap<String, crate::numpy::Array> =
        crate::numpy::read_npz(bytes).map_err(bad)?.into_iter().collect();
    let mut take = |name: &str| arrays_by_name.remove(name);
    let (Some(x), Some(y)) = (take("x"), take("y")) else {
        return Err(bad("the archive needs arrays 'x' (features) and 'y' (labels): np.savez(path, x=x, y=y)".into()));
    };
    let train = arrays(url, x, y)?;
    match (take("x_test"), take("y_test")) {
        (Some(x), Some(y)) => {
            let test = arrays(url, x, y)?;
            if test.shape != train.shape || test.features != train.features {
                return Err(bad(format!(
                    "'x_test' examples have shape {:?} ({} features); 'x' has {:?} ({})",
                    test.shape, test.features, train.shape, train.features
                )));
            }
            let classes = train.y.iter().chain(&test.y).max().map_or(0, |m| *m as usize + 1);
            Ok(Data { train, test, classes })
        }
        (None, None) => Ok(held_out(train)),
        _ => Err(bad("give both 'x_test' and 'y_test', or neither".into())),
    }
}

/// A file's rows with the last 20% held out for evaluation.
fn held_out(all: Split) -> Data {
    let classes = all.y.iter().max().map_or(0, |m| *m as usize + 1);
    let n_test = (all.len() as f64 * TEST_FRACTION).round() as usize;
    let cut = all.len() - n_test;
    let rows: Vec<usize> = (0..all.len()).collect();
    Data { train: all.select(&rows[..cut]), test: all.select(&rows[cut..]), classes }
}

/// A split as a safetensors file: `x` (F32 [rows, features]), `y` (I64
/// [rows], class labels, when it has them) and `t` (F32 [rows, width],
/// numeric targets, when it has them), e.g. to evaluate a model on the same
/// rows in PyTorch. With class labels only, it is a file [`load`] reads.
pub fn encode(split: &Split) -> Result<Vec<u8>, String> {
    use safetensors::tensor::{Dtype, TensorView};
    let x: Vec<u8> = split.x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let y: Vec<u8> = split.y.iter().flat_map(|v| v.to_le_bytes()).collect();
    let t: Vec<u8> = split.targets.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut views = vec![("x".to_string(), TensorView::new(Dtype::F32, vec![split.len(), split.features], &x).map_err(|e| e.to_string())?)];
    if !split.y.is_empty() {
        views.push(("y".to_string(), TensorView::new(Dtype::I64, vec![split.len()], &y).map_err(|e| e.to_string())?));
    }
    if split.target_width > 0 {
        views.push(("t".to_string(), TensorView::new(Dtype::F32, vec![split.len(), split.target_width], &t).map_err(|e| e.to_string())?));
    }
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

/// Rows from a safetensors file with tensors `x` (F32 [rows, features]) and `y` (I64 or I32 [rows]).
fn safetensors_rows(url: &str, bytes: &[u8]) -> Result<Split, Error> {
    use safetensors::tensor::Dtype;
    let bad = |reason: String| Error::Read { url: url.into(), reason };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let x = st.tensor("x").map_err(|_| bad("no tensor 'x' (F32, [rows, features])".into()))?;
    let y = st.tensor("y").map_err(|_| bad("no tensor 'y' (I64 or I32, [rows])".into()))?;
    let (&[rows, features], Dtype::F32) = (x.shape(), x.dtype()) else {
        return Err(bad(format!("tensor 'x' is {:?} {:?}; it must be F32 [rows, features]", x.dtype(), x.shape())));
    };
    if y.shape() != [rows] {
        return Err(bad(format!("tensor 'y' has shape {:?}; 'x' has {rows} rows", y.shape())));
    }
    let labels: Vec<i64> = match y.dtype() {
        Dtype::I64 => y.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect(),
        Dtype::I32 => y.data().chunks_exact(4).map(|b| i64::from(i32::from_le_bytes(b.try_into().unwrap_or([0; 4])))).collect(),
        other => return Err(bad(format!("tensor 'y' is {other:?}; it must be I64 or I32 class numbers"))),
    };
    if let Some(l) = labels.iter().find(|l| **l < 0) {
        return Err(bad(format!("label {l} is not a class number 0, 1, 2, ...")));
    }
    let x: Vec<f32> = x.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap_or([0; 4]))).collect();
    if x.iter().any(|v| !v.is_finite()) {
        return Err(bad("tensor 'x' holds NaN or infinite values".into()));
    }
    Ok(Split::classes(x, labels, features))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_parts_are_disjoint_and_cover_the_train_split() {
        let whole = load("builtin://digits").expect("digits");
        assert_eq!(whole.train.len() + whole.test.len(), 1797);
        assert_eq!(whole.test.len(), 359);
        assert_eq!(whole.train.features, 64);
        let parts: Vec<Data> = (0..3).map(|i| load(&format!("builtin://digits?part={i}&of=3")).expect("part")).collect();
        assert_eq!(parts.iter().map(|p| p.train.len()).sum::<usize>(), whole.train.len());
        assert!(parts.iter().all(|p| p.test == whole.test));
        assert!(whole.train.x.iter().all(|v| (0.0..=1.0).contains(v)));
        let mut labels: Vec<i64> = whole.test.y.clone();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let e = load("builtin://mnist").expect_err("unknown");
        assert!(e.to_string().contains("digits"), "{e}");
        let e = load("builtin://digits?part=3&of=3").expect_err("part out of range");
        assert!(e.to_string().contains("part=3"), "{e}");
        assert!(load("https://example.org/data.npz").is_err());
    }

    #[test]
    fn digits_parts_can_be_label_skewed() {
        let share = |url: &str| {
            let d = load(url).expect("digits");
            let mut counts = [0usize; 10];
            for y in &d.train.y {
                counts[*y as usize] += 1;
            }
            (d.train.len(), *counts.iter().max().unwrap_or(&0) as f64 / d.train.len().max(1) as f64)
        };
        let skewed: Vec<(usize, f64)> =
            (0..5).map(|i| share(&format!("builtin://digits?part={i}&of=5&split=dirichlet&alpha=0.1&seed=2"))).collect();
        assert_eq!(skewed.iter().map(|s| s.0).sum::<usize>(), 1438, "the parts cover the train split");
        assert!(skewed.iter().map(|s| s.1).sum::<f64>() / 5.0 > 0.4, "{skewed:?}");
        let (_, iid) = share("builtin://digits?part=0&of=5");
        assert!(iid < 0.15);
        assert!(load("builtin://digits?part=0&of=5&split=dirichlet").expect_err("alpha").to_string().contains("alpha"));
        assert!(load("builtin://digits?part=0&of=5&split=zipf").expect_err("split").to_string().contains("unknown split"));
    }

    #[test]
    fn safetensors_files_load_x_and_y_and_refuse_bad_tensors() {
        use safetensors::tensor::{Dtype, TensorView};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.safetensors");
        let write = |x: &[f32], shape: Vec<usize>, y: &[i64]| {
            let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            let yb: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
            let views = vec![
                ("x".to_string(), TensorView::new(Dtype::F32, shape, &xb).expect("x")),
                ("y".to_string(), TensorView::new(Dtype::I64, vec![y.len()], &yb).expect("y")),
            ];
            std::fs::write(&path, safetensors::serialize(views, None).expect("serialize")).expect("write");
        };
        let x: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let y: Vec<i64> = (0..10).map(|i| i % 3).collect();
        write(&x, vec![10, 2], &y);
        let d = load(path.to_str().expect("utf8")).expect("safetensors");
        assert_eq!((d.train.len(), d.test.len(), d.classes, d.train.features), (8, 2, 3, 2));
        assert_eq!(d.test.x, vec![16.0, 17.0, 18.0, 19.0]);
        write(&x, vec![10, 2], &y[..9]);
        assert!(load(path.to_str().expect("utf8")).expect_err("rows").to_string().contains("rows"));
        let mut nan = x.clone();
        nan[3] = f32::NAN;
        write(&nan, vec![10, 2], &y);
        assert!(load(path.to_str().expect("utf8")).expect_err("nan").to_string().contains("NaN"));
    }

    fn npy(descr: &str, shape: &[usize], data: Vec<u8>) -> Vec<u8> {
        crate::numpy::tests_support::npy(descr, shape, &data)
    }

    #[test]
    fn npz_archives_and_npy_pairs_load_with_their_image_shape_and_parts() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let rows = 20;
        let x: Vec<u8> = (0..rows * 4).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let y: Vec<u8> = (0..rows as i64).flat_map(|i| (i % 2).to_le_bytes()).collect();
        let path = dir.path().join("d.npz");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).expect("create"));
        for (name, bytes) in [("x.npy", npy("<f4", &[rows, 1, 2, 2], x.clone())), ("y.npy", npy("<i8", &[rows], y.clone()))] {
            zip.start_file(name, zip::write::FileOptions::default()).expect("start");
            zip.write_all(&bytes).expect("write");
        }
        zip.finish().expect("finish");
        let url = path.to_str().expect("utf8");
        let d = load(url).expect("npz");
        assert_eq!((d.train.len(), d.test.len(), d.classes, d.train.features), (16, 4, 2, 4));
        assert_eq!(d.train.shape, [1, 2, 2]);
        assert_eq!(d.test.x[..4], [64.0, 65.0, 66.0, 67.0], "the last 20% of rows are held out");
        // Parts of a file, as of the digits: disjoint, covering the training rows, one test split.
        let parts: Vec<Data> = (0..2).map(|i| load(&format!("{url}?part={i}&of=2")).expect("part")).collect();
        assert_eq!(parts.iter().map(|p| p.train.len()).sum::<usize>(), 16);
        assert!(parts.iter().all(|p| p.test == d.test && p.train.shape == [1, 2, 2]));
        let mut seen: Vec<f32> = parts.iter().flat_map(|p| p.train.x.chunks(4).map(|r| r[0])).collect();
        seen.sort_by(f32::total_cmp);
        seen.dedup();
        assert_eq!(seen.len(), 16);
        // A pair of .npy files.
        std::fs::write(dir.path().join("sitex.npy"), npy("<f4", &[rows, 4], x)).expect("x");
        std::fs::write(dir.path().join("sitey.npy"), npy("<i8", &[rows], y)).expect("y");
        let pair = load(dir.path().join("sitex.npy").to_str().expect("utf8")).expect("npy pair");
        assert_eq!((pair.train.len(), pair.train.features), (16, 4));
        assert!(pair.train.shape.is_empty(), "flat rows stay flat");
        // Labels that are not class numbers, and rows that do not match, are named.
        std::fs::write(dir.path().join("sitey.npy"), npy("<f4", &[rows], (0..rows).flat_map(|i| (i as f32 + 0.5).to_le_bytes()).collect()))
            .expect("y");
        let e = load(dir.path().join("sitex.npy").to_str().expect("utf8")).expect_err("labels").to_string();
        assert!(e.contains("label 0.5 of row 0"), "{e}");
        std::fs::write(dir.path().join("sitey.npy"), npy("<i8", &[3], vec![0; 24])).expect("y");
        let e = load(dir.path().join("sitex.npy").to_str().expect("utf8")).expect_err("rows").to_string();
        assert!(e.contains("'x' has 20 rows"), "{e}");
    }

    #[test]
    fn tables_with_named_labels_load_from_csv_and_parquet_alike() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/torchscript-regression");
        let csv = load(&format!("{example}/table.csv?label=price")).expect("csv");
        let parquet = load(&format!("{example}/table.parquet?label=price")).expect("parquet");
        assert_eq!((csv.train.len(), csv.test.len(), csv.train.features, csv.train.target_width), (1200, 300, 8, 1));
        assert!(csv.train.y.is_empty(), "prices are not class numbers");
        // The CSV holds the Parquet file's values to 6 decimals.
        for (a, b) in csv.train.x.iter().zip(&parquet.train.x).chain(csv.train.targets.iter().zip(&parquet.train.targets)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // Parts of a table, IID; label-skewed deals need class labels.
        let parts: Vec<Data> = (0..3).map(|i| load(&format!("{example}/table.parquet?label=price&part={i}&of=3")).expect("part")).collect();
        assert_eq!(parts.iter().map(|p| p.train.len()).sum::<usize>(), 1200);
        let e = load(&format!("{example}/table.csv?label=price&part=0&of=3&split=shards")).expect_err("shards").to_string();
        assert!(e.contains("split=iid"), "{e}");
        // Several targets, a missing column, a missing value.
        let two = load(&format!("{example}/table.csv?label=price,income")).expect("two targets");
        assert_eq!((two.train.target_width, two.train.features), (2, 7));
        let e = load(&format!("{example}/table.parquet?label=cost")).expect_err("no such column").to_string();
        assert!(e.contains("no column 'cost'") && e.contains("price"), "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "a,b,label\n1,2,0\n3,,1\n").expect("write");
        let e = load(&format!("{}?label=label", path.display())).expect_err("empty cell").to_string();
        assert!(e.contains("line 3, column 'b'"), "{e}");
        std::fs::write(&path, "a,b,label\n1,2,0\n3,4,1\n5,6,2\n7,8,1\n9,10,0\n").expect("write");
        let classes = load(&format!("{}?label=label", path.display())).expect("classes");
        assert_eq!((classes.train.y.clone(), classes.classes), (vec![0, 1, 2, 1], 3), "whole numbers serve as class labels too");
        assert!(load(path.to_str().expect("utf8")).is_err(), "without label= the header is not a row of numbers");
        assert!(load(&format!("{example}/table.parquet")).expect_err("label").to_string().contains("label=price"));
    }

    #[test]
    fn csv_files_load_with_the_last_column_as_label() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.csv");
        let rows: String = (0..10).map(|i| format!("{i}.0,{}.5,{}\n", i * 2, i % 2)).collect();
        std::fs::write(&path, rows).expect("write");
        let d = load(&format!("file:{}", path.display())).expect("csv");
        assert_eq!((d.train.len(), d.test.len(), d.classes, d.train.features), (8, 2, 2, 2));
        std::fs::write(&path, "1,2,x\n").expect("write");
        assert!(load(path.to_str().expect("utf8")).expect_err("bad").to_string().contains("line 1"));
        std::fs::write(&path, "1,2,0\n3,nan,1\n").expect("write");
        let e = load(path.to_str().expect("utf8")).expect_err("NaN").to_string();
        assert!(e.contains("feature 1 of train row 1 is NaN"), "{e}");
    }

    #[test]
    fn a_file_is_dealt_from_one_parse_and_read_again_once_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kept.csv");
        let write = |first: u32| {
            let rows: String = (0..20).map(|i| format!("{}.0,{}\n", first + i, i % 2)).collect();
            std::fs::write(&path, rows).expect("write");
        };
        let firsts = |url: &str| -> Vec<f32> { load(url).expect("csv").train.x };
        let part = |p: usize| format!("{}?part={p}&of=2", path.display());
        write(100);
        let (a, b) = (firsts(&part(0)), firsts(&part(1)));
        let mut both: Vec<f32> = a.iter().chain(&b).copied().collect();
        both.sort_by(f32::total_cmp);
        assert_eq!(both, (100..116).map(|v| v as f32).collect::<Vec<_>>(), "the two parts deal the 16 training rows between them");
        assert_eq!(firsts(&part(0)), a, "dealt again alike");
        // Same length, other values: what is kept must not be dealt from.
        write(200);
        let again = firsts(&part(0));
        assert_eq!(again, a.iter().map(|v| v + 100.0).collect::<Vec<_>>(), "the file was written: it is read again");
        // Options that shape the parse make another source.
        let e = load(&format!("{}?label=y", path.display())).expect_err("no header named y").to_string();
        assert!(e.contains("no column 'y'"), "{e}");
    }
}
