//! A model state and a TorchScript archive, both ways, in plain Rust (no
//! libtorch): the initial state a user's model file holds, and the file with
//! a trained state in place, as `flamectl model get --format torchscript`
//! writes it.

use std::collections::BTreeMap;

use flame_torchscript::{Archive, Dtype, Role, Values};

use crate::model::Error;
use crate::weights::{Counter, State, Tensor};

/// A model's whole state read from an archive: parameters, float buffers, counters.
pub fn state_of(archive: &Archive) -> Result<State, Error> {
    let mut state = State::default();
    for (t, v) in archive.values().map_err(|e| Error::Config(e.to_string()))? {
        match (t.role, v) {
            (Role::Parameter, Values::F32(data)) => {
                state.params.insert(t.name, Tensor { shape: t.shape, data });
            }
            (Role::Buffer, Values::F32(data)) => {
                state.buffers.insert(t.name, Tensor { shape: t.shape, data });
            }
            // int64 tensors are counters, whatever the module calls them (validation refuses int64 parameters).
            (_, Values::I64(data)) => {
                state.counters.insert(t.name, Counter { shape: t.shape, data });
            }
        }
    }
    if let Some((name, _)) = state.params.iter().chain(&state.buffers).find(|(_, t)| t.data.iter().any(|v| !v.is_finite())) {
        return Err(Error::Weights(format!("the model file's tensor '{name}' holds NaN or infinite values")));
    }
    Ok(state)
}

/// The archive's bytes with a state's values in place of its own.
pub fn with_state(archive: &Archive, state: &State) -> Result<Vec<u8>, Error> {
    let mut values = BTreeMap::new();
    for t in archive.tensors() {
        let v = match (t.role, t.dtype) {
            (Role::Parameter, Dtype::F32) => state.params.get(&t.name).map(|w| Values::F32(w.data.clone())),
            (Role::Buffer, Dtype::F32) => state.buffers.get(&t.name).map(|w| Values::F32(w.data.clone())),
            (_, Dtype::I64) => state.counters.get(&t.name).map(|c| Values::I64(c.data.clone())),
        };
        let v = v.ok_or_else(|| Error::Weights(format!("the model's tensor '{}' is missing from the weights", t.name)))?;
        values.insert(t.name.clone(), v);
    }
    archive.with_values(&values).map_err(|e| Error::Weights(e.to_string()))
}
