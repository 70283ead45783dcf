//! Record formats and validation: what a task file may hold, and what makes a record good.
//!
//! A file holds one record per line, in one of two formats, chosen by its extension (or, for
//! an `http://` file without a known extension, its `Content-Type`):
//! - CSV (`.csv`, `text/csv`): a header row naming the columns, then one record per line;
//!   fields may be quoted (`"a, b"`, `""` for a quote) but a record never spans lines;
//! - JSON lines (`.jsonl`, `.ndjson`, `application/x-ndjson`, `application/jsonl`): one JSON
//!   object per line; strings and numbers are read as text.
//!
//! Blank lines are skipped and not counted. Each entity type has one rule ([`EntityType`]); a
//! record that breaks it, or that cannot be parsed at all, is counted bad and processing goes
//! on. Only problems with the whole file (a CSV header without the rule's columns) fail the
//! task.

use serde_json::Value;
use std::borrow::Cow;

/// How a file's records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Csv,
    JsonLines,
}

impl Format {
    /// The format of `path` by its extension, else by `content_type`; `None`: unsupported.
    pub(super) fn detect(path: &str, content_type: Option<&str>) -> Option<Format> {
        let name = path.rsplit('/').next().unwrap_or(path);
        let extension = name
            .rsplit_once('.')
            .map(|(_, ext)| ext.to_ascii_lowercase());
        match extension.as_deref() {
            Some("csv") => return Some(Format::Csv),
            Some("jsonl" | "ndjson") => return Some(Format::JsonLines),
            _ => {}
        }
        let media = content_type?
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "text/csv" => Some(Format::Csv),
            "application/x-ndjson" | "application/jsonl" | "application/json-lines" => {
                Some(Format::JsonLines)
            }
            _ => None,
        }
    }
}

/// The kinds of records a task may hold, each with its validation rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntityType {
    /// `id` not empty, `email` a plausible address (`local@domain.tld`, no spaces).
    Customers,
    /// `sku` not empty, `price` a number at least 0.
    Products,
}

impl EntityType {
    /// The accepted `entity_type` values.
    pub(crate) const NAMES: [&'static str; 2] = ["customers", "products"];

    pub(crate) fn parse(name: &str) -> Option<EntityType> {
        match name {
            "customers" => Some(EntityType::Customers),
            "products" => Some(EntityType::Products),
            _ => None,
        }
    }

    /// The fields the rule reads (a CSV header must name them all).
    fn required(self) -> [&'static str; 2] {
        match self {
            EntityType::Customers => ["id", "email"],
            EntityType::Products => ["sku", "price"],
        }
    }

    /// Checks one record, given a lookup of its fields.
    fn validate<'a>(self, field: impl Fn(&str) -> Option<Cow<'a, str>>) -> Result<(), String> {
        let [first, second] = self.required();
        let key = field(first).unwrap_or_default();
        if key.trim().is_empty() {
            return Err(format!("{first} is missing or empty"));
        }
        let value = field(second).unwrap_or_default();
        match self {
            EntityType::Customers if !plausible_email(value.trim()) => {
                Err(format!("email {value:?} is not a valid address"))
            }
            EntityType::Products
                if !value
                    .trim()
                    .parse::<f64>()
                    .is_ok_and(|p| p.is_finite() && p >= 0.0) =>
            {
                Err(format!("price {value:?} is not a number at least 0"))
            }
            _ => Ok(()),
        }
    }
}

fn plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && !email.chars().any(char::is_whitespace)
        && domain.split('.').count() >= 2
        && domain.split('.').all(|label| !label.is_empty())
}

/// What one line was.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Not a record: blank, or the CSV header.
    Skipped,
    Good,
    Bad(String),
}

/// Turns a file's lines, in order, into verdicts (CSV keeps its header between lines).
pub(super) struct RecordParser {
    format: Format,
    entity: EntityType,
    header: Option<Vec<String>>,
}

impl RecordParser {
    pub(super) fn new(format: Format, entity: EntityType) -> Self {
        Self {
            format,
            entity,
            header: None,
        }
    }

    /// Whether the next non-blank line is a CSV header rather than a record: a run resuming
    /// past lines it already counted still feeds the header through [`line`](Self::line).
    #[cfg_attr(not(feature = "temporal"), allow(dead_code))]
    pub(super) fn expects_header(&self) -> bool {
        self.format == Format::Csv && self.header.is_none()
    }

    /// The verdict on the next line (its end of line included or not). `Err`: the file itself
    /// is unusable (a CSV header that is not text or lacks the rule's columns).
    pub(super) fn line(&mut self, raw: &[u8]) -> Result<Verdict, String> {
        let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(Verdict::Skipped);
        }
        let text = std::str::from_utf8(raw);
        match self.format {
            Format::JsonLines => Ok(match text {
                Ok(text) => self.json_line(text),
                Err(_) => Verdict::Bad("not UTF-8 text".into()),
            }),
            Format::Csv => match &self.header {
                None => {
                    let text = text.map_err(|_| "the CSV header is not UTF-8 text".to_owned())?;
                    let header: Vec<String> = split_csv(text)
                        .into_iter()
                        .map(|c| c.trim().to_owned())
                        .collect();
                    if let Some(missing) = self
                        .entity
                        .required()
                        .into_iter()
                        .find(|column| !header.iter().any(|h| h == column))
                    {
                        return Err(format!("the CSV header has no {missing} column"));
                    }
                    self.header = Some(header);
                    Ok(Verdict::Skipped)
                }
                Some(header) => Ok(match text {
                    Ok(text) => csv_line(self.entity, header, text),
                    Err(_) => Verdict::Bad("not UTF-8 text".into()),
                }),
            },
        }
    }

    fn json_line(&self, text: &str) -> Verdict {
        let object = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(object)) => object,
            Ok(_) => return Verdict::Bad("not a JSON object".into()),
            Err(e) => return Verdict::Bad(format!("not JSON: {e}")),
        };
        let field = |name: &str| match object.get(name) {
            Some(Value::String(s)) => Some(Cow::Borrowed(s.as_str())),
            Some(Value::Number(n)) => Some(Cow::Owned(n.to_string())),
            _ => None,
        };
        verdict(self.entity.validate(field))
    }
}

fn csv_line(entity: EntityType, header: &[String], text: &str) -> Verdict {
    let fields = split_csv(text);
    if fields.len() != header.len() {
        return Verdict::Bad(format!(
            "{} fields where the header has {}",
            fields.len(),
            header.len()
        ));
    }
    let field = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .map(|i| Cow::Owned(fields[i].clone()))
    };
    verdict(entity.validate(field))
}

fn verdict(result: Result<(), String>) -> Verdict {
    match result {
        Ok(()) => Verdict::Good,
        Err(reason) => Verdict::Bad(reason),
    }
}

/// Splits one CSV line into fields: commas separate, double quotes enclose, `""` inside quotes
/// is a quote.
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if field.is_empty() => quoted = true,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(format: Format, entity: EntityType, text: &str) -> Result<Vec<Verdict>, String> {
        let mut parser = RecordParser::new(format, entity);
        text.split_inclusive('\n')
            .map(|line| parser.line(line.as_bytes()))
            .collect()
    }

    fn tally(verdicts: &[Verdict]) -> (usize, usize) {
        let good = verdicts.iter().filter(|v| **v == Verdict::Good).count();
        let bad = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Bad(_)))
            .count();
        (good, bad)
    }

    #[test]
    fn detects_the_format_by_extension_then_content_type() {
        assert_eq!(Format::detect("/a/b.CSV", None), Some(Format::Csv));
        assert_eq!(Format::detect("x.jsonl", None), Some(Format::JsonLines));
        assert_eq!(
            Format::detect("x.ndjson", Some("text/csv")),
            Some(Format::JsonLines)
        );
        assert_eq!(
            Format::detect("/export", Some("text/csv; charset=utf-8")),
            Some(Format::Csv)
        );
        assert_eq!(
            Format::detect("/export", Some("application/x-ndjson")),
            Some(Format::JsonLines)
        );
        assert_eq!(
            Format::detect("data.xml", Some("text/csv")),
            Some(Format::Csv)
        );
        assert_eq!(Format::detect("data.xml", None), None);
        assert_eq!(Format::detect("dir.csv/data", None), None);
    }

    #[test]
    fn splits_quoted_csv_fields() {
        assert_eq!(split_csv("a,b,,c"), ["a", "b", "", "c"]);
        assert_eq!(
            split_csv(r#""x, y","say ""hi""",z"#),
            ["x, y", r#"say "hi""#, "z"]
        );
    }

    #[test]
    fn counts_good_and_bad_customer_rows_in_csv() {
        let text = "id,name,email\r\n\
                    1,Ann,ann@example.com\r\n\
                    \r\n\
                    2,\"Bob, Jr\",bob@example.org\n\
                    ,NoId,x@example.com\n\
                    4,Bad,not-an-email\n\
                    5,Short\n\
                    6,Spaces,a b@example.com\n";
        let verdicts = verdicts(Format::Csv, EntityType::Customers, text).unwrap();
        assert_eq!(tally(&verdicts), (2, 4), "{verdicts:?}");
    }

    #[test]
    fn a_csv_header_without_the_rules_columns_fails_the_file() {
        let err = verdicts(Format::Csv, EntityType::Products, "sku,name\nA,b\n").unwrap_err();
        assert!(err.contains("price"), "{err}");
    }

    #[test]
    fn counts_good_and_bad_product_lines_in_json_lines() {
        let text = "{\"sku\":\"A1\",\"price\":3.5}\n\
                    {\"sku\":\"A2\",\"price\":\"0\"}\n\
                    {\"sku\":\"A3\",\"price\":-1}\n\
                    {\"sku\":\"\",\"price\":1}\n\
                    [1,2]\n\
                    {not json\n\
                    \n\
                    {\"sku\":\"A4\"}";
        let verdicts = verdicts(Format::JsonLines, EntityType::Products, text).unwrap();
        assert_eq!(tally(&verdicts), (2, 5), "{verdicts:?}");
    }

    #[test]
    fn knows_only_the_documented_entity_types() {
        for name in EntityType::NAMES {
            assert!(EntityType::parse(name).is_some(), "{name}");
        }
        assert_eq!(EntityType::parse("orders"), None);
    }
}
