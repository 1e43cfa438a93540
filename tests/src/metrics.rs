//! Scraping `/metrics` and checking the Prometheus text exposition format (0.0.4) strictly:
//! every line is a `# HELP`, a `# TYPE` or a sample of a family declared before it, names and
//! label names are valid, label values are properly escaped, values are numbers, and histograms
//! have cumulative buckets ending in `+Inf` that equal their `_count`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed and checked page.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Family name → type (counter, gauge, histogram, summary, untyped).
    pub types: HashMap<String, String>,
}

impl Exposition {
    /// The value of the series `name` with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Every series of `name`.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

/// `GET http://127.0.0.1:<port>/metrics`: the body of a 200 answer with the exposition content
/// type, or why not.
pub async fn scrape(port: u16) -> Result<String, String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
        )
        .await
        .map_err(|e| format!("send: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        String::from_utf8(buf).map_err(|e| format!("not UTF-8: {e}"))
    };
    let text = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| "no answer within 10 s".to_string())??;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("status {status:?}: {body}"));
    }
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    if !content_type.starts_with("text/plain; version=0.0.4") {
        return Err(format!("content type {content_type:?}"));
    }
    // Transfer-Encoding: chunked is not used for a body of known length (axum sets it).
    Ok(body.to_string())
}

fn valid_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse::<f64>().ok(),
    }
}

/// `{a="x",b="y\"z"}` at the start of `s`: the labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected '{'")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("invalid label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("invalid escape {other:?} in a label value")),
                },
                Some((_, '\n')) => return Err("raw newline in a label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

/// The family a sample belongs to, given the declared types (histogram and summary samples
/// carry suffixes).
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| kinds.contains(&t.as_str())) {
                return Some(base);
            }
        }
    }
    None
}

/// Parses and checks a whole page.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut helped: HashMap<String, ()> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("HELP") => {
                    let name = parts
                        .next()
                        .ok_or_else(|| at("HELP without a name".into()))?;
                    if !valid_metric_name(name) {
                        return Err(at(format!("invalid metric name {name:?}")));
                    }
                    if helped.insert(name.to_string(), ()).is_some() {
                        return Err(at(format!("second HELP for {name}")));
                    }
                }
                Some("TYPE") => {
                    let name = parts
                        .next()
                        .ok_or_else(|| at("TYPE without a name".into()))?;
                    let kind = parts.next().unwrap_or_default();
                    if !valid_metric_name(name) {
                        return Err(at(format!("invalid metric name {name:?}")));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    if out
                        .samples
                        .iter()
                        .any(|s| family_of(&s.name, &out.types) == Some(name))
                        || out
                            .types
                            .insert(name.to_string(), kind.to_string())
                            .is_some()
                    {
                        return Err(at(format!("TYPE for {name} after its samples or twice")));
                    }
                }
                _ => {} // other comments are allowed
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(at(format!("invalid metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = fields
            .next()
            .and_then(parse_value)
            .ok_or_else(|| at("value is not a number".into()))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| at(format!("timestamp {ts:?} is not an integer")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing text".into()));
        }
        let family = family_of(name, &out.types)
            .ok_or_else(|| at(format!("sample of {name} without a TYPE before it")))?;
        let kind = out.types[family].as_str();
        if kind == "counter" && (value.is_nan() || value < 0.0) {
            return Err(at("a counter below 0".into()));
        }
        if name.ends_with("_bucket") && kind == "histogram" && !labels.contains_key("le") {
            return Err(at("histogram bucket without le".into()));
        }
        if out
            .samples
            .iter()
            .any(|s| s.name == name && s.labels == labels)
        {
            return Err(at("duplicate series".into()));
        }
        out.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    check_histograms(&out)?;
    Ok(out)
}

fn check_histograms(e: &Exposition) -> Result<(), String> {
    for (family, kind) in &e.types {
        if kind != "histogram" {
            continue;
        }
        // One histogram per label set without `le` (ours have none).
        let mut buckets: Vec<(f64, f64)> = e
            .series(&format!("{family}_bucket"))
            .iter()
            .map(|s| {
                let le = s
                    .labels
                    .get("le")
                    .and_then(|l| parse_value(l))
                    .unwrap_or(f64::NAN);
                (le, s.value)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        if buckets.last().map(|b| b.0) != Some(f64::INFINITY) {
            return Err(format!("histogram {family} has no +Inf bucket"));
        }
        if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
            return Err(format!("histogram {family}: buckets are not cumulative"));
        }
        let count = e.get(&format!("{family}_count"), &[]);
        if count != buckets.last().map(|b| b.1) {
            return Err(format!(
                "histogram {family}: +Inf bucket differs from _count"
            ));
        }
        if e.get(&format!("{family}_sum"), &[]).is_none() {
            return Err(format!("histogram {family} has no _sum"));
        }
    }
    Ok(())
}

/// Scrapes and parses, panicking with the page on a format error.
pub async fn scrape_parsed(port: u16) -> Result<Exposition, String> {
    let text = scrape(port).await?;
    Ok(parse(&text).unwrap_or_else(|e| panic!("invalid exposition from port {port}: {e}\n{text}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_and_refuses_broken_pages() {
        let ok = "# HELP a_total A counter.\n# TYPE a_total counter\na_total{kind=\"x\\\"y\"} 3\n\
                  # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n\
                  # TYPE g gauge\ng NaN\ng{a=\"b\",} -1e3 1700000000\n";
        let e = parse(ok).expect("valid");
        assert_eq!(e.get("a_total", &[("kind", "x\"y")]), Some(3.0));
        assert_eq!(e.get("g", &[("a", "b")]), Some(-1000.0));
        for bad in [
            "a 1\n",                                             // no TYPE
            "# TYPE a gauge\na{b=c} 1\n",                        // unquoted
            "# TYPE a gauge\na{b=\"c\\x\"} 1\n",                 // bad escape
            "# TYPE a gauge\na one\n",                           // not a number
            "# TYPE a gauge\na 1\na 2\n",                        // duplicate
            "# TYPE a gauge\n# TYPE a gauge\n",                  // twice
            "# TYPE 1a gauge\n",                                 // name
            "# TYPE a counter\na -1\n",                          // negative counter
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
