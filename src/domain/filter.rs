//! Job filters: the jobs a `bcp.query.jobs` asks for, and its paging. The
//! store reads its job views through [`JobFilter::matches`].

use super::ids::{Name, ProjectId};
use super::job::{Job, JobState};
use serde::{Deserialize, Serialize};

/// `bcp.query.jobs` filters; every given field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobFilter {
    #[serde(default)]
    pub project_id: Option<ProjectId>,
    #[serde(default)]
    pub state: Option<JobState>,
    #[serde(default)]
    pub region: Option<Name>,
    #[serde(default)]
    pub cluster: Option<String>,
    /// Paging: only jobs whose id sorts after this one (a reply's `next_after`).
    #[serde(default)]
    pub after: Option<uuid::Uuid>,
    /// At most this many jobs, at least one (and never more than bcp's
    /// page limit).
    #[serde(default)]
    pub limit: Option<std::num::NonZeroUsize>,
}

impl JobFilter {
    /// A `cluster` is a label as a deployment's is (a filter naming one no
    /// deployment may have is refused, not answered with no jobs).
    pub fn validate(&self) -> Result<(), String> {
        match &self.cluster {
            Some(c) => super::job::check_label("cluster", c),
            None => Ok(()),
        }
    }

    pub fn matches(&self, job: &Job) -> bool {
        self.project_id
            .as_ref()
            .is_none_or(|p| *p == job.project_id)
            && self.state.is_none_or(|s| s == job.state)
            && self
                .region
                .as_ref()
                .is_none_or(|r| job.region.as_ref() == Some(r))
            && self
                .cluster
                .as_ref()
                .is_none_or(|c| job.deployment.cluster.as_ref() == Some(c))
    }
}
