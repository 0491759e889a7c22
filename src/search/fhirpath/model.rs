//! The FHIR R4 type model the compiler navigates: every element of every resource, backbone
//! element and datatype with its type, and every choice element with its JSON names, read once
//! from `data/fhir-r4/elements.txt` (derived from the official definitions, see `derive.py`).

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::fhir::ResourceType;

const ELEMENTS_TEXT: &str = include_str!("../../../data/fhir-r4/elements.txt");

/// Resource types that derive from `Resource` directly rather than from `DomainResource`.
const RESOURCES_WITHOUT_DOMAIN_RESOURCE: [&str; 3] = ["Binary", "Bundle", "Parameters"];

/// The specialisations of `Quantity` among the R4 datatypes.
const QUANTITY_SPECIALISATIONS: [&str; 6] = [
    "Age",
    "Count",
    "Distance",
    "Duration",
    "MoneyQuantity",
    "SimpleQuantity",
];

/// The R4 primitives that specialise another primitive, with the one they specialise.
const PRIMITIVE_SPECIALISATIONS: [(&str, &str); 9] = [
    ("code", "string"),
    ("id", "string"),
    ("markdown", "string"),
    ("url", "uri"),
    ("canonical", "uri"),
    ("oid", "uri"),
    ("uuid", "uri"),
    ("positiveInt", "integer"),
    ("unsignedInt", "integer"),
];

/// An index into the model's types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct TypeId(u16);

/// The FHIRPath system type a value maps to, for primitives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PrimitiveKind {
    String,
    Boolean,
    Integer,
    Decimal,
    Date,
    DateTime,
    Time,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TypeKind {
    /// A concrete resource type.
    Resource(ResourceType),
    /// `Resource` or `DomainResource`: the concrete type is read from `resourceType`.
    AbstractResource,
    /// A FHIR primitive (`string`, `code`, …) or a FHIRPath system type (`System.String`, …).
    Primitive {
        kind: PrimitiveKind,
        is_system_type: bool,
    },
    /// A complex datatype or a backbone element.
    Complex,
}

/// How an element's values are found in a JSON object.
#[derive(Debug)]
pub(super) enum ElementShape {
    /// One JSON name, values of one type (`Resource`-typed elements read their type from the value).
    Single {
        json_name: &'static str,
        type_id: TypeId,
    },
    /// A choice element: one JSON name per allowed type (`valueQuantity`, `valueString`, …).
    Choice(Box<[ChoiceOption]>),
}

#[derive(Debug)]
pub(super) struct ChoiceOption {
    pub(super) json_name: Box<str>,
    pub(super) type_id: TypeId,
}

#[derive(Debug)]
struct TypeEntry {
    /// The model key: a type name (`CodeableConcept`, `Observation`) or the full path of a backbone
    /// element (`Observation.component`).
    key: &'static str,
    /// The FHIR type code reported for values of this type (`BackboneElement` for backbone paths).
    reported_name: &'static str,
    kind: TypeKind,
    supertype: Option<TypeId>,
    elements: HashMap<&'static str, ElementShape>,
}

/// Every FHIR R4 type the subset can navigate.
#[derive(Debug)]
pub(super) struct TypeModel {
    types: Vec<TypeEntry>,
    by_key: HashMap<&'static str, TypeId>,
    by_resource_code: Vec<TypeId>,
    system_boolean: TypeId,
}

impl TypeModel {
    pub(super) fn r4() -> &'static TypeModel {
        static R4_TYPE_MODEL: OnceLock<TypeModel> = OnceLock::new();
        R4_TYPE_MODEL.get_or_init(|| {
            TypeModel::from_elements_text(ELEMENTS_TEXT)
                .expect("the shipped r4 element list is understood")
        })
    }

    fn from_elements_text(text: &'static str) -> Result<TypeModel, String> {
        let mut builder = ModelBuilder::default();
        for (kind, names) in [
            (PrimitiveKind::String, "System.String string"),
            (PrimitiveKind::Boolean, "System.Boolean boolean"),
            (PrimitiveKind::Integer, "System.Integer integer"),
            (PrimitiveKind::Decimal, "System.Decimal decimal"),
            (PrimitiveKind::Date, "System.Date date"),
            (PrimitiveKind::DateTime, "System.DateTime dateTime"),
            (PrimitiveKind::Time, "System.Time time"),
        ] {
            let (system_name, reported_name) = names.split_once(' ').unwrap_or((names, names));
            builder.add(
                system_name,
                reported_name,
                TypeKind::Primitive {
                    kind,
                    is_system_type: true,
                },
            );
        }
        let resource = builder.add("Resource", "Resource", TypeKind::AbstractResource);
        let domain_resource = builder.add(
            "DomainResource",
            "DomainResource",
            TypeKind::AbstractResource,
        );
        builder.types[usize::from(domain_resource.0)].supertype = Some(resource);
        let mut by_resource_code = Vec::new();
        for resource_type in ResourceType::all() {
            let type_id = builder.add(
                resource_type.as_str(),
                resource_type.as_str(),
                TypeKind::Resource(resource_type),
            );
            builder.types[usize::from(type_id.0)].supertype = Some(
                if RESOURCES_WITHOUT_DOMAIN_RESOURCE.contains(&resource_type.as_str()) {
                    resource
                } else {
                    domain_resource
                },
            );
            by_resource_code.push(type_id);
        }
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            builder.add_element_line(line)?;
        }
        let quantity = builder.type_of_code("Quantity", "Quantity")?;
        for specialisation in QUANTITY_SPECIALISATIONS {
            let type_id = builder.type_of_code(specialisation, specialisation)?;
            builder.types[usize::from(type_id.0)].supertype = Some(quantity);
        }
        let system_boolean = builder.by_key["System.Boolean"];
        Ok(TypeModel {
            types: builder.types,
            by_key: builder.by_key,
            by_resource_code,
            system_boolean,
        })
    }

    pub(super) fn kind(&self, type_id: TypeId) -> TypeKind {
        self.entry(type_id).kind
    }

    pub(super) fn reported_name(&self, type_id: TypeId) -> &'static str {
        self.entry(type_id).reported_name
    }

    pub(super) fn key(&self, type_id: TypeId) -> &'static str {
        self.entry(type_id).key
    }

    /// The element `name` of a type, or of the type it derives from (a resource type the
    /// element list has no entries for still has the elements of `DomainResource`).
    pub(super) fn element(&self, type_id: TypeId, name: &str) -> Option<&ElementShape> {
        let mut current = Some(type_id);
        while let Some(type_id) = current {
            if let Some(shape) = self.entry(type_id).elements.get(name) {
                return Some(shape);
            }
            current = self.entry(type_id).supertype;
        }
        None
    }

    /// The type a type specifier names: `FHIR.x` and `System.X` are explicit; a bare name is a
    /// FHIR type when the model has one of that name, else a system type.
    pub(super) fn type_named(&self, namespace: Option<&str>, name: &str) -> Option<TypeId> {
        let fhir_type = || {
            self.by_key
                .get(name)
                .copied()
                .filter(|type_id| !self.key(*type_id).contains('.'))
        };
        let system_type = || self.by_key.get(format!("System.{name}").as_str()).copied();
        match namespace {
            None => fhir_type().or_else(system_type),
            Some("FHIR") => fhir_type(),
            Some("System") => system_type(),
            Some(_) => None,
        }
    }

    pub(super) fn resource_type_id(&self, resource_type: ResourceType) -> TypeId {
        self.by_resource_code[usize::from(resource_type.code())]
    }

    pub(super) fn system_boolean(&self) -> TypeId {
        self.system_boolean
    }

    /// The primitive a FHIR primitive specialises (`string` for `code`), if any. Kept apart
    /// from [`TypeModel::is_a`]: `ofType(string)` does not select `code` values.
    pub(super) fn specialised_primitive(&self, type_id: TypeId) -> Option<TypeId> {
        let key = self.key(type_id);
        PRIMITIVE_SPECIALISATIONS
            .iter()
            .find(|(specialisation, _)| *specialisation == key)
            .and_then(|(_, base)| self.by_key.get(base).copied())
    }

    /// Whether `candidate` is `ancestor` or derives from it.
    pub(super) fn is_a(&self, candidate: TypeId, ancestor: TypeId) -> bool {
        let mut current = Some(candidate);
        while let Some(type_id) = current {
            if type_id == ancestor {
                return true;
            }
            current = self.entry(type_id).supertype;
        }
        false
    }

    /// Every type that is `ancestor` or derives from it.
    pub(super) fn descendants(&self, ancestor: TypeId) -> Vec<TypeId> {
        (0..self.types.len())
            .map(|index| TypeId(index as u16))
            .filter(|type_id| self.is_a(*type_id, ancestor))
            .collect()
    }

    fn entry(&self, type_id: TypeId) -> &TypeEntry {
        &self.types[usize::from(type_id.0)]
    }
}

#[derive(Default)]
struct ModelBuilder {
    types: Vec<TypeEntry>,
    by_key: HashMap<&'static str, TypeId>,
}

impl ModelBuilder {
    fn add(&mut self, key: &'static str, reported_name: &'static str, kind: TypeKind) -> TypeId {
        let type_id = TypeId(self.types.len() as u16);
        self.types.push(TypeEntry {
            key,
            reported_name,
            kind,
            supertype: None,
            elements: HashMap::new(),
        });
        self.by_key.insert(key, type_id);
        type_id
    }

    /// `Path type` or `Path [x] Suffix:type …`.
    fn add_element_line(&mut self, line: &'static str) -> Result<(), String> {
        let mut fields = line.split_ascii_whitespace();
        let path = fields
            .next()
            .ok_or_else(|| format!("empty line '{line}'"))?;
        let (parent_path, name) = path
            .rsplit_once('.')
            .ok_or_else(|| format!("'{path}' is not an element path"))?;
        let type_field = fields
            .next()
            .ok_or_else(|| format!("'{path}' has no type"))?;
        let shape = if type_field == "[x]" {
            let mut options = Vec::new();
            for option in fields {
                let (suffix, type_code) = option
                    .split_once(':')
                    .ok_or_else(|| format!("'{option}' of '{path}' is not Suffix:type"))?;
                options.push(ChoiceOption {
                    json_name: format!("{name}{suffix}").into_boxed_str(),
                    type_id: self.type_of_code(type_code, path)?,
                });
            }
            ElementShape::Choice(options.into_boxed_slice())
        } else {
            ElementShape::Single {
                json_name: name,
                type_id: self.type_of_code(type_field, path)?,
            }
        };
        let parent = match self.by_key.get(parent_path) {
            Some(parent) => *parent,
            None if !parent_path.contains('.') => {
                self.add(parent_path, parent_path, TypeKind::Complex)
            }
            None => return Err(format!("'{path}' comes before its parent")),
        };
        self.types[usize::from(parent.0)]
            .elements
            .insert(name, shape);
        Ok(())
    }

    /// The type of an element of type `type_code` at `path`: backbone elements are their own
    /// types, keyed by path.
    fn type_of_code(
        &mut self,
        type_code: &'static str,
        path: &'static str,
    ) -> Result<TypeId, String> {
        if type_code == "BackboneElement" || type_code == "Element" {
            if let Some(existing) = self.by_key.get(path) {
                return Ok(*existing);
            }
            return Ok(self.add(path, type_code, TypeKind::Complex));
        }
        if let Some(existing) = self.by_key.get(type_code) {
            return Ok(*existing);
        }
        if type_code.starts_with("System.") {
            return Err(format!("unknown system type '{type_code}' at '{path}'"));
        }
        let kind = if type_code.starts_with(|character: char| character.is_ascii_lowercase()) {
            TypeKind::Primitive {
                kind: primitive_kind(type_code)
                    .ok_or_else(|| format!("unknown primitive '{type_code}' at '{path}'"))?,
                is_system_type: false,
            }
        } else {
            TypeKind::Complex
        };
        Ok(self.add(type_code, type_code, kind))
    }
}

fn primitive_kind(type_code: &str) -> Option<PrimitiveKind> {
    Some(match type_code {
        "string" | "code" | "id" | "markdown" | "uri" | "url" | "canonical" | "oid" | "uuid"
        | "base64Binary" | "xhtml" => PrimitiveKind::String,
        "boolean" => PrimitiveKind::Boolean,
        "integer" | "positiveInt" | "unsignedInt" => PrimitiveKind::Integer,
        "decimal" => PrimitiveKind::Decimal,
        "date" => PrimitiveKind::Date,
        "dateTime" | "instant" => PrimitiveKind::DateTime,
        "time" => PrimitiveKind::Time,
        _ => return None,
    })
}
