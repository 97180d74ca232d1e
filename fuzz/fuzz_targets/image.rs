//! Any bytes as an image file: decoding and both transforms (eval resize and center crop,
//! train RandomResizedCrop) give network input of the right size or a clean error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use retrain::preprocess::{Interpolation, Preprocess, decode_bytes, to_chw};

fuzz_target!(|bytes: &[u8]| {
    let Ok(decoded) = decode_bytes(Path::new("fuzz-input"), bytes) else {
        return;
    };
    let pre = Preprocess {
        input_size: 32,
        resize_size: 36,
        interpolation: Interpolation::Bicubic,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    assert_eq!(pre.eval(&decoded.image).len(), 3 * 32 * 32);
    let mut rng = rand::rngs::StdRng::seed_from_u64(bytes.len() as u64);
    let crop = retrain::data::random_resized_crop(&decoded.image, 32, 0.08, &mut rng);
    assert_eq!(to_chw(&crop, pre.mean, pre.std).len(), 3 * 32 * 32);
});
