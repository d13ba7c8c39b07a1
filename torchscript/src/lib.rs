//! The tensors of a TorchScript archive, in plain Rust.
//!
//! `torch.jit.save` (or `torch.jit.script(model).save(path)`) writes a zip
//! archive: `data.pkl` pickles the tree of module objects, each tensor a
//! reference to a raw storage record `data/<key>`, and `code/` holds the
//! modules' TorchScript with each class's `__parameters__` and
//! `__buffers__`. [`Archive`] reads which tensors the module has (named as
//! PyTorch's `state_dict()` names them), whether each is a parameter or a
//! buffer, their dtypes, shapes and values; and writes a copy of the archive
//! with new values, which `torch.jit.load` reads as the same module with
//! those weights. Nothing in the archive is executed.
//!
//! Supported: contiguous float32 and int64 tensors (BatchNorm's
//! `num_batches_tracked` is int64); other dtypes are named in the error.

mod pickle;

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};

pub use pickle::{TensorRef, Value};

/// Problems reading or writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a zip archive with a `data.pkl`.
    #[error("not a TorchScript archive: {0}; save the model with torch.jit.script(model).save(\"model.pt\") (or torch.jit.trace)")]
    NotAnArchive(String),
    /// A zip with pickled weights but no TorchScript code: `torch.save`'s output.
    #[error(
        "this is a file written by torch.save (a pickled state_dict or module), not TorchScript: the platform needs the module's code; save torch.jit.script(model).save(\"model.pt\")"
    )]
    NotScripted,
    /// The pickle could not be read.
    #[error("data.pkl: {0}")]
    Pickle(String),
    /// A tensor this reader does not support.
    #[error("tensor '{name}': {reason}")]
    Tensor {
        /// The tensor's state_dict name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// New values do not fit the archive's tensors.
    #[error("new values: {0}")]
    Values(String),
}

/// A tensor's element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// float32.
    F32,
    /// int64.
    I64,
}

impl Dtype {
    fn of_storage(storage: &str) -> Option<Self> {
        match storage {
            "FloatStorage" => Some(Self::F32),
            "LongStorage" => Some(Self::I64),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::I64 => 8,
        }
    }
}

/// Whether a tensor is trained (a parameter) or module state (a buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `nn.Parameter`.
    Parameter,
    /// `register_buffer` (BatchNorm's running statistics, counters).
    Buffer,
}

/// One tensor of the module.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Its `state_dict()` name (`bn1.running_mean`).
    pub name: String,
    /// Parameter or buffer.
    pub role: Role,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions (`[]` for a scalar).
    pub shape: Vec<usize>,
    at: TensorRef,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor's values.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    /// float32 values, row-major.
    F32(Vec<f32>),
    /// int64 values, row-major.
    I64(Vec<i64>),
}

impl Values {
    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::I64(v) => v.len(),
        }
    }

    fn dtype(&self) -> Dtype {
        match self {
            Self::F32(_) => Dtype::F32,
            Self::I64(_) => Dtype::I64,
        }
    }
}

/// A TorchScript archive and the tensors of its module.
#[derive(Clone, Debug)]
pub struct Archive {
    bytes: Vec<u8>,
    prefix: String,
    tensors: Vec<TensorInfo>,
}

fn zip_error(e: zip::result::ZipError) -> Error {
    Error::NotAnArchive(e.to_string())
}

impl Archive {
    /// Reads an archive's module and tensors.
    pub fn read(bytes: Vec<u8>) -> Result<Self, Error> {
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes.as_slice())).map_err(zip_error)?;
        let names: Vec<String> = zip.file_names().map(str::to_string).collect();
        let pkl = names
            .iter()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .min()
            .ok_or_else(|| Error::NotAnArchive("it has no data.pkl".into()))?
            .clone();
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let code: Vec<&String> = names.iter().filter(|n| n.starts_with(&format!("{prefix}code/")) && n.ends_with(".py")).collect();
        if code.is_empty() {
            return Err(Error::NotScripted);
        }
        let mut classes: BTreeMap<String, Members> = BTreeMap::new();
        for name in code {
            let module = name.trim_start_matches(&format!("{prefix}code/")).trim_end_matches(".py").replace('/', ".");
            let text = read_entry(&mut zip, name)?;
            classes.extend(members(&module, &String::from_utf8_lossy(&text)));
        }
        let root = pickle::load(&read_entry(&mut zip, &pkl)?).map_err(Error::Pickle)?;
        if !matches!(root, Value::Object { .. }) {
            return Err(Error::NotScripted);
        }
        let mut tensors = Vec::new();
        collect(&root, "", &classes, &mut tensors)?;
        Ok(Self { bytes, prefix, tensors })
    }

    /// The module's parameters and buffers, in the order the module holds them.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The archive's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Every tensor's values.
    pub fn values(&self) -> Result<Vec<(TensorInfo, Values)>, Error> {
        let mut zip = zip::ZipArchive::new(Cursor::new(self.bytes.as_slice())).map_err(zip_error)?;
        let mut out = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let storage = read_entry(&mut zip, &format!("{}data/{}", self.prefix, t.at.key))?;
            let size = t.dtype.size();
            let (start, end) = (t.at.offset * size, (t.at.offset + t.numel()) * size);
            let bytes = storage.get(start..end).ok_or_else(|| Error::Tensor {
                name: t.name.clone(),
                reason: format!("its storage data/{} holds {} bytes, the tensor needs {start}..{end}", t.at.key, storage.len()),
            })?;
            let values = match t.dtype {
                Dtype::F32 => Values::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
                Dtype::I64 => Values::I64(
                    bytes.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect(),
                ),
            };
            out.push((t.clone(), values));
        }
        Ok(out)
    }

    /// A copy of the archive with these tensors' values replaced (by
    /// `state_dict` name; tensors not named keep theirs). `torch.jit.load`
    /// reads it as the same module with the new weights.
    pub fn with_values(&self, values: &BTreeMap<String, Values>) -> Result<Vec<u8>, Error> {
        let by_name: BTreeMap<&str, &TensorInfo> = self.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        if let Some(unknown) = values.keys().find(|k| !by_name.contains_key(k.as_str())) {
            return Err(Error::Values(format!("the module has no tensor '{unknown}'")));
        }
        let mut zip = zip::ZipArchive::new(Cursor::new(self.bytes.as_slice())).map_err(zip_error)?;
        // New bytes of each storage touched.
        let mut storages: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (name, v) in values {
            let t = by_name[name.as_str()];
            if v.dtype() != t.dtype || v.len() != t.numel() {
                return Err(Error::Values(format!(
                    "tensor '{name}' is {:?} with {} elements; {:?} with {} given",
                    t.dtype,
                    t.numel(),
                    v.dtype(),
                    v.len()
                )));
            }
            let record = format!("{}data/{}", self.prefix, t.at.key);
            let storage = match storages.remove(&record) {
                Some(s) => s,
                None => read_entry(&mut zip, &record)?,
            };
            let mut storage = storage;
            let size = t.dtype.size();
            let slot = storage
                .get_mut(t.at.offset * size..(t.at.offset + t.numel()) * size)
                .ok_or_else(|| Error::Values(format!("tensor '{name}' does not fit its storage")))?;
            match v {
                Values::F32(x) => slot.iter_mut().zip(x.iter().flat_map(|f| f.to_le_bytes())).for_each(|(d, s)| *d = s),
                Values::I64(x) => slot.iter_mut().zip(x.iter().flat_map(|f| f.to_le_bytes())).for_each(|(d, s)| *d = s),
            }
            storages.insert(record, storage);
        }
        let mut out = zip::ZipWriter::new(Cursor::new(Vec::with_capacity(self.bytes.len())));
        let options = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(false);
        for i in 0..zip.len() {
            let mut entry = zip.by_index(i).map_err(zip_error)?;
            let name = entry.name().to_string();
            let bytes = match storages.remove(&name) {
                Some(b) => b,
                None => {
                    let mut b = Vec::new();
                    entry.read_to_end(&mut b).map_err(|e| Error::NotAnArchive(format!("{name}: {e}")))?;
                    b
                }
            };
            // PyTorch aligns records to 64 bytes so that storages can be mapped.
            out.start_file_aligned(name.clone(), options, 64).map_err(zip_error)?;
            out.write_all(&bytes).map_err(|e| Error::NotAnArchive(format!("writing {name}: {e}")))?;
        }
        Ok(out.finish().map_err(zip_error)?.into_inner())
    }
}

fn read_entry(zip: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str) -> Result<Vec<u8>, Error> {
    let mut entry = zip.by_name(name).map_err(|e| Error::NotAnArchive(format!("{name}: {e}")))?;
    let mut out = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
    entry.read_to_end(&mut out).map_err(|e| Error::NotAnArchive(format!("{name}: {e}")))?;
    Ok(out)
}

/// A class's declared parameters and buffers.
#[derive(Default)]
struct Members {
    parameters: Vec<String>,
    buffers: Vec<String>,
}

/// The `__parameters__` and `__buffers__` of each class in one code file.
fn members(module: &str, code: &str) -> BTreeMap<String, Members> {
    let mut out: BTreeMap<String, Members> = BTreeMap::new();
    let mut class = None;
    for line in code.lines() {
        if let Some(rest) = line.strip_prefix("class ") {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            class = Some(format!("{module}.{name}"));
            continue;
        }
        let Some(class) = &class else { continue };
        let trimmed = line.trim_start();
        let list = |rest: &str| -> Vec<String> { rest.split('"').skip(1).step_by(2).map(str::to_string).collect() };
        if let Some(rest) = trimmed.strip_prefix("__parameters__ = ") {
            out.entry(class.clone()).or_default().parameters = list(rest);
        } else if let Some(rest) = trimmed.strip_prefix("__buffers__ = ") {
            out.entry(class.clone()).or_default().buffers = list(rest);
        }
    }
    out
}

/// Every parameter and buffer under a module object, depth first in
/// attribute order (the order of `state_dict()`).
fn collect(value: &Value, prefix: &str, classes: &BTreeMap<String, Members>, out: &mut Vec<TensorInfo>) -> Result<(), Error> {
    let Value::Object { class, state } = value else { return Ok(()) };
    let Value::Dict(attrs) = state.as_ref() else { return Ok(()) };
    let members = classes.get(class);
    for (key, v) in attrs {
        let Value::Str(key) = key else { continue };
        let name = format!("{prefix}{key}");
        match v {
            Value::Tensor(t) => {
                let role = match members {
                    Some(m) if m.parameters.contains(key) => Role::Parameter,
                    Some(m) if m.buffers.contains(key) => Role::Buffer,
                    // A plain tensor attribute is neither: not in the state_dict.
                    Some(_) => continue,
                    None if t.requires_grad => Role::Parameter,
                    None => Role::Buffer,
                };
                let dtype = Dtype::of_storage(&t.storage).ok_or_else(|| Error::Tensor {
                    name: name.clone(),
                    reason: format!(
                        "its storage is {}; the platform trains float32 models (call model.float() before scripting)",
                        t.storage
                    ),
                })?;
                let contiguous: Vec<usize> = (0..t.shape.len()).map(|i| t.shape[i + 1..].iter().product::<usize>()).collect::<Vec<_>>();
                let numel: usize = t.shape.iter().product();
                if numel > 1 && t.stride != contiguous {
                    return Err(Error::Tensor {
                        name,
                        reason: format!(
                            "strides {:?} for shape {:?} are not contiguous; call .contiguous() on it before saving",
                            t.stride, t.shape
                        ),
                    });
                }
                if t.offset + numel > t.storage_len {
                    return Err(Error::Tensor { name, reason: format!("it reaches past its storage of {} elements", t.storage_len) });
                }
                out.push(TensorInfo { name, role, dtype, shape: t.shape.clone(), at: t.clone() });
            }
            Value::Object { .. } => collect(v, &format!("{name}."), classes, out)?,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_declared_members_per_class() {
        let code = "class Net(Module):\n  __parameters__ = []\n  __buffers__ = []\nclass BatchNorm2d(Module):\n  __parameters__ = [\"weight\", \"bias\", ]\n  __buffers__ = [\"running_mean\", \"running_var\", \"num_batches_tracked\", ]\n";
        let m = members("__torch__.x", code);
        assert_eq!(m["__torch__.x.BatchNorm2d"].parameters, ["weight", "bias"]);
        assert_eq!(m["__torch__.x.BatchNorm2d"].buffers, ["running_mean", "running_var", "num_batches_tracked"]);
        assert!(m["__torch__.x.Net"].parameters.is_empty());
    }

    #[test]
    fn refuses_what_is_not_an_archive() {
        assert!(matches!(Archive::read(b"not a zip".to_vec()), Err(Error::NotAnArchive(_))));
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        zip.start_file("archive/data.pkl", zip::write::FileOptions::default()).expect("start");
        // pickle.dumps(collections.OrderedDict(), protocol=2): what torch.save of an empty state_dict holds
        zip.write_all(b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01.").expect("write");
        let bytes = zip.finish().expect("finish").into_inner();
        assert!(matches!(Archive::read(bytes), Err(Error::NotScripted)));
    }
}
