//! The identity of a model file (DESIGN §9): a 128-bit hash of everything in a GGUF file that
//! decides what K/V a prompt produces — every metadata entry (architecture, hyper-parameters,
//! tokenizer vocabulary, merges and token types) and every tensor's name, type, shape and
//! offset. It enters every prefix key and tier key, so two models never share a block, and it
//! is computed from the file itself, never a constant.

use std::collections::BTreeMap;

use candle_core::quantized::gguf_file::{Content, Value};
use pagedkv::BlockHash;

/// A model file's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelFingerprint(pub u128);

impl ModelFingerprint {
    /// The fingerprint of a parsed GGUF file (metadata and tensor table; weights are not read).
    pub fn of(content: &Content) -> Self {
        let mut bytes = b"pagedkv-model-fingerprint-v1\0".to_vec();
        let metadata: BTreeMap<&String, &Value> = content.metadata.iter().collect();
        for (key, value) in metadata {
            put_str(&mut bytes, key);
            put_value(&mut bytes, value);
        }
        let tensors: BTreeMap<_, _> = content.tensor_infos.iter().collect();
        for (name, info) in tensors {
            put_str(&mut bytes, name);
            // the type's name (`Q4_1`, `F32`, …): candle's numeric codes are not public
            put_str(&mut bytes, &format!("{:?}", info.ggml_dtype));
            for dim in info.shape.dims() {
                bytes.extend_from_slice(&(*dim as u64).to_le_bytes());
            }
            bytes.extend_from_slice(&info.offset.to_le_bytes());
        }
        Self(BlockHash::of_bytes(&bytes).0)
    }

    /// The fingerprint as 32 hex digits.
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0)
    }

    /// The bytes a cache's prefix keys take as their model identity.
    pub fn key_bytes(&self) -> Vec<u8> {
        let mut bytes = b"model:".to_vec();
        bytes.extend_from_slice(self.hex().as_bytes());
        bytes
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A tagged, length-prefixed encoding: distinct values never encode alike.
fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(x) => out.extend([0, *x]),
        Value::I8(x) => out.extend([1, *x as u8]),
        Value::U16(x) => {
            out.push(2);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::I16(x) => {
            out.push(3);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::U32(x) => {
            out.push(4);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::I32(x) => {
            out.push(5);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::U64(x) => {
            out.push(6);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::I64(x) => {
            out.push(7);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::F32(x) => {
            out.push(8);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::F64(x) => {
            out.push(9);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::Bool(x) => out.extend([10, u8::from(*x)]),
        Value::String(s) => {
            out.push(11);
            put_str(out, s);
        }
        Value::Array(items) => {
            out.push(12);
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_encode_distinctly() {
        let enc = |v: &Value| {
            let mut out = Vec::new();
            put_value(&mut out, v);
            out
        };
        assert_ne!(enc(&Value::U32(1)), enc(&Value::I32(1)));
        assert_ne!(
            enc(&Value::Array(vec![Value::String("ab".into())])),
            enc(&Value::Array(vec![
                Value::String("a".into()),
                Value::String("b".into())
            ]))
        );
    }
}
