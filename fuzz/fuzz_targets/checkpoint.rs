//! Any bytes as a checkpoint file (zip `.pth`, legacy `.pth`, `.safetensors`): reading it
//! gives tensors or a clean error, never a panic, an abort or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    // The readers take a path, as the CLI gives them: one file per fuzzing process.
    let path = std::env::temp_dir().join(format!("retrain-fuzz-{}.pth", std::process::id()));
    std::fs::write(&path, bytes).expect("write the input");
    if let Ok(layout) = retrain::checkpoint::read_layout(&path, None) {
        let full = retrain::checkpoint::read(&path, None);
        // What the layout lists, the full read either gives with data or refuses.
        if let Ok(full) = full {
            assert_eq!(layout.len(), full.len());
            for (name, t) in full.iter() {
                assert_eq!(t.data.len(), t.num_elements(), "{name}");
            }
        }
    }
    let _ = retrain::checkpoint::read(&path, Some("state_dict"));
});
