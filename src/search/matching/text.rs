//! Case- and accent-insensitive comparison for string search.
//!
//! Folding decomposes to NFD, drops combining marks and lowercases, so `Zoë`, `ZOE` and `zoe`
//! compare equal. Query values are folded once when parsed; resource text that is pure ASCII is
//! compared in place without folding or allocating.

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// `text` without accents, lowercased.
pub fn fold(text: &str) -> String {
    if text.is_ascii() {
        return text.to_ascii_lowercase();
    }
    text.nfd()
        .filter(|character| !is_combining_mark(*character))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether folded `text` starts with `folded_prefix` (itself already folded).
pub fn folded_starts_with(text: &str, folded_prefix: &str) -> bool {
    if text.is_ascii() {
        let (text, prefix) = (text.as_bytes(), folded_prefix.as_bytes());
        return text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix);
    }
    fold(text).starts_with(folded_prefix)
}

/// Whether folded `text` contains `folded_part` (itself already folded).
pub fn folded_contains(text: &str, folded_part: &str) -> bool {
    if text.is_ascii() {
        let part = folded_part.as_bytes();
        if part.is_empty() {
            return true;
        }
        return text
            .as_bytes()
            .windows(part.len())
            .any(|window| window.eq_ignore_ascii_case(part));
    }
    fold(text).contains(folded_part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_and_accents() {
        assert_eq!(fold("Zoë Ångström"), "zoe angstrom");
        assert!(folded_starts_with("Müller", &fold("MUL")));
        assert!(folded_starts_with("MULLER", &fold("mül")));
        assert!(!folded_starts_with("Mu", "mul"));
        assert!(folded_contains("van der Berg", &fold("DER b")));
        assert!(folded_contains("Gonçalves", &fold("CALV")));
        assert!(!folded_contains("Smith", "mits"));
    }
}
