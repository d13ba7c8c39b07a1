//! NumPy's `.npy` arrays and `.npz` archives (`np.save`, `np.savez`,
//! `np.savez_compressed`): a header naming the dtype and shape, then the
//! values in C order. Any integer, unsigned, float or bool dtype reads, as
//! f32 features or as i64 labels.

use std::io::{Cursor, Read};

/// An array: its shape and its values as f64 (exact for every integer a label can be).
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values in C order.
    pub values: Vec<f64>,
}

/// Reads one `.npy` file's bytes.
pub fn read_npy(bytes: &[u8]) -> Result<Array, String> {
    let rest = bytes.strip_prefix(b"\x93NUMPY").ok_or("not a .npy file (no \\x93NUMPY magic)")?;
    let (major, rest) = rest.split_first().ok_or("a .npy header ends early")?;
    let (_, rest) = rest.split_first().ok_or("a .npy header ends early")?;
    let (len, rest) = match major {
        1 => {
            let b = rest.get(..2).ok_or("a .npy header ends early")?;
            (usize::from(u16::from_le_bytes([b[0], b[1]])), &rest[2..])
        }
        2 | 3 => {
            let b = rest.get(..4).ok_or("a .npy header ends early")?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, &rest[4..])
        }
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    let header = std::str::from_utf8(rest.get(..len).ok_or("a .npy header ends early")?).map_err(|_| "a .npy header that is not text")?;
    let data = &rest[len..];
    let field = |key: &str| -> Result<&str, String> {
        let at = header.find(&format!("'{key}'")).ok_or_else(|| format!("the .npy header has no '{key}': {header}"))?;
        Ok(header[at + key.len() + 2..].trim_start().trim_start_matches(':').trim_start())
    };
    let descr = field("descr")?;
    let descr = descr.strip_prefix('\'').and_then(|d| d.split('\'').next()).ok_or_else(|| format!("bad descr in {header}"))?;
    if field("fortran_order")?.starts_with("True") {
        return Err("the array is in Fortran order; save it with np.ascontiguousarray(a)".into());
    }
    let shape_text = field("shape")?;
    let shape_text = shape_text.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or_else(|| format!("bad shape in {header}"))?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad dimension '{s}' in {header}")))
        .collect::<Result<_, _>>()?;
    let (order, kind) = descr.split_at(1);
    if order == ">" && !kind.ends_with('1') {
        return Err(format!("big-endian dtype '{descr}'; save the array as little-endian (a.astype('<f4'))"));
    }
    let count: usize = shape.iter().product();
    let size: usize = kind[1..].parse().map_err(|_| format!("dtype '{descr}' is not a number type"))?;
    let needed = count.checked_mul(size).ok_or("the array is too large")?;
    if data.len() < needed {
        return Err(format!("the array needs {needed} bytes of values and the file has {}", data.len()));
    }
    let chunks = data[..needed].chunks_exact(size.max(1));
    let values: Vec<f64> = match (&kind[..1], size) {
        ("f", 4) => chunks.map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        ("f", 8) => chunks.map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect(),
        ("i", 1) => chunks.map(|c| f64::from(c[0] as i8)).collect(),
        ("i", 2) => chunks.map(|c| f64::from(i16::from_le_bytes([c[0], c[1]]))).collect(),
        ("i", 4) => chunks.map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        ("i", 8) => chunks.map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64).collect(),
        ("u" | "b", 1) => chunks.map(|c| f64::from(c[0])).collect(),
        ("u", 2) => chunks.map(|c| f64::from(u16::from_le_bytes([c[0], c[1]]))).collect(),
        ("u", 4) => chunks.map(|c| f64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        ("u", 8) => chunks.map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64).collect(),
        _ => return Err(format!("dtype '{descr}' is not supported: use an integer, float32/64 or bool array")),
    };
    Ok(Array { shape, values })
}

/// Reads the arrays of a `.npz` archive, by name without `.npy`.
pub fn read_npz(bytes: &[u8]) -> Result<Vec<(String, Array)>, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| format!("not a .npz archive: {e}"))?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| format!("not a .npz archive: {e}"))?;
        let name = entry.name().trim_end_matches(".npy").to_string();
        let mut b = Vec::new();
        entry.read_to_end(&mut b).map_err(|e| format!("array '{name}': {e}"))?;
        out.push((name.clone(), read_npy(&b).map_err(|e| format!("array '{name}': {e}"))?));
    }
    Ok(out)
}

/// Writing `.npy` bytes, for tests.
#[cfg(test)]
pub(crate) mod tests_support {
    /// A `.npy` file (format 1.0, C order) of `data` with this dtype and shape, its header padded as NumPy pads it.
    pub(crate) fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::tests_support::npy;

    #[test]
    fn reads_numbers_of_every_kind_in_c_order() {
        let f: Vec<u8> = [1.5f32, -2.0, 0.25, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(read_npy(&npy("<f4", &[2, 3], &f)), Ok(Array { shape: vec![2, 3], values: vec![1.5, -2.0, 0.25, 4.0, 5.0, 6.0] }));
        assert_eq!(read_npy(&npy("|u1", &[3], &[0, 7, 255])).expect("u1").values, vec![0.0, 7.0, 255.0]);
        let i: Vec<u8> = [-3i64, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(read_npy(&npy("<i8", &[2], &i)).expect("i8").values, vec![-3.0, 9.0]);
        assert_eq!(read_npy(&npy("|b1", &[2], &[1, 0])).expect("bool").values, vec![1.0, 0.0]);
    }

    #[test]
    fn refuses_what_it_cannot_read_and_says_why() {
        assert!(read_npy(b"PK\x03\x04").expect_err("zip").contains("magic"));
        assert!(read_npy(&npy("<c8", &[1], &[0; 8])).expect_err("complex").contains("<c8"));
        assert!(read_npy(&npy(">f4", &[1], &[0; 4])).expect_err("big endian").contains("little-endian"));
        assert!(read_npy(&npy("<f4", &[4], &[0; 8])).expect_err("short").contains("16 bytes"));
        let mut fortran = npy("<f4", &[1], &[0; 4]);
        let at = fortran.windows(5).position(|w| w == b"False").expect("False");
        fortran[at..at + 5].copy_from_slice(b"True ");
        assert!(read_npy(&fortran).expect_err("fortran").contains("Fortran"));
    }
}
