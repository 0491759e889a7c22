//! The comparison prefixes of ordered search values (number, date, quantity).

/// `eq ne gt lt ge le sa eb ap`; a value without a prefix is `eq`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

impl Prefix {
    pub const ALL: [Prefix; 9] = [
        Prefix::Eq,
        Prefix::Ne,
        Prefix::Gt,
        Prefix::Lt,
        Prefix::Ge,
        Prefix::Le,
        Prefix::Sa,
        Prefix::Eb,
        Prefix::Ap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Prefix::Eq => "eq",
            Prefix::Ne => "ne",
            Prefix::Gt => "gt",
            Prefix::Lt => "lt",
            Prefix::Ge => "ge",
            Prefix::Le => "le",
            Prefix::Sa => "sa",
            Prefix::Eb => "eb",
            Prefix::Ap => "ap",
        }
    }

    /// Splits a leading prefix off `text`: two lowercase letters before a digit or sign.
    /// Returns `None` when the two letters are not a known prefix.
    pub fn split(text: &str) -> Option<(Prefix, &str)> {
        let bytes = text.as_bytes();
        if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1].is_ascii_alphabetic() {
            let prefix = Prefix::ALL
                .into_iter()
                .find(|prefix| prefix.as_str().as_bytes() == &bytes[..2])?;
            return Some((prefix, &text[2..]));
        }
        Some((Prefix::Eq, text))
    }
}
