//! `retrain demo`: transfer learning end to end on built-in data, with no download and no GPU.
//! It draws a source dataset (shapes) and a different target dataset (textures), pretrains a
//! small ResNet-18 on the source and saves it as a `.pth` like any downloaded checkpoint,
//! then compares the freezing regimes on the target.

use std::path::Path;

use retrain::compare::{compare, parse_regimes};
use retrain::evaluate::load_run;
use retrain::export::export;
use retrain::job::Job;
use retrain::models::{Arch, ModelSpec};
use retrain::output::read_json;
use retrain::synth::{Kind, write_dataset};
use retrain::train::{Existing, TrainOptions, holds_run, resume, train};

/// The demo's training options: small images, a few epochs, a livelier head.
fn options(data: &Path, epochs: usize) -> TrainOptions {
    TrainOptions {
        data: Some(data.to_path_buf()),
        epochs,
        image_size: Some(64),
        crop_scale: 0.35,
        lr: Some(2e-3),
        head_lr_mult: 5.0,
        batch_size: 16,
        seed: 1,
        ..TrainOptions::default()
    }
}

/// Draw the datasets, pretrain, then compare the regimes, in `out`.
pub fn demo(out: &Path, job: &Job) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (source, target) = (out.join("source"), out.join("target"));
    if !source.exists() {
        println!(
            "drawing the source dataset (6 shape classes) in {}",
            source.display()
        );
        write_dataset(&source, Kind::Source, 150, 64, 1)?;
    }
    if !target.exists() {
        println!(
            "drawing the target dataset (4 texture classes) in {}",
            target.display()
        );
        write_dataset(&target, Kind::Target, 120, 64, 2)?;
    }

    // Pretraining: a ResNet-18 at a quarter of the usual width, from scratch on the source.
    let checkpoint = out.join("resnet18_w16_source.pth");
    if !checkpoint.exists() {
        println!("== pretraining resnet18 (width 16) on the source dataset");
        let mut pre = options(&source, 10);
        pre.arch = Arch::named("resnet18");
        pre.scratch = true;
        pre.width = Some(0.25);
        let run = out.join("pretrain");
        if read_json::<retrain::train::RunSummary>(&run.join("summary.json")).is_err() {
            // A pretraining that was stopped continues where it was.
            if holds_run(&run) {
                resume(&run, None, job)?;
            } else {
                train(&pre, &run, Existing::Refuse, job)?;
            }
        }
        let (model, _) = load_run(&run, job.device)?;
        export(&model, &checkpoint)?;
        println!("saved the pretrained network as {}", checkpoint.display());
    }

    // The comparison on the target, from that checkpoint.
    let mut base = options(&target, 10);
    base.weights = Some(checkpoint);
    let partial = ModelSpec::new(Arch::named("resnet18").expect("registered"), 4)
        .family
        .default_partial();
    let regimes = parse_regimes("head,partial,full,scratch", &partial)?;
    let comparison = out.join("compare");
    let summary = compare(&base, &regimes, &comparison, false, job)?;
    println!("\n{}", retrain::compare::summary_markdown(&summary));
    println!("figure:  {}", comparison.join("curves.png").display());
    println!("summary: {}", comparison.join("summary.md").display());
    println!("demo finished in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
