//! The `retrain` command line.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::*;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use retrain::checkpoint;
use retrain::compare::{compare, parse_regimes, summary_markdown};
use retrain::evaluate::{evaluate_run, expand_images, load_run, render as render_eval};
use retrain::export::export;
use retrain::hub::{Hub, Weights, WeightsRef};
use retrain::job::{Cancellation, Job};
use retrain::load::{LoadOptions, Loaded, load_pretrained, read_input};
use retrain::models::{Arch, ModelSpec, describe, detect, to_vec};
use retrain::modules::{group, named_modules, render};
use retrain::onnx::{Deployment, export_onnx};
use retrain::output::{read_json, write_atomic, write_json, write_safetensors};
use retrain::predict::{Classifier, TopClass};
use retrain::ranges;
use retrain::report::plot_confusion;
use retrain::synth;
use retrain::train::{Existing, RunConfig, resume, train};

use crate::options::{TrainFlags, arch as arch_parser, choice};
use crate::progress::Terminal;

#[derive(Parser, Debug)]
#[command(
    name = "retrain",
    version,
    about = "Transfer learning for image classifiers from PyTorch checkpoints"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List a checkpoint's tensors and recognise its architecture.
    Inspect {
        /// A checkpoint file, or registered weights (`resnet18.IMAGENET1K_V1`).
        #[arg(value_name = "FILE_OR_NAME", required_unless_present = "weights")]
        file: Option<PathBuf>,
        /// The same, as the other commands take it.
        #[arg(long, value_name = "FILE_OR_NAME", conflicts_with = "file")]
        weights: Option<PathBuf>,
        /// Dotted key of a nested state dict (e.g. `state_dict`).
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the registered pretrained weights (what `--weights NAME` accepts).
    Weights {
        /// Only this architecture's.
        #[arg(value_parser = arch_parser())]
        arch: Option<Arch>,
        #[arg(long)]
        json: bool,
    },
    /// Show the network's modules, like PyTorch's `print(net)` / `named_modules()`.
    Modules {
        #[arg(long, value_parser = arch_parser())]
        arch: Option<Arch>,
        #[arg(long, value_parser = ranges::num_classes)]
        num_classes: Option<usize>,
        /// Show what this `--freeze` spec would freeze (as `train` takes it).
        #[arg(long)]
        freeze: Option<String>,
        #[command(flatten)]
        weights: WeightsArgs,
        #[arg(long)]
        json: bool,
    },
    /// Eval-mode forward of an NCHW f32 tensor; writes `logits` and `embedding`.
    Forward {
        #[arg(long, value_parser = arch_parser())]
        arch: Option<Arch>,
        #[command(flatten)]
        weights: WeightsArgs,
        /// A safetensors file with the input batch.
        #[arg(long)]
        input: PathBuf,
        /// Name of the input tensor (default: the only one, or `input`).
        #[arg(long)]
        input_tensor: Option<String>,
        #[arg(long)]
        output: PathBuf,
    },
    /// Classify images (folders are walked) with a trained run or a pretrained checkpoint.
    Predict {
        /// A run folder from `train`: its classes, preprocessing and best weights.
        #[arg(long, conflicts_with = "weights")]
        run: Option<PathBuf>,
        #[arg(long, value_parser = arch_parser())]
        arch: Option<Arch>,
        #[command(flatten)]
        weights: WeightsArgs,
        #[arg(long, default_value_t = 5, value_parser = ranges::at_least_one)]
        top_k: usize,
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Fine-tune on an image folder: head only, partly frozen, full, or from scratch.
    Train(Box<TrainArgs>),
    /// Train several regimes on the same split and draw their curves in one figure.
    Compare(Box<CompareArgs>),
    /// Evaluate a run: top-1/top-5, per-class precision and recall, confusion matrix.
    Eval {
        #[arg(long)]
        run: PathBuf,
        /// Class folders to evaluate on (default: the run's validation split).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value_t = 32, value_parser = ranges::batch_size)]
        batch_size: usize,
        #[arg(long)]
        json: bool,
    },
    /// Export a run or a checkpoint: for PyTorch (`.pth`, `.safetensors`) or for
    /// deployment (`.onnx`); the format follows the extension of `--out`.
    Export(Box<ExportArgs>),
    /// Measure one workload's speed and peak memory (see tools/bench.py for the comparison
    /// with PyTorch).
    Bench(crate::bench::BenchArgs),
    /// Transfer learning end to end on built-in data: pretrain, then compare regimes.
    Demo {
        #[arg(long, default_value = "demo-out")]
        out: PathBuf,
    },
    /// Write a procedural image dataset (class folders of PNGs).
    Synth {
        #[arg(long, value_parser = choice(&synth::Kind::ALL))]
        kind: synth::Kind,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 60, value_parser = synth_per_class)]
        per_class: usize,
        #[arg(long, default_value_t = 64, value_parser = synth_size)]
        size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Args, Debug, Clone)]
struct TrainArgs {
    #[command(flatten)]
    flags: TrainFlags,
    /// Run folder for config, split, metrics and checkpoints.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this folder where it stopped, with its own settings (only
    /// `--epochs` may be given, to extend it).
    #[arg(long, conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Remove the run already in `--out` (its files only) and start over.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Total epochs [default: 10; on resume, the run's own].
    #[arg(long, value_parser = ranges::at_least_one)]
    epochs: Option<usize>,
}

#[derive(Args, Debug, Clone)]
struct ExportArgs {
    /// A run folder from `train`: its best weights, classes and preprocessing.
    #[arg(long, conflicts_with = "weights", required_unless_present = "weights")]
    run: Option<PathBuf>,
    #[arg(long, value_parser = arch_parser(), conflicts_with = "run")]
    arch: Option<Arch>,
    /// A new head with this many outputs (with `--weights`).
    #[arg(long, value_parser = ranges::num_classes, conflicts_with = "run")]
    num_classes: Option<usize>,
    #[command(flatten)]
    weights: WeightsArgs,
    /// The file to write: `.pth` (zip), `.safetensors` or `.onnx`.
    #[arg(long)]
    out: PathBuf,
    /// ONNX only: also output `probabilities`, the softmax of the logits.
    #[arg(long)]
    with_softmax: bool,
    /// ONNX only: the weights in `OUT.data` beside the file (always past 2 GiB).
    #[arg(long)]
    external_data: bool,
    /// ONNX only, with `--weights`: the square input side the file is for (default: the
    /// weights' preprocessing). ViT and Swin graphs hold for that size alone.
    #[arg(long, value_parser = ranges::image_size, conflicts_with = "run")]
    image_size: Option<usize>,
}

#[derive(Args, Debug, Clone)]
struct CompareArgs {
    #[command(flatten)]
    flags: TrainFlags,
    /// Folder for the comparison: one run folder per regime, the figure, the summary.
    #[arg(long)]
    out: PathBuf,
    /// Regimes: head, partial (or partial:SPEC), full, scratch.
    #[arg(long, default_value = "head,partial,full,scratch")]
    regimes: String,
    #[arg(long, default_value_t = 10, value_parser = ranges::at_least_one)]
    epochs: usize,
    /// Train again the regimes whose folders hold runs made with other settings or data.
    #[arg(long)]
    retrain: bool,
}

#[derive(Args, Debug, Clone)]
struct WeightsArgs {
    /// Checkpoint: `.pth` (zip or legacy) or `.safetensors`, or registered weights by name
    /// (`resnet50.IMAGENET1K_V2`, `resnet50` for its default; see `retrain weights`).
    #[arg(long, value_name = "FILE_OR_NAME")]
    weights: Option<PathBuf>,
    /// Dotted key of a nested state dict (found automatically under
    /// `state_dict`, `model_state_dict`, `model`, `net`).
    #[arg(long)]
    key: Option<String>,
    /// Load even when tensors outside the head are missing, unexpected or reshaped.
    #[arg(long)]
    allow_partial: bool,
    /// Also write the load report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    load_report: Option<PathBuf>,
    /// Use weights that hold NaN or infinite values (refused otherwise).
    #[arg(long)]
    allow_non_finite: bool,
}

impl WeightsArgs {
    fn options(&self, arch: Option<Arch>, num_classes: Option<usize>) -> LoadOptions {
        LoadOptions {
            arch,
            num_classes,
            key: self.key.clone(),
            allow_partial: self.allow_partial,
        }
    }

    /// Find and load the weights, print the report to stderr and write it where asked;
    /// also says which registered weights they are, if any.
    fn load(
        &self,
        arch: Option<Arch>,
        num_classes: Option<usize>,
        job: &Job,
    ) -> anyhow::Result<(Loaded, Option<&'static Weights>)> {
        let text = self
            .weights
            .as_deref()
            .context("--weights FILE_OR_NAME is required for this command")?;
        let resolved = WeightsRef::parse(text).resolve(&job.hub, job.observer)?;
        let options = self.options(arch, num_classes);
        let loaded = load_pretrained(&resolved.path, &options, job.device)?;
        eprintln!("{}", loaded.report);
        if let Some(out) = &self.load_report {
            write_atomic(
                out,
                serde_json::to_string_pretty(&loaded.report)?.as_bytes(),
            )?;
        }
        if !self.allow_non_finite {
            loaded.report.refuse_non_finite()?;
        }
        Ok((loaded, resolved.weights))
    }
}

/// The compute device: the GPU when built with `--features wgpu` (unless
/// `RETRAIN_DEVICE=cpu`), else burn-flex on the CPU.
pub fn device() -> Device {
    #[cfg(feature = "wgpu")]
    if std::env::var("RETRAIN_DEVICE").as_deref() != Ok("cpu") {
        return Device::wgpu(burn::prelude::DeviceKind::DefaultDevice);
    }
    Device::flex()
}

/// The parsed command line and clap's matches (which say where each value came from).
pub struct Invocation {
    cli: Cli,
    matches: clap::ArgMatches,
}

/// Parse `std::env::args`; a usage error exits 2 with clap's message.
pub fn parse() -> Invocation {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Invocation { cli, matches }
}

/// A usage error found after parsing, reported like clap's own (exit 2).
fn usage_error(message: String) -> anyhow::Error {
    use clap::CommandFactory;
    Cli::command()
        .error(clap::error::ErrorKind::ArgumentConflict, message)
        .into()
}

fn synth_per_class(text: &str) -> Result<usize, String> {
    ranges::count_within(text, 1..=100_000)
}

fn synth_size(text: &str) -> Result<u32, String> {
    ranges::count_within(text, 8..=1024).map(|n| n as u32)
}

/// The observer and cancellation token of this process: progress on the terminal, and
/// (for commands that train) Ctrl-C asking the job to save and stop.
struct Session {
    terminal: Terminal,
    cancellation: Cancellation,
    device: Device,
}

impl Session {
    /// `trains`: the command checks the cancellation token, so Ctrl-C sets it (a second
    /// Ctrl-C exits at once); other commands keep Ctrl-C's default, which ends the process.
    fn new(trains: bool) -> Self {
        let cancellation = Cancellation::new();
        if trains {
            let on_interrupt = cancellation.clone();
            let _ = ctrlc::set_handler(move || {
                if on_interrupt.is_cancelled() {
                    std::process::exit(130);
                }
                on_interrupt.cancel();
            });
        }
        Self {
            terminal: Terminal::default(),
            cancellation,
            device: device(),
        }
    }

    fn job(&self) -> Job<'_> {
        Job {
            device: &self.device,
            observer: &self.terminal,
            cancellation: self.cancellation.clone(),
            hub: Hub::from_env(),
        }
    }
}

/// Run the parsed command.
pub fn run(invocation: Invocation) -> anyhow::Result<()> {
    let Invocation { cli, matches } = invocation;
    let trains = matches!(
        cli.command,
        Command::Train(_) | Command::Compare(_) | Command::Demo { .. }
    );
    let session = Session::new(trains);
    let job = session.job();
    match cli.command {
        Command::Inspect {
            file,
            weights,
            key,
            json,
        } => {
            let file = file.or(weights).expect("clap requires one");
            inspect(&file, key.as_deref(), json, &job)
        }
        Command::Weights { arch, json } => weights_command(arch, json, &job.hub),
        Command::Modules {
            arch,
            num_classes,
            freeze,
            weights,
            json,
        } => modules(arch, num_classes, freeze.as_deref(), &weights, json, &job),
        Command::Forward {
            arch,
            weights,
            input,
            input_tensor,
            output,
        } => forward(
            arch,
            &weights,
            &input,
            input_tensor.as_deref(),
            &output,
            &job,
        ),
        Command::Predict {
            run,
            arch,
            weights,
            top_k,
            json,
            images,
        } => predict(run.as_deref(), arch, &weights, top_k, json, &images, &job),
        Command::Compare(args) => compare_command(*args, &job),
        Command::Eval {
            run,
            data,
            batch_size,
            json,
        } => eval_command(&run, data.as_deref(), batch_size, json, job.device),
        Command::Export(args) => export_command(&args, &job),
        Command::Demo { out } => crate::demo::demo(&out, &job),
        Command::Bench(args) => crate::bench::command(&args, job.device),
        Command::Train(args) => train_command(*args, &matches, &job),
        Command::Synth {
            kind,
            out,
            per_class,
            size,
            seed,
        } => Ok(synth::write_dataset(&out, kind, per_class, size, seed)?),
    }
}

fn compare_command(args: CompareArgs, job: &Job) -> anyhow::Result<()> {
    let CompareArgs {
        flags,
        out,
        regimes,
        epochs,
        retrain,
    } = args;
    let options = flags.options(epochs);
    // `partial` freezes the lower part of the network the weights hold.
    let detected = match &options.weights {
        Some(text) => {
            let resolved = WeightsRef::parse(text).resolve(&job.hub, job.observer)?;
            detect(&checkpoint::read_layout(
                &resolved.path,
                options.key.as_deref(),
            )?)
        }
        None => None,
    };
    let spec = match (detected, options.arch) {
        (Some(spec), _) => spec,
        (None, Some(arch)) => ModelSpec::new(arch, 1000),
        (None, None) if options.weights.is_some() => {
            anyhow::bail!("cannot tell the architecture from --weights; pass --arch")
        }
        (None, None) => anyhow::bail!("pass --weights (and optionally --arch)"),
    };
    let regimes = parse_regimes(&regimes, &spec.family.default_partial())?;
    let summary = compare(&options, &regimes, &out, retrain, job)?;
    println!("\n{}", summary_markdown(&summary));
    println!("figure: {}", out.join("curves.png").display());
    Ok(())
}

fn eval_command(
    run: &Path,
    data: Option<&Path>,
    batch_size: usize,
    json: bool,
    device: &Device,
) -> anyhow::Result<()> {
    let report = evaluate_run(run, data, batch_size, device)?;
    let config: RunConfig = read_json(&run.join("config.json"))?;
    let figure = run.join("confusion.png");
    plot_confusion(&report.confusion, &config.classes, &figure)?;
    write_json(&run.join("eval.json"), &report)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_eval(&report, &config.classes));
        println!("\nconfusion matrix figure: {}", figure.display());
    }
    Ok(())
}

fn weights_command(arch: Option<Arch>, json: bool, hub: &Hub) -> anyhow::Result<()> {
    let entries = retrain::hub::listing(arch, hub);
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!(
        "{:<42} {:>6}  {:<18} {:<6} file",
        "name", "acc@1", "resize/crop", "cached"
    );
    for e in &entries {
        let p = &e.preprocess;
        let name = if e.default {
            format!("{} (default)", e.name)
        } else {
            e.name.clone()
        };
        println!(
            "{name:<42} {:>6}  {:<18} {:<6} {}",
            e.acc1.map_or("-".into(), |a| format!("{a:.3}")),
            format!("{}/{} {:?}", p.resize_size, p.input_size, p.interpolation).to_lowercase(),
            if e.cached { "yes" } else { "no" },
            e.file
        );
    }
    Ok(())
}

fn export_command(args: &ExportArgs, job: &Job) -> anyhow::Result<()> {
    let (model, deployment) = match &args.run {
        Some(run) => {
            let (model, config) = load_run(run, job.device)?;
            (model, Deployment::of_run(run, &config))
        }
        None => {
            let (loaded, registered) = args.weights.load(args.arch, args.num_classes, job)?;
            let mut config = loaded.spec.pretrained_config(registered);
            if let Some(size) = args.image_size {
                config.preprocess = config.preprocess.for_input_size(size);
            }
            let source = match (registered, &args.weights.weights) {
                (Some(w), _) => w.name(),
                (None, file) => file
                    .as_deref()
                    .map_or(String::new(), |f| f.display().to_string()),
            };
            (
                loaded.model,
                Deployment::of_weights(&loaded.spec, config, source),
            )
        }
    };
    let deployment = Deployment {
        with_softmax: args.with_softmax,
        external_data: args.external_data,
        ..deployment
    };
    let out = &args.out;
    let is_onnx = out.extension().is_some_and(|e| e == "onnx");
    if is_onnx {
        export_onnx(&model, &deployment, out)?;
    } else if args.with_softmax || args.external_data || args.image_size.is_some() {
        return Err(usage_error(
            "--with-softmax, --external-data and --image-size apply to an .onnx --out only".into(),
        ));
    } else {
        export(&model, out)?;
    }
    let classes = model.head().weight.dims()[1];
    let names = if is_onnx {
        "ONNX opset 17"
    } else {
        "PyTorch names"
    };
    println!(
        "wrote {} ({} with {classes} classes, {names})",
        out.display(),
        deployment.architecture,
    );
    Ok(())
}

fn train_command(args: TrainArgs, matches: &clap::ArgMatches, job: &Job) -> anyhow::Result<()> {
    if let Some(dir) = &args.resume {
        let given = matches.subcommand_matches("train").map_or(Vec::new(), |m| {
            m.ids()
                .map(|id| id.as_str())
                .filter(|id| !matches!(*id, "resume" | "epochs"))
                .filter(|id| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
                .map(|id| format!("--{}", id.replace('_', "-")))
                .collect()
        });
        if let Some(flag) = given.first() {
            return Err(usage_error(format!(
                "{flag} cannot be given with --resume: a resumed run keeps the settings in {} (only --epochs may extend it)",
                dir.join("config.json").display()
            )));
        }
        resume(dir, args.epochs, job)?;
        return Ok(());
    }
    let out = args.out.expect("clap requires --out without --resume");
    let options = args.flags.options(args.epochs.unwrap_or(10));
    let existing = if args.overwrite {
        Existing::Replace
    } else {
        Existing::Refuse
    };
    train(&options, &out, existing, job)?;
    Ok(())
}

#[derive(Serialize)]
struct TensorEntry<'a> {
    name: &'a str,
    dtype: &'a str,
    shape: &'a [usize],
}

#[derive(Serialize)]
struct HeadInfo {
    tensors: Vec<String>,
    num_classes: Option<usize>,
}

#[derive(Serialize)]
struct InspectOutput<'a> {
    format: checkpoint::Format,
    tensors: Vec<TensorEntry<'a>>,
    num_params: usize,
    architecture: Option<String>,
    head: Option<HeadInfo>,
}

fn inspect(text: &Path, key: Option<&str>, json: bool, job: &Job) -> anyhow::Result<()> {
    if text.extension().is_some_and(|e| e == "onnx") {
        return inspect_onnx(text, json);
    }
    let resolved = WeightsRef::parse(text).resolve(&job.hub, job.observer)?;
    let file = resolved.path.as_path();
    let sd = checkpoint::read_layout(file, key)?;
    let detected = detect(&sd);
    let out = InspectOutput {
        format: sd.format,
        tensors: sd
            .iter()
            .map(|(name, t)| TensorEntry {
                name,
                dtype: t.dtype,
                shape: &t.shape,
            })
            .collect(),
        num_params: sd.num_params(),
        architecture: detected.as_ref().map(|s| s.arch.to_string()),
        head: detected.as_ref().map(|s| HeadInfo {
            tensors: s.head_tensors().iter().map(|t| t.to_string()).collect(),
            num_classes: Some(s.num_classes),
        }),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{} ({} format)", file.display(), out.format);
    for t in &out.tensors {
        println!("  {:<48} {:<9} {:?}", t.name, t.dtype, t.shape);
    }
    println!(
        "{} tensors, {} parameters",
        out.tensors.len(),
        group(out.num_params)
    );
    match &detected {
        Some(spec) => println!(
            "architecture: {}; head: {} ({} classes)",
            describe(spec),
            spec.head_tensors().join(", "),
            spec.num_classes
        ),
        None => println!("architecture: not recognised"),
    }
    Ok(())
}

/// `inspect` of an `.onnx` file: opset, inputs and outputs, operators, metadata.
fn inspect_onnx(file: &Path, json: bool) -> anyhow::Result<()> {
    let model = retrain::onnx_format::read(file)?;
    let summary = retrain::onnx_format::Summary::of(&model);
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let opsets: Vec<String> = summary
        .opsets
        .iter()
        .map(|(domain, v)| format!("{}{v}", if domain.is_empty() { "" } else { domain }))
        .collect();
    println!(
        "{} (ONNX, IR version {}, opset {}, written by {})",
        file.display(),
        summary.ir_version,
        opsets.join(", "),
        summary.producer
    );
    for (kind, values) in [("input", &summary.inputs), ("output", &summary.outputs)] {
        for v in values {
            println!(
                "  {kind:<7} {:<16} {} [{}]",
                v.name,
                v.elem_type,
                v.shape.join(", ")
            );
        }
    }
    let operators: Vec<String> = summary
        .operators
        .iter()
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    println!("{} nodes: {}", summary.nodes, operators.join(", "));
    println!("{} parameters", group(summary.parameters as usize));
    for (key, value) in &summary.metadata {
        println!("  {key}: {value}");
    }
    Ok(())
}

fn modules(
    arch: Option<Arch>,
    num_classes: Option<usize>,
    freeze: Option<&str>,
    weights: &WeightsArgs,
    json: bool,
    job: &Job,
) -> anyhow::Result<()> {
    let (model, spec) = match &weights.weights {
        Some(_) => {
            let (loaded, _) = weights.load(arch, num_classes, job)?;
            (loaded.model, loaded.spec)
        }
        None => {
            let arch = arch.context("pass --arch (or --weights to detect it)")?;
            let spec = ModelSpec::new(arch, num_classes.unwrap_or(1000));
            (spec.build(job.device), spec)
        }
    };
    let frozen = match freeze {
        Some(spec_text) => retrain::freeze::parse_spec(spec_text, &spec, &model)?,
        None => retrain::freeze::FreezeSet::none(),
    };
    let list = named_modules(&model, spec.torch_class(), &|name| frozen.contains(name));
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", render(&list));
    }
    Ok(())
}

fn forward(
    arch: Option<Arch>,
    weights: &WeightsArgs,
    input: &Path,
    input_tensor: Option<&str>,
    output: &Path,
    job: &Job,
) -> anyhow::Result<()> {
    let model = weights.load(arch, None, job)?.0.model.for_inference();
    let (data, dims) = read_input(input, input_tensor)?;
    let x = Tensor::<4>::from_data(TensorData::new(data, dims), job.device);
    let embedding = model.embed(x);
    let logits = model.forward_head(embedding.clone());
    let to_entry = |name: &str, t: Tensor<2>| -> anyhow::Result<(String, Vec<usize>, Vec<f32>)> {
        let shape = t.dims().to_vec();
        Ok((name.to_string(), shape, to_vec(t)?))
    };
    write_safetensors(
        output,
        &[
            to_entry("logits", logits)?,
            to_entry("embedding", embedding)?,
        ],
    )?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

/// One image's line of `predict --json`.
#[derive(Serialize)]
struct PredictionJson<'a> {
    image: String,
    top: &'a [TopClass],
}

fn predict(
    run: Option<&Path>,
    arch: Option<Arch>,
    weights: &WeightsArgs,
    top_k: usize,
    json: bool,
    images: &[PathBuf],
    job: &Job,
) -> anyhow::Result<()> {
    let classifier = match run {
        Some(run) => Classifier::from_run(run, job.device)?,
        None => {
            let (loaded, registered) = weights.load(arch, None, job)?;
            let config = loaded.spec.pretrained_config(registered);
            Classifier::new(&loaded.model, config, job.device)
        }
    };
    let (paths, warnings) = expand_images(images)?;
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    // A file that cannot be read is reported and the others are still classified.
    let predictions = classifier.classify(&paths, top_k)?;
    let mut classified = Vec::new();
    for p in &predictions {
        if let Some(w) = &p.warning {
            eprintln!("warning: {w}");
        }
        match &p.top {
            Ok(top) => classified.push(PredictionJson {
                image: p.image.display().to_string(),
                top,
            }),
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&classified)?);
    } else {
        for p in &classified {
            println!("{}", p.image);
            for t in p.top {
                println!("  {:>6.2}%  {} ({})", t.prob * 100.0, t.label, t.index);
            }
        }
    }
    let failed = predictions.len() - classified.len();
    if failed > 0 {
        anyhow::bail!("{failed} of {} image(s) could not be read", paths.len());
    }
    Ok(())
}
