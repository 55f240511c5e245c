//! One Rust enum, two wire shapes.
//!
//! The KKT link is JSON and speaks adjacently tagged objects (`{"method": "receipt", "params":
//! {...}}`), which is what people and other firmware expect to read. The tunnel is postcard, which
//! is not self-describing and cannot decode adjacently tagged enums. [`dual_enum!`] declares an
//! enum once and gives it both: the adjacent form for human-readable formats (JSON) and serde's
//! plain externally tagged form for compact ones (postcard). Both are derived from one shadow
//! definition (`serde(remote)`), so the two shapes cannot drift apart.

/// Converts serde's externally tagged JSON (`"unit"` or `{"variant": content}`) to the adjacent
/// form `{tag: "variant", content_key: content}`.
pub(crate) fn to_adjacent(
    v: serde_json::Value,
    tag: &str,
    content: &str,
) -> Result<serde_json::Value, String> {
    use serde_json::{Map, Value};
    let mut out = Map::new();
    match v {
        Value::String(name) => {
            out.insert(tag.to_owned(), Value::String(name));
        }
        Value::Object(map) if map.len() == 1 => {
            if let Some((name, inner)) = map.into_iter().next() {
                out.insert(tag.to_owned(), Value::String(name));
                out.insert(content.to_owned(), inner);
            }
        }
        other => return Err(format!("not an enum value: {other}")),
    }
    Ok(Value::Object(out))
}

/// The inverse of [`to_adjacent`]; a missing or `null` content means a unit variant.
pub(crate) fn from_adjacent(
    v: serde_json::Value,
    tag: &str,
    content: &str,
) -> Result<serde_json::Value, String> {
    use serde_json::{Map, Value};
    let Value::Object(mut map) = v else {
        return Err(format!("expected an object with `{tag}`"));
    };
    let name = match map.remove(tag) {
        Some(Value::String(s)) => s,
        Some(_) => return Err(format!("`{tag}` must be a string")),
        None => return Err(format!("missing `{tag}`")),
    };
    Ok(match map.remove(content) {
        None | Some(Value::Null) => Value::String(name),
        Some(inner) => {
            let mut m = Map::new();
            m.insert(name, inner);
            Value::Object(m)
        }
    })
}

/// Declares `pub enum $name` with adjacent tagging in JSON and external tagging in postcard.
macro_rules! dual_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($shadow:ident, $remote:literal, tag = $tag:literal, content = $content:literal) {
            $($body:tt)*
        }
    ) => {
        $(#[$meta])*
        pub enum $name { $($body)* }

        #[derive(serde::Serialize, serde::Deserialize)]
        #[serde(remote = $remote, rename_all = "camelCase")]
        #[allow(clippy::large_enum_variant)]
        enum $shadow { $($body)* }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::Error as _;
                if s.is_human_readable() {
                    let v = $shadow::serialize(self, serde_json::value::Serializer)
                        .map_err(S::Error::custom)?;
                    let v = $crate::wire::to_adjacent(v, $tag, $content).map_err(S::Error::custom)?;
                    serde::Serialize::serialize(&v, s)
                } else {
                    $shadow::serialize(self, s)
                }
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                use serde::de::Error as _;
                if d.is_human_readable() {
                    let v = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
                    let v = $crate::wire::from_adjacent(v, $tag, $content).map_err(D::Error::custom)?;
                    $shadow::deserialize(v).map_err(D::Error::custom)
                } else {
                    $shadow::deserialize(d)
                }
            }
        }
    };
}

pub(crate) use dual_enum;
