//! The process's Prometheus metrics: what the code counts as it runs (jobs ended and their
//! duration, model cache hits and loads, database errors, Discord rate limits) and what
//! `/metrics` reads at scrape time (jobs in the database by status and kind, the queue, each
//! device's state and speed).
//!
//! One registry per process, reached through [`global`]: the counters are bumped from deep in
//! the scheduler, the model cache and the store, which should not carry a handle for it. Tests
//! that check a counter compare it before and after what they do (other tests share it).

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels `status` and `kind` (of jobs in the database).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// `queued`, `running`, `succeeded`, `failed`, `cancelled`.
    pub status: String,
    /// `imagine`, `upscale`, `variation`, …
    pub kind: String,
}

/// Label `status` (how a job ended on this process's devices).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    /// `succeeded`, `failed`, `cancelled`, `interrupted`.
    pub status: &'static str,
}

/// Label `device` (`cpu`, `cuda:0`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    /// The device's label.
    pub device: String,
}

/// Labels of a device's state: `device` and `state` (`idle`, `busy`, `out_of_service`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceStateLabels {
    /// The device's label.
    pub device: String,
    /// `idle`, `busy` or `out_of_service`.
    pub state: &'static str,
}

/// Label `jobs`: a bucket of waiting jobs per user (`1`, `2`, `3-4`, `5+`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueBucket {
    /// The bucket.
    pub jobs: &'static str,
}

/// Labels `kind` (`vqgan`, `clip`) and `model` (its id).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// `vqgan` or `clip`.
    pub kind: &'static str,
    /// The model's id.
    pub model: String,
}

/// Labels of a Discord rate limit: `method` and `route` (the API path, ids included, as
/// serenity reports it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `GET`, `POST`, …
    pub method: String,
    /// The request's path.
    pub route: String,
}

/// Every metric of the process, registered in [`Metrics::registry`].
pub struct Metrics {
    registry: Registry,
    /// Jobs in the database by status and kind (read at scrape time).
    pub jobs: Family<JobLabels, Gauge>,
    /// Jobs that ended on this process's devices, by how.
    pub jobs_ended: Family<EndLabels, Counter>,
    /// Seconds from a job's start on a device to its end, by how it ended.
    pub job_seconds: Family<EndLabels, Histogram>,
    /// Jobs waiting in this process's scheduler (read at scrape time).
    pub queue_waiting: Gauge,
    /// Users by how many jobs they have waiting (read at scrape time; no user ids).
    pub queue_users: Family<QueueBucket, Gauge>,
    /// Each device's state, 1 for the current one (read at scrape time).
    pub device_state: Family<DeviceStateLabels, Gauge>,
    /// Each busy device's optimisation speed (read at scrape time; 0 when idle).
    pub device_iterations_per_second: Family<DeviceLabels, Gauge<f64, AtomicU64>>,
    /// Models found already loaded on a device.
    pub model_cache_hits: Family<ModelLabels, Counter>,
    /// Models loaded onto a device.
    pub model_loads: Family<ModelLabels, Counter>,
    /// Database operations that failed (each logged error).
    pub database_errors: Counter,
    /// Discord rate limits met (a 429, or a wait serenity made to avoid one).
    pub discord_ratelimits: Family<RouteLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("vqclip");
        let metrics = Self {
            jobs: Family::default(),
            jobs_ended: Family::default(),
            // 10 s to 5.7 h (12 doublings): a tiny test job to a long video.
            job_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(10.0, 2.0, 12))
            }),
            queue_waiting: Gauge::default(),
            queue_users: Family::default(),
            device_state: Family::default(),
            device_iterations_per_second: Family::default(),
            model_cache_hits: Family::default(),
            model_loads: Family::default(),
            database_errors: Counter::default(),
            discord_ratelimits: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "jobs",
            "Jobs in the database by status and kind",
            metrics.jobs.clone(),
        );
        registry.register(
            "jobs_ended",
            "Jobs that ended on this process's devices, by how",
            metrics.jobs_ended.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Seconds from a job's start on a device to its end",
            metrics.job_seconds.clone(),
        );
        registry.register(
            "queue_waiting_jobs",
            "Jobs waiting in this process's scheduler",
            metrics.queue_waiting.clone(),
        );
        registry.register(
            "queue_users",
            "Users by how many jobs they have waiting",
            metrics.queue_users.clone(),
        );
        registry.register(
            "device_state",
            "Each device's state (1 for the current one)",
            metrics.device_state.clone(),
        );
        registry.register(
            "device_iterations_per_second",
            "Optimisation steps per second of the job on each device (0 when idle)",
            metrics.device_iterations_per_second.clone(),
        );
        registry.register(
            "model_cache_hits",
            "Models found already loaded on a device",
            metrics.model_cache_hits.clone(),
        );
        registry.register(
            "model_loads",
            "Models loaded onto a device",
            metrics.model_loads.clone(),
        );
        registry.register(
            "database_errors",
            "Database operations that failed",
            metrics.database_errors.clone(),
        );
        registry.register(
            "discord_ratelimits",
            "Discord rate limits met, by route",
            metrics.discord_ratelimits.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// Counts a job that ended on a device after `seconds`.
    pub fn job_ended(&self, status: &'static str, seconds: f64) {
        let labels = EndLabels { status };
        self.jobs_ended.get_or_create(&labels).inc();
        self.job_seconds.get_or_create(&labels).observe(seconds);
    }

    /// Counts a model found loaded (`hit`) or loaded.
    pub fn model(&self, kind: &'static str, model: &str, hit: bool) {
        let labels = ModelLabels {
            kind,
            model: model.to_owned(),
        };
        if hit {
            self.model_cache_hits.get_or_create(&labels).inc();
        } else {
            self.model_loads.get_or_create(&labels).inc();
        }
    }

    /// Sets the queue gauges from the users of the waiting jobs, in order.
    pub fn set_queue(&self, waiting_users: impl IntoIterator<Item = u64>) {
        let mut per_user: BTreeMap<u64, usize> = BTreeMap::new();
        let mut total = 0i64;
        for user in waiting_users {
            *per_user.entry(user).or_default() += 1;
            total += 1;
        }
        self.queue_waiting.set(total);
        for bucket in QUEUE_BUCKETS {
            self.queue_users
                .get_or_create(&QueueBucket { jobs: bucket })
                .set(0);
        }
        for count in per_user.into_values() {
            self.queue_users
                .get_or_create(&QueueBucket {
                    jobs: queue_bucket(count),
                })
                .inc();
        }
    }

    /// The registry, for encoding.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every metric in the OpenMetrics text format ([`CONTENT_TYPE`]), which Prometheus reads.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The buckets of [`Metrics::queue_users`], in order.
const QUEUE_BUCKETS: [&str; 4] = ["1", "2", "3-4", "5+"];

fn queue_bucket(jobs: usize) -> &'static str {
    match jobs {
        0 | 1 => QUEUE_BUCKETS[0],
        2 => QUEUE_BUCKETS[1],
        3 | 4 => QUEUE_BUCKETS[2],
        _ => QUEUE_BUCKETS[3],
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_bucketed_by_user_without_ids() {
        let m = Metrics::new();
        m.set_queue([7, 7, 8, 9, 9, 9, 10, 10, 10, 10, 10]);
        let text = m.encode();
        assert!(text.contains("vqclip_queue_waiting_jobs 11"), "{text}");
        for line in [
            "vqclip_queue_users{jobs=\"1\"} 1",
            "vqclip_queue_users{jobs=\"2\"} 1",
            "vqclip_queue_users{jobs=\"3-4\"} 1",
            "vqclip_queue_users{jobs=\"5+\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(!text.contains("user=\"7\""));
        // The buckets are set afresh, not added to.
        m.set_queue([]);
        let text = m.encode();
        assert!(text.contains("vqclip_queue_users{jobs=\"5+\"} 0"), "{text}");
    }

    #[test]
    fn ended_jobs_are_counted_and_timed() {
        let m = Metrics::new();
        m.job_ended("succeeded", 42.0);
        m.job_ended("succeeded", 5.0);
        m.job_ended("failed", 1.0);
        let text = m.encode();
        assert!(
            text.contains("vqclip_jobs_ended_total{status=\"succeeded\"} 2"),
            "{text}"
        );
        assert!(text.contains("vqclip_job_duration_seconds_count{status=\"succeeded\"} 2"));
        assert!(text.contains("vqclip_job_duration_seconds_sum{status=\"succeeded\"} 47"));
        assert!(
            text.contains("vqclip_job_duration_seconds_bucket{le=\"10.0\",status=\"succeeded\"} 1"),
            "{text}"
        );
    }
}
