//! Writes tensors as `torch.save(state_dict)` does since PyTorch 1.6: a zip archive (stored, not
//! deflated) of `NAME/data.pkl` (a protocol-2 pickle of an `OrderedDict` whose values rebuild
//! tensors from persistent storage ids) and one `NAME/data/K` file per storage, beside
//! `NAME/version`, `NAME/.format_version`, `NAME/.storage_alignment` and `NAME/byteorder`.
//!
//! The opcode sequence is the one `torch.save` emits (compare `pickletools.dis` of
//! `tests/fixtures/ckpt/tiny_vqgan.ckpt`, written by torch itself), so Hugging Face's
//! `pytorch_model.bin` files can be stood in for without torch.

use std::io::Write;

use candle_core::{DType, Tensor};

/// A pickle under construction (protocol 2).
struct Pickle(Vec<u8>);

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn string(&mut self, s: &str) {
        self.0.push(b'X');
        self.0
            .extend_from_slice(&u32::try_from(s.len()).unwrap().to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, n: usize) {
        self.0.push(b'J');
        self.0
            .extend_from_slice(&i32::try_from(n).unwrap().to_le_bytes());
    }

    fn tuple_of(&mut self, ns: &[usize]) {
        self.0.push(b'(');
        for &n in ns {
            self.int(n);
        }
        self.0.push(b't');
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(b")R");
    }
}

/// A tensor's values, little-endian, as torch stores them.
fn values<T: candle_core::WithDType, const N: usize>(
    tensor: &Tensor,
    bytes: fn(T) -> [u8; N],
) -> Vec<u8> {
    let all = tensor.flatten_all().unwrap().to_vec1::<T>().unwrap();
    all.into_iter().flat_map(bytes).collect()
}

/// The bytes of a `pytorch_model.bin` holding `tensors` (f32 or i64, contiguous) in this order.
pub fn state_dict_bin(tensors: &[(String, Tensor)]) -> Vec<u8> {
    let mut pickle = Pickle(vec![0x80, 2]);
    pickle.empty_ordered_dict();
    pickle.0.push(b'(');
    let mut storages = Vec::new();
    for (key, tensor) in tensors {
        let (storage_class, bytes) = match tensor.dtype() {
            DType::F32 => ("FloatStorage", values::<f32, 4>(tensor, f32::to_le_bytes)),
            DType::I64 => ("LongStorage", values::<i64, 8>(tensor, i64::to_le_bytes)),
            other => panic!("no torch storage written for {other:?}"),
        };
        let dims = tensor.dims();
        let mut strides = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1];
        }
        pickle.string(key);
        pickle.global("torch._utils", "_rebuild_tensor_v2");
        pickle.0.push(b'(');
        // The persistent id: ('storage', class, key, location, numel).
        pickle.0.push(b'(');
        pickle.string("storage");
        pickle.global("torch", storage_class);
        pickle.string(&storages.len().to_string());
        pickle.string("cpu");
        pickle.int(tensor.elem_count());
        pickle.0.extend_from_slice(b"tQ");
        pickle.int(0);
        pickle.tuple_of(dims);
        pickle.tuple_of(&strides);
        pickle.0.push(0x89);
        pickle.empty_ordered_dict();
        pickle.0.extend_from_slice(b"tR");
        storages.push(bytes);
    }
    pickle.0.extend_from_slice(b"u.");

    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut put = |name: &str, bytes: &[u8]| {
        zip.start_file(format!("pytorch_model/{name}"), stored)
            .unwrap();
        zip.write_all(bytes).unwrap();
    };
    put("data.pkl", &pickle.0);
    put(".format_version", b"1");
    put(".storage_alignment", b"64");
    put("byteorder", b"little");
    for (i, bytes) in storages.iter().enumerate() {
        put(&format!("data/{i}"), bytes);
    }
    put("version", b"3\n");
    zip.finish().unwrap().into_inner()
}
