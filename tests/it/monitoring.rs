//! The monitoring kit in `examples/monitoring/`: every metric its alert rules and its
//! Grafana dashboard use is one `/metrics` serves, and the rules pass `promtool` (when
//! it is installed: Debian's `prometheus` package).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::common::*;
use serde_json::{Value, json};

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/monitoring")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `provisiond_...` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"provisiond_[a-z0-9_]+").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_owned()).collect()
}

/// The PromQL expressions of the dashboard's panels.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

/// The `expr:` values of the alert rules (one line or a `|` block).
fn alert_exprs(rules: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(expr) = line.trim().strip_prefix("expr:") else {
            continue;
        };
        let expr = expr.trim();
        if expr != "|" {
            out.push(expr.to_owned());
            continue;
        }
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            if next.trim().is_empty() || next.starts_with("          ") {
                block.push_str(next.trim());
                block.push(' ');
                lines.next();
            } else {
                break;
            }
        }
        out.push(block);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_kit_uses_is_served() {
    let before = HandlerServer::echo().await;
    let after = HandlerServer::fixed(200, "").await;
    let config = format!(
        "{SERVER}[[handler]]\nname = \"check\"\nevents = [\"*\"]\nstage = \"before\"\nurl = {}\n\n{}",
        toml_str(before.url("/")),
        after_handler("crm", &after.url("/"), "")
    );
    let sidecar = Sidecar::start(&config);
    let (status, _) = sidecar.send("clients.create", 1, json!({})).await;
    assert_eq!(status, 200);
    // The after-stage call is counted once it is made.
    assert!(
        eventually(std::time::Duration::from_secs(10), || after.calls().len()
            == 1)
        .await
    );
    let text = sidecar.metrics_text().await;
    let served: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    assert!(
        text.contains(&format!(
            "provisiond_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(
        text.contains("provisiond_restart_needed_settings 0"),
        "{text}"
    );

    let rules = example("alerts.yml");
    let dashboard: Value = serde_json::from_str(&example("grafana-dashboard.json")).unwrap();
    let exprs: Vec<String> = alert_exprs(&rules)
        .into_iter()
        .chain(dashboard_exprs(&dashboard))
        .collect();
    assert!(exprs.len() >= 20, "{exprs:?}");
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    let missing: Vec<&String> = used.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "used but not served: {missing:?}\n{text}"
    );
    // The kit covers what the issue asks to alert on.
    for metric in [
        "provisiond_dead_letters",
        "provisiond_after_queue_depth",
        "provisiond_after_queue_oldest_age_seconds",
        "provisiond_reloads_total",
        "provisiond_handler_calls_total",
        "provisiond_restart_needed_settings",
    ] {
        assert!(
            metric_names(&alert_exprs(&rules).join(" ")).contains(metric),
            "no alert on {metric}"
        );
    }
    // Outside provisiond's own, the rules use only Prometheus' `up`.
    let words = regex::Regex::new(r"\b([a-z_]+)\{").unwrap();
    for expr in alert_exprs(&rules) {
        for name in words.captures_iter(&expr).map(|c| c[1].to_owned()) {
            assert!(name.starts_with("provisiond_") || name == "up", "{expr}");
        }
    }
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_over_a_chosen_prometheus() {
    let dashboard: Value = serde_json::from_str(&example("grafana-dashboard.json")).unwrap();
    assert_eq!(dashboard["title"], "provisiond");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource")
    );
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {panel}"
        );
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{panel}");
        for target in targets {
            assert!(
                target["expr"]
                    .as_str()
                    .is_some_and(|e| e.contains("provisiond_"))
            );
        }
    }
}

fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if !found {
        println!("note: promtool is not installed (Debian: apt-get install prometheus); skipping");
    }
    found.then_some("promtool")
}

#[test]
fn promtool_checks_and_tests_the_alert_rules() {
    let Some(promtool) = promtool() else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/monitoring");
    let out = Command::new(promtool)
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("SUCCESS: 11 rules found"), "{said}");
    // The rule tests: each alert fires (and stays quiet) when it should.
    let out = Command::new(promtool)
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("SUCCESS"), "{said}");
}

/// One input series of a promtool test: `metric{job, instance, labels}` at `values`.
fn series(metric: &str, instance: &str, labels: &str, values: &str) -> String {
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!(",{labels}")
    };
    format!(
        "      - series: '{metric}{{job=\"provisiond\",instance=\"{instance}\"{labels}}}'\n        \
         values: '{values}'\n"
    )
}

#[test]
fn the_dashboards_totals_count_a_shared_database_once() {
    // Sidecars a and b share a PostgreSQL store, so each reports its whole queue; c has
    // a store file; d's database changed (the old one's info went to 0). The stat panels
    // "Waiting deliveries" and "Dead letters", with every instance selected, are
    // evaluated by promtool over these series.
    let Some(promtool) = promtool() else { return };
    let dashboard: Value = serde_json::from_str(&example("grafana-dashboard.json")).unwrap();
    let stat = |title: &str| {
        let panel = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"] == title && p["type"] == "stat")
            .unwrap_or_else(|| panic!("no stat panel {title:?}"));
        panel["targets"][0]["expr"]
            .as_str()
            .unwrap()
            .replace("$instance", ".*")
    };
    // One sidecar's series: its store's info, crm's queue depth, its dead letters.
    let sidecar = |instance: &str, store: &str, depth: &str, dead: &str| {
        series("provisiond_store_info", instance, store, "1 1")
            + &series(
                "provisiond_after_queue_depth",
                instance,
                "handler=\"crm\"",
                depth,
            )
            + &series("provisiond_dead_letters", instance, "", dead)
    };
    let shared = "backend=\"postgres\",store=\"provisiond@00000000000000ab\"";
    let mut input = String::new();
    for instance in ["a", "b"] {
        input += &sidecar(instance, shared, "5 5", "3 3");
        input += &series(
            "provisiond_after_queue_depth",
            instance,
            "handler=\"erp\"",
            "1 1",
        );
    }
    let file = "backend=\"file\",store=\"host-c:/var/lib/provisiond/store.db\"";
    input += &sidecar("c", file, "2 2", "1 1");
    let old = "backend=\"postgres\",store=\"provisiond@0000000000000001\"";
    let new = "backend=\"postgres\",store=\"provisiond@0000000000000002\"";
    input += &series("provisiond_store_info", "d", old, "0 0");
    input += &sidecar("d", new, "4 4", "0 0");
    let expect = |expr: String, value: u32| {
        format!(
            "      - expr: '{expr}'\n        eval_time: 1m\n        exp_samples:\n          \
             - labels: '{{}}'\n            value: {value}\n"
        )
    };
    let tests = format!(
        "evaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{input}    \
         promql_expr_test:\n{}{}",
        // 5 + 1 shared, 2, 4: not 18, the sum over the sidecars.
        expect(stat("Waiting deliveries"), 12),
        // 3 shared, 1, 0.
        expect(stat("Dead letters"), 4),
    );
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("dashboard.test.yml"), &tests).unwrap();
    let out = Command::new(promtool)
        .args(["test", "rules", "dashboard.test.yml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}\n{tests}");
    assert!(said.contains("SUCCESS"), "{said}");
}
