//! `add_site`: what it writes, what it refuses, and that a refusal leaves
//! nothing behind.

use std::path::{Path, PathBuf};

use edgefleet_fleet::{add_site, FleetError, PipelineValidator, SiteOptions, Wave};
use serde_json::Value;

/// A scratch repository with the one file add_site insists on.
fn scratch_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("deploy/k3s/edge");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(base.join("kustomization.yaml"), "kind: Kustomization\n").unwrap();
    dir
}

fn yaml(path: &Path) -> Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn writes_a_complete_site() {
    let repo = scratch_repo();
    let dbc = repo.path().join("engine.dbc");
    std::fs::write(&dbc, "VERSION \"\"\n").unwrap();
    let options = SiteOptions {
        wave: Wave::Canary,
        can_interfaces: vec!["can0".into(), "can1".into()],
        dbc_files: vec![dbc],
        cluster_server: Some("https://10.1.2.3:6443".into()),
        ..SiteOptions::default()
    };
    let files = add_site(
        repo.path(),
        "plant-7",
        &labels(&[("region", "eu-west"), ("example.com/tier", "gold")]),
        &options,
    )
    .unwrap();
    assert_eq!(files.dir, repo.path().join("gitops/sites/plant-7"));
    for file in files.all() {
        assert!(file.is_file(), "{} missing", file.display());
    }

    let kustomization = std::fs::read_to_string(&files.kustomization).unwrap();
    assert!(
        kustomization.contains("- ../../../deploy/k3s/edge\n"),
        "{kustomization}"
    );
    assert!(kustomization.contains("- edgepipeline.yaml\n"));
    assert!(kustomization.contains("../../../deploy/k3s/edge/components/mosquitto"));
    assert!(
        kustomization.contains("name: edge-agent-dbc\n    namespace: edgefleet\n"),
        "{kustomization}"
    );
    assert!(kustomization.contains("- dbc/engine.dbc"));
    assert_eq!(std::fs::read(&files.dbc[0]).unwrap(), b"VERSION \"\"\n");

    let secret = yaml(&files.cluster_secret);
    let l = &secret["metadata"]["labels"];
    assert_eq!(l["argocd.argoproj.io/secret-type"], "cluster");
    assert_eq!(l["edgefleet.io/role"], "edge");
    assert_eq!(l["edgefleet.io/site"], "plant-7");
    assert_eq!(l["edgefleet.io/wave"], "canary");
    assert_eq!(l["region"], "eu-west");
    assert_eq!(l["example.com/tier"], "gold");
    assert_eq!(secret["metadata"]["namespace"], "argocd");
    assert_eq!(secret["stringData"]["server"], "https://10.1.2.3:6443");

    let pipeline = yaml(&files.pipeline);
    assert!(PipelineValidator::new().check(&pipeline).is_empty());
    assert_eq!(pipeline["metadata"]["name"], "edge-agent");
    assert_eq!(pipeline["metadata"]["namespace"], "edgefleet");
    let spec = &pipeline["spec"];
    assert_eq!(spec["agent"]["id"], "plant-7");
    assert_eq!(spec["uplink"]["caFile"], "/etc/edgefleet/tls/ca.crt");
    assert_eq!(spec["metrics"]["listen"], "0.0.0.0:9464");
    assert_eq!(spec["sources"]["can"][1]["interface"], "can1");
    assert_eq!(
        spec["sources"]["can"][0]["dbc"][0],
        "/etc/edgefleet/dbc/engine.dbc"
    );
    let mqtt = &spec["sources"]["mqtt"][0];
    assert_eq!(mqtt["host"], "mosquitto.edgefleet.svc.cluster.local");
    assert_eq!(
        mqtt["subscriptions"][0]["deviceFromTopic"],
        "devices/{device}/telemetry"
    );

    let apps = std::fs::read_to_string(&files.pull[1]).unwrap();
    assert!(apps.contains("path: gitops/sites/plant-7\n"), "{apps}");
    assert!(apps.contains("path: gitops/sites/plant-7/pull\n"), "{apps}");
}

#[test]
fn an_external_broker_and_no_mosquitto() {
    let repo = scratch_repo();
    let options = SiteOptions {
        mosquitto: false,
        mqtt_broker: Some("broker.plant.local:8883".into()),
        mqtt_topics: vec!["line/+/sensors/#".into()],
        ..SiteOptions::default()
    };
    let files = add_site(repo.path(), "plant-8", &[], &options).unwrap();
    assert!(!std::fs::read_to_string(&files.kustomization)
        .unwrap()
        .contains("mosquitto"));
    let pipeline = yaml(&files.pipeline);
    let mqtt = &pipeline["spec"]["sources"]["mqtt"][0];
    assert_eq!(mqtt["host"], "broker.plant.local");
    assert_eq!(mqtt["port"], 8883);
    assert_eq!(
        mqtt["subscriptions"][0]["deviceFromTopic"],
        "line/{device}/sensors/#"
    );
    assert_eq!(
        yaml(&files.cluster_secret)["metadata"]["labels"]["edgefleet.io/wave"],
        "main"
    );
}

#[test]
fn refuses_to_overwrite_a_site() {
    let repo = scratch_repo();
    add_site(repo.path(), "plant-1", &[], &SiteOptions::default()).unwrap();
    let pipeline = repo.path().join("gitops/sites/plant-1/edgepipeline.yaml");
    std::fs::write(&pipeline, "# hand edits\n").unwrap();
    let err = add_site(repo.path(), "plant-1", &[], &SiteOptions::default()).unwrap_err();
    assert!(matches!(err, FleetError::SiteExists { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(&pipeline).unwrap(),
        "# hand edits\n"
    );
}

#[test]
fn refuses_names_that_are_not_dns_labels() {
    let repo = scratch_repo();
    let too_long = "a".repeat(59);
    for name in [
        "",
        "Plant1",
        "plant_1",
        "-plant",
        "plant-",
        "plant.1",
        "pläntt",
        too_long.as_str(),
        "../x",
    ] {
        let err = add_site(repo.path(), name, &[], &SiteOptions::default()).unwrap_err();
        assert!(
            matches!(err, FleetError::InvalidSiteName { .. }),
            "{name:?}: {err}"
        );
    }
    // 58 characters fit with the Application's `edge-` prefix.
    add_site(repo.path(), &"a".repeat(58), &[], &SiteOptions::default()).unwrap();
    add_site(repo.path(), "0-plant-9", &[], &SiteOptions::default()).unwrap();
}

#[test]
fn refuses_bad_and_reserved_labels() {
    let repo = scratch_repo();
    let bad = [
        ("edgefleet.io/wave", "canary"),
        ("edgefleet.io/site", "other"),
        ("edgefleet.io/role", "cloud"),
        ("argocd.argoproj.io/secret-type", "repository"),
        ("bad key", "x"),
        ("Example.COM/x", "y"),
        ("/x", "y"),
        ("region", "-eu"),
        ("region", "eu west"),
        ("k", &"v".repeat(64)),
    ];
    for (key, value) in bad {
        let err = add_site(
            repo.path(),
            "plant-2",
            &labels(&[(key, value)]),
            &SiteOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, FleetError::InvalidLabel { .. }),
            "{key}={value}: {err}"
        );
    }
    let err = add_site(
        repo.path(),
        "plant-2",
        &labels(&[("a", "1"), ("a", "2")]),
        &SiteOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, FleetError::InvalidOption(_)), "{err}");
    assert!(!repo.path().join("gitops/sites/plant-2").exists());
    // Empty values and dotted names are fine.
    add_site(
        repo.path(),
        "plant-2",
        &labels(&[("empty", ""), ("a.b_c-d", "V1.2")]),
        &SiteOptions::default(),
    )
    .unwrap();
}

#[test]
fn refusals_leave_nothing_behind() {
    let repo = scratch_repo();
    let cases: Vec<(SiteOptions, &str)> = vec![
        (
            SiteOptions {
                mosquitto: false,
                ..SiteOptions::default()
            },
            "needs a source",
        ),
        (
            SiteOptions {
                mqtt_broker: Some("b:1883".into()),
                ..SiteOptions::default()
            },
            "not both",
        ),
        (
            SiteOptions {
                mqtt_topics: vec!["a/#/b".into()],
                ..SiteOptions::default()
            },
            "topic",
        ),
        (
            SiteOptions {
                can_interfaces: vec!["can-interface-name-too-long".into()],
                mosquitto: false,
                ..SiteOptions::default()
            },
            "interface",
        ),
        (
            SiteOptions {
                ingest_endpoint: "ingest:7443".into(),
                ..SiteOptions::default()
            },
            "endpoint",
        ),
        (
            SiteOptions {
                dbc_files: vec![PathBuf::from("/nonexistent/x.dbc")],
                can_interfaces: vec!["can0".into()],
                ..SiteOptions::default()
            },
            "does not exist",
        ),
        (
            SiteOptions {
                mosquitto: false,
                mqtt_broker: Some("host:port".into()),
                ..SiteOptions::default()
            },
            "host:port",
        ),
    ];
    for (options, expected) in cases {
        let err = add_site(repo.path(), "plant-3", &[], &options).unwrap_err();
        assert!(
            err.to_string().contains(expected),
            "expected `{expected}` in: {err}"
        );
        let sites = repo.path().join("gitops/sites");
        let leftovers: Vec<_> = std::fs::read_dir(&sites)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    }
}

#[test]
fn refuses_a_folder_that_is_not_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    let err = add_site(dir.path(), "plant-4", &[], &SiteOptions::default()).unwrap_err();
    assert!(matches!(err, FleetError::NotARepository { .. }), "{err}");
}

#[test]
fn waves_parse_and_print() {
    for wave in Wave::ALL {
        assert_eq!(wave.as_str().parse::<Wave>().unwrap(), wave);
    }
    assert!("wave-1".parse::<Wave>().is_err());
}
