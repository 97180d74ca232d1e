//! What a long job (training, a comparison) needs from whoever runs it: the device to
//! compute on, somewhere to report progress, and a way to be asked to stop. The library
//! prints nothing itself; the `retrain` binary draws progress bars from these reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::prelude::Device;

use crate::hub::Hub;
pub use crate::progress::{Observer, Silent};

/// A request to stop, shared between the job and whoever may ask (a Ctrl-C handler).
/// Training checks it between steps, saves its last finished epoch and returns
/// [`crate::train::Interrupted`].
#[derive(Debug, Default, Clone)]
pub struct Cancellation(Arc<AtomicBool>);

impl Cancellation {
    /// A token nobody has cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the job to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Has anyone asked?
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The device, observer, cancellation token and weights hub a job runs with.
#[derive(Clone)]
pub struct Job<'a> {
    /// Where tensors live (burn-flex on the CPU, or a GPU).
    pub device: &'a Device,
    /// Where progress goes.
    pub observer: &'a dyn Observer,
    /// Checked between steps.
    pub cancellation: Cancellation,
    /// Where weights named like `resnet50.IMAGENET1K_V2` are found.
    pub hub: Hub,
}

impl<'a> Job<'a> {
    /// A job on `device` that reports nothing, is never cancelled, and finds weights in
    /// the environment's caches ([`Hub::from_env`]).
    pub fn quiet(device: &'a Device) -> Self {
        Self {
            device,
            observer: &Silent,
            cancellation: Cancellation::new(),
            hub: Hub::from_env(),
        }
    }
}
