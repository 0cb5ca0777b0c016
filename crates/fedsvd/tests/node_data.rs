//! A deployed node's own data file (`load_node_data`): every row, labels
//! mapped to the run's by name or index, tokenized as the run tokenizes.
//! Needs the MiniLM tokenizer from the assets (fetched by CI before tests).

use std::path::Path;

use fedsvd::{Error, FileSource, RunConfig, load_node_data};
use fedsvd_model::Tokenizer;

fn quick() -> RunConfig {
    serde_json::from_str(include_str!("../../fedsvd-cli/presets/quick.json")).unwrap()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn assets() -> std::path::PathBuf {
    fedsvd_data::assets::default_dir()
}

fn encode(config: &RunConfig, text: &str) -> Vec<u32> {
    let dir = config.model_dir(&assets());
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json"), config.model.max_len).unwrap();
    tok.encode(&[text]).unwrap().ids(0).to_vec()
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_node_file_keeps_every_row_and_maps_labels_to_the_runs_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick();
    // The file's own sorted names would be [fresh, rotten]: the run's order
    // (rotten = 0, fresh = 1) must win.
    let path = write(
        dir.path(),
        "hospital.csv",
        "text,label\na moving film,fresh\na dull one,rotten\n\"witty, warm\",fresh\n",
    );
    let (data, report) =
        load_node_data(&config, &assets(), &path, &names(&["rotten", "fresh"])).unwrap();
    assert_eq!(data.labels, vec![1, 0, 1]);
    assert_eq!(data.len(), 3);
    assert_eq!(data.ids[2], encode(&config, "witty, warm"));
    assert!(report.skipped.is_empty());

    // A node that holds one class only still speaks the run's indices.
    let one = write(
        dir.path(),
        "one.csv",
        "text,label\ngreat,fresh\nfine,fresh\n",
    );
    let (data, _) = load_node_data(&config, &assets(), &one, &names(&["rotten", "fresh"])).unwrap();
    assert_eq!(data.labels, vec![1, 1]);
}

#[test]
fn integer_labels_are_indices_and_a_file_source_names_the_columns() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick();
    config.data.dataset = "file".into();
    config.data.file = Some(FileSource {
        path: "server-side.jsonl".into(),
        text_column: "review".into(),
        pair_column: None,
        label_column: "stars".into(),
        skip_malformed: false,
    });
    let path = write(
        dir.path(),
        "bank.jsonl",
        "{\"review\": \"bad\", \"stars\": 0}\n{\"review\": \"good\", \"stars\": 2}\n",
    );
    let run = names(&["low", "mid", "high"]);
    let (data, _) = load_node_data(&config, &assets(), &path, &run).unwrap();
    assert_eq!(data.labels, vec![0, 2]);
    assert_eq!(data.ids[1], encode(&config, "good"));
}

#[test]
fn a_label_the_run_does_not_know_and_an_unreadable_file_are_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick();
    let run = names(&["rotten", "fresh"]);
    let path = write(dir.path(), "odd.csv", "text,label\nok,fresh\nhmm,meh\n");
    let err = load_node_data(&config, &assets(), &path, &run).unwrap_err();
    assert!(matches!(err, Error::NodeData { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("\"meh\"") && message.contains("odd.csv"),
        "{message}"
    );

    let index = write(dir.path(), "index.csv", "text,label\nok,1\nhmm,2\n");
    let message = load_node_data(&config, &assets(), &index, &run)
        .unwrap_err()
        .to_string();
    assert!(message.contains("\"2\""), "{message}");

    let missing = dir.path().join("absent.csv");
    let message = load_node_data(&config, &assets(), &missing, &run)
        .unwrap_err()
        .to_string();
    assert!(message.contains("absent.csv"), "{message}");

    let empty = write(dir.path(), "empty.csv", "text,label\n");
    assert!(load_node_data(&config, &assets(), &empty, &run).is_err());
    assert!(load_node_data(&config, &assets(), &path, &names(&["only"])).is_err());
}
