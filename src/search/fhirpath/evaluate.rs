//! Runs a plan over a resource's JSON, pushing each node to a sink so that a path allocates
//! nothing of its own; only unions collect.

use std::cell::Cell;

use serde_json::Value;

use super::compile::{ComparedLiteral, Condition, InputType, MemberAccess, Plan};
use super::model::{ElementShape, PrimitiveKind, TypeId, TypeKind, TypeModel};
use super::reference::ReferenceTarget;
use crate::fhir::ResourceType;

static TRUE: Value = Value::Bool(true);
static FALSE: Value = Value::Bool(false);

/// A node of the evaluated collection: a JSON value and its FHIR type.
#[derive(Debug, Clone, Copy)]
pub(super) struct Item<'r> {
    pub(super) value: &'r Value,
    pub(super) type_id: TypeId,
}

/// How strictly FHIRPath semantics are kept where the subset cannot be exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Strictness {
    /// Search: union keeps each node once by identity; `as`/`is` on several nodes behave like
    /// `ofType`/empty; `resolve() is T` reads the type from the reference.
    Search,
    /// Conformance: whatever the subset cannot answer exactly is refused.
    Exact,
}

pub(super) struct Evaluation<'r> {
    pub(super) model: &'static TypeModel,
    pub(super) root: &'r Value,
    pub(super) strictness: Strictness,
    /// Why an exact evaluation gave up, if it did.
    pub(super) refusal: Cell<Option<&'static str>>,
}

impl<'r> Evaluation<'r> {
    fn refuse(&self, reason: &'static str) {
        if self.strictness == Strictness::Exact && self.refusal.get().is_none() {
            self.refusal.set(Some(reason));
        }
    }

    pub(super) fn each(&self, plan: &Plan, focus: Item<'r>, sink: &mut dyn FnMut(Item<'r>)) {
        match plan {
            Plan::Focus => sink(focus),
            Plan::Members { source, accesses } => self.each(source, focus, &mut |item| {
                for access in accesses.iter() {
                    if self.accepts_input(access, item.type_id) {
                        self.read_member(item.value, access.shape, sink);
                    }
                }
            }),
            Plan::Union(left, right) => {
                let mut collected: Vec<Item<'r>> = Vec::new();
                for side in [left, right] {
                    self.each(side, focus, &mut |item| {
                        if !collected.iter().any(|seen| self.same_node(seen, &item)) {
                            collected.push(item);
                        }
                    });
                }
                collected.into_iter().for_each(&mut *sink);
            }
            Plan::OfType { source, accepted } => self.each(source, focus, &mut |item| {
                if accepted.binary_search(&item.type_id).is_ok() {
                    sink(item);
                }
            }),
            Plan::As { source, accepted } => {
                let mut count = 0;
                self.each(source, focus, &mut |item| {
                    count += 1;
                    if count == 2 {
                        self.refuse("'as' on more than one node");
                    }
                    if accepted.binary_search(&item.type_id).is_ok() {
                        sink(item);
                    }
                });
            }
            Plan::Where { source, criteria } => self.each(source, focus, &mut |item| {
                if self.condition(criteria, item) == Some(true) {
                    sink(item);
                }
            }),
            Plan::Index { source, index } => {
                let mut position = 0;
                self.each(source, focus, &mut |item| {
                    if position == *index {
                        sink(item);
                    }
                    position += 1;
                });
            }
            Plan::Condition(condition) => {
                if let Some(result) = self.condition(condition, focus) {
                    sink(Item {
                        value: if result { &TRUE } else { &FALSE },
                        type_id: self.model.system_boolean(),
                    });
                }
            }
        }
    }

    fn accepts_input(&self, access: &MemberAccess, type_id: TypeId) -> bool {
        match access.input {
            InputType::Exactly(input) => input == type_id,
            InputType::DerivedFrom(ancestor) => self.model.is_a(type_id, ancestor),
        }
    }

    fn read_member(&self, value: &'r Value, shape: &ElementShape, sink: &mut dyn FnMut(Item<'r>)) {
        let Value::Object(object) = value else {
            return;
        };
        match shape {
            ElementShape::Single { json_name, type_id } => {
                if let Some(member) = object.get(*json_name) {
                    self.check_primitive_extensions(object, json_name, member, *type_id);
                    self.flatten(member, *type_id, sink);
                }
            }
            ElementShape::Choice(options) => {
                for option in options.iter() {
                    if let Some(member) = object.get(&*option.json_name) {
                        self.check_primitive_extensions(
                            object,
                            &option.json_name,
                            member,
                            option.type_id,
                        );
                        self.flatten(member, option.type_id, sink);
                    }
                }
            }
        }
    }

    /// An exact evaluation refuses primitives whose `_name` extensions stand for values that
    /// are absent from `name` (the subset does not model value-less primitives).
    fn check_primitive_extensions(
        &self,
        object: &serde_json::Map<String, Value>,
        json_name: &str,
        member: &Value,
        type_id: TypeId,
    ) {
        if self.strictness != Strictness::Exact
            || !matches!(self.model.kind(type_id), TypeKind::Primitive { .. })
        {
            return;
        }
        let Some(extensions) = object.get(&format!("_{json_name}")) else {
            return;
        };
        let values_missing = match (member, extensions) {
            (Value::Array(values), Value::Array(extensions)) => {
                values.len() != extensions.len() || values.iter().any(Value::is_null)
            }
            (Value::Null, _) => true,
            (Value::Array(_), _) | (_, Value::Array(_)) => true,
            _ => false,
        };
        if values_missing {
            self.refuse("a primitive with extensions but no value");
        }
    }

    fn flatten(&self, member: &'r Value, type_id: TypeId, sink: &mut dyn FnMut(Item<'r>)) {
        match member {
            Value::Array(values) => {
                for value in values {
                    self.emit(value, type_id, sink);
                }
            }
            value => self.emit(value, type_id, sink),
        }
    }

    fn emit(&self, value: &'r Value, type_id: TypeId, sink: &mut dyn FnMut(Item<'r>)) {
        if value.is_null() {
            return;
        }
        let type_id = match self.model.kind(type_id) {
            TypeKind::AbstractResource => match self.resource_type_of(value) {
                Some(concrete) => concrete,
                None => {
                    self.refuse("a resource without a known resourceType");
                    type_id
                }
            },
            _ => type_id,
        };
        sink(Item { value, type_id });
    }

    fn resource_type_of(&self, resource: &Value) -> Option<TypeId> {
        let name = resource.get("resourceType")?.as_str()?;
        let resource_type = ResourceType::parse(name).ok()?;
        Some(self.model.resource_type_id(resource_type))
    }

    fn same_node(&self, seen: &Item<'r>, item: &Item<'r>) -> bool {
        match self.strictness {
            Strictness::Search => {
                std::ptr::eq(seen.value, item.value) && seen.type_id == item.type_id
            }
            Strictness::Exact => {
                let kinds = (
                    self.primitive_kind(seen.type_id),
                    self.primitive_kind(item.type_id),
                );
                match kinds {
                    (Some(left), Some(right)) if left != right => false,
                    (
                        Some(
                            PrimitiveKind::String | PrimitiveKind::Boolean | PrimitiveKind::Integer,
                        ),
                        Some(_),
                    ) => seen.value == item.value,
                    (Some(_), Some(_)) => {
                        if seen.value != item.value {
                            self.refuse("union of dates, times or decimals that may be equal");
                        }
                        seen.value == item.value
                    }
                    (None, None) => seen.type_id == item.type_id && seen.value == item.value,
                    _ => false,
                }
            }
        }
    }

    fn primitive_kind(&self, type_id: TypeId) -> Option<PrimitiveKind> {
        match self.model.kind(type_id) {
            TypeKind::Primitive { kind, .. } => Some(kind),
            _ => None,
        }
    }

    pub(super) fn condition(&self, condition: &Condition, focus: Item<'r>) -> Option<bool> {
        match condition {
            Condition::Constant(value) => Some(*value),
            Condition::Exists(source) => {
                let mut found = false;
                self.each(source, focus, &mut |_| found = true);
                Some(found)
            }
            Condition::Compare {
                source,
                literal,
                negated,
            } => {
                let mut count = 0;
                let mut equal = false;
                self.each(source, focus, &mut |item| {
                    count += 1;
                    equal = self.equals_literal(item, literal);
                });
                match count {
                    0 => None,
                    1 => Some(equal != *negated),
                    _ => Some(*negated),
                }
            }
            Condition::Is { source, accepted } => {
                let mut outcome = None;
                let mut count = 0;
                self.each(source, focus, &mut |item| {
                    count += 1;
                    let is_accepted = accepted.binary_search(&item.type_id).is_ok();
                    if !is_accepted && self.is_related_primitive(item.type_id, accepted) {
                        self.refuse("'is' between a primitive and a related primitive type");
                    }
                    outcome = Some(is_accepted);
                });
                self.singleton(count, outcome, "'is' on more than one node")
            }
            Condition::ResolveIs { source, accepted } => {
                if self.strictness == Strictness::Exact {
                    self.refuse("resolve() without a server");
                    return None;
                }
                let mut outcome = None;
                let mut count = 0;
                self.each(source, focus, &mut |item| {
                    if let Some(target_type) = self.referenced_type(item.value) {
                        count += 1;
                        outcome = Some(accepted.binary_search(&target_type).is_ok());
                    }
                });
                self.singleton(count, outcome, "resolve() of more than one reference")
            }
            Condition::And(left, right) => {
                match (self.condition(left, focus), self.condition(right, focus)) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                }
            }
        }
    }

    /// Whether `type_id` is a FHIR primitive that specialises a primitive in `accepted`:
    /// FHIRPath engines and the official tests disagree on whether a `code` is a `string`
    /// (`is(string)` holds there, `ofType(string)` does not).
    fn is_related_primitive(&self, type_id: TypeId, accepted: &[TypeId]) -> bool {
        self.model
            .specialised_primitive(type_id)
            .is_some_and(|base| accepted.binary_search(&base).is_ok())
    }

    fn singleton(&self, count: usize, outcome: Option<bool>, reason: &'static str) -> Option<bool> {
        if count > 1 {
            self.refuse(reason);
            return None;
        }
        outcome
    }

    fn equals_literal(&self, item: Item<'r>, literal: &ComparedLiteral) -> bool {
        let kind = self.primitive_kind(item.type_id);
        match literal {
            ComparedLiteral::String(text) => item.value.as_str() == Some(text.as_str()),
            ComparedLiteral::Integer(integer) => item.value.as_i64() == Some(*integer),
            ComparedLiteral::Boolean(boolean) => {
                kind == Some(PrimitiveKind::Boolean) && item.value.as_bool() == Some(*boolean)
            }
        }
    }

    /// The type of the resource a Reference names, from its `reference` string.
    fn referenced_type(&self, reference: &'r Value) -> Option<TypeId> {
        let reference = reference.get("reference")?.as_str()?;
        let type_name = match ReferenceTarget::parse(reference)? {
            ReferenceTarget::Relative { type_name, .. }
            | ReferenceTarget::Absolute { type_name, .. } => type_name,
            ReferenceTarget::Contained { id: "" } => return self.resource_type_of(self.root),
            ReferenceTarget::Contained { id } => {
                let contained = self.root.get("contained")?.as_array()?;
                let resource = contained
                    .iter()
                    .find(|resource| resource.get("id").and_then(Value::as_str) == Some(id))?;
                return self.resource_type_of(resource);
            }
        };
        let resource_type = ResourceType::parse(type_name).ok()?;
        Some(self.model.resource_type_id(resource_type))
    }
}
