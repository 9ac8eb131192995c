//! The HTTP API's OpenAPI document. `schemas/openapi.v1.json` names the topic
//! schemas beside it by file (one definition of each record); the served
//! copy bundles them under `components/schemas` so that a client needs one file.

use serde_json::Value;

const DOCUMENT: &str = include_str!("../schemas/openapi.v1.json");

/// Every schema file the document (or a schema it names) refers to.
const SCHEMAS: [(&str, &str); 7] = [
    (
        "interaction.v1",
        include_str!("../schemas/interaction.v1.schema.json"),
    ),
    (
        "refresh.v1",
        include_str!("../schemas/refresh.v1.schema.json"),
    ),
    (
        "recommendations.v1",
        include_str!("../schemas/recommendations.v1.schema.json"),
    ),
    (
        "carousels.v2",
        include_str!("../schemas/carousels.v2.schema.json"),
    ),
    (
        "insights.v1",
        include_str!("../schemas/insights.v1.schema.json"),
    ),
    (
        "common.v1",
        include_str!("../schemas/common.v1.schema.json"),
    ),
    (
        "instance.v1",
        include_str!("../schemas/instance.v1.schema.json"),
    ),
];

/// The document with every file reference replaced by a local one.
pub fn bundled() -> Value {
    let mut doc: Value = serde_json::from_str(DOCUMENT).expect("schemas/openapi.v1.json is JSON");
    rewrite_refs(&mut doc, None);
    for (name, text) in SCHEMAS {
        let mut schema: Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("schemas/{name}: {e}"));
        if let Some(o) = schema.as_object_mut() {
            // A `$id` would change how the references inside resolve.
            o.remove("$id");
            o.remove("$schema");
        }
        rewrite_refs(&mut schema, Some(name));
        doc["components"]["schemas"][name] = schema;
    }
    doc
}

/// `X.schema.json#/p` becomes `#/components/schemas/X/p`; inside schema file
/// `within`, `#/p` becomes `#/components/schemas/<within>/p`.
fn rewrite_refs(value: &mut Value, within: Option<&str>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(target) if key == "$ref" => {
                        *target = local_ref(target, within);
                    }
                    other => rewrite_refs(other, within),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_refs(v, within)),
        _ => {}
    }
}

fn local_ref(target: &str, within: Option<&str>) -> String {
    let (file, pointer) = target.split_once('#').unwrap_or((target, ""));
    match (file.strip_suffix(".schema.json"), within) {
        (Some(name), _) => format!("#/components/schemas/{name}{pointer}"),
        (None, Some(name)) if file.is_empty() && pointer.starts_with("/$defs") => {
            format!("#/components/schemas/{name}{pointer}")
        }
        _ => target.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match v {
                        Value::String(s) if k == "$ref" => out.push(s.clone()),
                        other => refs(other, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_of_the_bundle_resolves_inside_it() {
        let doc = bundled();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 10);
        for r in all {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{r} is not local"));
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
    }

    #[test]
    fn every_schema_file_the_document_names_is_bundled() {
        let mut all = Vec::new();
        refs(&serde_json::from_str::<Value>(DOCUMENT).unwrap(), &mut all);
        for r in all.iter().filter(|r| !r.starts_with('#')) {
            let name = r.split_once(".schema.json").unwrap().0;
            assert!(
                SCHEMAS.iter().any(|(n, _)| *n == name),
                "{r} is not in SCHEMAS"
            );
        }
    }
}
