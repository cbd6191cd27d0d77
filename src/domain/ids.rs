//! Validated names: project ids and region/store names, and what free text
//! (deployment names, actors) may hold.
//!
//! Job, command, event and snapshot ids are plain UUIDs; what needs checking
//! beyond "is a UUID" lives here, so an invalid name can never be constructed.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Whether `c` may stand in text an operator or auditor reads: not a
/// control character, and none of the invisible ones that would let a name
/// display as another: every Default_Ignorable_Code_Point of Unicode
/// (DerivedCoreProperties.txt: the soft hyphen, bidirectional marks,
/// overrides and isolates such as U+202E, zero-width characters, Hangul
/// fillers, variation selectors, the byte-order mark, tag characters), and
/// line and paragraph separators and interlinear annotation marks.
pub fn is_displayable(c: char) -> bool {
    !(c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'..='\u{1160}'
                | '\u{17B4}'..='\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF0}'..='\u{FFFB}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}'
        ))
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// A project id: 1–64 of `[A-Za-z0-9_-]`. Ids starting with `_` are reserved;
/// `_admin` is the administrators' project and is the only reserved id accepted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProjectId(String);

impl ProjectId {
    pub const ADMIN: &'static str = "_admin";

    pub fn parse(s: &str) -> Result<Self, String> {
        if s == Self::ADMIN {
            return Ok(Self(s.to_owned()));
        }
        if s.is_empty() || s.len() > 64 || !s.chars().all(is_name_char) {
            return Err(format!(
                "project id {s:?} must be 1-64 characters of [A-Za-z0-9_-]"
            ));
        }
        if s.starts_with('_') {
            return Err(format!(
                "project id {s:?} is reserved (ids starting with '_')"
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn is_admin(&self) -> bool {
        self.0 == Self::ADMIN
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ProjectId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<ProjectId> for String {
    fn from(p: ProjectId) -> String {
        p.0
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A region or store name: 1–64 of `[A-Za-z0-9_-]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 64 || !s.chars().all(is_name_char) {
            return Err(format!(
                "name {s:?} must be 1-64 characters of [A-Za-z0-9_-]"
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_ids() {
        assert!(ProjectId::parse("p-1_A").is_ok());
        assert!(ProjectId::parse("_admin").unwrap().is_admin());
        assert!(ProjectId::parse("_other").unwrap_err().contains("reserved"));
        assert!(ProjectId::parse("").is_err());
        assert!(ProjectId::parse("a.b").is_err());
        assert!(ProjectId::parse(&"x".repeat(65)).is_err());
        assert!(ProjectId::parse(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn names() {
        assert!(Name::parse("eu-west_1").is_ok());
        assert!(Name::parse("a b").is_err());
        assert!(Name::parse("").is_err());
    }
}

macro_rules! name_schema {
    ($t:ty, $name:literal, $pattern:literal, $desc:literal) => {
        impl schemars::JsonSchema for $t {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": $pattern,
                    "description": $desc,
                })
            }
        }
    };
}
name_schema!(
    ProjectId,
    "ProjectId",
    "^(_admin|[A-Za-z0-9-][A-Za-z0-9_-]{0,63})$",
    "1-64 of [A-Za-z0-9_-], not starting with '_' (except the administrators' project _admin)"
);
name_schema!(
    Name,
    "Name",
    "^[A-Za-z0-9_-]{1,64}$",
    "a region or store name: 1-64 of [A-Za-z0-9_-]"
);
