//! Model weights as plain values, and their wire format: safetensors with
//! named f32 tensors, addressed by the sha256 of the bytes.

use std::collections::BTreeMap;

use safetensors::tensor::Dtype;

/// One named tensor: shape and row-major f32 data.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions (Linear weights are `[out, in]`).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// A model's parameters by name (`fc1.weight`, `fc1.bias`, ...), sorted.
pub type Weights = BTreeMap<String, Tensor>;

/// One named int64 tensor (a counter such as BatchNorm's `num_batches_tracked`).
#[derive(Clone, Debug, PartialEq)]
pub struct Counter {
    /// Dimensions (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<i64>,
}

/// A model's whole state: the parameters optimizers train and aggregate,
/// float buffers (BatchNorm's running statistics: averaged, never stepped,
/// clipped or noised), and int64 counters. Built-in models have parameters only.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// Trained parameters.
    pub params: Weights,
    /// Float buffers.
    pub buffers: Weights,
    /// int64 buffers.
    pub counters: BTreeMap<String, Counter>,
}

impl State {
    /// A state of parameters only.
    pub fn params(params: Weights) -> Self {
        Self { params, ..Self::default() }
    }

    /// The same state with other parameters.
    pub fn with_params(&self, params: Weights) -> Self {
        Self { params, buffers: self.buffers.clone(), counters: self.counters.clone() }
    }
}

/// The bytes of a state's values in memory (about its size as safetensors).
pub fn state_bytes(s: &State) -> usize {
    let floats: usize = s.params.values().chain(s.buffers.values()).map(|t| t.data.len()).sum();
    floats * 4 + s.counters.values().map(|c| c.data.len() * 8).sum::<usize>()
}

/// The safetensors metadata key listing which float tensors are buffers.
const BUFFERS: &str = "flame.buffers";

/// Problems with a weights blob.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a safetensors file.
    #[error("not a safetensors blob: {0}")]
    Format(String),
    /// A tensor is not f32.
    #[error("tensor '{name}' has dtype {dtype}; only F32 is accepted")]
    Dtype {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// A value is NaN or infinite.
    #[error("tensor '{0}' holds NaN or infinite values")]
    NotFinite(String),
    /// Two weight sets do not have the same tensors.
    #[error("weights do not match: {0}")]
    Mismatch(String),
    /// Weights held on disk could not be written or read back.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, and where.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

pub use flame_transport::blob::digest;

/// A tensor's values as the safetensors writer takes them: where memory is
/// little-endian (the format's order) it reads them where they are, so that
/// encoding a model holds it twice (values and bytes), not three times.
struct Values<'a> {
    shape: &'a [usize],
    data: Data<'a>,
}

#[derive(Clone, Copy)]
enum Data<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

impl<'a> Values<'a> {
    /// Checks that the shape holds the values.
    fn new(name: &str, shape: &'a [usize], data: Data<'a>) -> Result<Self, Error> {
        let values = match data {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
        };
        let holds: usize = shape.iter().product();
        if holds != values {
            return Err(Error::Format(format!("tensor '{name}' has {values} values; its shape {shape:?} holds {holds}")));
        }
        Ok(Self { shape, data })
    }
}

impl safetensors::View for Values<'_> {
    fn dtype(&self) -> Dtype {
        match self.data {
            Data::F32(_) => Dtype::F32,
            Data::I64(_) => Dtype::I64,
        }
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            return std::borrow::Cow::Borrowed(match self.data {
                Data::F32(v) => bytemuck::cast_slice(v),
                Data::I64(v) => bytemuck::cast_slice(v),
            });
        }
        std::borrow::Cow::Owned(match self.data {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
    }

    fn data_len(&self) -> usize {
        match self.data {
            Data::F32(v) => v.len() * 4,
            Data::I64(v) => v.len() * 8,
        }
    }
}

/// Encodes weights as safetensors bytes (deterministic for equal weights).
pub fn encode(weights: &Weights) -> Result<Vec<u8>, Error> {
    let views = weights
        .iter()
        .map(|(name, t)| Values::new(name, &t.shape, Data::F32(&t.data)).map(|v| (name, v)))
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| Error::Format(e.to_string()))
}

/// Encodes a model's state: parameters and buffers as F32 tensors, counters
/// as I64, and the names of the float buffers in the metadata. A state of
/// parameters only encodes as [`encode`] does, byte for byte.
pub fn encode_state(state: &State) -> Result<Vec<u8>, Error> {
    if state.buffers.is_empty() && state.counters.is_empty() {
        return encode(&state.params);
    }
    if let Some(twice) = state.buffers.keys().chain(state.counters.keys()).find(|k| state.params.contains_key(*k)) {
        return Err(Error::Mismatch(format!("'{twice}' is both a parameter and a buffer")));
    }
    let floats = state.params.iter().chain(&state.buffers).map(|(name, t)| (name, &t.shape, Data::F32(&t.data)));
    let counters = state.counters.iter().map(|(name, c)| (name, &c.shape, Data::I64(&c.data)));
    let views = floats
        .chain(counters)
        .map(|(name, shape, data)| Values::new(name, shape, data).map(|v| (name, v)))
        .collect::<Result<Vec<_>, _>>()?;
    let listed: Vec<&String> = state.buffers.keys().collect();
    let meta = std::collections::HashMap::from([(BUFFERS.to_string(), serde_json::to_string(&listed).unwrap_or_default())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::Format(e.to_string()))
}

/// Decodes a model's state ([`encode_state`]): finite F32 tensors (those the
/// metadata lists are buffers) and I64 counters.
pub fn decode_state(bytes: &[u8]) -> Result<State, Error> {
    let mut params = Weights::new();
    let mut state = read_state(bytes, |name, data, shape| {
        params.insert(name, Tensor { shape, data: f32s(data) });
    })?;
    state.params = params;
    Ok(state)
}

/// Reads a state's bytes, checking every float tensor is finite: decodes
/// the buffers and counters, and gives each parameter (name, little-endian
/// values, shape) to `param`.
fn read_state(bytes: &[u8], mut param: impl FnMut(String, &[u8], Vec<usize>)) -> Result<State, Error> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Format(e.to_string()))?;
    let buffers = listed_buffers(&meta)?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Format(e.to_string()))?;
    let mut state = State::default();
    for (name, view) in st.tensors() {
        match view.dtype() {
            Dtype::F32 => {
                let data = view.data();
                check_finite(&name, data)?;
                if buffers.contains(&name) {
                    state.buffers.insert(name, Tensor { shape: view.shape().to_vec(), data: f32s(data) });
                } else {
                    param(name, data, view.shape().to_vec());
                }
            }
            Dtype::I64 => {
                state.counters.insert(name, Counter { shape: view.shape().to_vec(), data: i64s(view.data()) });
            }
            other => return Err(Error::Dtype { name, dtype: format!("{other:?}") }),
        }
    }
    Ok(state)
}

/// The float tensors a state's metadata lists as buffers.
fn listed_buffers(meta: &safetensors::tensor::Metadata) -> Result<Vec<String>, Error> {
    match meta.metadata().as_ref().and_then(|m| m.get(BUFFERS)) {
        Some(list) => serde_json::from_str(list).map_err(|e| Error::Format(format!("metadata '{BUFFERS}': {e}"))),
        None => Ok(Vec::new()),
    }
}

/// Refuses little-endian f32 bytes holding NaN or an infinity, naming the tensor.
fn check_finite(name: &str, bytes: &[u8]) -> Result<(), Error> {
    match bytes.chunks_exact(4).any(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()) {
        true => Err(Error::NotFinite(name.to_string())),
        false => Ok(()),
    }
}

/// Little-endian i64 bytes as values.
fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect()
}

/// Little-endian f32 bytes as values.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Reads `out.len()` little-endian f32 values from `file` at byte `at`.
pub fn read_f32s_at(file: &std::fs::File, at: u64, out: &mut [f32]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0u8; out.len() * 4];
    file.read_exact_at(&mut bytes, at)?;
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// A model's state checked as [`decode_state`] checks it (finite F32
/// tensors, I64 counters) with its parameters left in the safetensors bytes:
/// a fold that reads each parameter once needs no decoded copy of them.
#[derive(Debug)]
pub struct Packed {
    bytes: Vec<u8>,
    /// Each parameter's shape, and where its little-endian values are in `bytes`.
    params: BTreeMap<String, (Vec<usize>, std::ops::Range<usize>)>,
    /// The buffers and counters, decoded (the parameters are left empty).
    pub rest: State,
}

impl Packed {
    /// The parameters' names and shapes, in order.
    pub fn layout(&self) -> impl Iterator<Item = (&String, &Vec<usize>)> {
        self.params.iter().map(|(name, (shape, _))| (name, shape))
    }

    /// A parameter's values as little-endian f32 bytes.
    pub fn values(&self, name: &str) -> Option<&[u8]> {
        self.params.get(name).map(|(_, range)| &self.bytes[range.clone()])
    }

    /// Checks that its parameters are exactly the tensors of `reference`, with their shapes.
    pub fn check_same_layout(&self, reference: &Weights) -> Result<(), Error> {
        check_shapes(reference.iter().map(|(name, t)| (name, &t.shape)), self.layout())
    }

    /// Its parameters, decoded.
    pub fn params(&self) -> Weights {
        self.params
            .iter()
            .map(|(name, (shape, range))| (name.clone(), Tensor { shape: shape.clone(), data: f32s(&self.bytes[range.clone()]) }))
            .collect()
    }
}

/// Checks a state's bytes as [`decode_state`] does, decoding its buffers and
/// counters but leaving its parameters in the bytes.
pub fn decode_packed(bytes: Vec<u8>) -> Result<Packed, Error> {
    let mut params = BTreeMap::new();
    let rest = read_state(&bytes, |name, data, shape| {
        // Where the view's bytes are in the blob.
        let start = data.as_ptr() as usize - bytes.as_ptr() as usize;
        params.insert(name, (shape, start..start + data.len()));
    })?;
    Ok(Packed { bytes, params, rest })
}

/// A model's state checked as [`decode_state`] checks it, with its
/// parameters left in a file (a blob the store wrote to disk): a fold reads
/// each parameter a block at a time, and the update is never whole in memory.
#[derive(Debug)]
pub struct PackedFile {
    file: std::fs::File,
    /// Each parameter's shape, and where its little-endian values are in the file.
    params: BTreeMap<String, (Vec<usize>, std::ops::Range<u64>)>,
    /// The buffers and counters, decoded (the parameters are left empty).
    pub rest: State,
}

/// Values read at a time from a [`PackedFile`] (4 MiB of f32).
pub const FILE_BLOCK: usize = 1 << 20;

impl PackedFile {
    /// Reads the safetensors header at `path`, checks every float tensor is
    /// finite (one pass over the file) and decodes the buffers and counters.
    pub fn open(path: &std::path::Path) -> Result<Self, Error> {
        use std::os::unix::fs::FileExt;
        let io = |what: &str, source| Error::Io { what: format!("{what} {}", path.display()), source };
        let file = std::fs::File::open(path).map_err(|e| io("opening", e))?;
        let len = file.metadata().map_err(|e| io("reading the size of", e))?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0).map_err(|_| Error::Format("shorter than a safetensors header".into()))?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 || 8 + n > len {
            return Err(Error::Format(format!("a header of {n} bytes in a file of {len}")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8).map_err(|e| io("reading the header of", e))?;
        let text = std::str::from_utf8(&header).map_err(|e| Error::Format(format!("the header is not UTF-8: {e}")))?;
        let meta: safetensors::tensor::Metadata = serde_json::from_str(text).map_err(|e| Error::Format(e.to_string()))?;
        let start = 8 + n;
        if start + meta.data_len() as u64 != len {
            return Err(Error::Format(format!("the header describes {} bytes of values; the file holds {}", meta.data_len(), len - start)));
        }
        let buffers = listed_buffers(&meta)?;
        let mut packed = Self { file, params: BTreeMap::new(), rest: State::default() };
        let mut tensors: Vec<_> = meta.tensors().into_iter().collect();
        tensors.sort_by_key(|(_, info)| info.data_offsets);
        for (name, info) in tensors {
            let range = start + info.data_offsets.0 as u64..start + info.data_offsets.1 as u64;
            let shape = info.shape.clone();
            match info.dtype {
                Dtype::F32 => {
                    let mut values = buffers.contains(&name).then(Vec::new);
                    packed.blocks(&range, 4, |_, bytes| {
                        check_finite(&name, bytes)?;
                        values.as_mut().into_iter().for_each(|v| v.extend(f32s(bytes)));
                        Ok(())
                    })?;
                    match values {
                        Some(data) => drop(packed.rest.buffers.insert(name, Tensor { shape, data })),
                        None => drop(packed.params.insert(name, (shape, range))),
                    }
                }
                Dtype::I64 => {
                    let mut data = Vec::new();
                    packed.blocks(&range, 8, |_, bytes| {
                        data.extend(i64s(bytes));
                        Ok(())
                    })?;
                    packed.rest.counters.insert(name, Counter { shape, data });
                }
                other => return Err(Error::Dtype { name, dtype: format!("{other:?}") }),
            }
        }
        Ok(packed)
    }

    /// The parameters' names and shapes, in order.
    pub fn layout(&self) -> impl Iterator<Item = (&String, &Vec<usize>)> {
        self.params.iter().map(|(name, (shape, _))| (name, shape))
    }

    /// Checks that its parameters are exactly the tensors of `reference`, with their shapes.
    pub fn check_same_layout(&self, reference: &Weights) -> Result<(), Error> {
        check_shapes(reference.iter().map(|(name, t)| (name, &t.shape)), self.layout())
    }

    /// Gives parameter `name`'s values to `f` a block of at most
    /// [`FILE_BLOCK`] at a time: the index of the block's first value, and
    /// the block as little-endian f32 bytes.
    pub fn read_param(&self, name: &str, mut f: impl FnMut(usize, &[u8])) -> Result<(), Error> {
        let Some((_, range)) = self.params.get(name) else {
            return Err(Error::Mismatch(format!("no parameter '{name}'")));
        };
        self.blocks(range, 4, |at, bytes| {
            f(at, bytes);
            Ok(())
        })
    }

    /// Reads `out.len()` values of parameter `name`, from its value `start` on.
    pub fn read_values(&self, name: &str, start: usize, out: &mut [f32]) -> Result<(), Error> {
        let Some((_, range)) = self.params.get(name) else {
            return Err(Error::Mismatch(format!("no parameter '{name}'")));
        };
        let at = range.start + start as u64 * 4;
        if at + out.len() as u64 * 4 > range.end {
            return Err(Error::Mismatch(format!(
                "values {start}..{} of '{name}', which has {}",
                start + out.len(),
                (range.end - range.start) / 4
            )));
        }
        read_f32s_at(&self.file, at, out).map_err(|source| Error::Io { what: format!("reading '{name}' at byte {at}"), source })
    }

    /// Its parameters, decoded.
    pub fn params(&self) -> Result<Weights, Error> {
        let mut out = Weights::new();
        for (name, (shape, _)) in &self.params {
            let mut data = Vec::with_capacity(shape.iter().product());
            self.read_param(name, |_, bytes| data.extend(f32s(bytes)))?;
            out.insert(name.clone(), Tensor { shape: shape.clone(), data });
        }
        Ok(out)
    }

    /// Reads the bytes in `range` a block at a time (whole values of `width` bytes).
    fn blocks(
        &self,
        range: &std::ops::Range<u64>,
        width: usize,
        mut f: impl FnMut(usize, &[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        use std::os::unix::fs::FileExt;
        let mut block = vec![0u8; (FILE_BLOCK * 4).min((range.end - range.start) as usize)];
        let mut at = range.start;
        while at < range.end {
            let n = block.len().min((range.end - at) as usize);
            self.file
                .read_exact_at(&mut block[..n], at)
                .map_err(|source| Error::Io { what: format!("reading an update's values at byte {at}"), source })?;
            f(((at - range.start) / width as u64) as usize, &block[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

/// A block of a tensor's values as a fold reads them: decoded, or as
/// little-endian f32 bytes where they were left in a blob.
pub enum Block<'a> {
    F32(&'a [f32]),
    Le(&'a [u8]),
}

/// Parameters a fold reads once, a block at a time, wherever they are held:
/// decoded ([`Weights`]), in a blob's bytes ([`Packed`]) or in a file the
/// store wrote ([`PackedFile`]).
pub trait Blocks {
    /// The parameters' names and shapes, in order.
    fn shapes(&self) -> Vec<(&String, &Vec<usize>)>;

    /// Gives parameter `name`'s values to `f` a block at a time, with the
    /// index of the block's first value.
    fn read_blocks(&self, name: &str, f: &mut dyn FnMut(usize, Block<'_>)) -> Result<(), Error>;
}

impl Blocks for Weights {
    fn shapes(&self) -> Vec<(&String, &Vec<usize>)> {
        self.iter().map(|(name, t)| (name, &t.shape)).collect()
    }

    fn read_blocks(&self, name: &str, f: &mut dyn FnMut(usize, Block<'_>)) -> Result<(), Error> {
        let t = self.get(name).ok_or_else(|| Error::Mismatch(format!("no parameter '{name}'")))?;
        f(0, Block::F32(&t.data));
        Ok(())
    }
}

impl Blocks for Packed {
    fn shapes(&self) -> Vec<(&String, &Vec<usize>)> {
        self.layout().collect()
    }

    fn read_blocks(&self, name: &str, f: &mut dyn FnMut(usize, Block<'_>)) -> Result<(), Error> {
        let bytes = self.values(name).ok_or_else(|| Error::Mismatch(format!("no parameter '{name}'")))?;
        f(0, Block::Le(bytes));
        Ok(())
    }
}

impl Blocks for PackedFile {
    fn shapes(&self) -> Vec<(&String, &Vec<usize>)> {
        self.layout().collect()
    }

    fn read_blocks(&self, name: &str, f: &mut dyn FnMut(usize, Block<'_>)) -> Result<(), Error> {
        self.read_param(name, |at, bytes| f(at, Block::Le(bytes)))
    }
}

/// Checks that `other` has exactly the tensors and shapes of `reference`,
/// buffers and counters included.
pub fn check_same_state(reference: &State, other: &State) -> Result<(), Error> {
    check_same_layout(&reference.params, &other.params)?;
    check_same_layout(&reference.buffers, &other.buffers).map_err(|e| Error::Mismatch(format!("buffers: {e}")))?;
    let shapes = |s: &State| s.counters.iter().map(|(k, c)| (k.clone(), c.shape.clone())).collect::<Vec<_>>();
    if shapes(reference) != shapes(other) {
        return Err(Error::Mismatch(format!("counters {:?}, expected {:?}", shapes(other), shapes(reference))));
    }
    Ok(())
}

/// The buffers and counters of an aggregated model: float buffers are the
/// sample-weighted mean of the updates' (as FedAvg takes parameters),
/// counters the largest any update reached.
pub fn merge_buffers(updates: &[(&State, u64)]) -> Result<(Weights, BTreeMap<String, Counter>), Error> {
    let Some((first, _)) = updates.first() else { return Ok(Default::default()) };
    let total: f64 = updates.iter().map(|(_, n)| *n as f64).sum::<f64>().max(1.0);
    let mut buffers = Weights::new();
    for (name, t) in &first.buffers {
        let mut sum = vec![0f64; t.data.len()];
        for (s, n) in updates {
            let b = s.buffers.get(name).filter(|b| b.shape == t.shape).ok_or_else(|| Error::Mismatch(format!("buffer '{name}'")))?;
            let w = *n as f64 / total;
            sum.iter_mut().zip(&b.data).for_each(|(acc, v)| *acc += w * f64::from(*v));
        }
        buffers.insert(name.clone(), Tensor { shape: t.shape.clone(), data: sum.into_iter().map(|v| v as f32).collect() });
    }
    let mut counters = BTreeMap::new();
    for (name, c) in &first.counters {
        let mut max = c.data.clone();
        for (s, _) in updates {
            let other = s.counters.get(name).filter(|o| o.shape == c.shape).ok_or_else(|| Error::Mismatch(format!("counter '{name}'")))?;
            max.iter_mut().zip(&other.data).for_each(|(m, v)| *m = (*m).max(*v));
        }
        counters.insert(name.clone(), Counter { shape: c.shape.clone(), data: max });
    }
    Ok((buffers, counters))
}

/// Decodes safetensors bytes, refusing anything but finite f32 tensors.
pub fn decode(bytes: &[u8]) -> Result<Weights, Error> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Format(e.to_string()))?;
    let mut out = Weights::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(Error::Dtype { name, dtype: format!("{:?}", view.dtype()) });
        }
        let data: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::NotFinite(name));
        }
        out.insert(name, Tensor { shape: view.shape().to_vec(), data });
    }
    Ok(out)
}

/// Checks that `other` has exactly the tensors and shapes of `reference`.
pub fn check_same_layout(reference: &Weights, other: &Weights) -> Result<(), Error> {
    check_shapes(reference.iter().map(|(name, t)| (name, &t.shape)), other.iter().map(|(name, t)| (name, &t.shape)))
}

/// Checks that `other` names exactly the tensors of `reference`, with their shapes.
pub(crate) fn check_shapes<'a, 'b>(
    reference: impl Iterator<Item = (&'a String, &'a Vec<usize>)>,
    other: impl Iterator<Item = (&'b String, &'b Vec<usize>)>,
) -> Result<(), Error> {
    let reference: BTreeMap<&str, &Vec<usize>> = reference.map(|(k, v)| (k.as_str(), v)).collect();
    let other: BTreeMap<&str, &Vec<usize>> = other.map(|(k, v)| (k.as_str(), v)).collect();
    for (name, shape) in &reference {
        match other.get(name) {
            None => return Err(Error::Mismatch(format!("tensor '{name}' is missing"))),
            Some(o) if o != shape => {
                return Err(Error::Mismatch(format!("tensor '{name}' has shape {o:?}, expected {shape:?}")));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = other.keys().find(|k| !reference.contains_key(*k)) {
        return Err(Error::Mismatch(format!("unexpected tensor '{extra}'")));
    }
    Ok(())
}

/// An update moved onto another model: `onto + (update - from)` for each
/// parameter, the update's own buffers and counters. What-if analysis uses it
/// to apply a trainer's recorded change to a counterfactual global model.
pub fn rebase(update: &State, from: &Weights, onto: &Weights) -> Result<State, Error> {
    check_same_layout(from, &update.params)?;
    check_same_layout(from, onto)?;
    let mut params = Weights::new();
    for (name, u) in &update.params {
        let (f, o) = (&from[name], &onto[name]);
        let data = u.data.iter().zip(&f.data).zip(&o.data).map(|((u, f), o)| o + (u - f)).collect();
        params.insert(name.clone(), Tensor { shape: u.shape.clone(), data });
    }
    Ok(update.with_params(params))
}

/// Where two states first differ, bit for bit, in words (`None`: identical):
/// the tensor (parameters, then buffers, then counters, each by name), and
/// its first differing element with both values.
pub fn first_difference(a: &State, b: &State) -> Option<String> {
    fn floats(kind: &str, a: &Weights, b: &Weights) -> Option<String> {
        for name in a.keys().chain(b.keys()).collect::<std::collections::BTreeSet<_>>() {
            let (x, y) = match (a.get(name), b.get(name)) {
                (Some(x), Some(y)) => (x, y),
                (Some(_), None) => return Some(format!("{kind} '{name}' is only in the first")),
                (None, _) => return Some(format!("{kind} '{name}' is only in the second")),
            };
            if x.shape != y.shape {
                return Some(format!("{kind} '{name}' has shape {:?} against {:?}", x.shape, y.shape));
            }
            if let Some(i) = x.data.iter().zip(&y.data).position(|(p, q)| p.to_bits() != q.to_bits()) {
                return Some(format!("{kind} '{name}' element {i} of {}: {:e} against {:e}", x.data.len(), x.data[i], y.data[i]));
            }
        }
        None
    }
    floats("parameter", &a.params, &b.params).or_else(|| floats("buffer", &a.buffers, &b.buffers)).or_else(|| {
        for name in a.counters.keys().chain(b.counters.keys()).collect::<std::collections::BTreeSet<_>>() {
            if a.counters.get(name) != b.counters.get(name) {
                return Some(format!("counter '{name}': {:?} against {:?}", a.counters.get(name), b.counters.get(name)));
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Weights {
        let mut w = Weights::new();
        w.insert("fc1.weight".into(), Tensor { shape: vec![2, 3], data: vec![1.0, -2.0, 3.5, 0.0, 1e-3, 7.0] });
        w.insert("fc1.bias".into(), Tensor { shape: vec![2], data: vec![0.25, -0.5] });
        w
    }

    #[test]
    fn round_trips_and_is_deterministic() {
        let w = sample();
        let a = encode(&w).expect("encode");
        let b = encode(&w.clone()).expect("encode");
        assert_eq!(a, b);
        assert_eq!(digest(&a), digest(&b));
        assert_eq!(decode(&a).expect("decode"), w);
    }

    /// What safetensors' own views write: each tensor's values copied to little-endian bytes first.
    fn copied(state: &State, meta: Option<std::collections::HashMap<String, String>>) -> Vec<u8> {
        use safetensors::tensor::TensorView;
        let floats = state
            .params
            .iter()
            .chain(&state.buffers)
            .map(|(n, t)| (n, Dtype::F32, &t.shape, t.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()));
        let counters = state.counters.iter().map(|(n, c)| (n, Dtype::I64, &c.shape, c.data.iter().flat_map(|v| v.to_le_bytes()).collect()));
        let owned: Vec<_> = floats.chain(counters).collect();
        let views = owned.iter().map(|(n, d, shape, b)| (*n, TensorView::new(*d, shape.to_vec(), b).expect("view")));
        safetensors::serialize(views, meta).expect("serialize")
    }

    #[test]
    fn encoding_in_place_writes_the_bytes_of_copied_values_and_checks_shapes() {
        let mut state = State::params(sample());
        assert_eq!(encode_state(&state).expect("encode"), copied(&state, None));
        state.buffers.insert("bn.running_mean".into(), Tensor { shape: vec![3], data: vec![0.5, -1.0, 2.0] });
        state.counters.insert("bn.num_batches_tracked".into(), Counter { shape: vec![], data: vec![-7] });
        let listed = r#"["bn.running_mean"]"#.to_string();
        assert_eq!(encode_state(&state).expect("encode"), copied(&state, Some([(BUFFERS.to_string(), listed)].into())));
        state.params.get_mut("fc1.bias").expect("bias").shape = vec![3];
        let refused = encode_state(&state).expect_err("a shape that does not hold the values");
        assert!(refused.to_string().contains("'fc1.bias' has 2 values; its shape [3] holds 3"), "{refused}");
    }

    #[test]
    fn refuses_nan_and_garbage() {
        let mut w = sample();
        w.get_mut("fc1.bias").expect("bias").data[0] = f32::NAN;
        let bytes = encode(&w).expect("encode");
        assert!(matches!(decode(&bytes), Err(Error::NotFinite(n)) if n == "fc1.bias"));
        assert!(matches!(decode(b"not safetensors"), Err(Error::Format(_))));
    }

    #[test]
    fn a_state_keeps_buffers_and_counters_apart_and_params_only_encode_as_before() {
        let plain = State::params(sample());
        assert_eq!(encode_state(&plain).expect("encode"), encode(&sample()).expect("encode"), "same bytes, same digest");
        let mut state = plain.clone();
        state.buffers.insert("bn.running_var".into(), Tensor { shape: vec![2], data: vec![1.0, 2.0] });
        state.counters.insert("bn.num_batches_tracked".into(), Counter { shape: vec![], data: vec![7] });
        let bytes = encode_state(&state).expect("encode");
        assert_eq!(decode_state(&bytes).expect("decode"), state);
        assert!(matches!(decode(&bytes), Err(Error::Dtype { .. })), "the parameters-only reader refuses a counter");
        let mut other = state.clone();
        other.buffers.get_mut("bn.running_var").expect("buffer").data = vec![3.0, 6.0];
        other.counters.get_mut("bn.num_batches_tracked").expect("counter").data = vec![5];
        let (buffers, counters) = merge_buffers(&[(&state, 1), (&other, 3)]).expect("merge");
        assert_eq!(buffers["bn.running_var"].data, vec![2.5, 5.0], "weighted by samples");
        assert_eq!(counters["bn.num_batches_tracked"].data, vec![7], "the largest count");
        other.counters.clear();
        assert!(check_same_state(&state, &other).is_err());
        assert!(merge_buffers(&[(&state, 1), (&other, 1)]).is_err());
    }

    #[test]
    fn a_packed_state_is_checked_as_a_decoded_one_and_holds_the_same_values() {
        let mut state = State::params(sample());
        state.buffers.insert("bn.running_var".into(), Tensor { shape: vec![2], data: vec![1.0, 2.0] });
        state.counters.insert("bn.num_batches_tracked".into(), Counter { shape: vec![], data: vec![7] });
        let packed = decode_packed(encode_state(&state).expect("encode")).expect("packed");
        assert_eq!(packed.params(), state.params);
        assert_eq!(packed.rest, state.with_params(Weights::new()), "buffers and counters decoded, apart");
        assert_eq!(packed.values("fc1.bias").expect("bias"), [0.25f32.to_le_bytes(), (-0.5f32).to_le_bytes()].concat());
        assert!(packed.check_same_layout(&sample()).is_ok());
        let mut other = sample();
        other.get_mut("fc1.weight").expect("weight").shape = vec![3, 2];
        let err = packed.check_same_layout(&other).expect_err("shape differs");
        assert_eq!(err.to_string(), check_same_layout(&other, &sample()).expect_err("shape differs").to_string());
        let mut nan = state.clone();
        nan.params.get_mut("fc1.weight").expect("weight").data[4] = f32::INFINITY;
        assert!(matches!(decode_packed(encode_state(&nan).expect("encode")), Err(Error::NotFinite(n)) if n == "fc1.weight"));
        nan.buffers.get_mut("bn.running_var").expect("buffer").data[0] = f32::NAN;
        assert!(decode_packed(encode_state(&nan).expect("encode")).is_err());
        assert!(matches!(decode_packed(b"not safetensors".to_vec()), Err(Error::Format(_))));
    }

    /// A state read from a file holds what its bytes decode to: parameters
    /// read a block at a time (one over three blocks), buffers and counters
    /// decoded apart; what is not finite, or not a whole safetensors file, is
    /// refused as from bytes.
    #[test]
    fn a_state_in_a_file_reads_as_its_bytes_decode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).expect("write");
            PackedFile::open(&path)
        };
        let mut state = State::params(sample());
        let long = 2 * FILE_BLOCK + 5;
        state.params.insert("big".into(), Tensor { shape: vec![long], data: (0..long).map(|i| i as f32 * 0.5 - 3.0).collect() });
        state.buffers.insert("bn.running_var".into(), Tensor { shape: vec![2], data: vec![1.0, 2.0] });
        state.counters.insert("bn.num_batches_tracked".into(), Counter { shape: vec![], data: vec![7] });
        let bytes = encode_state(&state).expect("encode");
        let packed = file("state", &bytes).expect("file");
        assert_eq!(packed.params().expect("params"), state.params);
        assert_eq!(packed.rest, state.with_params(Weights::new()), "buffers and counters decoded, apart");
        let mut starts = Vec::new();
        packed.read_param("big", |at, b| starts.push((at, b.len()))).expect("read");
        assert_eq!(starts, [(0, FILE_BLOCK * 4), (FILE_BLOCK, FILE_BLOCK * 4), (2 * FILE_BLOCK, 20)]);
        assert!(packed.check_same_layout(&state.params).is_ok() && packed.check_same_layout(&sample()).is_err());

        let mut nan = state.clone();
        nan.params.get_mut("big").expect("big").data[FILE_BLOCK + 1] = f32::NAN;
        assert!(matches!(file("nan", &encode_state(&nan).expect("encode")), Err(Error::NotFinite(n)) if n == "big"));
        let cut = file("cut", &bytes[..bytes.len() - 4]).expect_err("a value short");
        assert!(cut.to_string().contains("the file holds"), "{cut}");
        assert!(matches!(file("garbage", b"not safetensors"), Err(Error::Format(_))));
        assert!(matches!(PackedFile::open(&dir.path().join("missing")), Err(Error::Io { .. })));
    }

    #[test]
    fn layout_check_names_the_tensor() {
        let w = sample();
        let mut other = sample();
        other.get_mut("fc1.weight").expect("weight").shape = vec![3, 2];
        let err = check_same_layout(&w, &other).expect_err("shape differs");
        assert!(err.to_string().contains("fc1.weight"), "{err}");
        other.remove("fc1.weight");
        assert!(check_same_layout(&w, &other).is_err());
    }

    #[test]
    fn the_first_difference_names_the_tensor_and_element() {
        let t = |v: Vec<f32>| Tensor { shape: vec![v.len()], data: v };
        let a = State::params(Weights::from([("a".into(), t(vec![1.0, 2.0])), ("b".into(), t(vec![3.0, 4.0]))]));
        assert_eq!(first_difference(&a, &a.clone()), None);
        let mut b = a.clone();
        b.params.get_mut("b").expect("b").data[1] = 4.5;
        assert_eq!(first_difference(&a, &b).as_deref(), Some("parameter 'b' element 1 of 2: 4e0 against 4.5e0"));
        // -0.0 and 0.0 are equal numbers but different bits: a bit-for-bit check tells them apart.
        let (mut z, mut nz) = (a.clone(), a.clone());
        z.params.get_mut("a").expect("a").data[0] = 0.0;
        nz.params.get_mut("a").expect("a").data[0] = -0.0;
        assert!(first_difference(&z, &nz).is_some_and(|d| d.starts_with("parameter 'a' element 0")));
        let mut c = a.clone();
        c.params.remove("a");
        assert_eq!(first_difference(&a, &c).as_deref(), Some("parameter 'a' is only in the first"));
        let mut d = a.clone();
        d.buffers.insert("bn.running_mean".into(), t(vec![0.0]));
        assert_eq!(first_difference(&a, &d).as_deref(), Some("buffer 'bn.running_mean' is only in the second"));
    }

    #[test]
    fn an_update_rebased_carries_its_change_onto_the_other_model() {
        let t = |v: Vec<f32>| Weights::from([("w".to_string(), Tensor { shape: vec![v.len()], data: v })]);
        let update = State::params(t(vec![1.5, -1.0]));
        let moved = rebase(&update, &t(vec![1.0, 0.0]), &t(vec![10.0, 20.0])).expect("same layout");
        assert_eq!(moved.params["w"].data, vec![10.5, 19.0]);
        assert!(rebase(&update, &t(vec![1.0]), &t(vec![1.0])).is_err(), "a different layout is refused");
    }
}
