//! FHIRPath text to syntax tree: a tokenizer and a precedence-climbing parser for the full
//! expression grammar, so that what the subset does not support is refused by name rather than
//! misread. What the tree may hold is decided later, when it is compiled for a resource type.

use super::UnsupportedFhirPath;

/// A parsed FHIRPath expression.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Expression {
    Literal(Literal),
    /// `{}`
    EmptyCollection,
    /// `$this`, `%resource`, …
    Variable(String),
    /// A name at the start of an expression or after a dot: an element, or at the root a type.
    Member {
        target: Option<Box<Expression>>,
        name: String,
    },
    Function {
        target: Option<Box<Expression>>,
        name: String,
        arguments: Vec<Expression>,
    },
    Index {
        target: Box<Expression>,
        index: Box<Expression>,
    },
    Unary {
        operator: &'static str,
        operand: Box<Expression>,
    },
    Binary {
        operator: BinaryOperator,
        left: Box<Expression>,
        right: Box<Expression>,
    },
    TypeOperation {
        operator: TypeOperator,
        operand: Box<Expression>,
        type_specifier: TypeSpecifier,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Literal {
    String(String),
    Boolean(bool),
    Integer(i64),
    Decimal(String),
    /// `@2015-02-04`, `@T14:34`, …
    Temporal(String),
    /// `4 'mg'`, `3 days`
    Quantity(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BinaryOperator {
    Multiply,
    Divide,
    IntegerDivide,
    Modulo,
    Add,
    Subtract,
    Concatenate,
    Union,
    LessThan,
    GreaterThan,
    LessOrEqual,
    GreaterOrEqual,
    Equals,
    Equivalent,
    NotEquals,
    NotEquivalent,
    In,
    Contains,
    And,
    Or,
    Xor,
    Implies,
}

impl BinaryOperator {
    pub(super) fn symbol(self) -> &'static str {
        match self {
            BinaryOperator::Multiply => "*",
            BinaryOperator::Divide => "/",
            BinaryOperator::IntegerDivide => "div",
            BinaryOperator::Modulo => "mod",
            BinaryOperator::Add => "+",
            BinaryOperator::Subtract => "-",
            BinaryOperator::Concatenate => "&",
            BinaryOperator::Union => "|",
            BinaryOperator::LessThan => "<",
            BinaryOperator::GreaterThan => ">",
            BinaryOperator::LessOrEqual => "<=",
            BinaryOperator::GreaterOrEqual => ">=",
            BinaryOperator::Equals => "=",
            BinaryOperator::Equivalent => "~",
            BinaryOperator::NotEquals => "!=",
            BinaryOperator::NotEquivalent => "!~",
            BinaryOperator::In => "in",
            BinaryOperator::Contains => "contains",
            BinaryOperator::And => "and",
            BinaryOperator::Or => "or",
            BinaryOperator::Xor => "xor",
            BinaryOperator::Implies => "implies",
        }
    }

    /// Binding strength: higher binds tighter (the FHIRPath operator precedence table).
    fn precedence(self) -> u8 {
        match self {
            BinaryOperator::Multiply
            | BinaryOperator::Divide
            | BinaryOperator::IntegerDivide
            | BinaryOperator::Modulo => 10,
            BinaryOperator::Add | BinaryOperator::Subtract | BinaryOperator::Concatenate => 9,
            BinaryOperator::Union => 7,
            BinaryOperator::LessThan
            | BinaryOperator::GreaterThan
            | BinaryOperator::LessOrEqual
            | BinaryOperator::GreaterOrEqual => 6,
            BinaryOperator::Equals
            | BinaryOperator::Equivalent
            | BinaryOperator::NotEquals
            | BinaryOperator::NotEquivalent => 5,
            BinaryOperator::In | BinaryOperator::Contains => 4,
            BinaryOperator::And => 3,
            BinaryOperator::Or | BinaryOperator::Xor => 2,
            BinaryOperator::Implies => 1,
        }
    }
}

/// `is` and `as` bind between the additive operators and `|`.
const TYPE_OPERATOR_PRECEDENCE: u8 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TypeOperator {
    Is,
    As,
}

/// A type name, optionally qualified by its namespace (`FHIR.Quantity`, `System.Boolean`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TypeSpecifier {
    pub(super) namespace: Option<String>,
    pub(super) name: String,
}

impl std::fmt::Display for TypeSpecifier {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(formatter, "{namespace}.{}", self.name),
            None => formatter.write_str(&self.name),
        }
    }
}

impl Expression {
    /// The expression as a type specifier, when it is one (`Quantity`, `FHIR.Quantity`).
    pub(super) fn as_type_specifier(&self) -> Option<TypeSpecifier> {
        match self {
            Expression::Member { target: None, name } => Some(TypeSpecifier {
                namespace: None,
                name: name.clone(),
            }),
            Expression::Member {
                target: Some(target),
                name,
            } => match &**target {
                Expression::Member {
                    target: None,
                    name: namespace,
                } => Some(TypeSpecifier {
                    namespace: Some(namespace.clone()),
                    name: name.clone(),
                }),
                _ => None,
            },
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Identifier(String),
    /// A backtick-quoted identifier: never a keyword.
    DelimitedIdentifier(String),
    String(String),
    Number(String),
    Temporal(String),
    Variable(String),
    Symbol(&'static str),
}

#[derive(Debug, Clone)]
struct Spanned {
    token: Token,
    offset: usize,
}

const SYMBOLS: [&str; 20] = [
    "<=", ">=", "!=", "!~", ".", "(", ")", "[", "]", "{", "}", ",", "|", "=", "~", "<", ">", "+",
    "-", "*",
];

fn syntax_error(offset: usize, message: impl Into<String>) -> UnsupportedFhirPath {
    UnsupportedFhirPath::Syntax {
        offset,
        message: message.into(),
    }
}

fn tokenize(text: &str) -> Result<Vec<Spanned>, UnsupportedFhirPath> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut position = 0;
    while position < bytes.len() {
        let start = position;
        let byte = bytes[position];
        if byte.is_ascii_whitespace() {
            position += 1;
            continue;
        }
        if text[position..].starts_with("//") {
            position = text[position..]
                .find('\n')
                .map_or(bytes.len(), |newline| position + newline + 1);
            continue;
        }
        if text[position..].starts_with("/*") {
            let end = text[position + 2..]
                .find("*/")
                .ok_or_else(|| syntax_error(start, "unterminated comment"))?;
            position += 2 + end + 2;
            continue;
        }
        let token = match byte {
            b'\'' => {
                let (value, end) = quoted(text, position, b'\'')?;
                position = end;
                Token::String(value)
            }
            b'`' => {
                let (value, end) = quoted(text, position, b'`')?;
                position = end;
                Token::DelimitedIdentifier(value)
            }
            b'0'..=b'9' => {
                position = scan_while(bytes, position, |byte| byte.is_ascii_digit());
                if bytes.get(position) == Some(&b'.')
                    && bytes.get(position + 1).is_some_and(u8::is_ascii_digit)
                {
                    position = scan_while(bytes, position + 1, |byte| byte.is_ascii_digit());
                }
                Token::Number(text[start..position].to_owned())
            }
            b'@' => {
                position += 1;
                while let Some(&byte) = bytes.get(position) {
                    let fraction =
                        byte == b'.' && bytes.get(position + 1).is_some_and(u8::is_ascii_digit);
                    if !(byte.is_ascii_alphanumeric()
                        || matches!(byte, b'-' | b':' | b'+')
                        || fraction)
                    {
                        break;
                    }
                    position += 1;
                }
                Token::Temporal(text[start..position].to_owned())
            }
            b'$' | b'%' => {
                position = if bytes.get(position + 1) == Some(&b'`') {
                    quoted(text, position + 1, b'`')?.1
                } else if bytes.get(position + 1) == Some(&b'\'') {
                    quoted(text, position + 1, b'\'')?.1
                } else {
                    scan_while(bytes, position + 1, is_identifier_byte)
                };
                if position == start + 1 {
                    return Err(syntax_error(start, "a variable needs a name"));
                }
                Token::Variable(text[start..position].to_owned())
            }
            byte if byte.is_ascii_alphabetic() || byte == b'_' => {
                position = scan_while(bytes, position, is_identifier_byte);
                Token::Identifier(text[start..position].to_owned())
            }
            b'/' => {
                position += 1;
                Token::Symbol("/")
            }
            b'&' => {
                position += 1;
                Token::Symbol("&")
            }
            _ => {
                let symbol = SYMBOLS
                    .iter()
                    .find(|symbol| text[position..].starts_with(**symbol))
                    .ok_or_else(|| syntax_error(start, "unexpected character"))?;
                position += symbol.len();
                Token::Symbol(symbol)
            }
        };
        tokens.push(Spanned {
            token,
            offset: start,
        });
    }
    Ok(tokens)
}

fn is_identifier_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

fn scan_while(bytes: &[u8], mut position: usize, accept: impl Fn(u8) -> bool) -> usize {
    while position < bytes.len() && accept(bytes[position]) {
        position += 1;
    }
    position
}

/// The unescaped text of the literal quoted by `quote` at `start`, and the offset after it.
fn quoted(text: &str, start: usize, quote: u8) -> Result<(String, usize), UnsupportedFhirPath> {
    let mut value = String::new();
    let mut characters = text[start + 1..].char_indices();
    while let Some((relative, character)) = characters.next() {
        match character {
            character if character as u32 == u32::from(quote) => {
                return Ok((value, start + 1 + relative + 1));
            }
            '\\' => {
                let (_, escaped) = characters
                    .next()
                    .ok_or_else(|| syntax_error(start, "unterminated escape"))?;
                match escaped {
                    '\'' | '"' | '`' | '\\' | '/' => value.push(escaped),
                    'f' => value.push('\u{000C}'),
                    'n' => value.push('\n'),
                    'r' => value.push('\r'),
                    't' => value.push('\t'),
                    'u' => {
                        let digits: String = (0..4)
                            .filter_map(|_| characters.next().map(|(_, digit)| digit))
                            .collect();
                        let code = u32::from_str_radix(&digits, 16)
                            .ok()
                            .filter(|_| digits.len() == 4)
                            .and_then(char::from_u32)
                            .ok_or_else(|| syntax_error(start, "bad unicode escape"))?;
                        value.push(code);
                    }
                    _ => return Err(syntax_error(start, "unknown escape")),
                }
            }
            character => value.push(character),
        }
    }
    Err(syntax_error(start, "unterminated literal"))
}

/// Parses a whole FHIRPath expression.
pub(super) fn parse(text: &str) -> Result<Expression, UnsupportedFhirPath> {
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens,
        position: 0,
        end_offset: text.len(),
    };
    let expression = parser.expression(0)?;
    match parser.peek() {
        None => Ok(expression),
        Some(_) => Err(syntax_error(
            parser.offset(),
            "unexpected text after the expression",
        )),
    }
}

struct Parser {
    tokens: Vec<Spanned>,
    position: usize,
    end_offset: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.position).map(|spanned| &spanned.token)
    }

    fn offset(&self) -> usize {
        self.tokens
            .get(self.position)
            .map_or(self.end_offset, |spanned| spanned.offset)
    }

    fn advance(&mut self) -> Option<Token> {
        let token = self
            .tokens
            .get(self.position)
            .map(|spanned| spanned.token.clone());
        self.position += 1;
        token
    }

    fn eat_symbol(&mut self, symbol: &'static str) -> bool {
        if self.peek() == Some(&Token::Symbol(symbol)) {
            self.position += 1;
            true
        } else {
            false
        }
    }

    fn expect_symbol(&mut self, symbol: &'static str) -> Result<(), UnsupportedFhirPath> {
        if self.eat_symbol(symbol) {
            Ok(())
        } else {
            Err(syntax_error(self.offset(), format!("expected '{symbol}'")))
        }
    }

    /// Precedence climbing over the binary and type operators binding at least `minimum`.
    fn expression(&mut self, minimum: u8) -> Result<Expression, UnsupportedFhirPath> {
        let mut left = self.unary()?;
        loop {
            if let Some(operator) = self.peek_type_operator()
                && TYPE_OPERATOR_PRECEDENCE >= minimum
            {
                self.position += 1;
                let type_specifier = self.type_specifier()?;
                left = Expression::TypeOperation {
                    operator,
                    operand: Box::new(left),
                    type_specifier,
                };
                continue;
            }
            let Some(operator) = self.peek_binary_operator() else {
                return Ok(left);
            };
            let precedence = operator.precedence();
            if precedence < minimum {
                return Ok(left);
            }
            self.position += 1;
            let right = self.expression(precedence + 1)?;
            left = Expression::Binary {
                operator,
                left: Box::new(left),
                right: Box::new(right),
            };
        }
    }

    fn peek_type_operator(&self) -> Option<TypeOperator> {
        match self.peek()? {
            Token::Identifier(word) if word == "is" => Some(TypeOperator::Is),
            Token::Identifier(word) if word == "as" => Some(TypeOperator::As),
            _ => None,
        }
    }

    fn peek_binary_operator(&self) -> Option<BinaryOperator> {
        Some(match self.peek()? {
            Token::Symbol("*") => BinaryOperator::Multiply,
            Token::Symbol("/") => BinaryOperator::Divide,
            Token::Symbol("+") => BinaryOperator::Add,
            Token::Symbol("-") => BinaryOperator::Subtract,
            Token::Symbol("&") => BinaryOperator::Concatenate,
            Token::Symbol("|") => BinaryOperator::Union,
            Token::Symbol("<") => BinaryOperator::LessThan,
            Token::Symbol(">") => BinaryOperator::GreaterThan,
            Token::Symbol("<=") => BinaryOperator::LessOrEqual,
            Token::Symbol(">=") => BinaryOperator::GreaterOrEqual,
            Token::Symbol("=") => BinaryOperator::Equals,
            Token::Symbol("~") => BinaryOperator::Equivalent,
            Token::Symbol("!=") => BinaryOperator::NotEquals,
            Token::Symbol("!~") => BinaryOperator::NotEquivalent,
            Token::Identifier(word) => match word.as_str() {
                "div" => BinaryOperator::IntegerDivide,
                "mod" => BinaryOperator::Modulo,
                "in" => BinaryOperator::In,
                "contains" => BinaryOperator::Contains,
                "and" => BinaryOperator::And,
                "or" => BinaryOperator::Or,
                "xor" => BinaryOperator::Xor,
                "implies" => BinaryOperator::Implies,
                _ => return None,
            },
            _ => return None,
        })
    }

    fn type_specifier(&mut self) -> Result<TypeSpecifier, UnsupportedFhirPath> {
        let first = self.identifier()?;
        if self.eat_symbol(".") {
            let name = self.identifier()?;
            return Ok(TypeSpecifier {
                namespace: Some(first),
                name,
            });
        }
        Ok(TypeSpecifier {
            namespace: None,
            name: first,
        })
    }

    fn identifier(&mut self) -> Result<String, UnsupportedFhirPath> {
        let offset = self.offset();
        match self.advance() {
            Some(Token::Identifier(name) | Token::DelimitedIdentifier(name)) => Ok(name),
            _ => Err(syntax_error(offset, "expected an identifier")),
        }
    }

    fn unary(&mut self) -> Result<Expression, UnsupportedFhirPath> {
        for operator in ["+", "-"] {
            if self.eat_symbol(operator) {
                let operand = self.unary()?;
                return Ok(Expression::Unary {
                    operator,
                    operand: Box::new(operand),
                });
            }
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Result<Expression, UnsupportedFhirPath> {
        let mut expression = self.term()?;
        loop {
            if self.eat_symbol(".") {
                expression = self.invocation(Some(Box::new(expression)))?;
            } else if self.eat_symbol("[") {
                let index = self.expression(0)?;
                self.expect_symbol("]")?;
                expression = Expression::Index {
                    target: Box::new(expression),
                    index: Box::new(index),
                };
            } else {
                return Ok(expression);
            }
        }
    }

    /// A member or function call on `target` (or at the start, on the focus).
    fn invocation(
        &mut self,
        target: Option<Box<Expression>>,
    ) -> Result<Expression, UnsupportedFhirPath> {
        let name = self.identifier()?;
        if !self.eat_symbol("(") {
            return Ok(Expression::Member { target, name });
        }
        let mut arguments = Vec::new();
        if !self.eat_symbol(")") {
            loop {
                arguments.push(self.expression(0)?);
                if self.eat_symbol(")") {
                    break;
                }
                self.expect_symbol(",")?;
            }
        }
        Ok(Expression::Function {
            target,
            name,
            arguments,
        })
    }

    fn term(&mut self) -> Result<Expression, UnsupportedFhirPath> {
        let offset = self.offset();
        match self.peek().cloned() {
            None => Err(syntax_error(offset, "expected an expression")),
            Some(Token::String(value)) => {
                self.position += 1;
                Ok(Expression::Literal(Literal::String(value)))
            }
            Some(Token::Number(digits)) => {
                self.position += 1;
                if let Some(Token::String(unit) | Token::Identifier(unit)) = self.peek().cloned()
                    && (matches!(self.peek(), Some(Token::String(_))) || is_calendar_unit(&unit))
                {
                    self.position += 1;
                    return Ok(Expression::Literal(Literal::Quantity(format!(
                        "{digits} {unit}"
                    ))));
                }
                if digits.contains('.') {
                    return Ok(Expression::Literal(Literal::Decimal(digits)));
                }
                digits
                    .parse()
                    .map(|integer| Expression::Literal(Literal::Integer(integer)))
                    .map_err(|_| syntax_error(offset, "integer out of range"))
            }
            Some(Token::Temporal(text)) => {
                self.position += 1;
                Ok(Expression::Literal(Literal::Temporal(text)))
            }
            Some(Token::Variable(name)) => {
                self.position += 1;
                Ok(Expression::Variable(name))
            }
            Some(Token::Identifier(word)) if word == "true" || word == "false" => {
                self.position += 1;
                Ok(Expression::Literal(Literal::Boolean(word == "true")))
            }
            Some(Token::Identifier(_) | Token::DelimitedIdentifier(_)) => self.invocation(None),
            Some(Token::Symbol("(")) => {
                self.position += 1;
                let inner = self.expression(0)?;
                self.expect_symbol(")")?;
                Ok(inner)
            }
            Some(Token::Symbol("{")) => {
                self.position += 1;
                self.expect_symbol("}")?;
                Ok(Expression::EmptyCollection)
            }
            Some(Token::Symbol(_)) => Err(syntax_error(offset, "expected an expression")),
        }
    }
}

fn is_calendar_unit(word: &str) -> bool {
    matches!(
        word,
        "year"
            | "years"
            | "month"
            | "months"
            | "week"
            | "weeks"
            | "day"
            | "days"
            | "hour"
            | "hours"
            | "minute"
            | "minutes"
            | "second"
            | "seconds"
            | "millisecond"
            | "milliseconds"
    )
}
