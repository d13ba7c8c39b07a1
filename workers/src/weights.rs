//! Model weights as plain values, and their wire format: safetensors with
//! named f32 tensors, addressed by the sha256 of the bytes.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

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
}

/// The sha256 of bytes, as lower-case hex (a blob's address).
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Encodes weights as safetensors bytes (deterministic for equal weights).
pub fn encode(weights: &Weights) -> Result<Vec<u8>, Error> {
    let bytes: Vec<(String, Vec<u8>)> =
        weights.iter().map(|(name, t)| (name.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect())).collect();
    let views = weights
        .iter()
        .zip(&bytes)
        .map(|((name, t), (_, b))| TensorView::new(Dtype::F32, t.shape.clone(), b).map(|v| (name.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Format(e.to_string()))?;
    safetensors::serialize(views, None).map_err(|e| Error::Format(e.to_string()))
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
    for (name, t) in reference {
        match other.get(name) {
            None => return Err(Error::Mismatch(format!("tensor '{name}' is missing"))),
            Some(o) if o.shape != t.shape => {
                return Err(Error::Mismatch(format!("tensor '{name}' has shape {:?}, expected {:?}", o.shape, t.shape)));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = other.keys().find(|k| !reference.contains_key(*k)) {
        return Err(Error::Mismatch(format!("unexpected tensor '{extra}'")));
    }
    Ok(())
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

    #[test]
    fn refuses_nan_and_garbage() {
        let mut w = sample();
        w.get_mut("fc1.bias").expect("bias").data[0] = f32::NAN;
        let bytes = encode(&w).expect("encode");
        assert!(matches!(decode(&bytes), Err(Error::NotFinite(n)) if n == "fc1.bias"));
        assert!(matches!(decode(b"not safetensors"), Err(Error::Format(_))));
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
}
