//! A reader of RFC 8259 JSON text written for the body-parser property, independent of the
//! JSON library the code under test uses: a recursive-descent recogniser over bytes that
//! builds the value it recognises.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

/// Containers nested deeper than this are not read further, so the recursion stays well
/// within a test thread's stack.
pub const READER_NESTING_GUARD: usize = 512;

/// A JSON value as the text states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonTree {
    Null,
    Boolean(bool),
    /// The number as written, its exponent marker in lower case (`E` and `e` are the
    /// same token).
    Number(String),
    String(String),
    Array(Vec<JsonTree>),
    /// A member name written more than once keeps its last value.
    Object(BTreeMap<String, JsonTree>),
}

/// What reading a byte string as one JSON text found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonReading {
    WellFormed {
        tree: JsonTree,
        /// The deepest container nesting in the text, counting members a later
        /// member of the same name replaced.
        textual_nesting: usize,
    },
    Malformed,
    /// Containers nest deeper than [`READER_NESTING_GUARD`] before the text is malformed
    /// or ends.
    NestedBeyondTheGuard,
}

/// Reads `bytes` as one JSON text: a value with optional whitespace around it; strings
/// must be UTF-8 and their `\u` escapes must form Unicode scalar values (a lone surrogate
/// is malformed, as RFC 8259 §8.2 allows).
pub fn read_json_text(bytes: &[u8]) -> JsonReading {
    let mut reader = Reader {
        bytes,
        position: 0,
        deepest_nesting: 0,
    };
    let value = reader.read_value(0).and_then(|tree| {
        reader.skip_whitespace();
        if reader.position == bytes.len() {
            Ok(tree)
        } else {
            Err(ReadFailure::Malformed)
        }
    });
    match value {
        Ok(tree) => JsonReading::WellFormed {
            tree,
            textual_nesting: reader.deepest_nesting,
        },
        Err(ReadFailure::Malformed) => JsonReading::Malformed,
        Err(ReadFailure::NestedBeyondTheGuard) => JsonReading::NestedBeyondTheGuard,
    }
}

/// The deepest nesting of arrays and objects in `bytes` as its brackets state it, whether
/// or not the text is well-formed: a `[` or `{` opens a level and a `]` or `}` closes one
/// (never below none), except inside a string literal, which runs from a `"` to the next
/// `"` that an even run of backslashes precedes (or to the end).
pub fn bracket_nesting(bytes: &[u8]) -> usize {
    let mut deepest = 0;
    let mut open = 0_usize;
    let mut position = 0;
    while position < bytes.len() {
        match bytes[position] {
            b'"' => position = string_literal_end(bytes, position + 1),
            b'[' | b'{' => {
                open += 1;
                deepest = deepest.max(open);
            }
            b']' | b'}' => open = open.saturating_sub(1),
            _ => {}
        }
        position += 1;
    }
    deepest
}

/// The index of the `"` closing a string literal whose text starts at `text_start`, or
/// the end of `bytes`.
fn string_literal_end(bytes: &[u8], text_start: usize) -> usize {
    let mut candidate = text_start;
    while candidate < bytes.len() {
        if bytes[candidate] == b'"' {
            let backslashes = bytes[text_start..candidate]
                .iter()
                .rev()
                .take_while(|byte| **byte == b'\\')
                .count();
            if backslashes % 2 == 0 {
                return candidate;
            }
        }
        candidate += 1;
    }
    bytes.len()
}

enum ReadFailure {
    Malformed,
    NestedBeyondTheGuard,
}

const CONTINUATION_BYTES: RangeInclusive<u8> = 0x80..=0xBF;

struct Reader<'text> {
    bytes: &'text [u8],
    position: usize,
    deepest_nesting: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn next_byte(&mut self) -> Result<u8, ReadFailure> {
        let byte = self.peek().ok_or(ReadFailure::Malformed)?;
        self.position += 1;
        Ok(byte)
    }

    fn expect_byte(&mut self, expected: u8) -> Result<(), ReadFailure> {
        if self.next_byte()? == expected {
            Ok(())
        } else {
            Err(ReadFailure::Malformed)
        }
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.position += 1;
        }
    }

    /// Reads a value inside `nesting` containers, after optional whitespace.
    fn read_value(&mut self, nesting: usize) -> Result<JsonTree, ReadFailure> {
        self.skip_whitespace();
        match self.peek() {
            Some(b'{') => self.read_object(nesting + 1),
            Some(b'[') => self.read_array(nesting + 1),
            Some(b'"') => self.read_string().map(JsonTree::String),
            Some(b't') => self.read_literal(b"true", JsonTree::Boolean(true)),
            Some(b'f') => self.read_literal(b"false", JsonTree::Boolean(false)),
            Some(b'n') => self.read_literal(b"null", JsonTree::Null),
            Some(b'-' | b'0'..=b'9') => self.read_number(),
            _ => Err(ReadFailure::Malformed),
        }
    }

    fn read_literal(&mut self, literal: &[u8], tree: JsonTree) -> Result<JsonTree, ReadFailure> {
        for expected in literal {
            self.expect_byte(*expected)?;
        }
        Ok(tree)
    }

    /// Steps over the opening bracket of a container that is the `nesting`th one deep.
    fn enter_container(&mut self, nesting: usize) -> Result<(), ReadFailure> {
        if nesting > READER_NESTING_GUARD {
            return Err(ReadFailure::NestedBeyondTheGuard);
        }
        self.deepest_nesting = self.deepest_nesting.max(nesting);
        self.position += 1;
        self.skip_whitespace();
        Ok(())
    }

    fn read_array(&mut self, nesting: usize) -> Result<JsonTree, ReadFailure> {
        self.enter_container(nesting)?;
        let mut items = Vec::new();
        if self.peek() == Some(b']') {
            self.position += 1;
            return Ok(JsonTree::Array(items));
        }
        loop {
            items.push(self.read_value(nesting)?);
            self.skip_whitespace();
            match self.next_byte()? {
                b',' => {}
                b']' => return Ok(JsonTree::Array(items)),
                _ => return Err(ReadFailure::Malformed),
            }
        }
    }

    fn read_object(&mut self, nesting: usize) -> Result<JsonTree, ReadFailure> {
        self.enter_container(nesting)?;
        let mut members = BTreeMap::new();
        if self.peek() == Some(b'}') {
            self.position += 1;
            return Ok(JsonTree::Object(members));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(ReadFailure::Malformed);
            }
            let name = self.read_string()?;
            self.skip_whitespace();
            self.expect_byte(b':')?;
            let value = self.read_value(nesting)?;
            members.insert(name, value);
            self.skip_whitespace();
            match self.next_byte()? {
                b',' => {}
                b'}' => return Ok(JsonTree::Object(members)),
                _ => return Err(ReadFailure::Malformed),
            }
        }
    }

    /// Reads a string from its opening quote, decoding escapes and UTF-8.
    fn read_string(&mut self) -> Result<String, ReadFailure> {
        self.expect_byte(b'"')?;
        let mut text = String::new();
        loop {
            match self.next_byte()? {
                b'"' => return Ok(text),
                b'\\' => text.push(self.read_escape()?),
                0x00..=0x1F => return Err(ReadFailure::Malformed),
                ascii @ 0x20..=0x7F => text.push(char::from(ascii)),
                lead => text.push(self.read_multibyte_utf8(lead)?),
            }
        }
    }

    /// Reads the rest of an escape after its backslash.
    fn read_escape(&mut self) -> Result<char, ReadFailure> {
        let escaped = match self.next_byte()? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first_unit = self.read_four_hex_digits()?;
                let code_point = match first_unit {
                    0xD800..=0xDBFF => {
                        self.expect_byte(b'\\')?;
                        self.expect_byte(b'u')?;
                        let second_unit = self.read_four_hex_digits()?;
                        if !(0xDC00..=0xDFFF).contains(&second_unit) {
                            return Err(ReadFailure::Malformed);
                        }
                        0x10000 + ((first_unit - 0xD800) << 10) + (second_unit - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(ReadFailure::Malformed),
                    _ => first_unit,
                };
                return char::from_u32(code_point).ok_or(ReadFailure::Malformed);
            }
            _ => return Err(ReadFailure::Malformed),
        };
        Ok(escaped)
    }

    fn read_four_hex_digits(&mut self) -> Result<u32, ReadFailure> {
        let mut value = 0;
        for _ in 0..4 {
            let digit = match self.next_byte()? {
                digit @ b'0'..=b'9' => digit - b'0',
                digit @ b'a'..=b'f' => digit - b'a' + 10,
                digit @ b'A'..=b'F' => digit - b'A' + 10,
                _ => return Err(ReadFailure::Malformed),
            };
            value = value * 16 + u32::from(digit);
        }
        Ok(value)
    }

    /// Decodes a UTF-8 sequence of two to four bytes from its lead byte (RFC 3629 §4):
    /// no overlong forms, no surrogates, nothing above U+10FFFF.
    fn read_multibyte_utf8(&mut self, lead: u8) -> Result<char, ReadFailure> {
        let (continuation_count, first_continuation, lead_bits) = match lead {
            0xC2..=0xDF => (1, CONTINUATION_BYTES, lead & 0x1F),
            0xE0 => (2, 0xA0..=0xBF, lead & 0x0F),
            0xE1..=0xEC | 0xEE..=0xEF => (2, CONTINUATION_BYTES, lead & 0x0F),
            0xED => (2, 0x80..=0x9F, lead & 0x0F),
            0xF0 => (3, 0x90..=0xBF, lead & 0x07),
            0xF1..=0xF3 => (3, CONTINUATION_BYTES, lead & 0x07),
            0xF4 => (3, 0x80..=0x8F, lead & 0x07),
            _ => return Err(ReadFailure::Malformed),
        };
        let mut code_point = u32::from(lead_bits);
        for index in 0..continuation_count {
            let byte = self.next_byte()?;
            let allowed = if index == 0 {
                &first_continuation
            } else {
                &CONTINUATION_BYTES
            };
            if !allowed.contains(&byte) {
                return Err(ReadFailure::Malformed);
            }
            code_point = (code_point << 6) | u32::from(byte & 0x3F);
        }
        char::from_u32(code_point).ok_or(ReadFailure::Malformed)
    }

    /// Reads `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn read_number(&mut self) -> Result<JsonTree, ReadFailure> {
        let start = self.position;
        if self.peek() == Some(b'-') {
            self.position += 1;
        }
        match self.next_byte()? {
            b'0' => {}
            b'1'..=b'9' => self.skip_digits(),
            _ => return Err(ReadFailure::Malformed),
        }
        if self.peek() == Some(b'.') {
            self.position += 1;
            self.read_one_or_more_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.position += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.position += 1;
            }
            self.read_one_or_more_digits()?;
        }
        let written = self.bytes[start..self.position]
            .iter()
            .copied()
            .map(|byte| char::from(byte.to_ascii_lowercase()))
            .collect();
        Ok(JsonTree::Number(written))
    }

    fn skip_digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.position += 1;
        }
    }

    fn read_one_or_more_digits(&mut self) -> Result<(), ReadFailure> {
        if !matches!(self.peek(), Some(b'0'..=b'9')) {
            return Err(ReadFailure::Malformed);
        }
        self.skip_digits();
        Ok(())
    }
}

#[test]
fn the_reader_recognises_exactly_the_json_texts_of_rfc_8259() {
    let well_formed: [&[u8]; 16] = [
        b"{}",
        b" \t\r\n[ ] \n",
        b"0",
        b"-0.5e+3",
        b"1E400",
        b"12.000",
        b"true",
        b"null",
        b"\"\"",
        b"\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u0000\\u00e9\\uD83D\\uDE00\"",
        "\"é😀\u{7f}\"".as_bytes(),
        b"\"\xef\xbf\xbf\xf4\x8f\xbf\xbf\"",
        b"[1,[2,{\"a\":[]}],\"x\"]",
        b"{\"a\" : 1 , \"b\":{\"c\":null}}",
        b"{\"a\":[[[1]]],\"a\":2}",
        b"[-1e-2,0E0,9]",
    ];
    for text in well_formed {
        assert!(
            matches!(read_json_text(text), JsonReading::WellFormed { .. }),
            "{} is well-formed",
            String::from_utf8_lossy(text)
        );
    }
    let malformed: [&[u8]; 34] = [
        b"",
        b" ",
        b"{",
        b"[1,]",
        b"[,1]",
        b"{\"a\" 1}",
        b"{\"a\":1,}",
        b"{a:1}",
        b"{'a':1}",
        b"01",
        b"-",
        b"1.",
        b".5",
        b"+1",
        b"1e",
        b"1e+",
        b"0x10",
        b"tru",
        b"nul",
        b"True",
        b"[1] [2]",
        b"\"abc",
        b"\"\\x\"",
        b"\"\\u12G4\"",
        b"\"\\ud800\"",
        b"\"\\ud800\\u0041\"",
        b"\"\\udc00\"",
        b"\"a\x01\"",
        b"\"\xc0\x80\"",
        b"\"\xe0\x80\xaf\"",
        b"\"\xed\xa0\x80\"",
        b"\"\xf4\x90\x80\x80\"",
        b"\"\xe9\"",
        b"\xef\xbb\xbf{}",
    ];
    for text in malformed {
        assert_eq!(
            read_json_text(text),
            JsonReading::Malformed,
            "{} is malformed",
            String::from_utf8_lossy(text)
        );
    }
    assert_eq!(
        read_json_text(b"{\"a\":[[[1]]],\"a\":2,\"e\":-1.50E+7,\"s\":\"\\u00e9\\uD83D\\uDE00\"}"),
        JsonReading::WellFormed {
            tree: JsonTree::Object(BTreeMap::from([
                ("a".to_owned(), JsonTree::Number("2".to_owned())),
                ("e".to_owned(), JsonTree::Number("-1.50e+7".to_owned())),
                ("s".to_owned(), JsonTree::String("é😀".to_owned())),
            ])),
            textual_nesting: 4,
        }
    );
    let nested = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
    assert!(matches!(
        read_json_text(nested(READER_NESTING_GUARD).as_bytes()),
        JsonReading::WellFormed { textual_nesting, .. } if textual_nesting == READER_NESTING_GUARD
    ));
    assert_eq!(
        read_json_text(nested(READER_NESTING_GUARD + 1).as_bytes()),
        JsonReading::NestedBeyondTheGuard
    );
}

#[test]
fn bracket_nesting_counts_brackets_outside_strings_in_any_text() {
    let cases: [(&[u8], usize); 10] = [
        (b"", 0),
        (b"1", 0),
        (b"[]", 1),
        (b"[{},[[]]]", 3),
        (b"[\"[[[\"]", 1),
        (b"[\"\\\"[[\"]", 1),
        (b"[\"\\\\\"[[]]", 3),
        (b"]]][[", 2),
        (b"[1,][[[", 3),
        (b"{\"a\":[\"unterminated [[[[", 2),
    ];
    for (text, expected) in cases {
        assert_eq!(
            bracket_nesting(text),
            expected,
            "{}",
            String::from_utf8_lossy(text)
        );
    }
}
