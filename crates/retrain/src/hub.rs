//! Pretrained weights by name (`resnet50.IMAGENET1K_V2`, or `resnet50` for torchvision's
//! `DEFAULT`): each family registers its weights ([`Weights`]), and a [`Hub`] finds their
//! files: retrain's cache first, then torch.hub's (files a user already downloaded with
//! torchvision are used where they are), else a download over HTTPS to a temporary file
//! that is verified, then renamed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use crate::error::HubError;
use crate::models::Arch;
pub use crate::models::weights::{Weights, torchvision};
use crate::preprocess::Preprocess;
use crate::progress::Observer;

/// Every registered weight, architecture by architecture.
pub fn registered() -> Vec<&'static Weights> {
    Arch::all().into_iter().flat_map(|a| a.weights()).collect()
}

/// The registered weights called `name`: `ARCH.TAG`, or a bare `ARCH` for its `DEFAULT`.
pub fn find(name: &str) -> Option<&'static Weights> {
    let (arch, tag) = name.split_once('.').unwrap_or((name, ""));
    let weights = Arch::named(arch)?.weights();
    match tag {
        "" | "DEFAULT" => weights.iter().find(|w| w.is_default).or(weights.first()),
        tag => weights.iter().find(|w| w.tag == tag),
    }
}

/// One line of `retrain weights`: registered weights and whether a cache holds them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WeightsEntry {
    /// `ARCH.TAG`.
    pub name: String,
    /// The architecture.
    pub arch: &'static str,
    /// Where the file is published.
    pub url: &'static str,
    /// The cached file's name.
    pub file: &'static str,
    /// SHA-256 of the file at `url` (full, or the published 8-digit prefix).
    pub sha256: &'static str,
    /// Outputs of the head.
    pub num_classes: usize,
    /// Published ImageNet-1K top-1, percent.
    pub acc1: Option<f64>,
    /// Is it the architecture's `DEFAULT`?
    pub default: bool,
    /// Input preparation.
    pub preprocess: Preprocess,
    /// Does retrain's or torch.hub's cache hold the file?
    pub cached: bool,
}

/// The registered weights (of `arch` only, if given), with their cache state in `hub`.
pub fn listing(arch: Option<Arch>, hub: &Hub) -> Vec<WeightsEntry> {
    registered()
        .into_iter()
        .filter(|w| arch.is_none_or(|a| a.name() == w.arch))
        .map(|w| WeightsEntry {
            name: w.name(),
            arch: w.arch,
            url: w.url,
            file: w.file_name(),
            sha256: w.sha256,
            num_classes: w.num_classes,
            acc1: w.acc1,
            default: w.is_default,
            preprocess: w.preprocess.clone(),
            cached: hub.cached(w).is_some(),
        })
        .collect()
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The Hugging Face Hub, unless `HF_ENDPOINT` says otherwise.
const HF_ENDPOINT: &str = "https://huggingface.co";

/// A safe part of a Hugging Face repository id or commit: no separators, no `..`.
fn is_repo_part(part: &str) -> bool {
    !part.is_empty()
        && !part.starts_with('.')
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The largest weights file a download accepts (ViT-H/14 is 2.5 GB).
const MAX_DOWNLOAD_BYTES: u64 = 8 << 30;

/// Where weights are looked for and fetched from.
#[derive(Debug, Clone, PartialEq)]
pub struct Hub {
    /// retrain's checkpoint cache, where downloads go.
    pub cache: PathBuf,
    /// torch.hub's checkpoint cache, reused in place.
    pub torch_cache: Option<PathBuf>,
    /// Never touch the network.
    pub offline: bool,
    /// Fetch from this base URL instead of each weight's own host (a mirror; tests use a
    /// server on 127.0.0.1): the file name is appended to it.
    pub mirror: Option<String>,
    /// The Hugging Face Hub for `hf-hub:` names (`$HF_ENDPOINT`).
    pub hf_endpoint: String,
    /// The Hugging Face cache (`$HF_HOME/hub`), reused in place.
    pub hf_cache: Option<PathBuf>,
}

impl Hub {
    /// The caches and settings of the environment: `$RETRAIN_HOME` (default
    /// `$XDG_CACHE_HOME/retrain`, else `~/.cache/retrain`), torch.hub's
    /// `$TORCH_HOME/hub/checkpoints` (default `~/.cache/torch`), `RETRAIN_OFFLINE=1` (or
    /// `HF_HUB_OFFLINE=1`), `RETRAIN_WEIGHTS_MIRROR`, and for `hf-hub:` names `HF_ENDPOINT`
    /// and `HF_HOME` (default `~/.cache/huggingface`).
    pub fn from_env() -> Hub {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let cache_home = var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")));
        let home = var("RETRAIN_HOME")
            .map(PathBuf::from)
            .or_else(|| cache_home.as_ref().map(|c| c.join("retrain")))
            .unwrap_or_else(|| PathBuf::from(".retrain"));
        let torch_home = var("TORCH_HOME")
            .map(PathBuf::from)
            .or_else(|| cache_home.as_ref().map(|c| c.join("torch")));
        let hf_home = var("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| cache_home.map(|c| c.join("huggingface")));
        let set = |name: &str| var(name).is_some_and(|v| v != "0");
        Hub {
            cache: home.join("checkpoints"),
            torch_cache: torch_home.map(|t| t.join("hub").join("checkpoints")),
            offline: set("RETRAIN_OFFLINE") || set("HF_HUB_OFFLINE"),
            mirror: var("RETRAIN_WEIGHTS_MIRROR").map(|v| v.to_string_lossy().into_owned()),
            hf_endpoint: var("HF_ENDPOINT")
                .map_or(HF_ENDPOINT.into(), |v| v.to_string_lossy().into_owned()),
            hf_cache: hf_home.map(|h| h.join("hub")),
        }
    }

    /// A hub that caches in `cache` and knows no torch.hub cache.
    pub fn in_dir(cache: impl Into<PathBuf>) -> Hub {
        Hub {
            cache: cache.into(),
            torch_cache: None,
            offline: false,
            mirror: None,
            hf_endpoint: HF_ENDPOINT.into(),
            hf_cache: None,
        }
    }

    /// The `model.safetensors` of the Hugging Face repository `repo` (`timm/resnet50.tv_in1k`):
    /// from the Hugging Face cache (`refs/main`'s snapshot), retrain's cache, or a
    /// download checked against the SHA-256 the Hub publishes.
    pub fn fetch_hf(&self, repo: &str, observer: &dyn Observer) -> Result<PathBuf, HubError> {
        let (org, name) = repo
            .split_once('/')
            .filter(|(o, n)| is_repo_part(o) && is_repo_part(n))
            .ok_or_else(|| HubError::BadName(format!("hf-hub:{repo}")))?;
        let file = "model.safetensors";
        if let Some(hf) = &self.hf_cache {
            let dir = hf.join(format!("models--{org}--{name}"));
            if let Ok(commit) = std::fs::read_to_string(dir.join("refs/main")) {
                let snapshot = dir.join("snapshots").join(commit.trim()).join(file);
                if is_repo_part(commit.trim()) && snapshot.is_file() {
                    return Ok(snapshot);
                }
            }
        }
        let ours = self
            .cache
            .join("hf")
            .join(format!("{org}--{name}"))
            .join(file);
        if ours.is_file() {
            return Ok(ours);
        }
        if self.offline {
            return Err(HubError::Offline {
                name: format!("hf-hub:{repo}"),
                file: file.into(),
                url: self.hf_url(repo),
                dir: ours.parent().expect("a folder").to_path_buf(),
            });
        }
        let source = Source {
            url: self.hf_url(repo),
            sha256: None,
            member: None,
        };
        self.download(&source, &ours, observer)?;
        Ok(ours)
    }

    fn hf_url(&self, repo: &str) -> String {
        let endpoint = self.hf_endpoint.trim_end_matches('/');
        format!("{endpoint}/{repo}/resolve/main/model.safetensors")
    }

    /// Is the weights' file already in a cache (whatever its contents)?
    pub fn cached(&self, weights: &Weights) -> Option<PathBuf> {
        let file = weights.file_name();
        std::iter::once(&self.cache)
            .chain(&self.torch_cache)
            .map(|dir| dir.join(file))
            .find(|p| p.is_file())
    }

    /// The path of the weights' file, verified, downloading it if no cache has it.
    pub fn fetch(&self, weights: &Weights, observer: &dyn Observer) -> Result<PathBuf, HubError> {
        self.fetch_verified(weights, observer).map(|(path, _)| path)
    }

    /// [`Hub::fetch`], with the file's full SHA-256 that the check computed.
    fn fetch_verified(
        &self,
        weights: &Weights,
        observer: &dyn Observer,
    ) -> Result<(PathBuf, String), HubError> {
        let file = weights.file_name();
        let expected = weights.file_sha256();
        let ours = self.cache.join(file);
        if ours.is_file() {
            let sha = verify(&ours, expected, "; delete it to download it again")?;
            return Ok((ours, sha));
        }
        if let Some(theirs) = self.torch_cache.as_ref().map(|d| d.join(file))
            && theirs.is_file()
        {
            let advice = " (left where it is, in torch.hub's cache)";
            let sha = verify(&theirs, expected, advice)?;
            return Ok((theirs, sha));
        }
        if self.offline {
            return Err(HubError::Offline {
                name: weights.name(),
                file: file.to_string(),
                url: weights.url.to_string(),
                dir: self.cache.clone(),
            });
        }
        let source = Source {
            url: self.url(weights),
            sha256: Some(weights.sha256),
            member: weights.member,
        };
        let sha = self.download(&source, &ours, observer)?;
        Ok((ours, sha))
    }

    fn url(&self, weights: &Weights) -> String {
        match &self.mirror {
            Some(base) => {
                let name = weights.url.rsplit('/').next().unwrap_or(weights.url);
                format!("{}/{name}", base.trim_end_matches('/'))
            }
            None => weights.url.to_string(),
        }
    }

    /// Download into a temporary file beside `target`, check it, then rename it; returns
    /// the SHA-256 of what was saved.
    fn download(
        &self,
        source: &Source,
        target: &Path,
        observer: &dyn Observer,
    ) -> Result<String, HubError> {
        let dir = target.parent().unwrap_or(&self.cache);
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let url = source.url.clone();
        let failed = |message: String| HubError::Download {
            url: url.clone(),
            message,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .build()
            .into();
        let mut response = agent.get(&url).call().map_err(|e| failed(e.to_string()))?;
        let total = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        // The Hugging Face Hub publishes an LFS file's SHA-256 as its ETag.
        let etag = ["x-linked-etag", "etag"]
            .iter()
            .find_map(|h| response.headers().get(*h)?.to_str().ok())
            .map(|v| {
                v.trim_start_matches("W/")
                    .trim_matches('"')
                    .to_ascii_lowercase()
            })
            .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()));
        let expected = source.sha256.map(str::to_string).or(etag);
        let mut body = response
            .body_mut()
            .with_config()
            .limit(MAX_DOWNLOAD_BYTES)
            .reader();
        let mut tmp = crate::output::temporary_beside(target).map_err(io_error(target))?;
        observer.task_started(
            &format!(
                "downloading {}",
                target.file_name().unwrap_or_default().to_string_lossy()
            ),
            total.unwrap_or(0),
        );
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let copied = loop {
            let n = match body.read(&mut buffer) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(failed(e.to_string())),
            };
            hasher.update(&buffer[..n]);
            if let Err(e) = tmp.write_all(&buffer[..n]) {
                break Err(io_error(target)(e));
            }
            observer.task_advanced(n as u64, "");
        };
        observer.task_finished();
        copied?;
        let actual = format!("{:x}", hasher.finalize());
        match &expected {
            Some(expected) => check_digest(&url, &actual, expected)?,
            None => observer.warning(&format!(
                "{url}: no digest is published, so the download is not verified (SHA-256 {actual})"
            )),
        }
        let (bytes_file, saved_sha) = match source.member {
            Some((member, sha)) => extract_member(tmp.path(), member, sha, target)?,
            None => (tmp, actual),
        };
        bytes_file.as_file().sync_all().map_err(io_error(target))?;
        bytes_file
            .persist(target)
            .map_err(|e| io_error(target)(e.error))?;
        Ok(saved_sha)
    }
}

/// What to download: the URL, its digest (taken from the response's ETag when `None`)
/// and the archive member to keep, if any.
struct Source {
    url: String,
    sha256: Option<&'static str>,
    member: Option<(&'static str, &'static str)>,
}

/// The archive member `member` of the zip at `archive`, checked, in a temporary file
/// beside `target`, with its SHA-256.
fn extract_member(
    archive: &Path,
    member: &str,
    sha256: &str,
    target: &Path,
) -> Result<(tempfile::NamedTempFile, String), HubError> {
    let bad = |message: String| HubError::Download {
        url: archive.display().to_string(),
        message,
    };
    let file = std::fs::File::open(archive).map_err(io_error(archive))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| bad(format!("{member}: {e}")))?;
    let mut out = crate::output::temporary_beside(target).map_err(io_error(target))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buffer).map_err(|e| bad(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n]).map_err(io_error(target))?;
    }
    let actual = format!("{:x}", hasher.finalize());
    check_digest(member, &actual, sha256)?;
    Ok((out, actual))
}

fn check_digest(what: &str, actual: &str, expected: &str) -> Result<(), HubError> {
    if actual.starts_with(&expected.to_ascii_lowercase()) {
        Ok(())
    } else {
        Err(HubError::Mismatch {
            file: PathBuf::from(what),
            expected: expected.to_string(),
            actual: actual.to_string(),
            advice: "; nothing was saved",
        })
    }
}

/// Check a cached file against its registered digest; returns its full SHA-256.
fn verify(path: &Path, expected: &str, advice: &'static str) -> Result<String, HubError> {
    let actual = sha256_of(path)?;
    if actual.starts_with(&expected.to_ascii_lowercase()) {
        return Ok(actual);
    }
    Err(HubError::Mismatch {
        file: path.to_path_buf(),
        expected: expected.to_string(),
        actual,
        advice,
    })
}

/// The SHA-256 of a file, in hex, read in blocks.
pub fn sha256_of(path: &Path) -> Result<String, HubError> {
    let mut file = std::fs::File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_error(path))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// What `--weights` names: a file, or registered weights.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsRef {
    /// A checkpoint file.
    File(PathBuf),
    /// Registered weights, fetched through a [`Hub`].
    Registered(&'static Weights),
    /// timm weights on the Hugging Face Hub: `hf-hub:timm/resnet50.tv_in1k`.
    HuggingFace(String),
}

impl WeightsRef {
    /// Read `--weights TEXT`: a path that exists is a path; otherwise `hf-hub:ORG/NAME`
    /// or a registered name (`ARCH.TAG` or `ARCH`); anything else is taken as a path (and
    /// fails as one).
    pub fn parse(text: &Path) -> WeightsRef {
        if text.exists() {
            return WeightsRef::File(text.to_path_buf());
        }
        if let Some(repo) = text.to_str().and_then(|t| t.strip_prefix("hf-hub:")) {
            return WeightsRef::HuggingFace(repo.to_string());
        }
        match text.to_str().and_then(find) {
            Some(weights) => WeightsRef::Registered(weights),
            None => WeightsRef::File(text.to_path_buf()),
        }
    }

    /// The checkpoint file (fetched if need be) and the registered weights it holds:
    /// those named, or those whose file name it has.
    pub fn resolve(&self, hub: &Hub, observer: &dyn Observer) -> Result<Resolved, HubError> {
        match self {
            WeightsRef::Registered(w) => {
                let (path, sha256) = hub.fetch_verified(w, observer)?;
                Ok(Resolved {
                    path,
                    weights: Some(*w),
                    sha256: Some(sha256),
                })
            }
            WeightsRef::HuggingFace(repo) => Ok(Resolved {
                path: hub.fetch_hf(repo, observer)?,
                weights: None,
                sha256: None,
            }),
            WeightsRef::File(path) => {
                let name = path.file_name().and_then(|n| n.to_str());
                Ok(Resolved {
                    path: path.clone(),
                    weights: registered()
                        .into_iter()
                        .find(|w| Some(w.file_name()) == name),
                    sha256: None,
                })
            }
        }
    }
}

/// A checkpoint file that `--weights` resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The file.
    pub path: PathBuf,
    /// The registered weights it holds, if known.
    pub weights: Option<&'static Weights>,
    /// Its SHA-256, where resolving already computed it.
    sha256: Option<String>,
}

impl Resolved {
    /// The file's SHA-256 (computed once: verifying registered weights already did).
    pub fn sha256(&self) -> Result<String, HubError> {
        match &self.sha256 {
            Some(sha) => Ok(sha.clone()),
            None => sha256_of(&self.path),
        }
    }
}
