//! The counts of `shared/docs/datasets.md` on the fetched files. These tests
//! need `fedsvd assets fetch` to have run (CI fetches first); when the
//! assets are missing they fail with a message naming that command.

use std::collections::HashSet;
use std::path::PathBuf;

use fedsvd_data::assets::{self, PackageState};
use fedsvd_data::{DatasetName, Result, load, load_bbc_pairs};

fn assets_dir() -> PathBuf {
    let dir = assets::default_dir();
    for package in assets::standard_packages() {
        let state = assets::package_state(&dir, &package);
        assert!(
            state == PackageState::Installed,
            "package {} is not installed in {} ({state:?}); run `cargo run -p fedsvd-cli -- assets fetch` (or `fedsvd assets fetch`), or set FEDSVD_ASSETS",
            package.id,
            dir.display()
        );
    }
    dir
}

fn ok<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn rotten_tomatoes_has_12752_snippets() {
    let data = ok(load(DatasetName::Rt, &assets_dir(), 0));
    assert_eq!(data.len(), 12_752);
    assert_eq!(data.label_names, ["rotten", "fresh"]);
    assert_eq!(data.label_counts(), [5_384, 7_368]);
    assert_eq!(
        data.report.dropped["plot summary row (not a review)"],
        1_097
    );
    assert_eq!(
        data.report.dropped["duplicate text"],
        13_905 - 1_097 - 12_752
    );
    assert!(data.report.skipped.is_empty());
    let distinct: HashSet<&str> = data.examples.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(distinct.len(), data.len());
    assert!(data.examples.iter().all(|e| e.text_pair.is_none()));
}

#[test]
fn bbc_topics_have_2225_articles() {
    let data = ok(load(DatasetName::BbcTopic, &assets_dir(), 0));
    assert_eq!(data.len(), 2_225);
    assert_eq!(
        data.label_names,
        ["business", "entertainment", "politics", "sports", "tech"]
    );
    assert_eq!(data.label_counts(), [510, 386, 417, 511, 401]);
    // The one file that is not UTF-8 (a Latin-1 pound sign) is decoded, not
    // dropped, and named in the report.
    assert_eq!(data.report.decoded_as_latin1.len(), 1);
    assert!(data.report.decoded_as_latin1[0].ends_with("sports/199.txt"));
    let mutu = data
        .examples
        .iter()
        .find(|e| e.text.starts_with("Chelsea sack Mutu\n"))
        .expect("the Latin-1 article is loaded");
    assert!(mutu.text.contains("\u{a3}15.8m"));
    assert!(
        data.examples
            .iter()
            .all(|e| e.text.chars().count() <= 1_200)
    );
}

#[test]
fn bbc_pairs_are_balanced_seeded_and_built_from_the_articles() {
    let dir = assets_dir();
    let data = ok(load_bbc_pairs(&dir, 7));
    let counts = data.label_counts();
    assert_eq!(counts[0], counts[1], "balanced");
    assert!(data.len() >= 2 * 2_200, "{} pairs", data.len());
    assert_eq!(data, ok(load_bbc_pairs(&dir, 7)), "same seed, same task");
    assert_ne!(data.examples, ok(load_bbc_pairs(&dir, 8)).examples);

    let raw_dir = dir.join(assets::BBC_DIR);
    let mut bodies = std::collections::HashMap::new();
    for topic in fedsvd_data::BBC_TOPICS {
        for entry in std::fs::read_dir(raw_dir.join(topic)).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let text = String::from_utf8(bytes)
                .unwrap_or_else(|e| e.into_bytes().iter().map(|&b| b as char).collect());
            let (title, body) = text.split_once('\n').unwrap();
            let body = body.split_whitespace().collect::<Vec<_>>().join(" ");
            bodies
                .entry(title.trim().to_owned())
                .or_insert_with(Vec::new)
                .push(body);
        }
    }
    for pair in data.examples.chunks(2) {
        let (pos, neg) = (&pair[0], &pair[1]);
        assert_eq!((pos.label, neg.label), (1, 0));
        assert_eq!(
            pos.text, neg.text,
            "both pairs of an article share its title"
        );
        let own = &bodies[&pos.text];
        let sentence = pos.text_pair.as_deref().unwrap();
        let other = neg.text_pair.as_deref().unwrap();
        let in_own = |s: &str| own.iter().any(|b| b.contains(s));
        assert!(
            in_own(sentence),
            "positive sentence not in its article: {sentence}"
        );
        assert!(
            !in_own(other),
            "negative sentence is from this article: {other}"
        );
    }
}

#[test]
fn spam_assassin_has_4150_ham_and_1896_spam_without_headers() {
    let data = ok(load(DatasetName::Spam, &assets_dir(), 0));
    assert_eq!(data.len(), 6_046);
    assert_eq!(data.label_names, ["ham", "spam"]);
    assert_eq!(data.label_counts(), [4_150, 1_896]);
    assert!(data.report.skipped.is_empty(), "{}", data.report);
    let header_like: Vec<&str> = data
        .examples
        .iter()
        .filter(|e| {
            e.text.starts_with("Return-Path:")
                || e.text.starts_with("Received:")
                || e.text.starts_with("Delivered-To:")
        })
        .map(|e| e.text.as_str())
        .collect();
    // Only one body starts like a header block: spam-2/00403 forwards a whole
    // e-mail, whose own headers are the body's content.
    assert_eq!(header_like.len(), 1, "{:.200?}", header_like);
    assert!(header_like[0].starts_with("Return-Path: <CashByNet@webmillion.com>"));
}
