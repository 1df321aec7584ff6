//! The Kubernetes manifests in `deploy/kubernetes`: each overlay renders with
//! kubectl's kustomize (kubectl 1.32, preinstalled), and every rendered
//! object parses as its k8s-openapi type.

use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::edge::text;

/// Renders an overlay into its objects (as JSON values).
fn render(overlay: &str) -> Vec<Value> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes/overlays")
        .join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("run kubectl (preinstalled; 1.32 here)");
    assert!(out.status.success(), "{overlay}: {}", text(&out.stderr));
    let yaml = text(&out.stdout);
    serde_norway::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .collect()
}

fn typed<T: DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| {
        panic!(
            "{} {} does not parse as its type: {e}",
            v["kind"], v["metadata"]["name"]
        )
    })
}

struct Rendered {
    statefulset: StatefulSet,
    services: Vec<Service>,
    pdbs: Vec<PodDisruptionBudget>,
    deployments: Vec<Deployment>,
}

fn parse(objects: &[Value]) -> Rendered {
    let mut r = Rendered {
        statefulset: StatefulSet::default(),
        services: vec![],
        pdbs: vec![],
        deployments: vec![],
    };
    let mut statefulsets = 0;
    for o in objects {
        assert_eq!(
            o["metadata"]["namespace"].as_str().unwrap_or("custody"),
            "custody",
            "{o}"
        );
        match o["kind"].as_str().unwrap_or_default() {
            "Namespace" => drop(typed::<Namespace>(o)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(o)),
            "PersistentVolumeClaim" => drop(typed::<PersistentVolumeClaim>(o)),
            "Service" => r.services.push(typed(o)),
            "PodDisruptionBudget" => r.pdbs.push(typed(o)),
            "Deployment" => r.deployments.push(typed(o)),
            "StatefulSet" => {
                statefulsets += 1;
                r.statefulset = typed(o);
            }
            other => panic!("an object of kind {other:?} the test does not know: {o}"),
        }
    }
    assert_eq!(statefulsets, 1);
    r
}

#[test]
fn the_kubernetes_manifests_render_and_parse() {
    for overlay in ["bootstrap", "production"] {
        let r = parse(&render(overlay));
        let spec = &r.statefulset.spec;
        let pod = spec.template.spec.as_ref().unwrap();
        let coordinator = &pod.containers[0];
        let args = coordinator.args.clone().unwrap_or_default();
        // Only the bootstrap overlay creates a cluster.
        assert_eq!(
            args.iter().any(|a| a == "--new-cluster"),
            overlay == "bootstrap",
            "{overlay}: {args:?}"
        );
        assert_eq!(
            spec.replicas,
            Some(if overlay == "production" { 5 } else { 3 })
        );
        // Persistent volumes, one pod per zone, non-root, probes on /readyz.
        let claims = spec.volume_claim_templates.as_ref().unwrap();
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
        let spread = pod.topology_spread_constraints.as_ref().unwrap();
        assert_eq!(spread[0].topology_key, "topology.kubernetes.io/zone");
        assert_eq!(spread[0].when_unsatisfiable, "DoNotSchedule");
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        let ready = coordinator.readiness_probe.as_ref().unwrap();
        assert_eq!(
            ready.http_get.as_ref().unwrap().path.as_deref(),
            Some("/readyz")
        );
        // The headless Service for the peers, published before readiness.
        let peers = r
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("custody-coordinator-peers"))
            .unwrap();
        let ps = peers.spec.as_ref().unwrap();
        assert_eq!(ps.cluster_ip.as_deref(), Some("None"));
        assert_eq!(ps.publish_not_ready_addresses, Some(true));
        assert_eq!(
            spec.service_name.as_deref(),
            Some("custody-coordinator-peers")
        );
        // A disruption budget keeps a majority.
        assert_eq!(r.pdbs.len(), 1);
        // The edge: one pod at a time on its own volume.
        let edge = &r.deployments[0];
        let es = &edge.spec;
        assert_eq!(es.replicas, Some(1));
        assert_eq!(
            es.strategy.as_ref().unwrap().type_.as_deref(),
            Some("Recreate")
        );
    }
}
