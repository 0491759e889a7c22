//! The FHIRPath subset that R4 search parameter expressions are written in: paths, `|`,
//! parentheses, `ofType(T)`, `as T`/`as(T)`, `is T`, `where(…)`, `resolve() is T`,
//! `=`/`!=` against a literal, `exists()`, `and`, `[n]` and `first()`.
//!
//! An expression is parsed into a syntax tree, then compiled once for one resource type
//! against the R4 type model (`data/fhir-r4/elements.txt`): names become JSON members, choice
//! elements their typed JSON names (`Observation.value` → `valueQuantity`, `valueString`, …),
//! and union branches rooted at another resource type are dropped. Everything else is refused
//! with an [`UnsupportedFhirPath`] naming what was not understood; the subset never answers
//! differently from FHIRPath, it declines instead.

mod compile;
mod evaluate;
mod model;
mod reference;
mod syntax;
#[cfg(test)]
mod tests;

use std::cell::Cell;

use serde_json::Value;

pub use reference::ReferenceTarget;

use crate::fhir::ResourceType;
use compile::{CompileError, Compiler, Plan};
use evaluate::{Evaluation, Item, Strictness};
use model::{PrimitiveKind, TypeKind, TypeModel};

/// Why an expression cannot be compiled for a resource type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsupportedFhirPath {
    #[error("fhirpath syntax error at offset {offset}: {message}")]
    Syntax { offset: usize, message: String },
    #[error("{construct} is not in the supported fhirpath subset")]
    UnsupportedConstruct { construct: String },
    #[error("{type_name} has no element '{element}'")]
    UnknownElement { type_name: String, element: String },
    #[error("'{type_name}' is not a FHIR or System type")]
    UnknownType { type_name: String },
    /// Every branch of the expression starts at another resource type.
    #[error("no part of the expression applies to {resource_type}")]
    NoBranchForType { resource_type: ResourceType },
}

/// An expression compiled for one resource type.
#[derive(Debug)]
pub struct CompiledFhirPath {
    plan: Plan,
    resource_type: ResourceType,
}

/// A node of an evaluation's result: a value of the resource (or a computed boolean) and its
/// FHIR type code (`CodeableConcept`, `dateTime`, `Reference`, `code`, `BackboneElement`,
/// `Observation`, …; System types report the matching FHIR primitive: `string`, `boolean`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TypedNode<'r> {
    pub value: &'r Value,
    pub fhir_type: &'static str,
}

/// A FHIRPath value of an evaluation's result, as the FHIRPath type system sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum FhirPathValue<'r> {
    String(&'r str),
    Boolean(bool),
    Integer(i64),
    /// The decimal as written in the resource.
    Decimal(String),
    Date(&'r str),
    DateTime(&'r str),
    Time(&'r str),
    /// A complex value: a datatype, backbone element or resource.
    Complex(TypedNode<'r>),
}

/// An exact evaluation the subset cannot answer (it would have to guess).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the fhirpath subset cannot evaluate this exactly: {reason}")]
pub struct EvaluationRefused {
    pub reason: &'static str,
}

impl CompiledFhirPath {
    /// Parses `expression` and compiles it for resources of `resource_type`.
    pub fn compile(
        expression: &str,
        resource_type: ResourceType,
    ) -> Result<CompiledFhirPath, UnsupportedFhirPath> {
        let syntax = syntax::parse(expression)?;
        let model = TypeModel::r4();
        let compiler = Compiler {
            model,
            root_type: model.resource_type_id(resource_type),
        };
        match compiler.compile(&syntax) {
            Ok(plan) => Ok(CompiledFhirPath {
                plan,
                resource_type,
            }),
            Err(CompileError::Refused(refused)) => Err(refused),
            Err(CompileError::OtherType) => {
                Err(UnsupportedFhirPath::NoBranchForType { resource_type })
            }
        }
    }

    pub fn resource_type(&self) -> ResourceType {
        self.resource_type
    }

    /// The nodes the expression selects in `resource` (a resource of the compiled type), for
    /// search: a union keeps each node once, `resolve() is T` reads the type from the
    /// reference string (`Type/id`, an absolute URL ending in `Type/id`, `#id` in `contained`).
    pub fn evaluate<'r>(&self, resource: &'r Value) -> Vec<TypedNode<'r>> {
        let model = TypeModel::r4();
        let evaluation = self.evaluation(resource, Strictness::Search);
        let mut nodes = Vec::new();
        evaluation.each(&self.plan, self.root_item(resource), &mut |item| {
            nodes.push(TypedNode {
                value: item.value,
                fhir_type: model.reported_name(item.type_id),
            });
        });
        nodes
    }

    /// The FHIRPath values of the expression on `resource` with full FHIRPath semantics, or a
    /// refusal where the subset would have to guess (values of primitives that only carry
    /// extensions, `resolve()` without a server, equality of dates in a union, …).
    pub fn evaluate_values<'r>(
        &self,
        resource: &'r Value,
    ) -> Result<Vec<FhirPathValue<'r>>, EvaluationRefused> {
        let model = TypeModel::r4();
        let evaluation = self.evaluation(resource, Strictness::Exact);
        let mut items: Vec<Item<'r>> = Vec::new();
        evaluation.each(&self.plan, self.root_item(resource), &mut |item| {
            items.push(item)
        });
        if let Some(reason) = evaluation.refusal.get() {
            return Err(EvaluationRefused { reason });
        }
        items
            .into_iter()
            .map(|item| fhirpath_value(model, item))
            .collect()
    }

    fn evaluation<'r>(&self, resource: &'r Value, strictness: Strictness) -> Evaluation<'r> {
        Evaluation {
            model: TypeModel::r4(),
            root: resource,
            strictness,
            refusal: Cell::new(None),
        }
    }

    fn root_item<'r>(&self, resource: &'r Value) -> Item<'r> {
        Item {
            value: resource,
            type_id: TypeModel::r4().resource_type_id(self.resource_type),
        }
    }
}

fn fhirpath_value<'r>(
    model: &TypeModel,
    item: Item<'r>,
) -> Result<FhirPathValue<'r>, EvaluationRefused> {
    let TypeKind::Primitive { kind, .. } = model.kind(item.type_id) else {
        return Ok(FhirPathValue::Complex(TypedNode {
            value: item.value,
            fhir_type: model.reported_name(item.type_id),
        }));
    };
    let mismatch = || EvaluationRefused {
        reason: "a primitive whose JSON does not match its type",
    };
    Ok(match kind {
        PrimitiveKind::Boolean => {
            FhirPathValue::Boolean(item.value.as_bool().ok_or_else(mismatch)?)
        }
        PrimitiveKind::Integer => FhirPathValue::Integer(item.value.as_i64().ok_or_else(mismatch)?),
        PrimitiveKind::Decimal => match item.value {
            Value::Number(number) => FhirPathValue::Decimal(number.to_string()),
            _ => return Err(mismatch()),
        },
        PrimitiveKind::String => FhirPathValue::String(item.value.as_str().ok_or_else(mismatch)?),
        PrimitiveKind::Date => FhirPathValue::Date(item.value.as_str().ok_or_else(mismatch)?),
        PrimitiveKind::DateTime => {
            FhirPathValue::DateTime(item.value.as_str().ok_or_else(mismatch)?)
        }
        PrimitiveKind::Time => FhirPathValue::Time(item.value.as_str().ok_or_else(mismatch)?),
    })
}

impl CompiledFhirPath {
    /// The JSON member names, from the resource root, of every element the expression selects,
    /// with `where(…)` filters dropped and `[n]`/`first()` widened to every repetition (choice
    /// elements narrowed by `ofType`/`as` give their typed names: `valueReference`). `None`
    /// when the expression is a condition rather than a path. The Patient compartment reads
    /// its reference elements this way.
    pub fn member_paths(&self) -> Option<Vec<Vec<&'static str>>> {
        let model = TypeModel::r4();
        let root = (Vec::new(), model.resource_type_id(self.resource_type));
        let mut paths: Vec<Vec<&'static str>> = Vec::new();
        for (path, _) in typed_member_paths(model, &self.plan, root)? {
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
        Some(paths)
    }
}

type TypedMemberPath = (Vec<&'static str>, model::TypeId);

fn typed_member_paths(
    model: &'static TypeModel,
    plan: &Plan,
    focus: TypedMemberPath,
) -> Option<Vec<TypedMemberPath>> {
    Some(match plan {
        Plan::Focus => vec![focus],
        Plan::Members { source, accesses } => {
            let mut paths = Vec::new();
            for (path, type_id) in typed_member_paths(model, source, focus)? {
                for access in accesses.iter() {
                    let accepts = match access.input {
                        compile::InputType::Exactly(input) => input == type_id,
                        compile::InputType::DerivedFrom(ancestor) => model.is_a(type_id, ancestor),
                    };
                    if !accepts {
                        continue;
                    }
                    let mut extend = |json_name: &'static str, member_type| {
                        let mut member_path = path.clone();
                        member_path.push(json_name);
                        paths.push((member_path, member_type));
                    };
                    match access.shape {
                        model::ElementShape::Single { json_name, type_id } => {
                            extend(json_name, *type_id)
                        }
                        model::ElementShape::Choice(options) => {
                            for option in options.iter() {
                                extend(&option.json_name, option.type_id);
                            }
                        }
                    }
                }
            }
            paths
        }
        Plan::Union(left, right) => {
            let mut paths = typed_member_paths(model, left, focus.clone())?;
            paths.extend(typed_member_paths(model, right, focus)?);
            paths
        }
        Plan::OfType { source, accepted } | Plan::As { source, accepted } => {
            typed_member_paths(model, source, focus)?
                .into_iter()
                .filter(|(_, type_id)| accepted.binary_search(type_id).is_ok())
                .collect()
        }
        Plan::Where { source, .. } | Plan::Index { source, .. } => {
            typed_member_paths(model, source, focus)?
        }
        Plan::Condition(_) => return None,
    })
}
