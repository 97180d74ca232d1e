//! `retrain compare`: train several freezing regimes on the same split, seed and budget,
//! draw their curves in one figure and summarise what transfer learning bought.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::data::{Split, first_ten};
use crate::error::{Result, bail};
use crate::hub::WeightsRef;
use crate::job::Job;
use crate::output::{read_json, write_atomic, write_json};
use crate::report::{Curves, plot_curves, regime_color};
use crate::train::{
    EpochMetrics, Existing, RunConfig, RunSummary, TrainOptions, holds_run, resume, train_on_split,
};

/// One regime of a comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regime {
    /// `head`, `partial`, `full` or `scratch`.
    pub name: String,
    /// Freeze spec it trains with.
    pub freeze: String,
    /// Train from random initialisation instead of the pretrained weights.
    pub scratch: bool,
}

/// Parse `--regimes head,partial,full,scratch` (`partial:SPEC` sets the partial spec;
/// plain `partial` freezes `default_partial`, the family's, see
/// [`crate::models::Variant::default_partial`]).
pub fn parse_regimes(list: &str, default_partial: &str) -> Result<Vec<Regime>> {
    let mut out = Vec::new();
    // A `partial:SPEC` may itself contain commas (`partial:conv1,bn1`); items that are not a
    // regime name continue the spec before them.
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let regime = match item {
            "head" => Regime {
                name: "head".into(),
                freeze: "backbone".into(),
                scratch: false,
            },
            "full" => Regime {
                name: "full".into(),
                freeze: "none".into(),
                scratch: false,
            },
            "scratch" => Regime {
                name: "scratch".into(),
                freeze: "none".into(),
                scratch: true,
            },
            "partial" => Regime {
                name: "partial".into(),
                freeze: default_partial.into(),
                scratch: false,
            },
            other if other.starts_with("partial:") => Regime {
                name: "partial".into(),
                freeze: other["partial:".len()..].to_string(),
                scratch: false,
            },
            other => match out.last_mut() {
                Some(Regime { name, freeze, .. })
                    if name == "partial" && freeze != default_partial =>
                {
                    freeze.push(',');
                    freeze.push_str(other);
                    continue;
                }
                _ => bail!(
                    "--regimes: unknown regime '{other}' (head, partial[:SPEC], full, scratch)"
                ),
            },
        };
        if out.iter().any(|r: &Regime| r.name == regime.name) {
            bail!("--regimes: '{}' given twice", regime.name);
        }
        out.push(regime);
    }
    if out.is_empty() {
        bail!("--regimes is empty");
    }
    Ok(out)
}

/// One row of the summary table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegimeResult {
    /// Regime name (`head`, `partial`, `full`, `scratch`).
    pub regime: String,
    /// Freeze spec it trained with.
    pub freeze: String,
    /// Best validation top-1 over its epochs, as a fraction.
    pub best_top1: f64,
    /// Epoch (1-based) of that best.
    pub best_epoch: usize,
    /// First epoch at which validation top-1 reached 95% of the best regime's best.
    pub epochs_to_95: Option<usize>,
    /// Parameters the optimiser updated.
    pub trainable_params: usize,
    /// Wall-clock seconds of training, setup included (a resume counts only itself).
    pub wall_seconds: f64,
    /// Training images per second, averaged over epochs.
    pub train_images_per_second: f64,
    /// Peak resident memory of the process while it trained, in MiB.
    pub peak_memory_mib: f64,
    /// Whether every frozen tensor came out of training unchanged.
    pub freeze_audit_passed: bool,
}

/// `summary.json` of a comparison: what was compared, one row per regime, and the verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComparisonSummary {
    /// Architecture name, as in the runs' summaries.
    pub architecture: String,
    /// Name of the data folder.
    pub dataset: String,
    /// Epochs every regime trained for.
    pub epochs: usize,
    /// One row per regime, in the order given.
    pub regimes: Vec<RegimeResult>,
    /// What the numbers support, in one sentence ([`conclusion()`]).
    pub conclusion: String,
}

/// Reset this process's peak-RSS counter so each regime reports its own peak (Linux).
fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Train every regime into `out/REGIME/`, reusing those already trained with the same
/// settings, data and weights, then write `curves.png`, `curves.svg`, `summary.md` and
/// `summary.json` in `out`. A regime trained otherwise is an error unless `retrain`.
pub fn compare(
    base: &TrainOptions,
    regimes: &[Regime],
    out: &Path,
    retrain: bool,
    job: &Job,
) -> Result<ComparisonSummary> {
    base.validate()?;
    let data = base.data.as_deref().context("--data DIR is required")?;
    // One split for every regime, made from the data as it is now.
    let split = Split::make(data, base.val_fraction, base.seed)?;
    let split_path = out.join("split.json");
    if split_path.exists() && !retrain {
        let old = read_json::<Split>(&split_path)?.check(&split_path)?;
        let changes = old.differences(&split);
        if !changes.is_empty() {
            bail!(
                "{}: the data is not what this comparison was trained on ({}); pass --retrain to train every regime again, or use a new --out",
                split_path.display(),
                first_ten(&changes)
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    write_json(&split_path, &split)?;
    let weights_sha256 = match &base.weights {
        Some(text) => {
            let resolved = WeightsRef::parse(text).resolve(&job.hub, job.observer)?;
            Some(resolved.sha256()?)
        }
        None => None,
    };
    let mut runs: Vec<(Regime, RunSummary, Vec<EpochMetrics>)> = Vec::new();
    let mut arch = base.arch;
    for regime in regimes {
        let dir = out.join(&regime.name);
        let mut options = base.clone();
        options.freeze = regime.freeze.clone();
        options.scratch = regime.scratch;
        if regime.scratch {
            options.weights = None;
            // Scratch builds the same network the checkpoint holds.
            options.arch = arch;
            if options.width.is_none() {
                options.width =
                    read_json::<RunConfig>(&out.join(&regimes[0].name).join("config.json"))
                        .ok()
                        .and_then(|c| c.model.width());
            }
        }
        let fingerprint = Fingerprint {
            options: &options,
            split: &split,
            weights_sha256: if regime.scratch {
                None
            } else {
                weights_sha256.clone()
            },
        };
        let summary = match reuse(&dir, &fingerprint)? {
            Reuse::Done(summary) => {
                job.observer
                    .line(&format!("== {}: already trained, skipping", regime.name));
                *summary
            }
            Reuse::Extend => {
                job.observer.line(&format!(
                    "== {}: resuming to {} epochs",
                    regime.name, options.epochs
                ));
                reset_peak_memory();
                resume(&dir, Some(options.epochs), job)?
            }
            Reuse::Stale(changes) if !retrain => bail!(
                "{}: trained with other settings ({}); pass --retrain to train it again, or use a new --out",
                dir.display(),
                first_ten(&changes)
            ),
            Reuse::Fresh | Reuse::Unfinished | Reuse::Stale(_) => {
                job.observer.line(&format!(
                    "== {} (freeze {}{})",
                    regime.name,
                    regime.freeze,
                    if regime.scratch { ", from scratch" } else { "" }
                ));
                reset_peak_memory();
                // What is in the folder goes once the new run is checked.
                train_on_split(&options, &dir, split.clone(), Existing::Replace, job)?
            }
        };
        let config: RunConfig = read_json(&dir.join("config.json"))?;
        arch.get_or_insert(config.model.arch);
        let history = read_history(&dir)?;
        runs.push((regime.clone(), summary, history));
    }

    let arch_name = runs
        .first()
        .map(|(_, s, _)| s.architecture.clone())
        .unwrap_or_default();
    let dataset = data
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| data.display().to_string());
    let best_overall = runs.iter().map(|(_, s, _)| s.best_top1).fold(0.0, f64::max);
    let regimes_out: Vec<RegimeResult> = runs
        .iter()
        .map(|(r, s, h)| RegimeResult {
            regime: r.name.clone(),
            freeze: r.freeze.clone(),
            best_top1: s.best_top1,
            best_epoch: s.best_epoch,
            epochs_to_95: h
                .iter()
                .find(|m| m.val_top1 >= 0.95 * best_overall)
                .map(|m| m.epoch),
            trainable_params: s.trainable_params,
            wall_seconds: s.wall_seconds,
            train_images_per_second: s.train_images_per_second,
            peak_memory_mib: s.peak_memory_mib,
            freeze_audit_passed: s.freeze_audit_passed,
        })
        .collect();
    let summary = ComparisonSummary {
        conclusion: conclusion(&regimes_out, base.epochs),
        architecture: arch_name.clone(),
        dataset: dataset.clone(),
        epochs: base.epochs,
        regimes: regimes_out,
    };

    let curves: Vec<Curves> = runs
        .iter()
        .map(|(r, _, h)| Curves {
            label: &r.name,
            color: regime_color(&r.name),
            history: h,
        })
        .collect();
    let title = format!("{arch_name} on {dataset}: frozen features vs fine-tuning vs scratch");
    plot_curves(
        &curves,
        &title,
        &out.join("curves.png"),
        &out.join("curves.svg"),
    )?;
    write_json(&out.join("summary.json"), &summary)?;
    write_atomic(
        &out.join("summary.md"),
        summary_markdown(&summary).as_bytes(),
    )?;
    Ok(summary)
}

/// What a regime is to be trained with: every option, the split and the checkpoint's hash.
struct Fingerprint<'a> {
    options: &'a TrainOptions,
    split: &'a Split,
    weights_sha256: Option<String>,
}

/// What to do with a regime's folder.
enum Reuse {
    /// Nothing there: train.
    Fresh,
    /// Finished with the same fingerprint and epochs: use it.
    Done(Box<RunSummary>),
    /// The same fingerprint, fewer epochs: resume to the new total.
    Extend,
    /// Started but without a finished epoch: nothing to keep, train again.
    Unfinished,
    /// Made with other settings, data or weights: these.
    Stale(Vec<String>),
}

fn reuse(dir: &Path, wanted: &Fingerprint) -> anyhow::Result<Reuse> {
    if !holds_run(dir) {
        return Ok(Reuse::Fresh);
    }
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Ok(Reuse::Unfinished);
    }
    let config: RunConfig = read_json(&config_path)?;
    let mut changes = option_changes(&config.options, wanted.options)?;
    if config.weights_sha256 != wanted.weights_sha256 {
        changes.push("the checkpoint's content".into());
    }
    let split_path = dir.join("split.json");
    let split = read_json::<Split>(&split_path)?.check(&split_path)?;
    changes.extend(split.differences(wanted.split));
    if !changes.is_empty() {
        return Ok(Reuse::Stale(changes));
    }
    let epochs = wanted.options.epochs;
    match read_json::<RunSummary>(&dir.join("summary.json")) {
        Ok(s) if s.epochs == epochs => Ok(Reuse::Done(Box::new(s))),
        Ok(s) if s.epochs > epochs => Ok(Reuse::Stale(vec![format!(
            "trained for {} epochs, not {epochs}",
            s.epochs
        )])),
        _ if dir.join("last/state.json").exists() || dir.join("last.old/state.json").exists() => {
            Ok(Reuse::Extend)
        }
        _ => Ok(Reuse::Unfinished),
    }
}

/// The options that differ, as `--flag old -> new`; epochs (which may grow) and the paths
/// of data and weights (whose content the fingerprint compares) are left out.
fn option_changes(old: &TrainOptions, new: &TrainOptions) -> anyhow::Result<Vec<String>> {
    let (serde_json::Value::Object(old), serde_json::Value::Object(new)) =
        (serde_json::to_value(old)?, serde_json::to_value(new)?)
    else {
        bail!("options are not a JSON object");
    };
    Ok(new
        .iter()
        .filter(|(key, _)| !matches!(key.as_str(), "epochs" | "data" | "weights"))
        .filter(|(key, value)| old.get(*key) != Some(value))
        .map(|(key, value)| {
            let before = old.get(key).map_or("absent".to_string(), |v| v.to_string());
            format!("--{} {before} -> {value}", key.replace('_', "-"))
        })
        .collect())
}

fn read_history(run: &Path) -> anyhow::Result<Vec<EpochMetrics>> {
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("{}: bad line", path.display())))
        .collect()
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// One sentence that says what the numbers support, and no more.
pub fn conclusion(results: &[RegimeResult], epochs: usize) -> String {
    let Some(best) = results
        .iter()
        .max_by(|a, b| a.best_top1.total_cmp(&b.best_top1))
    else {
        return String::new();
    };
    let scratch = results.iter().find(|r| r.regime == "scratch");
    let pretrained = results
        .iter()
        .filter(|r| r.regime != "scratch")
        .max_by(|a, b| a.best_top1.total_cmp(&b.best_top1));
    match (pretrained, scratch) {
        (Some(p), Some(s)) if p.best_top1 - s.best_top1 >= 0.05 => format!(
            "With {epochs} epochs, starting from the pretrained weights beat training from scratch: {} reached {} validation top-1 against {} from scratch.",
            p.regime,
            pct(p.best_top1),
            pct(s.best_top1)
        ),
        (Some(p), Some(s)) if s.best_top1 - p.best_top1 >= 0.05 => format!(
            "With {epochs} epochs, training from scratch did better than any pretrained regime ({} against {} for {}): the pretrained features did not transfer to this data.",
            pct(s.best_top1),
            pct(p.best_top1),
            p.regime
        ),
        (Some(p), Some(s)) => format!(
            "With {epochs} epochs, the pretrained regimes and training from scratch ended within 5 points ({} for {} against {} from scratch), so this run does not show a clear benefit of transfer.",
            pct(p.best_top1),
            p.regime,
            pct(s.best_top1)
        ),
        _ => format!(
            "With {epochs} epochs, {} did best with {} validation top-1.",
            best.regime,
            pct(best.best_top1)
        ),
    }
}

/// `summary.md`: the table of regimes, the conclusion and the curves.
pub fn summary_markdown(s: &ComparisonSummary) -> String {
    let mut md = format!(
        "# {} on {}: {} epochs per regime\n\n| regime | freeze | best val top-1 | at epoch | epochs to 95% of best | trainable params | wall time | train img/s | peak memory | freeze audit |\n|---|---|---|---|---|---|---|---|---|---|\n",
        s.architecture, s.dataset, s.epochs
    );
    for r in &s.regimes {
        md.push_str(&format!(
            "| {} | `{}` | {} | {} | {} | {} | {:.1} s | {:.1} | {:.0} MiB | {} |\n",
            r.regime,
            r.freeze,
            pct(r.best_top1),
            r.best_epoch,
            r.epochs_to_95
                .map_or("not reached".to_string(), |e| e.to_string()),
            crate::modules::group(r.trainable_params),
            r.wall_seconds,
            r.train_images_per_second,
            r.peak_memory_mib,
            if r.freeze_audit_passed {
                "passed"
            } else {
                "FAILED"
            }
        ));
    }
    md.push_str(&format!("\n{}\n\n![curves](curves.png)\n", s.conclusion));
    md
}
