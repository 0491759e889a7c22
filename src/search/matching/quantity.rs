//! Number and quantity search values. A number's written precision is its range: `100`
//! covers `[99.5, 100.5)`, `100.0` covers `[99.95, 100.05)`.

use serde_json::Value;

use super::prefix::Prefix;
use crate::search::fhirpath::TypedNode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected a decimal number such as 100, -0.5 or 1.5e3, optionally after a prefix")]
pub struct MalformedNumber;

/// A prefixed number and the range its precision covers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NumberSearchValue {
    pub prefix: Prefix,
    pub value: f64,
    low: f64,
    high: f64,
}

/// A prefixed quantity: `value`, `value|system|code` or `value||code`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantitySearchValue {
    pub number: NumberSearchValue,
    pub system: Option<String>,
    pub code: Option<String>,
}

/// Whether `text` is a FHIR decimal (optionally with an exponent), and its count of
/// significant decimal places.
fn decimal_places(text: &str) -> Option<i32> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(index) => (&text[..index], text[index + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let unsigned = mantissa.strip_prefix(['-', '+']).unwrap_or(mantissa);
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let all_digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    if unsigned.contains('.') && fraction.is_empty() {
        return None;
    }
    Some(fraction.len() as i32 - exponent)
}

impl NumberSearchValue {
    pub fn parse(text: &str) -> Result<NumberSearchValue, MalformedNumber> {
        let (prefix, number) = Prefix::split(text).ok_or(MalformedNumber)?;
        let places = decimal_places(number).ok_or(MalformedNumber)?;
        let value: f64 = number.parse().map_err(|_| MalformedNumber)?;
        if !value.is_finite() {
            return Err(MalformedNumber);
        }
        let half_step = 0.5 * 10f64.powi(-places);
        Ok(NumberSearchValue {
            prefix,
            value,
            low: value - half_step,
            high: value + half_step,
        })
    }

    /// Whether a resource's number satisfies this value (R4 search, 3.1.1.4.1).
    pub fn matches(&self, target: f64) -> bool {
        match self.prefix {
            Prefix::Eq => self.low <= target && target < self.high,
            Prefix::Ne => !(self.low <= target && target < self.high),
            Prefix::Gt | Prefix::Sa => target > self.value,
            Prefix::Lt | Prefix::Eb => target < self.value,
            Prefix::Ge => target >= self.value,
            Prefix::Le => target <= self.value,
            Prefix::Ap => (target - self.value).abs() <= (self.value * 0.1).abs(),
        }
    }

    /// Whether some number a node holds satisfies this value.
    pub fn matches_node(&self, node: &TypedNode<'_>) -> bool {
        match node.fhir_type {
            "integer" | "decimal" | "positiveInt" | "unsignedInt" | "integer64" => {
                node.value.as_f64().is_some_and(|value| self.matches(value))
            }
            _ => false,
        }
    }
}

impl QuantitySearchValue {
    pub fn parse(text: &str) -> Result<QuantitySearchValue, MalformedNumber> {
        let mut parts = text.splitn(3, '|');
        let number = NumberSearchValue::parse(parts.next().unwrap_or_default())?;
        let non_empty =
            |part: Option<&str>| part.filter(|part| !part.is_empty()).map(str::to_owned);
        let system = non_empty(parts.next());
        let code = non_empty(parts.next());
        if system.is_some() && code.is_none() {
            return Err(MalformedNumber);
        }
        Ok(QuantitySearchValue {
            number,
            system,
            code,
        })
    }

    /// Whether a Quantity-like node (Quantity, Age, Duration, Money, …) satisfies this value.
    /// Without a system the code may also match the human unit.
    pub fn matches_node(&self, node: &TypedNode<'_>) -> bool {
        let field = |name: &str| node.value.get(name).and_then(Value::as_str);
        let (system, code, unit) = match node.fhir_type {
            "Quantity" | "Age" | "Count" | "Distance" | "Duration" | "SimpleQuantity"
            | "MoneyQuantity" => (field("system"), field("code"), field("unit")),
            "Money" => (Some("urn:iso:std:iso:4217"), field("currency"), None),
            _ => return false,
        };
        let Some(value) = node.value.get("value").and_then(Value::as_f64) else {
            return false;
        };
        if !self.number.matches(value) {
            return false;
        }
        if let Some(wanted_system) = &self.system
            && system != Some(wanted_system.as_str())
        {
            return false;
        }
        match &self.code {
            None => true,
            Some(wanted) if self.system.is_some() => code == Some(wanted.as_str()),
            Some(wanted) => code == Some(wanted.as_str()) || unit == Some(wanted.as_str()),
        }
    }
}
