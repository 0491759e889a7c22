//! Syntax tree to evaluation plan for one resource type: every name is resolved against the
//! type model, choice elements become their JSON names, union branches rooted at another type
//! are dropped, and whatever the subset does not evaluate exactly is refused.

use super::UnsupportedFhirPath;
use super::model::{ElementShape, PrimitiveKind, TypeId, TypeKind, TypeModel};
use super::syntax::{BinaryOperator, Expression, Literal, TypeOperator, TypeSpecifier};

/// What to do for each focus item: yields a collection of typed nodes.
#[derive(Debug)]
pub(super) enum Plan {
    /// The focus itself: the resource at the root, `$this` inside `where`.
    Focus,
    Members {
        source: Box<Plan>,
        accesses: Box<[MemberAccess]>,
    },
    /// Both collections, each node once.
    Union(Box<Plan>, Box<Plan>),
    /// `ofType(T)`: the nodes of type T (or a type derived from it).
    OfType {
        source: Box<Plan>,
        accepted: Box<[TypeId]>,
    },
    /// `as T`: like `ofType`, on a single node.
    As {
        source: Box<Plan>,
        accepted: Box<[TypeId]>,
    },
    Where {
        source: Box<Plan>,
        criteria: Condition,
    },
    /// `[n]`, and `first()` as `[0]`.
    Index { source: Box<Plan>, index: usize },
    /// A condition's result as a collection of zero or one System.Boolean.
    Condition(Box<Condition>),
}

/// Yields true, false or empty, never an error.
#[derive(Debug)]
pub(super) enum Condition {
    Exists(Box<Plan>),
    /// `source = literal` (or `!=` when negated): empty when the source is.
    Compare {
        source: Box<Plan>,
        literal: ComparedLiteral,
        negated: bool,
    },
    Is {
        source: Box<Plan>,
        accepted: Box<[TypeId]>,
    },
    /// `resolve() is T`: the type named by each reference of the source.
    ResolveIs {
        source: Box<Plan>,
        accepted: Box<[TypeId]>,
    },
    And(Box<Condition>, Box<Condition>),
    Constant(bool),
}

#[derive(Debug)]
pub(super) enum ComparedLiteral {
    String(String),
    Boolean(bool),
    Integer(i64),
}

/// One way to read a member: from nodes of `input`, the element `shape`.
#[derive(Debug)]
pub(super) struct MemberAccess {
    pub(super) input: InputType,
    pub(super) shape: &'static ElementShape,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum InputType {
    Exactly(TypeId),
    /// Any resource of this abstract type (`Resource`, `DomainResource`).
    DerivedFrom(TypeId),
}

/// Why a subexpression did not compile: it belongs to another resource type, or it is refused.
pub(super) enum CompileError {
    OtherType,
    Refused(UnsupportedFhirPath),
}

impl From<UnsupportedFhirPath> for CompileError {
    fn from(refused: UnsupportedFhirPath) -> Self {
        CompileError::Refused(refused)
    }
}

enum Compiled {
    Collection(Plan, Vec<TypeId>),
    Condition(Condition),
}

#[derive(Clone, Copy)]
struct Scope<'types> {
    focus_types: &'types [TypeId],
    /// The focus is the resource itself, so a leading type name filters it.
    at_resource_root: bool,
}

pub(super) struct Compiler {
    pub(super) model: &'static TypeModel,
    pub(super) root_type: TypeId,
}

fn unsupported(construct: impl Into<String>) -> CompileError {
    CompileError::Refused(UnsupportedFhirPath::UnsupportedConstruct {
        construct: construct.into(),
    })
}

impl Compiler {
    /// The plan of a whole expression for the root type.
    pub(super) fn compile(&self, expression: &Expression) -> Result<Plan, CompileError> {
        let root_types = [self.root_type];
        let scope = Scope {
            focus_types: &root_types,
            at_resource_root: true,
        };
        Ok(self.collection(expression, scope)?.0)
    }

    fn collection(
        &self,
        expression: &Expression,
        scope: Scope,
    ) -> Result<(Plan, Vec<TypeId>), CompileError> {
        Ok(match self.expression(expression, scope)? {
            Compiled::Collection(plan, types) => (plan, types),
            Compiled::Condition(condition) => (
                Plan::Condition(Box::new(condition)),
                vec![self.model.system_boolean()],
            ),
        })
    }

    fn condition(
        &self,
        expression: &Expression,
        scope: Scope,
        context: &str,
    ) -> Result<Condition, CompileError> {
        match self.expression(expression, scope)? {
            Compiled::Condition(condition) => Ok(condition),
            Compiled::Collection(..) => Err(unsupported(format!(
                "{context} that is not a condition (exists(), =, !=, is, and)"
            ))),
        }
    }

    fn expression(&self, expression: &Expression, scope: Scope) -> Result<Compiled, CompileError> {
        match expression {
            Expression::Literal(Literal::Boolean(value)) => {
                Ok(Compiled::Condition(Condition::Constant(*value)))
            }
            Expression::Literal(_) => Err(unsupported("a literal outside a comparison")),
            Expression::EmptyCollection => Err(unsupported("{}")),
            Expression::Variable(name) if name == "$this" => Ok(Compiled::Collection(
                Plan::Focus,
                scope.focus_types.to_vec(),
            )),
            Expression::Variable(name) => Err(unsupported(format!("variable {name}"))),
            Expression::Member { target: None, name } => {
                if scope.at_resource_root
                    && let Some(filtered) = self.root_type_filter(name)?
                {
                    return Ok(filtered);
                }
                self.members(Plan::Focus, scope.focus_types, name)
            }
            Expression::Member {
                target: Some(target),
                name,
            } => {
                let (source, types) = self.collection(target, scope)?;
                self.members(source, &types, name)
            }
            Expression::Function {
                target,
                name,
                arguments,
            } => self.function(target.as_deref(), name, arguments, scope),
            Expression::Index { target, index } => {
                let (source, types) = self.collection(target, scope)?;
                let Expression::Literal(Literal::Integer(index)) = **index else {
                    return Err(unsupported("an index that is not an integer literal"));
                };
                let index = usize::try_from(index).map_err(|_| unsupported("a negative index"))?;
                Ok(Compiled::Collection(
                    Plan::Index {
                        source: Box::new(source),
                        index,
                    },
                    types,
                ))
            }
            Expression::Unary { operator, .. } => Err(unsupported(format!("unary {operator}"))),
            Expression::Binary {
                operator,
                left,
                right,
            } => self.binary(*operator, left, right, scope),
            Expression::TypeOperation {
                operator,
                operand,
                type_specifier,
            } => self.type_operation_on(*operator, Some(operand), type_specifier, scope),
        }
    }

    /// A leading type name at the resource root: the resource when it is of that type,
    /// `OtherType` when the name is another resource type, `None` when it is no type name.
    fn root_type_filter(&self, name: &str) -> Result<Option<Compiled>, CompileError> {
        let Some(named) = self.model.type_named(Some("FHIR"), name) else {
            return Ok(None);
        };
        if !matches!(
            self.model.kind(named),
            TypeKind::Resource(_) | TypeKind::AbstractResource
        ) {
            return Ok(None);
        }
        if self.model.is_a(self.root_type, named) {
            Ok(Some(Compiled::Collection(
                Plan::Focus,
                vec![self.root_type],
            )))
        } else {
            Err(CompileError::OtherType)
        }
    }

    fn members(
        &self,
        source: Plan,
        types: &[TypeId],
        name: &str,
    ) -> Result<Compiled, CompileError> {
        let mut accesses = Vec::new();
        let mut output_types = Vec::new();
        for &type_id in types {
            let input = match self.model.kind(type_id) {
                TypeKind::Primitive { .. } if name == "extension" || name == "id" => {
                    return Err(unsupported(format!(
                        "'{name}' of a primitive value (primitive extensions and ids)"
                    )));
                }
                TypeKind::Primitive { .. } => continue,
                TypeKind::AbstractResource => InputType::DerivedFrom(type_id),
                TypeKind::Resource(_) | TypeKind::Complex => InputType::Exactly(type_id),
            };
            let Some(shape) = self.model.element(type_id, name) else {
                continue;
            };
            match shape {
                ElementShape::Single { type_id, .. } => output_types.push(*type_id),
                ElementShape::Choice(options) => {
                    output_types.extend(options.iter().map(|option| option.type_id));
                }
            }
            accesses.push(MemberAccess { input, shape });
        }
        if accesses.is_empty() {
            return Err(CompileError::Refused(UnsupportedFhirPath::UnknownElement {
                type_name: types
                    .iter()
                    .map(|type_id| self.model.key(*type_id))
                    .collect::<Vec<_>>()
                    .join(" | "),
                element: name.to_owned(),
            }));
        }
        output_types.sort();
        output_types.dedup();
        Ok(Compiled::Collection(
            Plan::Members {
                source: Box::new(source),
                accesses: accesses.into_boxed_slice(),
            },
            output_types,
        ))
    }

    fn function(
        &self,
        target: Option<&Expression>,
        name: &str,
        arguments: &[Expression],
        scope: Scope,
    ) -> Result<Compiled, CompileError> {
        let source = |compiler: &Compiler| -> Result<(Plan, Vec<TypeId>), CompileError> {
            match target {
                Some(target) => compiler.collection(target, scope),
                None => Ok((Plan::Focus, scope.focus_types.to_vec())),
            }
        };
        match (name, arguments) {
            ("where", [criteria]) => {
                let (source, types) = source(self)?;
                let criteria = self.condition(
                    criteria,
                    Scope {
                        focus_types: &types,
                        at_resource_root: false,
                    },
                    "a where() criterion",
                )?;
                Ok(Compiled::Collection(
                    Plan::Where {
                        source: Box::new(source),
                        criteria,
                    },
                    types,
                ))
            }
            ("exists", []) => Ok(Compiled::Condition(Condition::Exists(Box::new(
                source(self)?.0,
            )))),
            ("exists", [criteria]) => {
                let (source, types) = source(self)?;
                let criteria = self.condition(
                    criteria,
                    Scope {
                        focus_types: &types,
                        at_resource_root: false,
                    },
                    "an exists() criterion",
                )?;
                Ok(Compiled::Condition(Condition::Exists(Box::new(
                    Plan::Where {
                        source: Box::new(source),
                        criteria,
                    },
                ))))
            }
            ("first", []) => {
                let (source, types) = source(self)?;
                Ok(Compiled::Collection(
                    Plan::Index {
                        source: Box::new(source),
                        index: 0,
                    },
                    types,
                ))
            }
            ("ofType" | "as" | "is", [argument]) => {
                let type_specifier = argument.as_type_specifier().ok_or_else(|| {
                    unsupported(format!("{name}() of something that is not a type name"))
                })?;
                let operator = match name {
                    "ofType" => None,
                    "as" => Some(TypeOperator::As),
                    _ => Some(TypeOperator::Is),
                };
                match operator {
                    Some(operator) => {
                        self.type_operation_on(operator, target, &type_specifier, scope)
                    }
                    None => {
                        let (source, types) = source(self)?;
                        let (accepted, narrowed) = self.type_test(&type_specifier, &types)?;
                        Ok(Compiled::Collection(
                            Plan::OfType {
                                source: Box::new(source),
                                accepted,
                            },
                            narrowed,
                        ))
                    }
                }
            }
            ("resolve", []) => Err(unsupported("resolve() other than in 'resolve() is T'")),
            _ => Err(unsupported(format!(
                "function {name}() with {} argument(s)",
                arguments.len()
            ))),
        }
    }

    fn type_operation_on(
        &self,
        operator: TypeOperator,
        operand: Option<&Expression>,
        type_specifier: &TypeSpecifier,
        scope: Scope,
    ) -> Result<Compiled, CompileError> {
        if operator == TypeOperator::Is
            && let Some(Expression::Function {
                target: resolve_target,
                name,
                arguments,
            }) = operand
            && name == "resolve"
            && arguments.is_empty()
        {
            let (source, types) = match resolve_target {
                Some(target) => self.collection(target, scope)?,
                None => (Plan::Focus, scope.focus_types.to_vec()),
            };
            let reference = self.model.type_named(Some("FHIR"), "Reference");
            if types.is_empty() || types.iter().any(|type_id| Some(*type_id) != reference) {
                return Err(unsupported(
                    "resolve() of something that is not a Reference",
                ));
            }
            let named = self.named_type(type_specifier)?;
            if !matches!(
                self.model.kind(named),
                TypeKind::Resource(_) | TypeKind::AbstractResource
            ) {
                return Err(unsupported(format!(
                    "resolve() is {type_specifier}: not a resource type"
                )));
            }
            return Ok(Compiled::Condition(Condition::ResolveIs {
                source: Box::new(source),
                accepted: self.model.descendants(named).into_boxed_slice(),
            }));
        }
        let (source, types) = match operand {
            Some(operand) => self.collection(operand, scope)?,
            None => (Plan::Focus, scope.focus_types.to_vec()),
        };
        let (accepted, narrowed) = self.type_test(type_specifier, &types)?;
        Ok(match operator {
            TypeOperator::Is => Compiled::Condition(Condition::Is {
                source: Box::new(source),
                accepted,
            }),
            TypeOperator::As => Compiled::Collection(
                Plan::As {
                    source: Box::new(source),
                    accepted,
                },
                narrowed,
            ),
        })
    }

    fn named_type(&self, type_specifier: &TypeSpecifier) -> Result<TypeId, CompileError> {
        self.model
            .type_named(type_specifier.namespace.as_deref(), &type_specifier.name)
            .ok_or_else(|| {
                CompileError::Refused(UnsupportedFhirPath::UnknownType {
                    type_name: type_specifier.to_string(),
                })
            })
    }

    /// The types a node may have to pass a test for `type_specifier`, and what the source's
    /// static types narrow to.
    fn type_test(
        &self,
        type_specifier: &TypeSpecifier,
        source_types: &[TypeId],
    ) -> Result<(Box<[TypeId]>, Vec<TypeId>), CompileError> {
        let named = self.named_type(type_specifier)?;
        let accepted = self.model.descendants(named);
        let mut narrowed = Vec::new();
        for &source_type in source_types {
            if self.model.is_a(source_type, named) {
                narrowed.push(source_type);
            } else if self.model.kind(source_type) == TypeKind::AbstractResource
                && self.model.is_a(named, source_type)
            {
                narrowed.push(named);
            }
        }
        narrowed.sort();
        narrowed.dedup();
        Ok((accepted.into_boxed_slice(), narrowed))
    }

    fn binary(
        &self,
        operator: BinaryOperator,
        left: &Expression,
        right: &Expression,
        scope: Scope,
    ) -> Result<Compiled, CompileError> {
        match operator {
            BinaryOperator::Union => {
                let left = self.collection(left, scope);
                let right = self.collection(right, scope);
                match (left, right) {
                    (Err(CompileError::Refused(refused)), _)
                    | (_, Err(CompileError::Refused(refused))) => {
                        Err(CompileError::Refused(refused))
                    }
                    (Err(CompileError::OtherType), Err(CompileError::OtherType)) => {
                        Err(CompileError::OtherType)
                    }
                    (Ok(kept), Err(CompileError::OtherType))
                    | (Err(CompileError::OtherType), Ok(kept)) => {
                        Ok(Compiled::Collection(kept.0, kept.1))
                    }
                    (Ok((left_plan, mut types)), Ok((right_plan, right_types))) => {
                        types.extend(right_types);
                        types.sort();
                        types.dedup();
                        Ok(Compiled::Collection(
                            Plan::Union(Box::new(left_plan), Box::new(right_plan)),
                            types,
                        ))
                    }
                }
            }
            BinaryOperator::And => {
                let left = self.condition(left, scope, "an 'and' operand")?;
                let right = self.condition(right, scope, "an 'and' operand")?;
                Ok(Compiled::Condition(Condition::And(
                    Box::new(left),
                    Box::new(right),
                )))
            }
            BinaryOperator::Equals | BinaryOperator::NotEquals => {
                let negated = operator == BinaryOperator::NotEquals;
                let (literal, other) = match (left, right) {
                    (Expression::Literal(literal), other)
                    | (other, Expression::Literal(literal)) => (literal, other),
                    _ => {
                        return Err(unsupported(format!(
                            "'{}' without a literal operand",
                            operator.symbol()
                        )));
                    }
                };
                let (source, types) = self.collection(other, scope)?;
                let literal = self.compared_literal(literal, &types, operator)?;
                Ok(Compiled::Condition(Condition::Compare {
                    source: Box::new(source),
                    literal,
                    negated,
                }))
            }
            _ => Err(unsupported(format!("operator '{}'", operator.symbol()))),
        }
    }

    /// The literal of a comparison whose other side has `types`: exact only when every node
    /// it may meet compares by plain value (strings with strings, integers with integers,
    /// booleans with primitives).
    fn compared_literal(
        &self,
        literal: &Literal,
        types: &[TypeId],
        operator: BinaryOperator,
    ) -> Result<ComparedLiteral, CompileError> {
        let kinds: Vec<Option<PrimitiveKind>> = types
            .iter()
            .map(|type_id| match self.model.kind(*type_id) {
                TypeKind::Primitive { kind, .. } => Some(kind),
                _ => None,
            })
            .collect();
        let all_of = |wanted: PrimitiveKind| {
            !kinds.is_empty() && kinds.iter().all(|kind| *kind == Some(wanted))
        };
        match literal {
            Literal::String(text) if all_of(PrimitiveKind::String) => {
                Ok(ComparedLiteral::String(text.clone()))
            }
            Literal::Integer(value) if all_of(PrimitiveKind::Integer) => {
                Ok(ComparedLiteral::Integer(*value))
            }
            Literal::Boolean(value)
                if kinds.iter().all(Option::is_some)
                    && kinds.contains(&Some(PrimitiveKind::Boolean)) =>
            {
                Ok(ComparedLiteral::Boolean(*value))
            }
            _ => Err(unsupported(format!(
                "'{}' between {literal:?} and values of type {}",
                operator.symbol(),
                types
                    .iter()
                    .map(|type_id| self.model.key(*type_id))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ))),
        }
    }
}
