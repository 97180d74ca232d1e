//! `retrain demo`: transfer learning end to end on built-in data, with no download and no GPU.
//! It draws a source dataset (shapes) and a different target dataset (textures), pretrains a
//! small ResNet-18 on the source and saves it as a `.pth` like any downloaded checkpoint,
//! then compares the freezing regimes on the target.

use std::path::Path;

use crate::compare::{compare, parse_regimes};
use crate::evaluate::load_run;
use crate::export::export;
use crate::models::Arch;
use crate::output::read_json;
use crate::synth::{Kind, write_dataset};
use crate::train::{Existing, TrainOptions, holds_run, resume, train};

/// Options of a default training run, as the CLI would give them.
fn options(data: &Path, epochs: usize) -> TrainOptions {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        options: TrainOptions,
    }
    let mut options = Defaults::parse_from(["retrain"]).options;
    options.data = Some(data.to_path_buf());
    options.epochs = epochs;
    options.image_size = Some(64);
    options.crop_scale = 0.35;
    options.lr = Some(2e-3);
    options.head_lr_mult = 5.0;
    options.batch_size = 16;
    options.seed = 1;
    options
}

pub fn demo(out: &Path) -> anyhow::Result<()> {
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
        pre.arch = Some(Arch::ResNet18);
        pre.scratch = true;
        pre.width = Some(0.25);
        let run = out.join("pretrain");
        if read_json::<crate::train::RunSummary>(&run.join("summary.json")).is_err() {
            // A pretraining that was stopped continues where it was.
            if holds_run(&run) {
                resume(&run, None)?;
            } else {
                train(&pre, &run, Existing::Refuse)?;
            }
        }
        let (model, _) = load_run(&run, &crate::cli::device())?;
        export(&model, &checkpoint)?;
        println!("saved the pretrained network as {}", checkpoint.display());
    }

    // The comparison on the target, from that checkpoint.
    let mut base = options(&target, 10);
    base.weights = Some(checkpoint);
    let regimes = parse_regimes("head,partial,full,scratch", Arch::ResNet18)?;
    let comparison = out.join("compare");
    let summary = compare(&base, &regimes, &comparison, false)?;
    println!("\n{}", crate::compare::summary_markdown(&summary));
    println!("figure:  {}", comparison.join("curves.png").display());
    println!("summary: {}", comparison.join("summary.md").display());
    println!("demo finished in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
