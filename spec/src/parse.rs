//! Reading job files (flat TOML). Errors name the offending key, so that a typo or a wrong type
//! reads as `crop_heigth: unknown field ...` rather than as a generic parse error.

use std::path::Path;

use crate::{JobSpecInput, SpecError, FIELDS};

/// The `field` of errors that concern the job file as a whole (bad TOML syntax).
const WHOLE_FILE: &str = "job file";

impl JobSpecInput {
    /// Parses a job file's text. Errors: bad TOML syntax (with line and column), an unknown key
    /// (the error's `field` is that key), or a value of the wrong type (`field` names it). Values
    /// are not range-checked here; that is [`JobSpecInput::resolve`]'s job.
    pub fn from_toml_str(s: &str) -> Result<JobSpecInput, SpecError> {
        let table: toml::Table = toml::from_str(s).map_err(|e| syntax_error(s, &e))?;

        if let Some(key) = table.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(SpecError::new(key.as_str(), unknown_field_message(key)));
        }
        // Convert one key at a time, in field order, so that a type error names its field.
        for field in FIELDS {
            if let Some(value) = table.get(*field) {
                // serde would read a TOML date or time (`name = 1979-05-27`) as its text, so a
                // string field would accept it; no field is a date or a time.
                if let toml::Value::Datetime(d) = value {
                    return Err(SpecError::new(*field, datetime_message(d)));
                }
                let mut one = toml::Table::new();
                one.insert(field.to_string(), value.clone());
                if let Err(e) = one.try_into::<JobSpecInput>() {
                    return Err(SpecError::new(*field, e.message().trim().to_string()));
                }
            }
        }
        table
            .try_into::<JobSpecInput>()
            .map_err(|e| SpecError::new(WHOLE_FILE, e.message().trim().to_string()))
    }

    /// Reads and parses a job file. An unreadable file gives an error whose `field` is the path;
    /// errors in the content say which file they are in.
    pub fn from_file(path: &Path) -> Result<JobSpecInput, SpecError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| SpecError::new(shown.clone(), format!("cannot read the job file: {e}")))?;
        JobSpecInput::from_toml_str(&text).map_err(|e| {
            let field = if e.field == WHOLE_FILE {
                shown.clone()
            } else {
                e.field
            };
            SpecError::new(field, format!("{} (in {shown})", e.message))
        })
    }
}

/// A TOML syntax error, with its line and column. When it is in the value of a known field
/// (`name = segformer`, `seed = 99999999999999999999`), the error names that field.
fn syntax_error(s: &str, e: &toml::de::Error) -> SpecError {
    let Some(span) = e.span() else {
        return SpecError::new(WHOLE_FILE, format!("invalid TOML: {}", e.message().trim()));
    };
    let (line, column) = line_column(s, span.start);
    let message = format!(
        "invalid TOML at line {line}, column {column}: {}",
        e.message().trim()
    );
    let key = s
        .lines()
        .nth(line - 1)
        .and_then(|l| l.split_once('='))
        .map(|(key, _)| key.trim())
        .and_then(|key| FIELDS.iter().find(|f| **f == key));
    SpecError::new(key.copied().unwrap_or(WHOLE_FILE), message)
}

fn datetime_message(d: &toml::value::Datetime) -> String {
    format!(
        "invalid type: TOML date/time {d}; no field is a date or a time \
         (write \"{d}\" if a string is meant)"
    )
}

fn unknown_field_message(key: &str) -> String {
    let hint = match closest_field(key) {
        Some(f) => format!("; did you mean `{f}`?"),
        None => String::new(),
    };
    format!("unknown field{hint} (`segtrain job-template` lists every field)")
}

/// The field a mistyped key most likely meant (kebab-case or a small typo), if any is close.
fn closest_field(key: &str) -> Option<&'static str> {
    let key = key.replace('-', "_").to_ascii_lowercase();
    let chars = key.chars().count();
    FIELDS
        .iter()
        // The distance is at least the difference in length: skip the work for keys that cannot
        // be close (a huge key would otherwise cost a full edit distance per field).
        .filter(|f| f.len().abs_diff(chars) <= 2)
        .map(|f| (edit_distance(&key, f), *f))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, f)| f)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// 1-based line and column (in chars) of a byte offset.
fn line_column(s: &str, offset: usize) -> (usize, usize) {
    let before = s.get(..offset).unwrap_or(s);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .unwrap_or_default()
        .chars()
        .count()
        + 1;
    (line, column)
}
