//! retrain: transfer learning for image classifiers from PyTorch checkpoints, in Rust.
//!
//! One module per concern: [`checkpoint`] (the `retrain-checkpoint` crate) reads and writes
//! `.pth` / `.safetensors` files, [`kernels`] (the `retrain-kernels` crate) holds the native
//! CPU kernels, [`models`] holds the networks (PyTorch key layout, timm-like interface),
//! [`load`] puts a checkpoint into a network and reports what it did, [`modules`] is the
//! `named_modules()` view, [`preprocess`] decodes and transforms images, [`output`] writes
//! files atomically, [`data`] reads image folders and augments, [`freeze`] resolves and
//! audits freezing, [`job`] is how a caller watches and stops a long job, [`train`] runs training, [`compare`] trains several regimes and
//! [`report`] draws them, [`evaluate`] scores a run, [`predict`] classifies images, [`hub`] finds weights by name, [`export`] writes PyTorch files, [`onnx`] ONNX files
//! (messages from [`onnx_format`], the `retrain-onnx` crate), and [`synth`] draws procedural datasets.

#![warn(missing_docs)]

pub use retrain_checkpoint as checkpoint;
pub use retrain_kernels as kernels;
pub use retrain_onnx as onnx_format;

pub use error::{Error, Result};

pub mod compare;
pub mod data;
pub mod error;
pub mod evaluate;
pub mod export;
pub mod freeze;
pub mod hub;
pub mod job;
pub mod load;
pub mod models;
pub mod modules;
pub mod onnx;
pub mod output;
pub mod predict;
pub mod preprocess;
pub mod progress;
pub mod ranges;
pub mod report;
pub mod resample;
pub mod synth;
pub mod train;
