//! The pickle policy of `torch.load(weights_only=True)`, checked on the raw opcodes before
//! `pytorch-reader` interprets a `.pth` file.
//!
//! `pytorch-reader` never executes anything, but it drops what it does not need (the hooks
//! argument of `_rebuild_tensor_v2`, the class of a pickled `nn.Module`), so a check on its
//! output cannot see every global. This walker reads each opcode and its operand without
//! building any object, and refuses any global outside torch's default allowlist wherever
//! it appears. Written here because no crate walks pickle opcodes without also building
//! values (`serde-pickle` and `pytorch-reader` both interpret them).
//!
//! Beyond torch: protocol 4's `STACK_GLOBAL` is accepted when its two operands are string
//! literals (directly or through the memo), and its name is checked like `GLOBAL`'s; torch's
//! restricted unpickler cannot read such files at all, pytorch-reader can.

use std::collections::HashMap;
use std::io::Read;

/// Exact names of the globals torch's weights-only unpickler allows by default
/// (`torch/_weights_only_unpickler.py`, `_get_allowed_globals`), besides the dtypes, storage
/// and tensor classes that [`is_allowed`] builds.
const ALLOWED: [&str; 31] = [
    "collections.OrderedDict",
    "collections.Counter",
    "torch.nn.parameter.Parameter",
    "torch.serialization._get_layout",
    "torch.Size",
    "torch.Tensor",
    "torch.device",
    "_codecs.encode",
    "builtins.bytearray",
    "builtins.set",
    "builtins.complex",
    "torch._tensor._rebuild_from_type_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_wrapper_subclass",
    "torch._utils._rebuild_device_tensor_from_numpy",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch.per_tensor_affine",
    "torch.per_tensor_symmetric",
    "torch.per_channel_affine",
    "torch.per_channel_symmetric",
    "torch.per_channel_affine_float_qparams",
    "torch.storage.UntypedStorage",
    "torch.storage.TypedStorage",
];

/// `torch.<dtype>` by its canonical name (`str(torch.float32)`; aliases such as
/// `torch.float` are not allowed by torch either).
const DTYPES: [&str; 45] = [
    "float64",
    "float32",
    "float16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "bfloat16",
    "complex128",
    "complex64",
    "qint8",
    "qint32",
    "quint8",
    "quint4x2",
    "quint2x4",
    "float8_e5m2",
    "float8_e4m3fn",
    "float8_e5m2fnuz",
    "float8_e4m3fnuz",
    "float8_e8m0fnu",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "complex32",
    "uint16",
    "uint32",
    "uint64",
    "uint1",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
    "int1",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
];

/// `torch.<X>Storage` for all of these, `torch.cuda.<X>Storage` for the first twelve.
const STORAGES: [&str; 17] = [
    "Double",
    "Float",
    "Long",
    "Int",
    "Short",
    "Char",
    "Byte",
    "Half",
    "Bool",
    "BFloat16",
    "ComplexDouble",
    "ComplexFloat",
    "QUInt8",
    "QInt8",
    "QInt32",
    "QUInt4x2",
    "QUInt2x4",
];

/// `torch[.cuda].<X>Tensor` for all, `torch[.cuda].sparse.<X>Tensor` for all but `Bool`.
const TENSORS: [&str; 10] = [
    "Byte", "Char", "Double", "Float", "Int", "Long", "Short", "Half", "Bool", "BFloat16",
];

/// Is `module.name` a global that `torch.load(weights_only=True)` allows?
pub fn is_allowed(global: &str) -> bool {
    if ALLOWED.contains(&global) {
        return true;
    }
    if let Some(dtype) = global.strip_prefix("torch.")
        && DTYPES.contains(&dtype)
    {
        return true;
    }
    let class = |prefix: &str, suffix: &str, names: &[&str]| {
        global
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(suffix))
            .is_some_and(|x| names.contains(&x))
    };
    class("torch.", "Storage", &STORAGES)
        || class("torch.cuda.", "Storage", &STORAGES[..12])
        || class("torch.", "Tensor", &TENSORS)
        || class("torch.cuda.", "Tensor", &TENSORS)
        || class("torch.sparse.", "Tensor", &TENSORS[..8])
        || class("torch.sparse.", "Tensor", &TENSORS[9..])
        || class("torch.cuda.sparse.", "Tensor", &TENSORS[..8])
        || class("torch.cuda.sparse.", "Tensor", &TENSORS[9..])
}

/// Why a pickle is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PickleError {
    /// A `torch.save(model)` pickle: it names a model class (`__main__`, `torch.nn.modules`,
    /// `torchvision.models`), given as `module.name`.
    #[error(
        "this is a whole pickled model (torch.save(model)) naming the class '{0}', which weights_only loading refuses; save model.state_dict() instead"
    )]
    WholeModel(String),
    /// Any other global outside the `weights_only` allowlist, given as `module.name`.
    #[error(
        "the pickle references the global '{0}', which torch.load(weights_only=True) does not allow"
    )]
    Global(String),
    /// Not a well-formed pickle: the byte offset and what is wrong there.
    #[error("the pickle is malformed at byte {0}: {1}")]
    Malformed(usize, String),
}

/// Pickles larger than this are refused (pytorch-reader's own limit).
pub const MAX_PICKLE_BYTES: u64 = pytorch_reader::MAX_PICKLE_SIZE;

/// Check one pickle, read from `bytes` up to its STOP opcode; returns the bytes it took.
pub fn scan(bytes: &[u8]) -> Result<usize, PickleError> {
    Walker::new(bytes).run()
}

/// Check `count` pickles stored one after another (a legacy `.pth` starts with five),
/// reading no more than they need from `reader`.
pub fn scan_stream(reader: &mut impl Read, count: usize) -> Result<(), PickleError> {
    let mut buf = Vec::new();
    let mut start = 0;
    for _ in 0..count {
        loop {
            match Walker::new(&buf[start..]).run() {
                Ok(used) => {
                    start += used;
                    break;
                }
                Err(PickleError::Malformed(_, ref why)) if why == TRUNCATED => {
                    // Read more, in growing chunks, up to the limit.
                    let want = buf.len().max(1 << 16) as u64;
                    if buf.len() as u64 >= MAX_PICKLE_BYTES * count as u64 {
                        return Err(PickleError::Malformed(buf.len(), "too large".into()));
                    }
                    let got = reader
                        .by_ref()
                        .take(want)
                        .read_to_end(&mut buf)
                        .map_err(|e| PickleError::Malformed(buf.len(), e.to_string()))?;
                    if got == 0 {
                        return Err(PickleError::Malformed(buf.len(), TRUNCATED.into()));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

const TRUNCATED: &str = "it ends before its STOP opcode";

/// The opcode walker: a position, the memo slots that hold strings, and the last two stack
/// pushes when they were strings (the operands a STACK_GLOBAL would take).
struct Walker<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Every memo slot written, with its string if it holds one.
    memo: HashMap<u64, Option<String>>,
    recent: [Option<String>; 2],
}

impl<'a> Walker<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            pos: 0,
            memo: HashMap::new(),
            recent: [None, None],
        }
    }

    fn fail(&self, why: &str) -> PickleError {
        PickleError::Malformed(self.pos, why.to_string())
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], PickleError> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.fail(TRUNCATED))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn uint(&mut self, n: usize) -> Result<u64, PickleError> {
        let b = self.take(n as u64)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let rest = &self.bytes[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.fail(TRUNCATED))?;
        let line = &rest[..n];
        self.pos += n + 1;
        Ok(line)
    }

    fn push(&mut self, value: Option<String>) {
        self.recent = [self.recent[1].take(), value];
    }

    fn text(&self, bytes: &[u8]) -> Option<String> {
        std::str::from_utf8(bytes).ok().map(str::to_string)
    }

    fn check_global(&self, module: &str, name: &str) -> Result<(), PickleError> {
        let module = if module == "__builtin__" {
            "builtins"
        } else {
            module
        };
        let global = format!("{module}.{name}");
        if is_allowed(&global) {
            return Ok(());
        }
        let model_class = module == "__main__"
            || module.starts_with("torch.nn.modules")
            || module.starts_with("torchvision.models");
        Err(if model_class {
            PickleError::WholeModel(global)
        } else {
            PickleError::Global(global)
        })
    }

    /// Walk to the STOP opcode; the number of bytes taken.
    fn run(mut self) -> Result<usize, PickleError> {
        loop {
            let op = *self.take(1)?.first().expect("one byte");
            match op {
                b'.' => return Ok(self.pos),
                // No operand.
                b'('
                | b'0'
                | b'1'
                | b'2'
                | b'N'
                | b'R'
                | b'b'
                | b'd'
                | b'l'
                | b't'
                | b's'
                | b'a'
                | b']'
                | b'}'
                | b'e'
                | b'u'
                | b'Q'
                | b')'
                | 0x81
                | 0x85..=0x89
                | 0x8f..=0x92 => self.push(None),
                // PROTO and FRAME change nothing on the stack.
                0x80 => {
                    self.take(1)?;
                }
                0x95 => {
                    self.take(8)?;
                }
                // Fixed-size operands.
                b'J' => {
                    self.take(4)?;
                    self.push(None);
                }
                b'K' => {
                    self.take(1)?;
                    self.push(None);
                }
                b'M' => {
                    self.take(2)?;
                    self.push(None);
                }
                b'G' => {
                    self.take(8)?;
                    self.push(None);
                }
                // Memo reads and writes.
                b'h' | b'j' => {
                    let index = self.uint(if op == b'h' { 1 } else { 4 })?;
                    self.push(self.memo.get(&index).cloned().flatten());
                }
                b'g' => {
                    let line = self.line()?;
                    let index = self.text(line).and_then(|t| t.trim().parse().ok());
                    let value = index.and_then(|i| self.memo.get(&i).cloned().flatten());
                    self.push(value);
                }
                b'q' | b'r' | b'p' | 0x94 => {
                    let index = match op {
                        b'q' => self.uint(1)?,
                        b'r' => self.uint(4)?,
                        b'p' => {
                            let line = self.line()?;
                            self.text(line)
                                .and_then(|t| t.trim().parse().ok())
                                .ok_or_else(|| self.fail("bad PUT index"))?
                        }
                        // MEMOIZE: the next index, as `len(memo)` in CPython.
                        _ => self.memo.len() as u64,
                    };
                    self.memo.insert(index, self.recent[1].clone());
                }
                // Length-prefixed strings: their text can name a STACK_GLOBAL.
                0x8c | b'U' => {
                    let n = self.uint(1)?;
                    let text = self.take(n).map(|b| self.text(b))?;
                    self.push(text);
                }
                b'X' | b'T' => {
                    let n = self.uint(4)?;
                    let text = self.take(n).map(|b| self.text(b))?;
                    self.push(text);
                }
                0x8d => {
                    let n = self.uint(8)?;
                    let text = self.take(n).map(|b| self.text(b))?;
                    self.push(text);
                }
                // Length-prefixed numbers and bytes.
                0x8a | b'C' => {
                    let n = self.uint(1)?;
                    self.take(n)?;
                    self.push(None);
                }
                0x8b | b'B' => {
                    let n = self.uint(4)?;
                    self.take(n)?;
                    self.push(None);
                }
                0x8e | 0x96 => {
                    let n = self.uint(8)?;
                    self.take(n)?;
                    self.push(None);
                }
                // Text-line operands.
                b'I' | b'L' | b'F' | b'P' | b'V' => {
                    self.line()?;
                    self.push(None);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let (Some(module), Some(name)) = (self.text(module), self.text(name)) else {
                        return Err(self.fail("a GLOBAL that is not UTF-8"));
                    };
                    self.check_global(&module, &name)?;
                    self.push(None);
                }
                0x93 => {
                    let [Some(module), Some(name)] = self.recent.clone() else {
                        return Err(self.fail("a STACK_GLOBAL whose name is not a string literal"));
                    };
                    self.check_global(&module, &name)?;
                    self.recent = [None, None];
                }
                _ => {
                    return Err(
                        self.fail(&format!("opcode 0x{op:02x} is not one a weights file uses"))
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GLOBAL module name`, protocol 2.
    fn global(module: &str, name: &str) -> Vec<u8> {
        format!("c{module}\n{name}\n").into_bytes()
    }

    fn short_unicode(s: &str) -> Vec<u8> {
        let mut v = vec![0x8c, s.len() as u8];
        v.extend(s.as_bytes());
        v
    }

    #[test]
    fn the_allowlist_is_exact() {
        for ok in [
            "torch._utils._rebuild_tensor_v2",
            "collections.OrderedDict",
            "torch.FloatStorage",
            "torch.cuda.HalfStorage",
            "torch.float16",
            "torch.LongTensor",
            "torch.sparse.FloatTensor",
        ] {
            assert!(is_allowed(ok), "{ok}");
        }
        for refused in [
            "torch.load",
            "torch.hub.load",
            "numpy.core.multiarray._reconstruct",
            "builtins.frozenset",
            "builtins.eval",
            "os.system",
            "torch.float",
            "torch.sparse.BoolTensor",
            "torch.cuda.QInt8Storage",
        ] {
            assert!(!is_allowed(refused), "{refused}");
        }
    }

    #[test]
    fn a_global_anywhere_is_checked() {
        // EMPTY_DICT, then os.system inside a tuple as if it were REDUCE hooks, STOP.
        let mut p = vec![0x80, 2, b'}', b'('];
        p.extend(global("torch._utils", "_rebuild_tensor_v2"));
        p.extend(global("posix", "system"));
        p.extend([b't', b'.']);
        assert_eq!(scan(&p), Err(PickleError::Global("posix.system".into())));
    }

    #[test]
    fn stack_global_is_resolved_through_the_memo() {
        let mut p = vec![0x80, 4];
        p.extend(short_unicode("os"));
        p.extend([0x94]);
        p.extend(short_unicode("system"));
        p.extend([0x94, b'h', 0, b'h', 1, 0x93, b'.']);
        assert_eq!(scan(&p), Err(PickleError::Global("os.system".into())));
        let mut p = vec![0x80, 4];
        p.extend(short_unicode("collections"));
        p.extend(short_unicode("OrderedDict"));
        p.extend([0x93, b')', b'R', b'.']);
        assert_eq!(scan(&p), Ok(p.len()));
        // An operand that is not a string literal (here None) cannot be checked: refused.
        let mut p = vec![0x80, 4];
        p.extend(short_unicode("os"));
        p.extend([b'N', 0x93, b'.']);
        assert!(matches!(scan(&p), Err(PickleError::Malformed(..))));
    }

    #[test]
    fn a_whole_module_is_named_as_such() {
        let mut p = vec![0x80, 2];
        p.extend(global("torchvision.models.resnet", "ResNet"));
        p.push(b'.');
        assert!(matches!(scan(&p), Err(PickleError::WholeModel(_))));
        let mut p = vec![0x80, 2];
        p.extend(global("__builtin__", "set"));
        p.push(b'.');
        assert_eq!(scan(&p), Ok(p.len()));
    }

    #[test]
    fn truncation_and_bad_opcodes_are_malformed() {
        assert!(matches!(
            scan(&[0x80, 2, b'X', 255, 255, 255, 255]),
            Err(PickleError::Malformed(..))
        ));
        assert!(matches!(
            scan(&[0x80, 2, b'i']),
            Err(PickleError::Malformed(..))
        ));
        assert!(matches!(scan(&[0x80, 2]), Err(PickleError::Malformed(..))));
    }

    #[test]
    fn consecutive_pickles_are_read_as_far_as_needed() {
        let mut stream = Vec::new();
        for _ in 0..3 {
            stream.extend([0x80, 2, b'K', 7, b'.']);
        }
        stream.extend([0xFF; 16]); // storage bytes after the pickles are never read as opcodes
        assert_eq!(scan_stream(&mut stream.as_slice(), 3), Ok(()));
        assert!(scan_stream(&mut stream.as_slice(), 4).is_err());
    }
}
