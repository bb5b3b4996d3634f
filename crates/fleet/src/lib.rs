//! edgefleet on Kubernetes.
//!
//! - [`EdgePipeline`]: the custom resource whose `spec` is the edge agent's
//!   configuration and whose `status` the agents report into;
//! - [`crd_yaml`]: its `CustomResourceDefinition`, committed at [`CRD_PATH`];
//! - [`add_site`]: scaffolds a site under `gitops/sites/<name>/`;
//! - [`PipelineValidator`]: checks `EdgePipeline` manifests against the CRD's
//!   schema the way the API server would, before they reach a cluster.

mod crd;
mod error;
mod resource;
#[cfg(feature = "manifests")]
mod site;
#[cfg(feature = "manifests")]
mod validate;

pub use crd::{crd, crd_yaml, openapi_schema, CRD_PATH};
pub use error::FleetError;
pub use resource::{
    Backlog, EdgePipeline, EdgePipelineSpec, EdgePipelineStatus, NodeStatus, SourceState,
    SourceStatus, CONDITION_DEGRADED, CONDITION_READY, GROUP, VERSION,
};
#[cfg(feature = "manifests")]
pub use site::{
    add_site, validate_label, validate_site_name, SiteFiles, SiteOptions, Wave, AGENT_NAMESPACE,
    DEFAULT_REPO_URL, PIPELINE_NAME, ROLE_LABEL, SITE_LABEL, WAVE_LABEL,
};
#[cfg(feature = "manifests")]
pub use validate::{check_site_render, PipelineValidator};
