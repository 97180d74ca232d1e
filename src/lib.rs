//! retrain: transfer learning for image classifiers from PyTorch checkpoints, in Rust.
//!
//! One module per concern: [`checkpoint`] reads `.pth` / `.safetensors` files, [`models`]
//! holds the networks (PyTorch key layout, timm-like interface), [`load`] puts a
//! checkpoint into a network and reports what it did, [`modules`] is the `named_modules()`
//! view, [`preprocess`] decodes and transforms images, [`output`] writes files atomically,
//! [`data`] reads image folders and augments, [`freeze`] resolves and audits freezing,
//! [`train`] runs training, [`compare`] trains several regimes and [`report`] draws them,
//! [`evaluate`] scores a run, [`export`] writes PyTorch files, [`synth`] draws procedural
//! datasets, [`demo`] ties it all together, and [`cli`] is the command line on top.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod compare;
pub mod data;
pub mod demo;
pub mod evaluate;
pub mod export;
pub mod freeze;
pub mod kernels;
pub mod load;
pub mod models;
pub mod modules;
pub mod output;
pub mod pickle_scan;
pub mod preprocess;
pub mod ranges;
pub mod report;
pub mod resample;
pub mod synth;
pub mod train;
