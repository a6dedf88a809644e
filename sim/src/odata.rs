//! The OData v4 subset of the MDE API: `$filter` (`eq ne gt ge lt le and or not`, parentheses,
//! `in (...)`, `collection/any(x: x eq '...')`, quoted strings, unquoted datetimes) and the
//! query options `$top`, `$skip`, `$orderby`, `$count`. Field names, keywords and string
//! comparisons are case-sensitive; type mismatches are errors rather than silent no-matches.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};

/// Largest `$top` MDE accepts.
pub const MAX_TOP: usize = 10_000;

/// The type of a filterable property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// String (eq, ne, in).
    Str,
    /// DateTimeOffset (all comparisons, unquoted literal).
    DateTime,
    /// Number (all comparisons).
    Number,
    /// Collection of strings (only through `any`).
    Strings,
}

/// What one entity set allows.
#[derive(Debug)]
pub struct Schema {
    /// Entity type name, for messages.
    pub entity: &'static str,
    /// Filterable properties.
    pub fields: &'static [(&'static str, Kind)],
    /// Properties that exist but cannot be filtered (answer ODataError).
    pub unfilterable: &'static [&'static str],
    /// Properties allowed in `$orderby`.
    pub orderable: &'static [&'static str],
}

impl Schema {
    fn kind(&self, field: &str) -> Result<Kind, String> {
        if let Some((_, k)) = self.fields.iter().find(|(f, _)| *f == field) {
            return Ok(*k);
        }
        if self.unfilterable.contains(&field) {
            return Err(format!(
                "Invalid filter: filtering on property '{field}' is not supported"
            ));
        }
        Err(format!(
            "Could not find a property named '{field}' on type '{}'",
            self.entity
        ))
    }
}

/// A literal value.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `'text'`.
    Str(String),
    /// `2026-01-01T00:00:00Z`.
    DateTime(DateTime<Utc>),
    /// `42`.
    Number(f64),
    /// `null`.
    Null,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `eq`.
    Eq,
    /// `ne`.
    Ne,
    /// `gt`.
    Gt,
    /// `ge`.
    Ge,
    /// `lt`.
    Lt,
    /// `le`.
    Le,
}

impl CmpOp {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "eq" => Self::Eq,
            "ne" => Self::Ne,
            "gt" => Self::Gt,
            "ge" => Self::Ge,
            "lt" => Self::Lt,
            "le" => Self::Le,
            _ => return None,
        })
    }

    fn holds(self, o: Ordering) -> bool {
        match self {
            Self::Eq => o == Ordering::Equal,
            Self::Ne => o != Ordering::Equal,
            Self::Gt => o == Ordering::Greater,
            Self::Ge => o != Ordering::Less,
            Self::Lt => o == Ordering::Less,
            Self::Le => o != Ordering::Greater,
        }
    }
}

/// A parsed `$filter`. Inside `any`, the lambda variable is the field `$item`.
#[derive(Debug, Clone)]
pub enum Expr {
    /// `a and b`.
    And(Box<Expr>, Box<Expr>),
    /// `a or b`.
    Or(Box<Expr>, Box<Expr>),
    /// `not a`.
    Not(Box<Expr>),
    /// `field op literal`.
    Cmp(String, CmpOp, Literal),
    /// `field in (literals)`.
    In(String, Vec<Literal>),
    /// `collection/any(x: expr)`.
    Any(String, Box<Expr>),
}

/// A property value of an entity.
#[derive(Debug, Clone)]
pub enum Value<'a> {
    /// String or null.
    Str(Option<&'a str>),
    /// Timestamp.
    DateTime(DateTime<Utc>),
    /// Number.
    Number(f64),
    /// String collection.
    Strings(&'a [String]),
}

/// Something a filter can be evaluated on.
pub trait Entity {
    /// The value of a schema property.
    fn field(&self, name: &str) -> Option<Value<'_>>;
}

const ITEM: &str = "$item";

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    Comma,
    Str(String),
    Word(String),
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = src.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' | ',' => {
                chars.next();
                out.push(match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    _ => Tok::Comma,
                });
            }
            '\'' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            s.push('\'');
                        }
                        Some('\'') => break,
                        Some(ch) => s.push(ch),
                        None => return Err("Syntax error: unterminated string literal".into()),
                    }
                }
                out.push(Tok::Str(s));
            }
            _ => {
                let mut w = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_whitespace() || matches!(ch, '(' | ')' | ',' | '\'') {
                        break;
                    }
                    w.push(ch);
                    chars.next();
                }
                out.push(Tok::Word(w));
            }
        }
    }
    Ok(out)
}

struct Parser<'s> {
    toks: Vec<Tok>,
    pos: usize,
    schema: &'s Schema,
    lambda: Option<String>,
    depth: usize,
}

/// Deepest nesting accepted, so hostile input cannot overflow the stack.
const MAX_DEPTH: usize = 64;

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn peek_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(x)) if x == w)
    }

    fn expect(&mut self, t: Tok, what: &str) -> Result<(), String> {
        match self.next() {
            Some(x) if x == t => Ok(()),
            other => Err(format!(
                "Syntax error: expected {what}, found {}",
                describe(other.as_ref())
            )),
        }
    }

    fn or(&mut self) -> Result<Expr, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("The filter is nested too deeply".into());
        }
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        self.depth -= 1;
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.pos += 1;
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek_word("not") {
            self.pos += 1;
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err("The filter is nested too deeply".into());
            }
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Tok::LParen) => {
                let e = self.or()?;
                self.expect(Tok::RParen, "')'")?;
                Ok(e)
            }
            Some(Tok::Word(w)) => {
                if let Some(coll) = w.strip_suffix("/any") {
                    return self.any(coll.to_string());
                }
                self.comparison(w)
            }
            other => Err(format!(
                "Syntax error: expected a property, found {}",
                describe(other.as_ref())
            )),
        }
    }

    fn any(&mut self, coll: String) -> Result<Expr, String> {
        if self.schema.kind(&coll)? != Kind::Strings {
            return Err(format!("Property '{coll}' is not a collection"));
        }
        if self.lambda.is_some() {
            return Err("Nested lambda expressions are not supported".into());
        }
        self.expect(Tok::LParen, "'(' after any")?;
        let var = match self.next() {
            Some(Tok::Word(w)) => w,
            other => {
                return Err(format!(
                    "Syntax error: expected a lambda variable, found {}",
                    describe(other.as_ref())
                ));
            }
        };
        // `tag:`, `tag :` and `tag:tag` are all valid spellings of the lambda head.
        let var = match var.split_once(':') {
            Some((v, rest)) => {
                if !rest.is_empty() {
                    self.toks.insert(self.pos, Tok::Word(rest.to_string()));
                }
                v.to_string()
            }
            None => {
                self.expect(Tok::Word(":".into()), "':'")?;
                var
            }
        };
        if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("Syntax error: invalid lambda variable '{var}'"));
        }
        self.lambda = Some(var);
        let inner = self.or()?;
        self.lambda = None;
        self.expect(Tok::RParen, "')'")?;
        Ok(Expr::Any(coll, Box::new(inner)))
    }

    fn field_kind(&self, field: &str) -> Result<(String, Kind), String> {
        if self.lambda.as_deref() == Some(field) {
            return Ok((ITEM.to_string(), Kind::Str));
        }
        let k = self.schema.kind(field)?;
        if k == Kind::Strings {
            return Err(format!(
                "Property '{field}' is a collection: use {field}/any(x: x eq '...')"
            ));
        }
        Ok((field.to_string(), k))
    }

    fn comparison(&mut self, field: String) -> Result<Expr, String> {
        let (name, kind) = self.field_kind(&field)?;
        let op = match self.next() {
            Some(Tok::Word(w)) if w == "in" => {
                self.expect(Tok::LParen, "'(' after in")?;
                let mut values = Vec::new();
                loop {
                    let lit = self.literal()?;
                    check_type(&field, kind, CmpOp::Eq, &lit)?;
                    values.push(lit);
                    match self.next() {
                        Some(Tok::Comma) => continue,
                        Some(Tok::RParen) => break,
                        other => {
                            return Err(format!(
                                "Syntax error: expected ',' or ')', found {}",
                                describe(other.as_ref())
                            ));
                        }
                    }
                }
                return Ok(Expr::In(name, values));
            }
            Some(Tok::Word(w)) => {
                CmpOp::parse(&w).ok_or_else(|| format!("Syntax error: unknown operator '{w}'"))?
            }
            other => {
                return Err(format!(
                    "Syntax error: expected an operator, found {}",
                    describe(other.as_ref())
                ));
            }
        };
        let lit = self.literal()?;
        check_type(&field, kind, op, &lit)?;
        Ok(Expr::Cmp(name, op, lit))
    }

    fn literal(&mut self) -> Result<Literal, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Literal::Str(s)),
            Some(Tok::Word(w)) => {
                if w == "null" {
                    return Ok(Literal::Null);
                }
                if let Ok(t) = DateTime::parse_from_rfc3339(&w) {
                    return Ok(Literal::DateTime(t.with_timezone(&Utc)));
                }
                if let Ok(n) = w.parse::<f64>()
                    && n.is_finite()
                {
                    return Ok(Literal::Number(n));
                }
                Err(format!("Syntax error: '{w}' is not a valid literal"))
            }
            other => Err(format!(
                "Syntax error: expected a literal, found {}",
                describe(other.as_ref())
            )),
        }
    }
}

fn describe(t: Option<&Tok>) -> String {
    match t {
        None => "end of input".into(),
        Some(Tok::LParen) => "'('".into(),
        Some(Tok::RParen) => "')'".into(),
        Some(Tok::Comma) => "','".into(),
        Some(Tok::Str(s)) => format!("'{s}'"),
        Some(Tok::Word(w)) => format!("'{w}'"),
    }
}

fn check_type(field: &str, kind: Kind, op: CmpOp, lit: &Literal) -> Result<(), String> {
    let ok = match (kind, lit) {
        (_, Literal::Null) => matches!(op, CmpOp::Eq | CmpOp::Ne),
        (Kind::Str, Literal::Str(_)) => matches!(op, CmpOp::Eq | CmpOp::Ne),
        (Kind::DateTime, Literal::DateTime(_)) => true,
        (Kind::Number, Literal::Number(_)) => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "A binary operator with incompatible types was detected for property '{field}' ({kind:?} compared with {lit:?})"
        ))
    }
}

/// Parses a `$filter` against a schema.
pub fn parse_filter(src: &str, schema: &Schema) -> Result<Expr, String> {
    let toks = lex(src)?;
    if toks.is_empty() {
        return Err("The $filter expression is empty".into());
    }
    let mut p = Parser {
        toks,
        pos: 0,
        schema,
        lambda: None,
        depth: 0,
    };
    let e = p.or()?;
    if p.pos < p.toks.len() {
        return Err(format!("Syntax error at {}", describe(p.peek())));
    }
    Ok(e)
}

/// Whether an entity matches.
pub fn eval(e: &Expr, ent: &dyn Entity) -> bool {
    eval_in(e, ent, None)
}

fn eval_in(e: &Expr, ent: &dyn Entity, item: Option<&str>) -> bool {
    match e {
        Expr::And(a, b) => eval_in(a, ent, item) && eval_in(b, ent, item),
        Expr::Or(a, b) => eval_in(a, ent, item) || eval_in(b, ent, item),
        Expr::Not(a) => !eval_in(a, ent, item),
        Expr::Cmp(f, op, lit) => compare(value_of(f, ent, item), *op, lit),
        Expr::In(f, lits) => {
            let v = value_of(f, ent, item);
            lits.iter().any(|l| compare(v.clone(), CmpOp::Eq, l))
        }
        Expr::Any(coll, inner) => match ent.field(coll) {
            Some(Value::Strings(items)) => items.iter().any(|s| eval_in(inner, ent, Some(s))),
            _ => false,
        },
    }
}

fn value_of<'a>(f: &str, ent: &'a dyn Entity, item: Option<&'a str>) -> Option<Value<'a>> {
    if f == ITEM {
        return Some(Value::Str(item));
    }
    ent.field(f)
}

fn compare(v: Option<Value<'_>>, op: CmpOp, lit: &Literal) -> bool {
    match (v, lit) {
        (Some(Value::Str(None)), Literal::Null) => op == CmpOp::Eq,
        (
            Some(Value::Str(Some(_))) | Some(Value::DateTime(_)) | Some(Value::Number(_)),
            Literal::Null,
        ) => op == CmpOp::Ne,
        (Some(Value::Str(None)), _) => op == CmpOp::Ne,
        (Some(Value::Str(Some(s))), Literal::Str(l)) => op.holds(s.cmp(l.as_str())),
        (Some(Value::DateTime(t)), Literal::DateTime(l)) => op.holds(t.cmp(l)),
        (Some(Value::Number(n)), Literal::Number(l)) => {
            n.partial_cmp(l).is_some_and(|o| op.holds(o))
        }
        _ => false,
    }
}

/// Sort order of `$orderby`.
#[derive(Debug, Clone)]
pub struct OrderBy {
    /// Property.
    pub field: String,
    /// `desc`.
    pub descending: bool,
}

/// The parsed query options of a list call.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// `$filter`.
    pub filter: Option<Expr>,
    /// `$top`.
    pub top: Option<usize>,
    /// `$skip`.
    pub skip: usize,
    /// `$orderby`.
    pub orderby: Option<OrderBy>,
    /// `$count=true`.
    pub count: bool,
}

/// Parses the raw query string of a list call. Parameters not starting with `$` are ignored;
/// unknown or repeated `$` options are errors.
pub fn parse_query(raw: Option<&str>, schema: &Schema) -> Result<Query, String> {
    let mut q = Query::default();
    let mut seen: Vec<String> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        if !k.starts_with('$') {
            continue;
        }
        if seen.iter().any(|s| *s == k) {
            return Err(format!("Query option '{k}' was specified more than once"));
        }
        seen.push(k.to_string());
        match k.as_ref() {
            "$filter" => q.filter = Some(parse_filter(&v, schema)?),
            "$top" => {
                let n: usize = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("Invalid value '{v}' for $top"))?;
                if n > MAX_TOP {
                    return Err(format!(
                        "The limit of '{MAX_TOP}' for Top query has been exceeded. The value from the incoming request is '{n}'."
                    ));
                }
                q.top = Some(n);
            }
            "$skip" => {
                q.skip = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("Invalid value '{v}' for $skip"))?
            }
            "$count" => {
                q.count = match v.trim() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(format!("Invalid value '{v}' for $count")),
                }
            }
            "$orderby" => {
                let mut parts = v.split_whitespace();
                let field = parts.next().ok_or("Empty $orderby")?.to_string();
                let descending = match parts.next() {
                    None | Some("asc") => false,
                    Some("desc") => true,
                    Some(d) => return Err(format!("Invalid $orderby direction '{d}'")),
                };
                if parts.next().is_some() || field.contains(',') {
                    return Err("Only one $orderby property is supported".into());
                }
                if !schema.orderable.contains(&field.as_str()) {
                    return Err(format!("Ordering by '{field}' is not supported"));
                }
                q.orderby = Some(OrderBy { field, descending });
            }
            other => return Err(format!("The query parameter '{other}' is not supported")),
        }
    }
    Ok(q)
}

/// Orders entities by a property (values of mismatched types compare equal).
pub fn order_cmp(a: &dyn Entity, b: &dyn Entity, field: &str) -> Ordering {
    match (a.field(field), b.field(field)) {
        (Some(Value::Str(x)), Some(Value::Str(y))) => x.cmp(&y),
        (Some(Value::DateTime(x)), Some(Value::DateTime(y))) => x.cmp(&y),
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            x.partial_cmp(&y).unwrap_or(Ordering::Equal)
        }
        _ => Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Schema = Schema {
        entity: "Test",
        fields: &[
            ("status", Kind::Str),
            ("type", Kind::Str),
            ("creationDateTimeUtc", Kind::DateTime),
            ("machineTags", Kind::Strings),
        ],
        unfilterable: &["lastUpdateDateTimeUtc"],
        orderable: &["creationDateTimeUtc"],
    };

    struct E {
        status: &'static str,
        kind: &'static str,
        created: DateTime<Utc>,
        tags: Vec<String>,
    }

    impl Entity for E {
        fn field(&self, name: &str) -> Option<Value<'_>> {
            match name {
                "status" => Some(Value::Str(Some(self.status))),
                "type" => Some(Value::Str(Some(self.kind))),
                "creationDateTimeUtc" => Some(Value::DateTime(self.created)),
                "machineTags" => Some(Value::Strings(&self.tags)),
                _ => None,
            }
        }
    }

    fn e() -> E {
        E {
            status: "Pending",
            kind: "Isolate",
            created: DateTime::parse_from_rfc3339("2026-01-02T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            tags: vec!["a".into(), "it's".into()],
        }
    }

    fn m(f: &str) -> bool {
        eval(&parse_filter(f, &S).unwrap(), &e())
    }

    #[test]
    fn evaluates_the_subset() {
        assert!(m("status eq 'Pending'"));
        assert!(!m("status eq 'pending'"));
        assert!(m(
            "type in ('Isolate','Unisolate') and status in ('Pending', 'InProgress')"
        ));
        assert!(m(
            "(status eq 'Failed' or status ne 'Succeeded') and not (type eq 'Unisolate')"
        ));
        assert!(m("creationDateTimeUtc ge 2026-01-01T00:00:00Z"));
        assert!(!m("creationDateTimeUtc gt 2026-01-02T00:00:00Z"));
        assert!(m("creationDateTimeUtc le 2026-01-02T00:00:00.0000000Z"));
        assert!(m("machineTags/any(tag: tag eq 'it''s')"));
        assert!(m("machineTags/any(t:t eq 'a')"));
        assert!(!m("machineTags/any(tag: tag eq 'b')"));
    }

    #[test]
    fn rejects_what_mde_rejects() {
        for bad in [
            "lastUpdateDateTimeUtc gt 2026-01-01T00:00:00Z",
            "status eq",
            "status eq 'x' and",
            "nosuch eq 'x'",
            "status gt 'x'",
            "creationDateTimeUtc ge '2026-01-01T00:00:00Z'",
            "status eq 'x')",
            "(status eq 'x'",
            "status EQ 'x'",
            "status eq 'unterminated",
            "machineTags eq 'a'",
            "",
        ] {
            assert!(parse_filter(bad, &S).is_err(), "{bad}");
        }
        let deep = format!("{}status eq 'x'{}", "(".repeat(500), ")".repeat(500));
        assert!(parse_filter(&deep, &S).is_err());
    }

    #[test]
    fn query_options() {
        let q = parse_query(
            Some("$top=5&$skip=2&$orderby=creationDateTimeUtc%20desc&$count=true&x=1"),
            &S,
        )
        .unwrap();
        assert_eq!((q.top, q.skip, q.count), (Some(5), 2, true));
        assert!(q.orderby.unwrap().descending);
        assert!(parse_query(Some("$top=10001"), &S).is_err());
        assert!(parse_query(Some("$top=-1"), &S).is_err());
        assert!(parse_query(Some("$expand=x"), &S).is_err());
        assert!(parse_query(Some("$orderby=status"), &S).is_err());
    }
}
