//! The archive reader against archives PyTorch wrote (fixtures/make_fixtures.py)
//! and what PyTorch said is in them.

use std::collections::BTreeMap;

use flame_torchscript::{Archive, Dtype, Error, Role, Values};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

fn expected() -> Vec<serde_json::Value> {
    serde_json::from_slice(&fixture("bn.json")).expect("bn.json")
}

#[test]
fn reads_every_parameter_and_buffer_as_pytorch_names_them() {
    let archive = Archive::read(fixture("bn.pt")).expect("archive");
    let values: BTreeMap<String, (Role, Dtype, Vec<usize>, Values)> =
        archive.values().expect("values").into_iter().map(|(t, v)| (t.name.clone(), (t.role, t.dtype, t.shape, v))).collect();
    let want = expected();
    assert_eq!(values.len(), want.len(), "{:?}", values.keys().collect::<Vec<_>>());
    for e in &want {
        let name = e["name"].as_str().expect("name");
        let (role, dtype, shape, v) = values.get(name).unwrap_or_else(|| panic!("'{name}' not found"));
        let want_role = if e["role"] == "parameter" { Role::Parameter } else { Role::Buffer };
        assert_eq!(*role, want_role, "{name}");
        let want_shape: Vec<usize> = e["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).collect();
        assert_eq!(*shape, want_shape, "{name}");
        let numbers = e["values"].as_array().expect("values");
        match (dtype, v) {
            (Dtype::F32, Values::F32(x)) => {
                assert_eq!(e["dtype"], "float32");
                let want: Vec<f32> = numbers.iter().map(|n| n.as_f64().expect("number") as f32).collect();
                assert_eq!(*x, want, "{name}");
            }
            (Dtype::I64, Values::I64(x)) => {
                assert_eq!(e["dtype"], "int64");
                let want: Vec<i64> = numbers.iter().map(|n| n.as_i64().expect("integer")).collect();
                assert_eq!(*x, want, "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(values["bn1.num_batches_tracked"].3, Values::I64(vec![1]), "one forward pass in training mode was counted");
    assert_eq!(values["head.1.weight"].2, vec![3, 64], "Sequential's members are named by index");
}

#[test]
fn rewritten_values_read_back_and_the_rest_is_untouched() {
    let archive = Archive::read(fixture("bn.pt")).expect("archive");
    let mut new = BTreeMap::new();
    new.insert("bn1.running_var".to_string(), Values::F32(vec![0.5, 1.5, 2.5, 3.5]));
    new.insert("bn1.num_batches_tracked".to_string(), Values::I64(vec![42]));
    new.insert("head.1.bias".to_string(), Values::F32(vec![-1.0, 0.0, 1.0]));
    let bytes = archive.with_values(&new).expect("rewrite");
    let again = Archive::read(bytes).expect("re-read");
    let before: BTreeMap<String, Values> = archive.values().expect("values").into_iter().map(|(t, v)| (t.name, v)).collect();
    for (t, v) in again.values().expect("values") {
        match new.get(&t.name) {
            Some(want) => assert_eq!(&v, want, "{}", t.name),
            None => assert_eq!(v, before[&t.name], "{} is unchanged", t.name),
        }
    }
    let wrong = BTreeMap::from([("bn1.running_var".to_string(), Values::F32(vec![1.0]))]);
    assert!(matches!(archive.with_values(&wrong), Err(Error::Values(m)) if m.contains("bn1.running_var")));
    let unknown = BTreeMap::from([("fc9.weight".to_string(), Values::F32(vec![1.0]))]);
    assert!(matches!(archive.with_values(&unknown), Err(Error::Values(m)) if m.contains("fc9.weight")));
    let dtype = BTreeMap::from([("bn1.num_batches_tracked".to_string(), Values::F32(vec![1.0]))]);
    assert!(archive.with_values(&dtype).is_err(), "an int64 counter takes int64 values");
}

#[test]
fn a_torch_save_file_is_named_as_such() {
    let err = Archive::read(fixture("state_dict.pt")).expect_err("not TorchScript");
    assert!(matches!(err, Error::NotScripted), "{err}");
    assert!(err.to_string().contains("torch.jit.script"), "{err}");
    let mut truncated = fixture("bn.pt");
    truncated.truncate(truncated.len() / 2);
    assert!(matches!(Archive::read(truncated), Err(Error::NotAnArchive(_))));
}
