//! The GitOps examples stay true: the Kubernetes ConfigMap carries exactly the config
//! that CI checks, and the Deployment mounts it so that updates reach provisiond.

use std::path::Path;

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/kubernetes")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `provisioning.toml: |` block of a ConfigMap, de-indented.
fn embedded_config(configmap: &str) -> String {
    let mut lines = configmap
        .lines()
        .skip_while(|l| l.trim() != "provisioning.toml: |");
    assert!(
        lines.next().is_some(),
        "no provisioning.toml in the ConfigMap"
    );
    let mut text = String::new();
    for line in lines {
        if line.is_empty() {
            text.push('\n');
        } else if let Some(rest) = line.strip_prefix("    ") {
            text.push_str(rest);
            text.push('\n');
        } else {
            break;
        }
    }
    text
}

#[test]
fn the_configmap_carries_the_checked_config() {
    let checked = example("provisioning.toml");
    let shipped = embedded_config(&example("configmap.yaml"));
    assert!(
        shipped == checked,
        "examples/kubernetes/configmap.yaml is stale; regenerate it (see its header)"
    );
}

#[test]
fn the_deployment_mounts_the_configmap_as_a_directory() {
    let deployment = example("deployment.yaml");
    let mounts: Vec<&str> = deployment
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        !mounts.iter().any(|l| l.contains("subPath")),
        "a subPath mount never updates"
    );
    assert!(
        mounts
            .iter()
            .any(|l| l.trim() == "mountPath: /etc/provisiond")
    );
    assert!(deployment.contains("\"-c\", \"/etc/provisiond/provisioning.toml\""));
    assert!(deployment.contains("name: provisiond-config"));
    let configmap = example("configmap.yaml");
    assert!(configmap.contains("  name: provisiond-config\n"));
    let kustomization = example("kustomization.yaml");
    assert!(
        kustomization.contains("- configmap.yaml") && kustomization.contains("- deployment.yaml")
    );
}
