//! Kubernetes protobuf bodies (`application/vnd.kubernetes.protobuf`),
//! which kubectl sends for `create <generator>` and `auth can-i`: the magic
//! `k8s\0`, then a `runtime.Unknown` envelope holding the object's
//! apiVersion, kind and encoding (`k8s-pb` messages).
//!
//! [`to_json`] turns a body into what the evidence keeps and masking reads:
//! the object as its JSON form for the kinds decoded here (ConfigMap,
//! Secret, Deployment, SelfSubjectAccessReview, SelfSubjectReview), else its
//! apiVersion, kind, metadata where it can be read, and size.

use std::collections::BTreeMap;

use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::authorization::v1 as authz;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
use prost::Message as _;
use serde_json::{json, Map, Value};

/// The media type.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
/// What every protobuf body starts with.
pub const MAGIC: &[u8] = b"k8s\x00";

/// Whether a `Content-Type` names the protobuf encoding.
pub fn is_protobuf(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(CONTENT_TYPE))
}

/// A body's envelope: what it holds, and the object's own bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub api_version: String,
    pub kind: String,
    pub raw: Vec<u8>,
}

pub fn decode(body: &[u8]) -> Result<Envelope, String> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("a protobuf body must start with k8s\\0")?;
    let u = Unknown::decode(rest).map_err(|e| format!("the protobuf envelope: {e}"))?;
    if u.content_encoding.as_deref().is_some_and(|e| !e.is_empty()) {
        return Err(format!(
            "an encoded protobuf body ({:?}) is not read here",
            u.content_encoding.unwrap_or_default()
        ));
    }
    let tm = u.type_meta.unwrap_or_default();
    Ok(Envelope {
        api_version: tm.api_version.unwrap_or_default(),
        kind: tm.kind.unwrap_or_default(),
        raw: u.raw.unwrap_or_default(),
    })
}

/// A body holding `raw` as `api_version`/`kind`.
pub fn encode(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
    let u = Unknown {
        type_meta: Some(TypeMeta {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
        }),
        raw: Some(raw),
        content_encoding: Some(String::new()),
        content_type: Some(String::new()),
    };
    let mut out = MAGIC.to_vec();
    u.encode(&mut out).expect("a Vec grows");
    out
}

/// A protobuf body as JSON: decoded for the kinds known here, else its
/// type, metadata and size.
pub fn to_json(body: &[u8]) -> Result<Value, String> {
    let env = decode(body)?;
    let bad = |e: prost::DecodeError| format!("{} {}: {e}", env.api_version, env.kind);
    let mut v = match (env.api_version.as_str(), env.kind.as_str()) {
        ("v1", "ConfigMap") => {
            let cm = core::ConfigMap::decode(env.raw.as_slice()).map_err(bad)?;
            let mut v = object(cm.metadata);
            put_map(&mut v, "data", &cm.data);
            put_bytes_map(&mut v, "binaryData", &cm.binary_data);
            v
        }
        ("v1", "Secret") => {
            let s = core::Secret::decode(env.raw.as_slice()).map_err(bad)?;
            let mut v = object(s.metadata);
            put_bytes_map(&mut v, "data", &s.data);
            put_map(&mut v, "stringData", &s.string_data);
            if let Some(t) = s.r#type {
                v["type"] = t.into();
            }
            v
        }
        ("apps/v1", "Deployment") => {
            let d = apps::Deployment::decode(env.raw.as_slice()).map_err(bad)?;
            let mut v = object(d.metadata);
            if let Some(spec) = d.spec {
                v["spec"] = deployment_spec(spec);
            }
            v
        }
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => {
            let r = authz::SelfSubjectAccessReview::decode(env.raw.as_slice()).map_err(bad)?;
            let mut v = object(r.metadata);
            let spec = r.spec.unwrap_or_default();
            let mut s = Map::new();
            if let Some(a) = spec.resource_attributes {
                s.insert(
                    "resourceAttributes".into(),
                    strings(&[
                        ("namespace", a.namespace),
                        ("verb", a.verb),
                        ("group", a.group),
                        ("version", a.version),
                        ("resource", a.resource),
                        ("subresource", a.subresource),
                        ("name", a.name),
                    ]),
                );
            }
            if let Some(a) = spec.non_resource_attributes {
                s.insert(
                    "nonResourceAttributes".into(),
                    strings(&[("path", a.path), ("verb", a.verb)]),
                );
            }
            v["spec"] = Value::Object(s);
            v
        }
        _ => {
            // Unknown here: the metadata every object starts with (field 1),
            // when it reads as such, and the size.
            let meta = MetaOnly::decode(env.raw.as_slice())
                .ok()
                .and_then(|m| m.metadata);
            let mut v = object(meta);
            v["protobufBytes"] = env.raw.len().into();
            v
        }
    };
    v["apiVersion"] = env.api_version.into();
    v["kind"] = env.kind.into();
    Ok(v)
}

/// Field 1 of any object: its metadata.
#[derive(Clone, PartialEq, prost::Message)]
struct MetaOnly {
    #[prost(message, optional, tag = "1")]
    metadata: Option<meta::ObjectMeta>,
}

fn strings(fields: &[(&str, Option<String>)]) -> Value {
    let mut m = Map::new();
    for (k, v) in fields {
        if let Some(v) = v.as_ref().filter(|v| !v.is_empty()) {
            m.insert((*k).into(), v.clone().into());
        }
    }
    Value::Object(m)
}

fn put_map(v: &mut Value, key: &str, m: &BTreeMap<String, String>) {
    if !m.is_empty() {
        v[key] = json!(m);
    }
}

fn put_bytes_map(v: &mut Value, key: &str, m: &BTreeMap<String, Vec<u8>>) {
    use base64::Engine as _;
    if !m.is_empty() {
        let b64: BTreeMap<&String, String> = m
            .iter()
            .map(|(k, b)| (k, base64::engine::general_purpose::STANDARD.encode(b)))
            .collect();
        v[key] = json!(b64);
    }
}

/// An object with its metadata.
fn object(m: Option<meta::ObjectMeta>) -> Value {
    let Some(m) = m else {
        return json!({});
    };
    let mut md = strings(&[
        ("name", m.name),
        ("generateName", m.generate_name),
        ("namespace", m.namespace),
        ("uid", m.uid),
        ("resourceVersion", m.resource_version),
    ]);
    put_map(&mut md, "labels", &m.labels);
    put_map(&mut md, "annotations", &m.annotations);
    json!({ "metadata": md })
}

fn deployment_spec(spec: apps::DeploymentSpec) -> Value {
    let mut v = json!({});
    if let Some(r) = spec.replicas {
        v["replicas"] = r.into();
    }
    if let Some(sel) = spec.selector {
        let mut s = json!({});
        put_map(&mut s, "matchLabels", &sel.match_labels);
        v["selector"] = s;
    }
    if let Some(t) = spec.template {
        let mut tv = object(t.metadata);
        if let Some(ps) = t.spec {
            let containers: Vec<Value> = ps
                .containers
                .into_iter()
                .map(|c| {
                    let mut cv = strings(&[("name", c.name), ("image", c.image)]);
                    if !c.command.is_empty() {
                        cv["command"] = json!(c.command);
                    }
                    if !c.args.is_empty() {
                        cv["args"] = json!(c.args);
                    }
                    let env: Vec<Value> = c
                        .env
                        .into_iter()
                        .map(|e| strings(&[("name", e.name), ("value", e.value)]))
                        .collect();
                    if !env.is_empty() {
                        cv["env"] = json!(env);
                    }
                    cv
                })
                .collect();
            tv["spec"] = json!({ "containers": containers });
        }
        v["template"] = tv;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str) -> Option<meta::ObjectMeta> {
        Some(meta::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        })
    }

    #[test]
    fn known_kinds_decode_to_their_json_form() {
        let cm = core::ConfigMap {
            metadata: meta("settings"),
            data: [("mode".to_string(), "fast".to_string())].into(),
            ..Default::default()
        };
        let body = encode("v1", "ConfigMap", cm.encode_to_vec());
        assert!(body.starts_with(MAGIC));
        let v = to_json(&body).unwrap();
        assert_eq!(v["kind"], "ConfigMap");
        assert_eq!(v["metadata"]["name"], "settings");
        assert_eq!(v["data"]["mode"], "fast");

        let secret = core::Secret {
            metadata: meta("db"),
            data: [("password".to_string(), b"hunter2".to_vec())].into(),
            ..Default::default()
        };
        let v = to_json(&encode("v1", "Secret", secret.encode_to_vec())).unwrap();
        assert_eq!(v["data"]["password"], "aHVudGVyMg==");

        let d = apps::Deployment {
            metadata: meta("web"),
            spec: Some(apps::DeploymentSpec {
                replicas: Some(2),
                template: Some(core::PodTemplateSpec {
                    metadata: None,
                    spec: Some(core::PodSpec {
                        containers: vec![core::Container {
                            name: Some("nginx".into()),
                            image: Some("nginx:1.27".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = to_json(&encode("apps/v1", "Deployment", d.encode_to_vec())).unwrap();
        assert_eq!(v["spec"]["replicas"], 2);
        assert_eq!(
            v["spec"]["template"]["spec"]["containers"][0]["image"],
            "nginx:1.27"
        );
    }

    #[test]
    fn other_kinds_give_type_metadata_and_size_and_garbage_is_refused() {
        let pod = core::Pod {
            metadata: meta("p"),
            ..Default::default()
        };
        let raw = pod.encode_to_vec();
        let v = to_json(&encode("v1", "Pod", raw.clone())).unwrap();
        assert_eq!(v["kind"], "Pod");
        assert_eq!(v["metadata"]["name"], "p");
        assert_eq!(v["protobufBytes"], raw.len());
        assert!(to_json(b"{\"kind\":\"Pod\"}").is_err());
        assert!(to_json(b"k8s\x00\xff\xff\xff").is_err());
        assert!(is_protobuf(
            "application/vnd.kubernetes.protobuf; charset=x"
        ));
        assert!(!is_protobuf("application/json"));
    }
}
