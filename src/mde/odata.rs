//! A small builder for the OData v4 query options MDE list endpoints accept.
//!
//! Only the subset MDE documents is modelled: comparisons, `in`, `and`/`or`, and
//! `collection/any(...)`. Building strings by hand is where quoting bugs live (a `'` in a device
//! name), so every literal goes through [`Literal`].

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};

/// A literal on the right-hand side of a comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Literal {
    /// A string, rendered single-quoted with `'` doubled.
    Str(String),
    /// A timestamp, rendered unquoted in UTC (`2026-01-01T00:00:00Z`), as MDE expects.
    DateTime(DateTime<Utc>),
    /// An integer, rendered as is.
    Int(i64),
    /// A boolean, rendered `true` / `false`.
    Bool(bool),
}

impl From<&str> for Literal {
    fn from(s: &str) -> Self {
        Literal::Str(s.to_owned())
    }
}

impl From<String> for Literal {
    fn from(s: String) -> Self {
        Literal::Str(s)
    }
}

impl From<&String> for Literal {
    fn from(s: &String) -> Self {
        Literal::Str(s.clone())
    }
}

impl From<DateTime<Utc>> for Literal {
    fn from(t: DateTime<Utc>) -> Self {
        Literal::DateTime(t)
    }
}

impl From<i64> for Literal {
    fn from(n: i64) -> Self {
        Literal::Int(n)
    }
}

impl From<u32> for Literal {
    fn from(n: u32) -> Self {
        Literal::Int(n.into())
    }
}

impl From<bool> for Literal {
    fn from(b: bool) -> Self {
        Literal::Bool(b)
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Str(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Literal::DateTime(t) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            Literal::Int(n) => write!(f, "{n}"),
            Literal::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    /// `eq`
    Eq,
    /// `ne`
    Ne,
    /// `gt`
    Gt,
    /// `ge`
    Ge,
    /// `lt`
    Lt,
    /// `le`
    Le,
}

impl CompareOp {
    fn as_str(self) -> &'static str {
        match self {
            CompareOp::Eq => "eq",
            CompareOp::Ne => "ne",
            CompareOp::Gt => "gt",
            CompareOp::Ge => "ge",
            CompareOp::Lt => "lt",
            CompareOp::Le => "le",
        }
    }
}

/// An OData `$filter` expression. Build it with the associated functions; `Display` renders it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `field op value`.
    Compare {
        /// Property name, e.g. `machineId`.
        field: String,
        /// Operator.
        op: CompareOp,
        /// Right-hand side.
        value: Literal,
    },
    /// `field in (v1,v2,...)`. An empty list renders `field in ()`, which MDE rejects: callers
    /// should skip the query instead.
    In {
        /// Property name.
        field: String,
        /// Values.
        values: Vec<Literal>,
    },
    /// `collection/any(x: x eq value)`, e.g. a machine tag.
    AnyEq {
        /// Collection property, e.g. `machineTags`.
        collection: String,
        /// Value one element must equal.
        value: Literal,
    },
    /// Every operand holds (rendered `a and b`; an empty list renders `true`).
    And(Vec<Filter>),
    /// Some operand holds (rendered `a or b`; an empty list renders `false`).
    Or(Vec<Filter>),
}

impl Filter {
    fn compare(field: impl Into<String>, op: CompareOp, value: impl Into<Literal>) -> Self {
        Filter::Compare {
            field: field.into(),
            op,
            value: value.into(),
        }
    }

    /// `field eq value`.
    pub fn eq(field: impl Into<String>, value: impl Into<Literal>) -> Self {
        Self::compare(field, CompareOp::Eq, value)
    }

    /// `field ne value`.
    pub fn ne(field: impl Into<String>, value: impl Into<Literal>) -> Self {
        Self::compare(field, CompareOp::Ne, value)
    }

    /// `field gt value` (typically a `DateTime<Utc>`).
    pub fn gt(field: impl Into<String>, value: impl Into<Literal>) -> Self {
        Self::compare(field, CompareOp::Gt, value)
    }

    /// `field ge value` (typically a `DateTime<Utc>`).
    pub fn ge(field: impl Into<String>, value: impl Into<Literal>) -> Self {
        Self::compare(field, CompareOp::Ge, value)
    }

    /// `field lt value` (typically a `DateTime<Utc>`).
    pub fn lt(field: impl Into<String>, value: impl Into<Literal>) -> Self {
        Self::compare(field, CompareOp::Lt, value)
    }

    /// `field le value` (typically a `DateTime<Utc>`).
    pub fn le(field: impl Into<String>, value: impl Into<Literal>) -> Self {
        Self::compare(field, CompareOp::Le, value)
    }

    /// `field in (v1,v2,...)`.
    pub fn is_in<I>(field: impl Into<String>, values: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Literal>,
    {
        Filter::In {
            field: field.into(),
            values: values.into_iter().map(Into::into).collect(),
        }
    }

    /// `collection/any(x: x eq value)`.
    pub fn any_eq(collection: impl Into<String>, value: impl Into<Literal>) -> Self {
        Filter::AnyEq {
            collection: collection.into(),
            value: value.into(),
        }
    }

    /// `self and other` (flattened: `a.and(b).and(c)` renders `a and b and c`).
    pub fn and(self, other: Filter) -> Self {
        let mut parts = match self {
            Filter::And(v) => v,
            f => vec![f],
        };
        match other {
            Filter::And(v) => parts.extend(v),
            f => parts.push(f),
        }
        Filter::And(parts)
    }

    /// `self or other` (flattened like [`Filter::and`]).
    pub fn or(self, other: Filter) -> Self {
        let mut parts = match self {
            Filter::Or(v) => v,
            f => vec![f],
        };
        match other {
            Filter::Or(v) => parts.extend(v),
            f => parts.push(f),
        }
        Filter::Or(parts)
    }

    fn is_compound(&self) -> bool {
        matches!(self, Filter::And(v) | Filter::Or(v) if v.len() > 1)
    }
}

fn join(f: &mut fmt::Formatter<'_>, parts: &[Filter], op: &str) -> fmt::Result {
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            write!(f, " {op} ")?;
        }
        // Parenthesise every nested and/or: correct whatever the precedence, and readable.
        if p.is_compound() {
            write!(f, "({p})")?;
        } else {
            write!(f, "{p}")?;
        }
    }
    Ok(())
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::Compare { field, op, value } => write!(f, "{field} {} {value}", op.as_str()),
            Filter::In { field, values } => {
                write!(f, "{field} in (")?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str(")")
            }
            Filter::AnyEq { collection, value } => {
                write!(f, "{collection}/any(x: x eq {value})")
            }
            Filter::And(v) if v.is_empty() => f.write_str("true"),
            Filter::Or(v) if v.is_empty() => f.write_str("false"),
            Filter::And(v) => join(f, v, "and"),
            Filter::Or(v) => join(f, v, "or"),
        }
    }
}

/// Query options of a list call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// `$filter`.
    pub filter: Option<Filter>,
    /// `$top` (MDE allows up to 10,000).
    pub top: Option<u32>,
    /// `$skip`.
    pub skip: Option<u32>,
    /// `$orderby`, e.g. `creationDateTimeUtc desc`.
    pub orderby: Option<String>,
    /// `$count=true`.
    pub count: bool,
}

impl ListQuery {
    /// The query string (without `?`), values percent-encoded (space as `%20`, not `+`).
    pub fn to_query_string(&self) -> String {
        let mut parts = Vec::new();
        if let Some(filter) = &self.filter {
            parts.push(format!("$filter={}", encode(&filter.to_string())));
        }
        if let Some(top) = self.top {
            parts.push(format!("$top={top}"));
        }
        if let Some(skip) = self.skip {
            parts.push(format!("$skip={skip}"));
        }
        if let Some(orderby) = &self.orderby {
            parts.push(format!("$orderby={}", encode(orderby)));
        }
        if self.count {
            parts.push("$count=true".to_owned());
        }
        parts.join("&")
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so the value survives any
/// server's query decoding (`+` would be read as a space by some).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn comparisons() {
        assert_eq!(
            Filter::eq("machineId", "abc").to_string(),
            "machineId eq 'abc'"
        );
        assert_eq!(
            Filter::ne("status", "Failed").to_string(),
            "status ne 'Failed'"
        );
        assert_eq!(
            Filter::ge("creationDateTimeUtc", t()).to_string(),
            "creationDateTimeUtc ge 2026-01-01T00:00:00Z"
        );
        assert_eq!(
            Filter::gt("creationDateTimeUtc", t()).to_string(),
            "creationDateTimeUtc gt 2026-01-01T00:00:00Z"
        );
        assert_eq!(
            Filter::lt("creationDateTimeUtc", t()).to_string(),
            "creationDateTimeUtc lt 2026-01-01T00:00:00Z"
        );
        let frac = t() + chrono::Duration::milliseconds(250);
        assert_eq!(
            Filter::le("creationDateTimeUtc", frac).to_string(),
            "creationDateTimeUtc le 2026-01-01T00:00:00.250Z"
        );
        assert_eq!(
            Filter::eq("errorHResult", 0i64).to_string(),
            "errorHResult eq 0"
        );
        assert_eq!(
            Filter::eq("isPotentialDuplication", false).to_string(),
            "isPotentialDuplication eq false"
        );
    }

    #[test]
    fn quotes_are_escaped() {
        assert_eq!(
            Filter::eq("computerDnsName", "o'brien's-pc").to_string(),
            "computerDnsName eq 'o''brien''s-pc'"
        );
        assert_eq!(
            Filter::eq("requestorComment", "'").to_string(),
            "requestorComment eq ''''"
        );
    }

    #[test]
    fn in_lists() {
        assert_eq!(
            Filter::is_in("type", ["Isolate", "Unisolate"]).to_string(),
            "type in ('Isolate','Unisolate')"
        );
        let ids = ["a".to_string(), "b'c".to_string()];
        assert_eq!(
            Filter::is_in("id", ids.iter().map(String::as_str)).to_string(),
            "id in ('a','b''c')"
        );
        assert_eq!(
            Filter::is_in("id", Vec::<String>::new()).to_string(),
            "id in ()"
        );
        assert_eq!(
            Filter::any_eq("machineTags", "vip").to_string(),
            "machineTags/any(x: x eq 'vip')"
        );
    }

    #[test]
    fn and_or_parenthesise_correctly() {
        let open = Filter::is_in("status", ["Pending", "InProgress"]);
        let f = Filter::is_in("type", ["Isolate", "Unisolate"])
            .and(open.clone().or(Filter::ge("creationDateTimeUtc", t())));
        assert_eq!(
            f.to_string(),
            "type in ('Isolate','Unisolate') and (status in ('Pending','InProgress') \
             or creationDateTimeUtc ge 2026-01-01T00:00:00Z)"
        );
        let f = Filter::eq("a", "1")
            .and(Filter::eq("b", "2"))
            .and(Filter::eq("c", "3"));
        assert_eq!(f.to_string(), "a eq '1' and b eq '2' and c eq '3'");
        let f = Filter::eq("a", "1")
            .or(Filter::eq("b", "2").and(Filter::eq("c", "3")))
            .or(Filter::eq("d", "4"));
        assert_eq!(
            f.to_string(),
            "a eq '1' or (b eq '2' and c eq '3') or d eq '4'"
        );
        let f = Filter::eq("a", "1")
            .or(Filter::eq("b", "2"))
            .and(Filter::eq("c", "3").or(Filter::eq("d", "4")));
        assert_eq!(
            f.to_string(),
            "(a eq '1' or b eq '2') and (c eq '3' or d eq '4')"
        );
        assert_eq!(Filter::And(vec![]).to_string(), "true");
        assert_eq!(Filter::Or(vec![]).to_string(), "false");
        assert_eq!(
            Filter::And(vec![Filter::eq("a", "1")]).to_string(),
            "a eq '1'"
        );
    }

    #[test]
    fn query_strings_are_percent_encoded() {
        let q = ListQuery {
            filter: Some(
                Filter::eq("machineId", "1e5b").and(Filter::ge("creationDateTimeUtc", t())),
            ),
            top: Some(10_000),
            orderby: Some("creationDateTimeUtc desc".into()),
            ..ListQuery::default()
        };
        assert_eq!(
            q.to_query_string(),
            "$filter=machineId%20eq%20%271e5b%27%20and%20creationDateTimeUtc%20ge%20\
             2026-01-01T00%3A00%3A00Z&$top=10000&$orderby=creationDateTimeUtc%20desc"
        );
        let q = ListQuery {
            filter: Some(Filter::is_in("id", ["a+b", "ü&="])),
            skip: Some(20),
            count: true,
            ..ListQuery::default()
        };
        assert_eq!(
            q.to_query_string(),
            "$filter=id%20in%20%28%27a%2Bb%27%2C%27%C3%BC%26%3D%27%29&$skip=20&$count=true"
        );
        assert_eq!(ListQuery::default().to_query_string(), "");
    }

    #[test]
    fn query_string_round_trips_through_a_url_parser() {
        let q = ListQuery {
            filter: Some(Filter::eq("computerDnsName", "o'brien & co")),
            top: Some(5),
            ..ListQuery::default()
        };
        let mut url = url::Url::parse("https://example.invalid/api/machines").unwrap();
        url.set_query(Some(&q.to_query_string()));
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(
            pairs,
            [
                (
                    "$filter".to_string(),
                    "computerDnsName eq 'o''brien & co'".to_string()
                ),
                ("$top".to_string(), "5".to_string())
            ]
        );
    }
}
