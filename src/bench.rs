//! `retrain bench`: the speed of one workload, measured the way `tools/bench_torch.py`
//! measures PyTorch's, so the two can be run side by side and compared as ratios.

use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig, momentum::MomentumConfig};
use burn::prelude::*;
use serde::Serialize;

use retrain::freeze::{self, FrozenBn};
use retrain::models::{Arch, Model, ModelSpec, to_vec};
use retrain::train::peak_memory_mib;

/// What `retrain bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Eval-mode forward.
    Inference,
    /// Train-mode forward, cross-entropy, backward, SGD momentum step; nothing frozen.
    Full,
    /// The same step with the lower part frozen (mobilenet_v2 `features.0-13`).
    Partial,
    /// Train the head for 10 epochs on 512 images: feature cache, then head-only steps.
    Head,
}

impl Workload {
    /// Every workload, for the command line's choices.
    pub const ALL: [Workload; 4] = [
        Workload::Inference,
        Workload::Full,
        Workload::Partial,
        Workload::Head,
    ];
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub engine: &'static str,
    pub arch: Arch,
    pub workload: Workload,
    pub batch_size: usize,
    pub image_size: usize,
    pub threads: usize,
    /// Median images per second over the timed steps (inference, full, partial).
    pub images_per_second: Option<f64>,
    /// Seconds for the whole workload (head).
    pub seconds: Option<f64>,
    pub peak_memory_mib: f64,
}

/// `retrain bench`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(long, value_parser = crate::options::arch(), default_value = "mobilenet_v2")]
    arch: Arch,
    #[arg(long, value_parser = crate::options::choice(&Workload::ALL))]
    workload: Workload,
    #[arg(long, default_value_t = 16, value_parser = batch_size)]
    batch_size: usize,
    #[arg(long, default_value_t = 224, value_parser = retrain::ranges::image_size)]
    image_size: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 10, value_parser = retrain::ranges::at_least_one)]
    steps: usize,
    #[arg(long)]
    json: bool,
}

fn batch_size(text: &str) -> Result<usize, String> {
    retrain::ranges::count_within(text, 1..=1024)
}

/// Run the benchmark and print its result.
pub fn command(args: &BenchArgs, device: &Device) -> anyhow::Result<()> {
    let BenchArgs {
        arch,
        workload,
        steps,
        ..
    } = *args;
    let r = run(
        device,
        arch,
        workload,
        args.batch_size,
        args.image_size,
        args.warmup,
        steps,
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    match (r.images_per_second, r.seconds) {
        (Some(ips), _) => println!(
            "{arch} {workload:?}: {ips:.1} img/s (median of {steps} steps), peak {:.0} MiB",
            r.peak_memory_mib
        ),
        (_, Some(s)) => println!(
            "{arch} {workload:?}: {s:.1} s, peak {:.0} MiB",
            r.peak_memory_mib
        ),
        _ => {}
    }
    Ok(())
}

/// SGD with PyTorch's momentum 0.9 (no dampening), as tools/bench_torch.py uses.
fn sgd_momentum() -> ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(Some(
            MomentumConfig::new().with_momentum(0.9).with_dampening(0.0),
        ))
        .init()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn random_batch(batch: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::random(
        [batch, 3, size, size],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    )
}

fn labels(batch: usize, classes: usize, device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = (0..batch).map(|i| (i % classes) as i64).collect();
    Tensor::from_data(TensorData::new(v, [batch]), device)
}

/// Time `steps` calls of `step` after `warmup` untimed ones; returns per-call seconds.
fn time_steps(warmup: usize, steps: usize, mut step: impl FnMut()) -> Vec<f64> {
    for _ in 0..warmup {
        step();
    }
    (0..steps)
        .map(|_| {
            let t = Instant::now();
            step();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// Measure `workload` on `device`: `warmup` untimed steps, then `steps` timed ones.
fn run(
    device: &Device,
    arch: Arch,
    workload: Workload,
    batch: usize,
    size: usize,
    warmup: usize,
    steps: usize,
) -> anyhow::Result<BenchResult> {
    let classes = 1000;
    let spec = ModelSpec::new(arch, classes);
    let plain = device.clone();
    let ad = plain.clone().autodiff();
    plain.seed(0);
    let (mut images_per_second, mut seconds) = (None, None);
    match workload {
        Workload::Inference => {
            let model = spec.build(&plain).for_inference();
            let x = random_batch(batch, size, &plain);
            let times = time_steps(warmup, steps, || {
                let _ = to_vec(model.forward(x.clone()));
            });
            images_per_second = Some(batch as f64 / median(times));
        }
        Workload::Full | Workload::Partial => {
            let mut model = spec.build(&ad);
            if workload == Workload::Partial {
                let set = freeze::parse_spec(&spec.family.default_partial(), &spec, &model)?;
                model = freeze::apply(model, &set, FrozenBn::Eval);
            }
            let mut optim = sgd_momentum();
            let ce = CrossEntropyLossConfig::new().init(&ad);
            let x = random_batch(batch, size, &ad);
            let y = labels(batch, classes, &ad);
            let mut slot = Some(model);
            let times = time_steps(warmup, steps, || {
                let model = slot.take().expect("model");
                let loss = ce.forward(model.forward(x.clone()), y.clone());
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                let model: Model = optim.step(0.01, model, grads);
                // Wait for the step to finish before the clock stops.
                let _ = to_vec(head_probe(&model));
                slot = Some(model);
            });
            images_per_second = Some(batch as f64 / median(times));
        }
        Workload::Head => {
            let (images, epochs) = (512, 10);
            let t = Instant::now();
            let model = spec.build(&ad);
            let set = freeze::parse_spec("backbone", &spec, &model)?;
            let mut model = freeze::apply(model, &set, FrozenBn::Eval);
            let eval = model.for_inference();
            let mut features = Vec::new();
            for _ in 0..images / batch {
                features.extend(to_vec(eval.embed(random_batch(batch, size, &plain)))?);
            }
            let dim = features.len() / images;
            let mut optim = sgd_momentum();
            let ce = CrossEntropyLossConfig::new().init(&ad);
            for _ in 0..epochs {
                for chunk in features.chunks(batch * dim) {
                    let n = chunk.len() / dim;
                    let x = Tensor::<2>::from_data(TensorData::new(chunk.to_vec(), [n, dim]), &ad);
                    let loss = ce.forward(model.forward_head(x), labels(n, classes, &ad));
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    model = optim.step(0.01, model, grads);
                }
            }
            let _ = to_vec(head_probe(&model));
            seconds = Some(t.elapsed().as_secs_f64());
        }
    }
    Ok(BenchResult {
        engine: "retrain",
        arch,
        workload,
        batch_size: batch,
        image_size: size,
        threads: rayon::current_num_threads(),
        images_per_second,
        seconds,
        peak_memory_mib: peak_memory_mib(),
    })
}

/// One element of the head's weights: reading it waits for the queued step to finish.
fn head_probe(model: &Model) -> Tensor<1> {
    model
        .head()
        .weight
        .val()
        .inner()
        .slice([0..1, 0..1])
        .reshape([1])
}
