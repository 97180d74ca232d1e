//! Every torchvision architecture retrain registers, built at full size, has exactly the
//! parameter count torchvision publishes for it: a whole-width check of every channel count
//! (`_make_divisible` rounding, squeeze widths, group widths) that reduced fixtures cannot
//! give. The counts come from torchvision's weight enums via tools/make_fixtures.py.

use std::path::Path;

use burn::prelude::Device;
use retrain::models::{Arch, ModelSpec};
use retrain::modules::named_modules;

#[test]
fn every_torchvision_architecture_has_torchvisions_parameter_count() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/torchvision_weights.json");
    let weights: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let device = Device::flex();
    let mut checked = Vec::new();
    for w in &weights {
        let name = w["name"].as_str().unwrap();
        let arch_name = name.split('.').next().unwrap();
        if checked.contains(&arch_name) {
            continue;
        }
        let arch = Arch::named(arch_name).unwrap_or_else(|| panic!("{arch_name} registered"));
        let spec = ModelSpec::new(arch, 1000);
        let model = spec.build(&device);
        let count = named_modules(&model, spec.torch_class(), &|_| false)[0].num_params;
        assert_eq!(
            count as u64,
            w["num_params"].as_u64().unwrap(),
            "{arch_name}"
        );
        checked.push(arch_name);
    }
    let torchvision_archs = Arch::all()
        .into_iter()
        .filter(|a| a.name() != "efficientnet_lite0")
        .count();
    assert_eq!(
        checked.len(),
        torchvision_archs,
        "every architecture checked"
    );
}
