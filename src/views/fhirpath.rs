//! A parser for the FHIRPath subset that SQL-on-FHIR v2 ViewDefinitions use.
//!
//! It turns a path string into an [`Expr`] tree and nothing more: which functions exist and
//! what they mean in SQL is the compiler's business (`compile`). Parsing never panics on any
//! input; every failure is a [`ParseError`] naming the character offset.

use std::fmt;

/// A parsed FHIRPath expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `{}`: the empty collection.
    Empty,
    Str(String),
    /// A number literal as written, and whether it is an integer.
    Num(String, bool),
    Bool(bool),
    /// `@2020-01-01`, `@2020-01-01T10:00:00Z`, `@T12:00` (the text after `@`).
    Temporal(String),
    /// `$this`.
    This,
    /// `$index`.
    Index,
    /// `%name`.
    Env(String),
    /// A member access, from the focus (`None`) or from an expression.
    Member(Option<Box<Expr>>, String),
    /// A function call, on the focus (`None`) or on an expression.
    Call(Option<Box<Expr>>, String, Vec<Expr>),
    /// `expr[index]`.
    Indexer(Box<Expr>, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// Unary minus.
    Neg(Box<Expr>),
    /// `expr is Type` / `expr as Type`.
    TypeOp(bool, Box<Expr>, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Implies,
    Or,
    Xor,
    And,
    In,
    Contains,
    Eq,
    Ne,
    Equiv,
    NotEquiv,
    Lt,
    Gt,
    Le,
    Ge,
    Union,
    Add,
    Sub,
    Concat,
    Mul,
    Div,
    IntDiv,
    Mod,
}

/// Why a path does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at offset {}", self.message, self.offset)
    }
}

impl std::error::Error for ParseError {}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A backtick-delimited identifier: never a keyword.
    Quoted(String),
    Str(String),
    Num(String, bool),
    Temporal(String),
    Special(String),
    Env(String),
    Sym(&'static str),
}

/// Parses one FHIRPath expression.
pub fn parse(text: &str) -> Result<Expr, ParseError> {
    let tokens = lex(text)?;
    let mut parser = Parser {
        tokens,
        pos: 0,
        len: text.len(),
    };
    let expr = parser.expr(0)?;
    if let Some((offset, tok)) = parser.tokens.get(parser.pos) {
        return Err(ParseError {
            offset: *offset,
            message: format!("unexpected {}", describe(tok)),
        });
    }
    Ok(expr)
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Ident(s) | Tok::Quoted(s) => format!("identifier {s:?}"),
        Tok::Str(_) => "string".into(),
        Tok::Num(n, _) => format!("number {n}"),
        Tok::Temporal(t) => format!("@{t}"),
        Tok::Special(s) => format!("${s}"),
        Tok::Env(s) => format!("%{s}"),
        Tok::Sym(s) => format!("{s:?}"),
    }
}

fn lex(text: &str) -> Result<Vec<(usize, Tok)>, ParseError> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |offset: usize, message: &str| ParseError {
        offset,
        message: message.to_string(),
    };
    while i < chars.len() {
        let (at, c) = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        // Comments: `//` to the end of the line and `/* ... */`.
        if c == '/' && chars.get(i + 1).map(|x| x.1) == Some('/') {
            while i < chars.len() && chars[i].1 != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && chars.get(i + 1).map(|x| x.1) == Some('*') {
            i += 2;
            while i + 1 < chars.len() && !(chars[i].1 == '*' && chars[i + 1].1 == '/') {
                i += 1;
            }
            if i + 1 >= chars.len() {
                return Err(err(at, "unterminated comment"));
            }
            i += 2;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].1.is_ascii_alphanumeric() || chars[i].1 == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().map(|x| x.1).collect();
            out.push((at, Tok::Ident(word)));
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].1.is_ascii_digit() {
                i += 1;
            }
            let mut integer = true;
            if i + 1 < chars.len() && chars[i].1 == '.' && chars[i + 1].1.is_ascii_digit() {
                integer = false;
                i += 1;
                while i < chars.len() && chars[i].1.is_ascii_digit() {
                    i += 1;
                }
            }
            let num: String = chars[start..i].iter().map(|x| x.1).collect();
            // A trailing `L` marks a long integer literal.
            if integer && i < chars.len() && chars[i].1 == 'L' {
                i += 1;
            }
            out.push((at, Tok::Num(num, integer)));
            continue;
        }
        match c {
            '\'' | '`' => {
                let (value, next) = quoted(&chars, i, c)?;
                i = next;
                out.push((
                    at,
                    if c == '\'' {
                        Tok::Str(value)
                    } else {
                        Tok::Quoted(value)
                    },
                ));
            }
            '@' => {
                let start = i + 1;
                i += 1;
                while i < chars.len()
                    && (chars[i].1.is_ascii_alphanumeric() || "-:.+Z".contains(chars[i].1))
                {
                    i += 1;
                }
                if i == start {
                    return Err(err(at, "empty date/time literal"));
                }
                let value: String = chars[start..i].iter().map(|x| x.1).collect();
                out.push((at, Tok::Temporal(value)));
            }
            '$' | '%' => {
                i += 1;
                let start = i;
                if c == '%' && i < chars.len() && (chars[i].1 == '`' || chars[i].1 == '\'') {
                    let (value, next) = quoted(&chars, i, chars[i].1)?;
                    i = next;
                    out.push((at, Tok::Env(value)));
                    continue;
                }
                while i < chars.len() && (chars[i].1.is_ascii_alphanumeric() || chars[i].1 == '_') {
                    i += 1;
                }
                if i == start {
                    return Err(err(at, &format!("expected a name after {c:?}")));
                }
                let name: String = chars[start..i].iter().map(|x| x.1).collect();
                out.push((
                    at,
                    if c == '$' {
                        Tok::Special(name)
                    } else {
                        Tok::Env(name)
                    },
                ));
            }
            _ => {
                let two: String = chars[i..(i + 2).min(chars.len())]
                    .iter()
                    .map(|x| x.1)
                    .collect();
                let sym = ["<=", ">=", "!=", "!~"]
                    .into_iter()
                    .find(|s| *s == two)
                    .or_else(|| {
                        [
                            ".", "(", ")", "[", "]", "{", "}", ",", "=", "~", "<", ">", "|", "+",
                            "-", "*", "/", "&",
                        ]
                        .into_iter()
                        .find(|s| s.starts_with(c))
                    });
                match sym {
                    Some(s) => {
                        i += s.chars().count();
                        out.push((at, Tok::Sym(s)));
                    }
                    None => return Err(err(at, &format!("unexpected character {c:?}"))),
                }
            }
        }
    }
    Ok(out)
}

/// Reads a `'...'` or backtick literal starting at `start`, with FHIRPath escapes.
fn quoted(
    chars: &[(usize, char)],
    start: usize,
    delim: char,
) -> Result<(String, usize), ParseError> {
    let mut i = start + 1;
    let mut value = String::new();
    while i < chars.len() {
        let c = chars[i].1;
        if c == delim {
            return Ok((value, i + 1));
        }
        if c == '\\' {
            let Some(&(at, e)) = chars.get(i + 1) else {
                break;
            };
            i += 2;
            match e {
                'n' => value.push('\n'),
                'r' => value.push('\r'),
                't' => value.push('\t'),
                'f' => value.push('\u{c}'),
                'u' => {
                    let hex: String = chars[i..(i + 4).min(chars.len())]
                        .iter()
                        .map(|x| x.1)
                        .collect();
                    let code = u32::from_str_radix(&hex, 16)
                        .ok()
                        .and_then(char::from_u32)
                        .ok_or(ParseError {
                            offset: at,
                            message: "bad \\u escape".into(),
                        })?;
                    value.push(code);
                    i += 4;
                }
                other => value.push(other),
            }
            continue;
        }
        value.push(c);
        i += 1;
    }
    Err(ParseError {
        offset: chars[start].0,
        message: "unterminated string".into(),
    })
}

struct Parser {
    tokens: Vec<(usize, Tok)>,
    pos: usize,
    len: usize,
}

/// Binding power of the binary operators, lowest first (FHIRPath's precedence table).
fn binary_op(tok: &Tok) -> Option<(BinOp, u8)> {
    let op = match tok {
        Tok::Ident(w) => match w.as_str() {
            "implies" => (BinOp::Implies, 1),
            "or" => (BinOp::Or, 2),
            "xor" => (BinOp::Xor, 2),
            "and" => (BinOp::And, 3),
            "in" => (BinOp::In, 4),
            "contains" => (BinOp::Contains, 4),
            "div" => (BinOp::IntDiv, 9),
            "mod" => (BinOp::Mod, 9),
            _ => return None,
        },
        Tok::Sym(s) => match *s {
            "=" => (BinOp::Eq, 5),
            "!=" => (BinOp::Ne, 5),
            "~" => (BinOp::Equiv, 5),
            "!~" => (BinOp::NotEquiv, 5),
            "<" => (BinOp::Lt, 6),
            ">" => (BinOp::Gt, 6),
            "<=" => (BinOp::Le, 6),
            ">=" => (BinOp::Ge, 6),
            "|" => (BinOp::Union, 7),
            "+" => (BinOp::Add, 8),
            "-" => (BinOp::Sub, 8),
            "&" => (BinOp::Concat, 8),
            "*" => (BinOp::Mul, 9),
            "/" => (BinOp::Div, 9),
            _ => return None,
        },
        _ => return None,
    };
    Some(op)
}

/// `is` and `as` bind between `|` and the additive operators.
const TYPE_OP_POWER: u8 = 7;

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|t| &t.1)
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.len, |t| t.0)
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            offset: self.offset(),
            message: message.into(),
        })
    }

    fn eat(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(s)) if *s == sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, sym: &str) -> Result<(), ParseError> {
        if self.eat(sym) {
            Ok(())
        } else {
            match self.peek() {
                Some(tok) => {
                    let found = describe(tok);
                    self.error(format!("expected {sym:?}, found {found}"))
                }
                None => self.error(format!("expected {sym:?} at the end")),
            }
        }
    }

    fn expr(&mut self, min_power: u8) -> Result<Expr, ParseError> {
        let mut left = self.unary()?;
        while let Some(tok) = self.peek() {
            if let Tok::Ident(w) = tok
                && (w == "is" || w == "as")
                && TYPE_OP_POWER > min_power
            {
                let is = w == "is";
                self.pos += 1;
                let name = self.type_name()?;
                left = Expr::TypeOp(is, Box::new(left), name);
                continue;
            }
            let Some((op, power)) = binary_op(tok) else {
                break;
            };
            if power <= min_power {
                break;
            }
            self.pos += 1;
            let right = self.expr(power)?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn type_name(&mut self) -> Result<String, ParseError> {
        let mut name = self.identifier()?;
        while self.eat(".") {
            name = self.identifier()?;
        }
        Ok(name)
    }

    fn identifier(&mut self) -> Result<String, ParseError> {
        match self.peek().cloned() {
            Some(Tok::Ident(w)) | Some(Tok::Quoted(w)) => {
                self.pos += 1;
                Ok(w)
            }
            _ => self.error("expected an identifier"),
        }
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        if self.eat("-") {
            let inner = self.unary()?;
            return Ok(Expr::Neg(Box::new(inner)));
        }
        if self.eat("+") {
            return self.unary();
        }
        let mut expr = self.term()?;
        loop {
            if self.eat(".") {
                let name = self.identifier()?;
                expr = self.invocation(Some(Box::new(expr)), name)?;
            } else if self.eat("[") {
                let index = self.expr(0)?;
                self.expect("]")?;
                expr = Expr::Indexer(Box::new(expr), Box::new(index));
            } else {
                break;
            }
        }
        Ok(expr)
    }

    /// A member or, when `(` follows, a function call.
    fn invocation(&mut self, on: Option<Box<Expr>>, name: String) -> Result<Expr, ParseError> {
        if !self.eat("(") {
            return Ok(Expr::Member(on, name));
        }
        let mut args = Vec::new();
        if !self.eat(")") {
            loop {
                args.push(self.expr(0)?);
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
        }
        Ok(Expr::Call(on, name, args))
    }

    fn term(&mut self) -> Result<Expr, ParseError> {
        let Some(tok) = self.peek().cloned() else {
            return self.error("expected an expression");
        };
        self.pos += 1;
        Ok(match tok {
            Tok::Str(s) => Expr::Str(s),
            Tok::Num(n, integer) => Expr::Num(n, integer),
            Tok::Temporal(t) => Expr::Temporal(t),
            Tok::Env(name) => Expr::Env(name),
            Tok::Special(s) => match s.as_str() {
                "this" => Expr::This,
                "index" => Expr::Index,
                _ => {
                    self.pos -= 1;
                    return self.error(format!("unknown ${s}"));
                }
            },
            Tok::Ident(w) if w == "true" => Expr::Bool(true),
            Tok::Ident(w) if w == "false" => Expr::Bool(false),
            Tok::Ident(w) | Tok::Quoted(w) => self.invocation(None, w)?,
            Tok::Sym("(") => {
                let inner = self.expr(0)?;
                self.expect(")")?;
                inner
            }
            Tok::Sym("{") => {
                self.expect("}")?;
                Expr::Empty
            }
            other => {
                self.pos -= 1;
                return self.error(format!("unexpected {}", describe(&other)));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(on: Option<Expr>, name: &str) -> Expr {
        Expr::Member(on.map(Box::new), name.into())
    }

    #[test]
    fn navigation_calls_and_indexers_chain_left_to_right() {
        let e = parse("name.where(use = 'official').family[0]").unwrap();
        let expected = Expr::Indexer(
            Box::new(member(
                Some(Expr::Call(
                    Some(Box::new(member(None, "name"))),
                    "where".into(),
                    vec![Expr::Binary(
                        BinOp::Eq,
                        Box::new(member(None, "use")),
                        Box::new(Expr::Str("official".into())),
                    )],
                )),
                "family",
            )),
            Box::new(Expr::Num("0".into(), true)),
        );
        assert_eq!(e, expected);
    }

    #[test]
    fn precedence_follows_the_fhirpath_table() {
        let e = parse("a or b and c = 1 + 2 * 3").unwrap();
        let Expr::Binary(BinOp::Or, _, right) = e else {
            panic!("or is lowest: {e:?}")
        };
        let Expr::Binary(BinOp::And, _, right) = *right else {
            panic!("and under or")
        };
        let Expr::Binary(BinOp::Eq, _, right) = *right else {
            panic!("= under and")
        };
        assert!(matches!(*right, Expr::Binary(BinOp::Add, _, _)));
    }

    #[test]
    fn literals_constants_and_specials() {
        assert_eq!(parse("'a\\'b'").unwrap(), Expr::Str("a'b".into()));
        assert_eq!(parse("1.50").unwrap(), Expr::Num("1.50".into(), false));
        assert_eq!(parse("%name_use").unwrap(), Expr::Env("name_use".into()));
        assert_eq!(parse("$this").unwrap(), Expr::This);
        assert_eq!(parse("{}").unwrap(), Expr::Empty);
        assert_eq!(
            parse("@2020-01-01").unwrap(),
            Expr::Temporal("2020-01-01".into())
        );
        assert!(matches!(
            parse("value is Quantity").unwrap(),
            Expr::TypeOp(true, _, ref t) if t == "Quantity"
        ));
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        for bad in [
            "@@", "name.", "where(", "'open", "a +", ")", "a b", "$foo", "[1]", "1 +* 2",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
