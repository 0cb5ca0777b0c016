//! The user's own CSV and JSON Lines files, malformed rows, and loaders
//! pointed at a folder without assets.

use std::fs;
use std::path::PathBuf;

use fedsvd_data::{DatasetName, Error, OnMalformed, TableSpec, load, load_csv, load_jsonl};
use tempfile::TempDir;

fn spec(path: PathBuf, pair: bool, on_malformed: OnMalformed) -> TableSpec {
    TableSpec {
        path,
        text_column: "sentence".into(),
        pair_column: pair.then(|| "question".into()),
        label_column: "label".into(),
        on_malformed,
    }
}

#[test]
fn csv_with_named_columns_and_string_labels() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("d.csv");
    fs::write(
        &path,
        "id,label,sentence,question\n1,pos,\"good, really\",q1\n2,neg,bad,q2\n3,pos,\"multi\nline\",q3\n",
    )
    .unwrap();
    let d = load_csv(&spec(path, true, OnMalformed::Error)).unwrap();
    assert_eq!(d.label_names, ["neg", "pos"]);
    assert_eq!(d.labels(), [1, 0, 1]);
    assert_eq!(d.examples[0].text, "good, really");
    assert_eq!(d.examples[2].text, "multi\nline");
    assert_eq!(d.examples[1].text_pair.as_deref(), Some("q2"));
    assert!(d.report.is_clean());
}

#[test]
fn csv_malformed_rows_name_file_and_line_or_are_reported() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("bad.csv");
    // Line 3 has an empty text, line 4 lacks the label field.
    fs::write(&path, "sentence,label\nfine,1\n,0\nshort\nok,0\n").unwrap();
    let err = load_csv(&spec(path.clone(), false, OnMalformed::Error)).unwrap_err();
    match &err {
        Error::Malformed { path: p, line, .. } => {
            assert_eq!(p, &path);
            assert_eq!(*line, 3);
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("bad.csv:3"), "{err}");

    let d = load_csv(&spec(path.clone(), false, OnMalformed::Skip)).unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d.label_names, ["0", "1"]);
    assert_eq!(d.labels(), [1, 0]);
    let lines: Vec<Option<u64>> = d.report.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, [Some(3), Some(4)]);
    assert!(d.report.skipped.iter().all(|s| s.path == path));
}

#[test]
fn csv_missing_column_is_an_error() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("d.csv");
    fs::write(&path, "text,label\na,1\n").unwrap();
    let err = load_csv(&spec(path, false, OnMalformed::Skip)).unwrap_err();
    assert!(err.to_string().contains("no `sentence` column"), "{err}");
}

#[test]
fn jsonl_labels_may_be_strings_integers_or_booleans() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("d.jsonl");
    fs::write(
        &path,
        "{\"sentence\": \"a\", \"label\": 2}\n\n{\"sentence\": \"b\", \"label\": 0}\n",
    )
    .unwrap();
    let d = load_jsonl(&spec(path.clone(), false, OnMalformed::Error)).unwrap();
    assert_eq!(d.label_names, ["0", "1", "2"]);
    assert_eq!(d.labels(), [2, 0]);

    fs::write(&path, "{\"sentence\": \"a\", \"label\": true}\n").unwrap();
    let d = load_jsonl(&spec(path, false, OnMalformed::Error)).unwrap();
    assert_eq!(d.labels(), [1]);
}

#[test]
fn jsonl_malformed_lines_name_file_and_line_or_are_reported() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("d.jsonl");
    fs::write(
        &path,
        concat!(
            "{\"sentence\": \"ok\", \"label\": \"x\"}\n",
            "{\"sentence\": \"no label\"}\n",
            "not json\n",
            "{\"sentence\": 5, \"label\": \"x\"}\n",
            "{\"sentence\": \"ok too\", \"label\": -1}\n",
            "{\"sentence\": \"fine\", \"label\": \"y\"}\n",
        ),
    )
    .unwrap();
    let err = load_jsonl(&spec(path.clone(), false, OnMalformed::Error)).unwrap_err();
    assert!(
        err.to_string().contains("d.jsonl:2: no `label` key"),
        "{err}"
    );
    let d = load_jsonl(&spec(path, false, OnMalformed::Skip)).unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d.label_names, ["x", "y"]);
    let lines: Vec<Option<u64>> = d.report.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, [Some(2), Some(3), Some(4), Some(5)]);
}

#[test]
fn a_file_with_no_usable_rows_is_an_error() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("d.jsonl");
    fs::write(&path, "\n\n").unwrap();
    assert!(load_jsonl(&spec(path, false, OnMalformed::Skip)).is_err());
}

#[test]
fn loaders_without_assets_name_the_fetch_command() {
    let tmp = TempDir::new().unwrap();
    for name in DatasetName::ALL {
        let err = load(name, tmp.path(), 0).unwrap_err();
        assert!(matches!(err, Error::AssetsMissing { .. }), "{name}: {err}");
        assert!(err.to_string().contains("fedsvd assets fetch"), "{err}");
    }
}
