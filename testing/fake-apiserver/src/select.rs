//! Field and label selectors, parsed from list/watch query parameters and matched against stored
//! JSON objects.
//!
//! Syntax follows the Kubernetes API conventions (`k8s.io/apimachinery/pkg/fields` and
//! `pkg/labels`): field selectors are comma-separated `path=value`, `path==value` or
//! `path!=value` terms; label selectors add `key`, `!key`, `key in (a,b)` and `key notin (a,b)`.

use serde_json::Value;

/// One parsed field-selector term: a dotted path into the object and the comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldTerm {
    path: String,
    equal: bool,
    value: String,
}

/// One parsed label-selector requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LabelTerm {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `fieldSelector` + `labelSelector` pair; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Selector {
    fields: Vec<FieldTerm>,
    labels: Vec<LabelTerm>,
}

impl Selector {
    /// Parses both selectors. `supported_fields` lists the field paths the real apiserver accepts
    /// for this resource (`None` = any path); others are refused like the apiserver does
    /// (`field label not supported: X`). Errors are messages for a 400 BadRequest Status.
    pub(crate) fn parse(
        field_selector: Option<&str>,
        label_selector: Option<&str>,
        supported_fields: Option<&[&str]>,
    ) -> Result<Self, String> {
        let mut selector = Selector::default();
        for term in field_selector.map(split_terms).unwrap_or_default() {
            let (path, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: '{term}'; can't understand '{term}'"));
            };
            let path = path.trim();
            if let Some(supported) = supported_fields
                && !supported.contains(&path)
            {
                return Err(format!("field label not supported: {path}"));
            }
            selector.fields.push(FieldTerm {
                path: path.to_owned(),
                equal,
                value: value.trim().to_owned(),
            });
        }
        for term in label_selector.map(split_terms).unwrap_or_default() {
            selector.labels.push(parse_label_term(&term)?);
        }
        Ok(selector)
    }

    /// True when the object satisfies every term.
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let fields_ok = self.fields.iter().all(|term| {
            let actual = field_value(object, &term.path);
            (actual == term.value) == term.equal
        });
        if !fields_ok {
            return false;
        }
        let labels = object.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.labels.iter().all(|term| match term {
            LabelTerm::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelTerm::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelTerm::Exists(k) => label(k).is_some(),
            LabelTerm::NotExists(k) => label(k).is_none(),
            LabelTerm::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelTerm::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        })
    }
}

/// The string form of the value at a dotted path; a missing value is the empty string (so
/// `spec.nodeName=` selects unbound pods, as on the real apiserver).
fn field_value(object: &Value, path: &str) -> String {
    let mut current = object;
    for part in path.split('.') {
        match current.get(part) {
            Some(next) => current = next,
            None => return String::new(),
        }
    }
    match current {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

/// Splits a selector at commas outside parentheses; empty terms are dropped.
fn split_terms(selector: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in selector.chars() {
        match c {
            '(' => {
                depth += 1;
                current.push(c);
            }
            ')' => {
                depth = depth.saturating_sub(1);
                current.push(c);
            }
            ',' if depth == 0 => terms.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    terms.push(current);
    terms
        .into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_term(term: &str) -> Result<LabelTerm, String> {
    let set_values = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("unable to parse requirement: '{term}'"))?;
        Ok(inner
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect())
    };
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(LabelTerm::NotEquals(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = term.split_once("==") {
        return Ok(LabelTerm::Equals(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = term.split_once('=') {
        return Ok(LabelTerm::Equals(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, rest)) = term.split_once(" notin ") {
        return Ok(LabelTerm::NotIn(k.trim().to_owned(), set_values(rest)?));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return Ok(LabelTerm::In(k.trim().to_owned(), set_values(rest)?));
    }
    if let Some(k) = term.strip_prefix('!') {
        return Ok(LabelTerm::NotExists(k.trim().to_owned()));
    }
    if term.contains(|c: char| c.is_whitespace() || c == '(' || c == ')') {
        return Err(format!("unable to parse requirement: '{term}'"));
    }
    Ok(LabelTerm::Exists(term.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web", "tier": "a"}},
               "spec": {"nodeName": "node-1", "hostNetwork": false},
               "status": {"phase": "Running"}})
    }

    #[test]
    fn field_terms_match_like_the_apiserver() {
        let check = |f: &str| {
            Selector::parse(Some(f), None, None)
                .expect("parses")
                .matches(&pod())
        };
        assert!(check("spec.nodeName=node-1"));
        assert!(check("spec.nodeName==node-1,status.phase=Running"));
        assert!(!check("spec.nodeName=node-2"));
        assert!(check("spec.nodeName!=node-2"));
        assert!(!check("spec.nodeName="));
        assert!(check("spec.schedulerName="));
        assert!(check("spec.hostNetwork=false"));
        assert!(check("metadata.namespace=ns,metadata.name=p"));
    }

    #[test]
    fn unsupported_field_is_refused() {
        let err = Selector::parse(Some("spec.foo=x"), None, Some(&["spec.nodeName"])).expect_err("refused");
        assert_eq!(err, "field label not supported: spec.foo");
    }

    #[test]
    fn label_terms() {
        let check = |l: &str| {
            Selector::parse(None, Some(l), None)
                .expect("parses")
                .matches(&pod())
        };
        assert!(check("app=web,tier==a"));
        assert!(!check("app=db"));
        assert!(check("app!=db"));
        assert!(check("app"));
        assert!(!check("!app"));
        assert!(check("!missing"));
        assert!(check("app in (db, web)"));
        assert!(!check("app notin (db,web)"));
        assert!(check("missing notin (x)"));
        assert!(Selector::parse(None, Some("app in web"), None).is_err());
    }
}
