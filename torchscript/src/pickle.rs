//! The part of Python's pickle format a TorchScript archive's `data.pkl`
//! uses (protocol 2, with the protocol 4 framing opcodes tolerated): enough
//! to rebuild the tree of module objects and find every tensor in it, never
//! to run anything. Globals are names, reductions of unknown functions stay
//! opaque.

use std::collections::BTreeMap;

/// A tensor as `torch._utils._rebuild_tensor_v2` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    /// The storage's record name in the archive (`data/<key>`).
    pub key: String,
    /// The storage class (`FloatStorage`, `LongStorage`, ...).
    pub storage: String,
    /// Elements in the storage.
    pub storage_len: usize,
    /// Offset of the tensor's first element in the storage, in elements.
    pub offset: usize,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub stride: Vec<usize>,
    /// Whether it was saved as requiring gradients.
    pub requires_grad: bool,
}

/// A value on the unpickler's stack.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A global name (module, name).
    Global(String, String),
    /// An object of a class with its state (a dict of attributes for modules).
    Object {
        /// `module.name` of its class.
        class: String,
        /// What `BUILD` gave it.
        state: Box<Value>,
    },
    /// A persistent id (a storage reference).
    Persistent(Box<Value>),
    /// A tensor.
    Tensor(TensorRef),
    /// The result of calling a function this reader does not know.
    Opaque(String),
    /// A stack mark.
    Mark,
}

/// Reads one pickle into its value.
pub fn load(bytes: &[u8]) -> Result<Value, String> {
    let mut r = Reader { bytes, at: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: BTreeMap<u32, Value> = BTreeMap::new();
    let pop = |stack: &mut Vec<Value>, op: u8| stack.pop().ok_or_else(|| format!("opcode 0x{op:02x} on an empty stack"));
    let pop_mark = |stack: &mut Vec<Value>| -> Result<Vec<Value>, String> {
        let at = stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or("no mark on the stack")?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.take(8)?; // FRAME
            }
            b'.' => return pop(&mut stack, op),
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => stack.push(Value::Int(i64::from(r.u8()?))),
            b'M' => stack.push(Value::Int(i64::from(u16::from_le_bytes(r.array()?)))),
            b'J' => stack.push(Value::Int(i64::from(i32::from_le_bytes(r.array()?)))),
            0x8a => {
                let n = usize::from(r.u8()?);
                let b = r.take(n)?;
                if n > 8 {
                    return Err(format!("an integer of {n} bytes"));
                }
                let mut buf = if b.last().is_some_and(|x| x & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                buf[..n].copy_from_slice(b);
                stack.push(Value::Int(i64::from_le_bytes(buf)));
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(r.array()?))),
            b'X' => {
                let n = u32::from_le_bytes(r.array()?) as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8c => {
                let n = usize::from(r.u8()?);
                stack.push(Value::Str(r.string(n)?));
            }
            0x8d => {
                let n = usize::try_from(u64::from_le_bytes(r.array()?)).map_err(|_| "a string too long")?;
                stack.push(Value::Str(r.string(n)?));
            }
            b'B' => {
                let n = u32::from_le_bytes(r.array()?) as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'C' => {
                let n = usize::from(r.u8()?);
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b')' => stack.push(Value::Tuple(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if stack.len() < n {
                    return Err(format!("TUPLE{n} on a stack of {}", stack.len()));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'a' => {
                let v = pop(&mut stack, op)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => return Err("APPEND to something not a list".into()),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err("APPENDS to something not a list".into()),
                }
            }
            b's' => {
                let v = pop(&mut stack, op)?;
                let k = pop(&mut stack, op)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => return Err("SETITEM on something not a dict".into()),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with an odd number of items".into());
                }
                let mut it = items.into_iter();
                match stack.last_mut() {
                    Some(Value::Dict(d)) => {
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => return Err("SETITEMS on something not a dict".into()),
                }
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(module, name));
            }
            0x93 => {
                let name = pop(&mut stack, op)?;
                let module = pop(&mut stack, op)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => return Err("STACK_GLOBAL without two strings".into()),
                }
            }
            b'q' => {
                let k = u32::from(r.u8()?);
                memo.insert(k, stack.last().cloned().ok_or("BINPUT on an empty stack")?);
            }
            b'r' => {
                let k = u32::from_le_bytes(r.array()?);
                memo.insert(k, stack.last().cloned().ok_or("LONG_BINPUT on an empty stack")?);
            }
            0x94 => {
                let k = u32::try_from(memo.len()).map_err(|_| "memo too large")?;
                memo.insert(k, stack.last().cloned().ok_or("MEMOIZE on an empty stack")?);
            }
            b'h' => {
                let k = u32::from(r.u8()?);
                stack.push(memo.get(&k).cloned().ok_or_else(|| format!("BINGET {k} before BINPUT"))?);
            }
            b'j' => {
                let k = u32::from_le_bytes(r.array()?);
                stack.push(memo.get(&k).cloned().ok_or_else(|| format!("LONG_BINGET {k} before LONG_BINPUT"))?);
            }
            b'Q' => {
                let id = pop(&mut stack, op)?;
                stack.push(Value::Persistent(Box::new(id)));
            }
            0x81 => {
                let _args = pop(&mut stack, op)?;
                match pop(&mut stack, op)? {
                    Value::Global(m, n) => stack.push(Value::Object { class: format!("{m}.{n}"), state: Box::new(Value::None) }),
                    other => return Err(format!("NEWOBJ of {other:?}")),
                }
            }
            b'b' => {
                let state = pop(&mut stack, op)?;
                match stack.last_mut() {
                    Some(Value::Object { state: s, .. }) => **s = state,
                    _ => return Err("BUILD on something not an object".into()),
                }
            }
            b'R' => {
                let args = pop(&mut stack, op)?;
                let func = pop(&mut stack, op)?;
                stack.push(reduce(func, args)?);
            }
            other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", r.at - 1)),
        }
    }
}

fn reduce(func: Value, args: Value) -> Result<Value, String> {
    let Value::Global(module, name) = func else { return Ok(Value::Opaque("a call of a non-global".into())) };
    let Value::Tuple(args) = args else { return Err(format!("{module}.{name} called without an argument tuple")) };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") => {
            let [Value::Persistent(id), Value::Int(offset), Value::Tuple(size), Value::Tuple(stride), Value::Bool(requires_grad), ..] =
                args.as_slice()
            else {
                return Err(format!("_rebuild_tensor_v2 with unexpected arguments {args:?}"));
            };
            let Value::Tuple(id) = id.as_ref() else { return Err("a storage id that is not a tuple".into()) };
            let [Value::Str(kind), Value::Global(_, storage), Value::Str(key), _, Value::Int(len)] = id.as_slice() else {
                return Err(format!("an unexpected storage id {id:?}"));
            };
            if kind != "storage" {
                return Err(format!("a persistent id of kind '{kind}'"));
            }
            let dims = |t: &[Value]| -> Result<Vec<usize>, String> {
                t.iter()
                    .map(|v| match v {
                        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("a negative dimension {i}")),
                        other => Err(format!("a dimension {other:?}")),
                    })
                    .collect()
            };
            Ok(Value::Tensor(TensorRef {
                key: key.clone(),
                storage: storage.clone(),
                storage_len: usize::try_from(*len).map_err(|_| "a negative storage size")?,
                offset: usize::try_from(*offset).map_err(|_| "a negative storage offset")?,
                shape: dims(size)?,
                stride: dims(stride)?,
                requires_grad: *requires_grad,
            }))
        }
        _ => Ok(Value::Opaque(format!("{module}.{name}"))),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len()).ok_or("the pickle ends early")?;
        let b = &self.bytes[self.at..end];
        self.at = end;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn string(&mut self, n: usize) -> Result<String, String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a string that is not UTF-8".into())
    }

    fn line(&mut self) -> Result<String, String> {
        let end = self.bytes[self.at..].iter().position(|b| *b == b'\n').ok_or("a GLOBAL without its newline")?;
        let s = self.string(end)?;
        self.at += 1;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_containers_numbers_and_memo() {
        // pickle.dumps({'a': (1, 300, -2, 2.5, True, None), 'b': ['x', 'x']}, protocol=2)
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01(K\x01M,\x01J\xfe\xff\xff\xffG@\x04\x00\x00\x00\x00\x00\x00\x88Ntq\x02X\x01\x00\x00\x00bq\x03]q\x04(X\x01\x00\x00\x00xq\x05h\x05eu.";
        let v = load(bytes).expect("pickle");
        let Value::Dict(d) = v else { panic!("{v:?}") };
        assert_eq!(d[0].0, Value::Str("a".into()));
        assert_eq!(
            d[0].1,
            Value::Tuple(vec![Value::Int(1), Value::Int(300), Value::Int(-2), Value::Float(2.5), Value::Bool(true), Value::None])
        );
        assert_eq!(d[1].1, Value::List(vec![Value::Str("x".into()), Value::Str("x".into())]));
    }

    #[test]
    fn refuses_truncated_and_unknown_input() {
        assert!(load(b"\x80\x02}q").is_err());
        assert!(load(b"\x80\x02\xff.").expect_err("opcode").contains("0xff"));
        assert!(load(b"").is_err());
    }
}
