//! Scaffolding of a site under `gitops/sites/<name>/`.
//!
//! A site is one K3s cluster (one location) running the agents of the
//! `deploy/k3s/edge` base. Its folder holds everything that differs between
//! sites: the `EdgePipeline` (the agents' configuration), the DBC files, the
//! optional on-site broker, and the Argo CD cluster Secret template whose
//! labels place the site in the rollout.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use edgefleet_config::{AgentConfig, CanSource, MqttSource, PayloadFormat, Subscription};
use serde_json::json;

use crate::{EdgePipeline, EdgePipelineSpec, FleetError, PipelineValidator};

/// Cluster label that makes the edge ApplicationSet deploy to a cluster.
pub const ROLE_LABEL: &str = "edgefleet.io/role";
/// Cluster label naming the site; the ApplicationSet deploys `gitops/sites/<value>`.
pub const SITE_LABEL: &str = "edgefleet.io/site";
/// Cluster label choosing the rollout step (see [`Wave`]).
pub const WAVE_LABEL: &str = "edgefleet.io/wave";

/// The fixed name of every site's `EdgePipeline`, in the agents' namespace.
/// The DaemonSet runs `edge-agent run --pipeline edge-agent --namespace
/// edgefleet` on every gateway node, and the agent's Role may read only
/// this name.
pub const PIPELINE_NAME: &str = "edge-agent";
/// Namespace of the agents on a site cluster.
pub const AGENT_NAMESPACE: &str = "edgefleet";

/// Placeholder for the repository URL, as in gitops/argocd.
pub const DEFAULT_REPO_URL: &str = "https://git.example.com/edgefleet/edgefleet.git";

/// Where the site's Secret `edge-agent-tls` is mounted in the agent pod.
const TLS_DIR: &str = "/etc/edgefleet/tls";
/// Where the DBC ConfigMap is mounted in the agent pod.
const DBC_DIR: &str = "/etc/edgefleet/dbc";

/// Step of the progressive rollout a site belongs to. The ApplicationSet
/// updates `canary` sites first, then `early`, then `main` (a few at a
/// time); `hold` sites are left out of the rollout entirely, which is how an
/// offline or troubled site is kept from blocking the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wave {
    Canary,
    Early,
    #[default]
    Main,
    Hold,
}

impl Wave {
    pub const ALL: [Wave; 4] = [Wave::Canary, Wave::Early, Wave::Main, Wave::Hold];

    pub fn as_str(self) -> &'static str {
        match self {
            Wave::Canary => "canary",
            Wave::Early => "early",
            Wave::Main => "main",
            Wave::Hold => "hold",
        }
    }
}

impl fmt::Display for Wave {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Wave {
    type Err = FleetError;
    fn from_str(text: &str) -> Result<Self, FleetError> {
        Wave::ALL
            .into_iter()
            .find(|w| w.as_str() == text)
            .ok_or_else(|| {
                FleetError::InvalidOption(format!(
                    "unknown wave `{text}`: use canary, early, main or hold"
                ))
            })
    }
}

/// Everything about a new site besides its name and labels. `Default` gives
/// a site with the on-site Mosquitto broker and placeholders for the
/// addresses, ready to be edited.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteOptions {
    pub wave: Wave,
    /// The ingest the agents send to, e.g. `https://ingest.example.com:7443`.
    pub ingest_endpoint: String,
    /// Name to verify the ingest's certificate against, when it is not the
    /// endpoint's host.
    pub ingest_server_name: Option<String>,
    /// API server URL of the site's cluster, for the Argo CD cluster Secret.
    /// `None` writes a placeholder under `.invalid`.
    pub cluster_server: Option<String>,
    /// Deploy the on-site Mosquitto broker (kustomize component) and read
    /// from it.
    pub mosquitto: bool,
    /// Read from an existing broker instead, `host` or `host:port`.
    pub mqtt_broker: Option<String>,
    /// Topic filters to subscribe to when a broker is used.
    pub mqtt_topics: Vec<String>,
    /// SocketCAN interfaces to read, e.g. `can0`.
    pub can_interfaces: Vec<String>,
    /// DBC files to copy into the site and decode every CAN interface with.
    pub dbc_files: Vec<PathBuf>,
    /// The git repository Argo CD pulls from (pull mode's Applications).
    pub repo_url: String,
    /// The branch or tag a pull-mode site follows.
    pub target_revision: String,
}

impl Default for SiteOptions {
    fn default() -> Self {
        Self {
            wave: Wave::default(),
            ingest_endpoint: "https://ingest.edgefleet.example.com:7443".into(),
            ingest_server_name: None,
            cluster_server: None,
            mosquitto: true,
            mqtt_broker: None,
            mqtt_topics: vec!["devices/+/telemetry".into()],
            can_interfaces: Vec::new(),
            dbc_files: Vec::new(),
            repo_url: DEFAULT_REPO_URL.into(),
            target_revision: "main".into(),
        }
    }
}

/// What [`add_site`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteFiles {
    /// `gitops/sites/<name>`.
    pub dir: PathBuf,
    pub kustomization: PathBuf,
    pub pipeline: PathBuf,
    /// The Argo CD cluster Secret template; to be completed with the
    /// cluster's credentials and applied to the Argo CD cluster, never
    /// committed with them.
    pub cluster_secret: PathBuf,
    /// The DBC files copied into `dbc/`.
    pub dbc: Vec<PathBuf>,
    /// Pull mode: `pull/kustomization.yaml` and `pull/applications.yaml`,
    /// applied once to the site's own Argo CD.
    pub pull: Vec<PathBuf>,
}

impl SiteFiles {
    /// Every file written, for printing.
    pub fn all(&self) -> Vec<&Path> {
        let mut files = vec![
            self.kustomization.as_path(),
            self.pipeline.as_path(),
            self.cluster_secret.as_path(),
        ];
        files.extend(self.dbc.iter().map(PathBuf::as_path));
        files.extend(self.pull.iter().map(PathBuf::as_path));
        files
    }
}

/// Checks a site name: it becomes a label value, part of the Argo CD
/// Application name (`edge-<name>`) and the folder name, so it must be a
/// DNS-1123 label short enough for the `edge-` prefix.
pub fn validate_site_name(name: &str) -> Result<(), FleetError> {
    let invalid = |reason: &str| {
        Err(FleetError::InvalidSiteName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    // 63 is the DNS-1123 label limit; `edge-` is prepended for the Application.
    const MAX: usize = 63 - "edge-".len();
    if name.is_empty() {
        return invalid("must not be empty");
    }
    if name.len() > MAX {
        return invalid(&format!("must be at most {MAX} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return invalid("only lowercase letters, digits and `-` are allowed (DNS-1123 label)");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return invalid("must start and end with a letter or digit");
    }
    Ok(())
}

/// Checks a Kubernetes label (`[prefix/]name=value`) and refuses the keys
/// edgefleet sets itself.
pub fn validate_label(key: &str, value: &str) -> Result<(), FleetError> {
    let invalid = |reason: String| {
        Err(FleetError::InvalidLabel {
            key: key.to_string(),
            value: value.to_string(),
            reason,
        })
    };
    if [ROLE_LABEL, SITE_LABEL, WAVE_LABEL].contains(&key)
        || key == "argocd.argoproj.io/secret-type"
    {
        return invalid(format!(
            "`{key}` is set by edgefleet itself (use the wave option for {WAVE_LABEL})"
        ));
    }
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(is_dns_label) {
            return invalid("the key's prefix must be a DNS subdomain".into());
        }
    }
    if name.is_empty() || name.len() > 63 || !is_label_name(name) {
        return invalid(
            "the key's name must be 1-63 characters of letters, digits, `-`, `_`, `.`, \
             starting and ending with a letter or digit"
                .into(),
        );
    }
    if value.len() > 63 || (!value.is_empty() && !is_label_name(value)) {
        return invalid(
            "the value must be empty or up to 63 characters of letters, digits, `-`, `_`, `.`, \
             starting and ending with a letter or digit"
                .into(),
        );
    }
    Ok(())
}

fn is_dns_label(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 63
        && part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !part.starts_with('-')
        && !part.ends_with('-')
}

fn is_label_name(text: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let bytes = text.as_bytes();
    bytes
        .iter()
        .all(|&b| alnum(b) || b == b'-' || b == b'_' || b == b'.')
        && bytes.first().copied().is_some_and(alnum)
        && bytes.last().copied().is_some_and(alnum)
}

/// Writes `gitops/sites/<name>/` under `repo_root`: `kustomization.yaml`
/// (the edge base, the site's pipeline, the DBC ConfigMap and, if asked,
/// the Mosquitto component), `edgepipeline.yaml`, `dbc/*.dbc` and
/// `cluster-secret.yaml`.
///
/// Refuses an invalid name or label, an existing site, and a pipeline that
/// the CRD schema would reject. Nothing is left behind on failure.
pub fn add_site(
    repo_root: &Path,
    name: &str,
    labels: &[(String, String)],
    options: &SiteOptions,
) -> Result<SiteFiles, FleetError> {
    validate_site_name(name)?;
    for (key, value) in labels {
        validate_label(key, value)?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for (key, _) in labels {
        if !seen.insert(key) {
            return Err(FleetError::InvalidOption(format!(
                "label `{key}` is given twice"
            )));
        }
    }
    // The relative paths in the kustomization only work from this layout.
    let base = repo_root.join("deploy/k3s/edge/kustomization.yaml");
    if !base.is_file() {
        return Err(FleetError::NotARepository {
            root: repo_root.to_path_buf(),
            missing: "deploy/k3s/edge/kustomization.yaml".into(),
        });
    }
    let sites = repo_root.join("gitops/sites");
    let dir = sites.join(name);
    if dir.exists() {
        return Err(FleetError::SiteExists {
            name: name.to_string(),
            path: dir,
        });
    }

    let dbc_names = dbc_file_names(&options.dbc_files)?;
    let pipeline = pipeline_for(name, options, &dbc_names)?;
    let pipeline_yaml = pipeline_yaml(&pipeline)?;
    // Catch a bad option (a malformed topic, an interface name too long)
    // here rather than at the first sync on a remote site.
    // Compiled once: scaffolding many sites in one run is common in tests.
    static VALIDATOR: std::sync::OnceLock<PipelineValidator> = std::sync::OnceLock::new();
    let problems = VALIDATOR
        .get_or_init(PipelineValidator::new)
        .check_yaml(&pipeline_yaml)
        .into_iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>();
    if !problems.is_empty() {
        return Err(FleetError::InvalidPipeline {
            name: name.to_string(),
            problems: problems.join("\n"),
        });
    }

    let kustomization = kustomization_yaml(name, options, &dbc_names);
    let secret = cluster_secret_yaml(name, labels, options)?;
    let pull_kustomization = pull_kustomization_yaml();
    let pull_applications = pull_applications_yaml(name, options)?;

    // Build the site in a scratch folder beside its final place and rename
    // it in one step, so a failure never leaves half a site (which the
    // ApplicationSet would try to deploy).
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| FleetError::Io {
            action,
            path,
            source,
        }
    };
    std::fs::create_dir_all(&sites).map_err(io("create", &sites))?;
    let scratch = sites.join(format!(".{name}.partial"));
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).map_err(io("remove", &scratch))?;
    }
    let write_all = || -> Result<(), FleetError> {
        std::fs::create_dir_all(&scratch).map_err(io("create", &scratch))?;
        let write = |file: &str, text: &str| {
            let path = scratch.join(file);
            std::fs::write(&path, text).map_err(io("write", &path))
        };
        write("kustomization.yaml", &kustomization)?;
        write("edgepipeline.yaml", &pipeline_yaml)?;
        write("cluster-secret.yaml", &secret)?;
        let pull_dir = scratch.join("pull");
        std::fs::create_dir_all(&pull_dir).map_err(io("create", &pull_dir))?;
        write("pull/kustomization.yaml", &pull_kustomization)?;
        write("pull/applications.yaml", &pull_applications)?;
        if !dbc_names.is_empty() {
            let dbc_dir = scratch.join("dbc");
            std::fs::create_dir_all(&dbc_dir).map_err(io("create", &dbc_dir))?;
            for (source, file_name) in options.dbc_files.iter().zip(&dbc_names) {
                std::fs::copy(source, dbc_dir.join(file_name)).map_err(io("copy", source))?;
            }
        }
        Ok(())
    };
    if let Err(err) = write_all() {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(err);
    }
    // Checked again: another scaffold may have created it meanwhile.
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(FleetError::SiteExists {
            name: name.to_string(),
            path: dir,
        });
    }
    std::fs::rename(&scratch, &dir).map_err(io("rename into place", &dir))?;

    Ok(SiteFiles {
        kustomization: dir.join("kustomization.yaml"),
        pipeline: dir.join("edgepipeline.yaml"),
        cluster_secret: dir.join("cluster-secret.yaml"),
        dbc: dbc_names.iter().map(|n| dir.join("dbc").join(n)).collect(),
        pull: vec![
            dir.join("pull/kustomization.yaml"),
            dir.join("pull/applications.yaml"),
        ],
        dir,
    })
}

/// File names of the DBC files inside the site; two files of the same name
/// would overwrite each other in the ConfigMap.
fn dbc_file_names(files: &[PathBuf]) -> Result<Vec<String>, FleetError> {
    let mut names = Vec::new();
    for file in files {
        if !file.is_file() {
            return Err(FleetError::InvalidOption(format!(
                "DBC file {} does not exist",
                file.display()
            )));
        }
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| is_configmap_key(n))
            .ok_or_else(|| {
                FleetError::InvalidOption(format!(
                    "DBC file name {} must be letters, digits, `-`, `_` and `.` (a ConfigMap key)",
                    file.display()
                ))
            })?;
        if names.iter().any(|n| n == name) {
            return Err(FleetError::InvalidOption(format!(
                "two DBC files are named `{name}`"
            )));
        }
        names.push(name.to_string());
    }
    Ok(names)
}

fn is_configmap_key(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The site's agent configuration. Paths are those of the DaemonSet's mounts.
fn pipeline_for(
    name: &str,
    options: &SiteOptions,
    dbc_names: &[String],
) -> Result<EdgePipeline, FleetError> {
    if options.mosquitto && options.mqtt_broker.is_some() {
        return Err(FleetError::InvalidOption(
            "choose either the on-site Mosquitto broker or an existing broker, not both".into(),
        ));
    }
    if !dbc_names.is_empty() && options.can_interfaces.is_empty() {
        return Err(FleetError::InvalidOption(
            "DBC files were given but no CAN interface to decode with them".into(),
        ));
    }
    let broker = if options.mosquitto {
        // The component's Service; the agent runs on the host network with
        // ClusterFirstWithHostNet DNS, so it resolves Service names.
        Some((
            format!("mosquitto.{AGENT_NAMESPACE}.svc.cluster.local"),
            1883,
        ))
    } else {
        match &options.mqtt_broker {
            None => None,
            Some(broker) => Some(parse_broker(broker)?),
        }
    };
    // Built from the config crate's own deserialisation so every field not
    // set here takes the agent's default, exactly as in a config file.
    let mut config: AgentConfig = serde_json::from_value(json!({
        "uplink": {
            "endpoint": options.ingest_endpoint,
            "caFile": format!("{TLS_DIR}/ca.crt"),
            "certFile": format!("{TLS_DIR}/tls.crt"),
            "keyFile": format!("{TLS_DIR}/tls.key"),
        },
        // The kubelet probes the pod IP, which on the host network is the
        // node's address: the default 127.0.0.1 would fail every probe.
        "metrics": {"listen": "0.0.0.0:9464"},
    }))
    .map_err(FleetError::Json)?;
    config.uplink.server_name = options.ingest_server_name.clone();
    config.agent.id = Some(name.to_string());
    if let Some((host, port)) = broker {
        if options.mqtt_topics.is_empty() {
            return Err(FleetError::InvalidOption(
                "an MQTT broker needs at least one topic".into(),
            ));
        }
        config.sources.mqtt.push(MqttSource {
            name: "mqtt".into(),
            host,
            port,
            client_id: format!("edgefleet-{name}"),
            clean_session: false,
            keep_alive_secs: 30,
            username: None,
            password_file: None,
            tls: None,
            // Every gateway of the site subscribes; each message goes to one.
            shared_group: Some(format!("edgefleet-{name}")),
            subscriptions: options
                .mqtt_topics
                .iter()
                .map(|topic| Subscription {
                    topic: topic.clone(),
                    qos: 1,
                    device_from_topic: device_pattern(topic),
                    payload: PayloadFormat::Json,
                    content_type: "application/octet-stream".into(),
                })
                .collect(),
        });
    }
    for interface in &options.can_interfaces {
        config.sources.can.push(CanSource {
            interface: interface.clone(),
            dbc: dbc_names.iter().map(|n| format!("{DBC_DIR}/{n}")).collect(),
            unknown_frames: Default::default(),
            filters: Vec::new(),
            fd: false,
            reduction: Default::default(),
        });
    }
    if config.sources.mqtt.is_empty() && config.sources.can.is_empty() {
        return Err(FleetError::InvalidOption(
            "a site needs a source: the on-site Mosquitto broker, an MQTT broker or a CAN interface"
                .into(),
        ));
    }
    let mut pipeline = EdgePipeline::new(PIPELINE_NAME, EdgePipelineSpec(config));
    pipeline.metadata.namespace = Some(AGENT_NAMESPACE.into());
    Ok(pipeline)
}

fn parse_broker(broker: &str) -> Result<(String, u16), FleetError> {
    let bad =
        || FleetError::InvalidOption(format!("broker `{broker}` is not `host` or `host:port`"));
    match broker.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            Ok((host.to_string(), port.parse().map_err(|_| bad())?))
        }
        Some(_) => Err(bad()),
        None if broker.is_empty() => Err(bad()),
        None => Ok((broker.to_string(), 1883)),
    }
}

/// `devices/+/telemetry` names the device by its `+` level.
fn device_pattern(topic: &str) -> Option<String> {
    let levels: Vec<&str> = topic.split('/').collect();
    let first = levels.iter().position(|l| *l == "+")?;
    let pattern: Vec<&str> = levels
        .iter()
        .enumerate()
        .map(|(i, l)| if i == first { "{device}" } else { l })
        .collect();
    Some(pattern.join("/"))
}

const GENERATED: &str = "# Scaffolded by `edgefleet gitops add-site`; edit freely.\n";

fn pipeline_yaml(pipeline: &EdgePipeline) -> Result<String, FleetError> {
    let mut value = serde_json::to_value(pipeline).map_err(FleetError::Json)?;
    // The CRD arrives in the same sync; Argo CD's dry run would otherwise
    // fail on a kind it does not know yet.
    value["metadata"]["annotations"] = json!({
        "argocd.argoproj.io/sync-options": "SkipDryRunOnMissingResource=true"
    });
    // A fresh object has no status; do not commit an empty one.
    if let Some(object) = value.as_object_mut() {
        object.remove("status");
    }
    let yaml = serde_yaml_ng::to_string(&value).map_err(FleetError::Yaml)?;
    Ok(format!("{GENERATED}{yaml}"))
}

fn kustomization_yaml(name: &str, options: &SiteOptions, dbc_names: &[String]) -> String {
    let mut text = format!(
        "{GENERATED}apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../../deploy/k3s/edge
  - edgepipeline.yaml
labels:
  - pairs:
      {SITE_LABEL}: {name}
"
    );
    if options.mosquitto {
        text.push_str("components:\n  - ../../../deploy/k3s/edge/components/mosquitto\n");
    }
    if !dbc_names.is_empty() {
        // Same name as the base's optional volume: kustomize appends the
        // content hash and rewrites the DaemonSet's reference, so changing
        // a DBC file rolls the agents. The rewrite only matches within a
        // namespace, hence the base's namespace on the generated ConfigMap
        // (without it the DaemonSet would keep the unhashed name and, the
        // volume being optional, silently run without DBC files).
        text.push_str(&format!(
            "configMapGenerator:\n  - name: edge-agent-dbc\n    namespace: {AGENT_NAMESPACE}\n    files:\n"
        ));
        for file in dbc_names {
            text.push_str(&format!("      - dbc/{file}\n"));
        }
    }
    text
}

fn cluster_secret_yaml(
    name: &str,
    labels: &[(String, String)],
    options: &SiteOptions,
) -> Result<String, FleetError> {
    let mut all_labels = serde_json::Map::new();
    all_labels.insert("argocd.argoproj.io/secret-type".into(), json!("cluster"));
    all_labels.insert(ROLE_LABEL.into(), json!("edge"));
    all_labels.insert(SITE_LABEL.into(), json!(name));
    all_labels.insert(WAVE_LABEL.into(), json!(options.wave.as_str()));
    for (key, value) in labels {
        all_labels.insert(key.clone(), json!(value));
    }
    let server = options
        .cluster_server
        .clone()
        .unwrap_or_else(|| format!("https://{name}.sites.edgefleet.invalid:6443"));
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": format!("cluster-{name}"),
            "namespace": "argocd",
            "labels": all_labels,
        },
        "type": "Opaque",
        "stringData": {
            "name": name,
            "server": server,
            "config": "{\"tlsClientConfig\": {\"caData\": \"REPLACE_ME\", \"certData\": \"REPLACE_ME\", \"keyData\": \"REPLACE_ME\"}}",
        },
    });
    let yaml = serde_yaml_ng::to_string(&secret).map_err(FleetError::Yaml)?;
    Ok(format!(
        "# Argo CD cluster Secret TEMPLATE for site `{name}`: not part of the site's kustomization.
# Replace the REPLACE_ME credentials (or register the cluster with `argocd cluster add`
# and copy these labels onto the Secret it creates), then apply it to the Argo CD
# cluster's `argocd` namespace. Never commit it with real credentials.
# The labels place the site in the fleet: {ROLE_LABEL}=edge selects it for the edge
# ApplicationSet, {SITE_LABEL} picks gitops/sites/{name}, {WAVE_LABEL} its rollout step
# (canary, early, main; `hold` takes it out of the rollout, e.g. while it is offline).
{yaml}"
    ))
}

fn pull_kustomization_yaml() -> String {
    format!(
        "{GENERATED}# Pull mode: the site's own Argo CD deploys this site only. Bootstrap once with
#   kubectl apply -k gitops/sites/<name>/pull
# on the site's cluster; from then on the root Application keeps these
# Applications (and so the site) in step with git.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: argocd
resources:
  - ../../../pull
  - applications.yaml
"
    )
}

fn pull_applications_yaml(name: &str, options: &SiteOptions) -> Result<String, FleetError> {
    let source = |path: String| {
        json!({
            "repoURL": options.repo_url,
            "targetRevision": options.target_revision,
            "path": path,
        })
    };
    let retry = json!({
        "limit": 20,
        "backoff": {"duration": "1m", "factor": 2, "maxDuration": "1h"},
    });
    // app-of-apps: the root manages the Applications of this folder,
    // itself included, so changing them is a commit, not a visit.
    let root = json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": "edgefleet-root", "namespace": "argocd"},
        "spec": {
            "project": "edgefleet-site",
            "source": source(format!("gitops/sites/{name}/pull")),
            "destination": {"server": "https://kubernetes.default.svc", "namespace": "argocd"},
            "syncPolicy": {
                "automated": {"prune": true, "selfHeal": true},
                "retry": retry,
            },
        },
    });
    let site = json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {
            "name": "edgefleet-site",
            "namespace": "argocd",
            "labels": {SITE_LABEL: name, WAVE_LABEL: options.wave.as_str()},
        },
        "spec": {
            "project": "edgefleet-site",
            "source": source(format!("gitops/sites/{name}")),
            "destination": {"server": "https://kubernetes.default.svc", "namespace": AGENT_NAMESPACE},
            "syncPolicy": {
                "automated": {"prune": true, "selfHeal": true},
                "syncOptions": ["RespectIgnoreDifferences=true", "ApplyOutOfSyncOnly=true"],
                "retry": retry,
            },
            "ignoreDifferences": [{
                "group": "edgefleet.io",
                "kind": "EdgePipeline",
                "jsonPointers": ["/status"],
            }],
        },
    });
    let mut text = String::from(GENERATED);
    for (i, app) in [root, site].iter().enumerate() {
        if i > 0 {
            text.push_str("---\n");
        }
        text.push_str(&serde_yaml_ng::to_string(app).map_err(FleetError::Yaml)?);
    }
    Ok(text)
}
