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
    let torchvision_archs = Arch::all()
        .into_iter()
        .filter(|a| a.name() != "efficientnet_lite0");
    for arch in torchvision_archs {
        let spec = ModelSpec::new(arch, 1000);
        // A ViT's count depends on the image size of its position embeddings: take the
        // weights made for the size it is built for.
        let made_for = |w: &&serde_json::Value| {
            w["name"].as_str().unwrap().split('.').next() == Some(arch.name())
                && spec
                    .family
                    .image_size()
                    .is_none_or(|size| w["input_size"].as_u64() == Some(size as u64))
        };
        let published = weights
            .iter()
            .find(made_for)
            .unwrap_or_else(|| panic!("{arch}: torchvision weights listed"));
        let model = spec.build(&device);
        let count = named_modules(&model, spec.torch_class(), &|_| false)[0].num_params;
        assert_eq!(
            count as u64,
            published["num_params"].as_u64().unwrap(),
            "{arch}"
        );
    }
}
