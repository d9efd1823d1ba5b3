//! The Prometheus metrics of `cairn replicate --listen`, in the text exposition format
//! (through `prometheus-client`).
//!
//! Contract: per database (labels `tenant`, `db`, and `kind` for checkpoints: `segments`
//! for shipped WAL, `sqlite` for page generations), the counters and histograms are fed by
//! the replicate loop's observer hook ([`DbObserver`], a
//! [`cairn_orchestrator::ReplicateObserver`]) as events happen; the gauges (lag,
//! generation and its age, watermark) are computed at scrape time from the newest step
//! status the loop handed over. Service-wide numbers are read at scrape time from the
//! counters that already exist: the store's [`cairn_orchestrator::RemoteStore::stats`]
//! (requests by operation, retries, errors by cause and class, bytes), the job queue's
//! depth and the quota levels; nothing is counted twice. Series that nothing in this
//! process feeds yet (restores, bytes downloaded) are registered with zero values so
//! dashboards and alerts can rely on their names. GC series are per database, fed by the
//! service's collections ([`GcRecorder`]).
//!
//! Crash: counters live in memory and start from zero with the process (Prometheus'
//! `rate()` handles resets). Retries: none; a scrape that cannot read the job queue
//! omits that gauge and logs why. Cancellation: a scrape is one synchronous encode.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_orchestrator::{
    CairnError, CheckpointReport, Checkpointer, GcReport, ReplicateObserver, ReplicateStatus,
    SourceKind,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The labels of per-database series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbLabels {
    /// Tenant.
    pub tenant: String,
    /// Database.
    pub db: String,
}

/// The labels of per-database checkpoint series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    tenant: String,
    db: String,
    kind: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 5 ms to about 3 minutes.
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

/// One database the service replicates: its lag bound and newest step status.
#[derive(Debug)]
pub struct DbEntry {
    /// Its labels.
    pub labels: DbLabels,
    /// `/ready` fails when its lag passes this.
    pub lag_bound: Duration,
    /// The newest status the replicate loop reported (`None` before its first step).
    pub status: Mutex<Option<ReplicateStatus>>,
}

impl DbEntry {
    /// The newest status, if any.
    pub fn status(&self) -> Option<ReplicateStatus> {
        self.status.lock().ok().and_then(|s| s.clone())
    }
}

/// The databases a service runs.
pub type DbTable = Arc<RwLock<Vec<Arc<DbEntry>>>>;

/// The event-fed metric families (shared by the registry and the observers).
#[derive(Clone, Debug)]
struct Families {
    checkpoints_started: Family<KindLabels, Counter>,
    checkpoints_succeeded: Family<KindLabels, Counter>,
    checkpoints_failed: Family<KindLabels, Counter>,
    checkpoint_seconds: Histograms<KindLabels>,
    restores_started: Family<DbLabels, Counter>,
    restores_succeeded: Family<DbLabels, Counter>,
    restores_failed: Family<DbLabels, Counter>,
    restore_seconds: Histograms<DbLabels>,
    uploaded_bytes: Family<DbLabels, Counter>,
    downloaded_bytes: Family<DbLabels, Counter>,
    blobs_uploaded: Family<DbLabels, Counter>,
    blobs_reused: Family<DbLabels, Counter>,
    gc_deleted_bytes: Family<DbLabels, Counter>,
    gc_deleted_objects: Family<DbLabels, Counter>,
    gc_unreferenced_bytes: Family<DbLabels, Gauge>,
}

/// The registry of a service and the handles that feed it.
pub struct Metrics {
    registry: Registry,
    families: Families,
    dbs: DbTable,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch, now (the system clock, as the CLI's checkpointer uses).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Metrics {
    /// The registry for the service of `cp` whose databases are `dbs`.
    pub fn new(cp: Arc<Checkpointer>, dbs: DbTable) -> Self {
        let families = Families {
            checkpoints_started: Family::default(),
            checkpoints_succeeded: Family::default(),
            checkpoints_failed: Family::default(),
            checkpoint_seconds: Family::new_with_constructor(duration_histogram),
            restores_started: Family::default(),
            restores_succeeded: Family::default(),
            restores_failed: Family::default(),
            restore_seconds: Family::new_with_constructor(duration_histogram),
            uploaded_bytes: Family::default(),
            downloaded_bytes: Family::default(),
            blobs_uploaded: Family::default(),
            blobs_reused: Family::default(),
            gc_deleted_bytes: Family::default(),
            gc_deleted_objects: Family::default(),
            gc_unreferenced_bytes: Family::default(),
        };
        let mut r = Registry::with_prefix("cairn");
        let f = &families;
        r.register(
            "checkpoints_started",
            "Checkpoints started",
            f.checkpoints_started.clone(),
        );
        r.register(
            "checkpoints_succeeded",
            "Checkpoints that published a generation",
            f.checkpoints_succeeded.clone(),
        );
        r.register(
            "checkpoints_failed",
            "Checkpoints that failed",
            f.checkpoints_failed.clone(),
        );
        r.register(
            "checkpoint_duration_seconds",
            "Wall time of checkpoints, succeeded or failed",
            f.checkpoint_seconds.clone(),
        );
        r.register(
            "restores_started",
            "Restores started",
            f.restores_started.clone(),
        );
        r.register(
            "restores_succeeded",
            "Restores that completed",
            f.restores_succeeded.clone(),
        );
        r.register(
            "restores_failed",
            "Restores that failed",
            f.restores_failed.clone(),
        );
        r.register(
            "restore_duration_seconds",
            "Wall time of restores",
            f.restore_seconds.clone(),
        );
        r.register(
            "uploaded_bytes",
            "Bytes checkpoints sent to the store (blobs and manifests)",
            f.uploaded_bytes.clone(),
        );
        r.register(
            "downloaded_bytes",
            "Bytes restores read from the store",
            f.downloaded_bytes.clone(),
        );
        r.register(
            "blobs_uploaded",
            "Blobs checkpoints uploaded",
            f.blobs_uploaded.clone(),
        );
        r.register(
            "blobs_reused",
            "Blobs checkpoints referenced without uploading (already stored)",
            f.blobs_reused.clone(),
        );
        r.register(
            "gc_deleted_bytes",
            "Bytes of blobs GC deleted",
            f.gc_deleted_bytes.clone(),
        );
        r.register(
            "gc_deleted_objects",
            "Objects GC deleted",
            f.gc_deleted_objects.clone(),
        );
        r.register(
            "gc_unreferenced_bytes",
            "Bytes of stored blobs no retained generation references that the last GC kept (in their grace period)",
            f.gc_unreferenced_bytes.clone(),
        );
        r.register_collector(Box::new(Scraped {
            cp,
            dbs: Arc::clone(&dbs),
        }));
        Self {
            registry: r,
            families,
            dbs,
        }
    }

    /// Adds a database whose checkpoints are of `kinds`; the returned observer feeds its
    /// series (which exist from now on, at zero).
    pub fn add_db(
        &self,
        labels: DbLabels,
        lag_bound: Duration,
        kinds: &[SourceKind],
    ) -> Arc<DbObserver> {
        let f = &self.families;
        for kind in kinds {
            let k = kind_labels(&labels, kind.as_str());
            drop(f.checkpoints_started.get_or_create(&k));
            drop(f.checkpoints_succeeded.get_or_create(&k));
            drop(f.checkpoints_failed.get_or_create(&k));
            drop(f.checkpoint_seconds.get_or_create(&k));
        }
        for fam in [
            &f.restores_started,
            &f.restores_succeeded,
            &f.restores_failed,
            &f.uploaded_bytes,
            &f.downloaded_bytes,
            &f.blobs_uploaded,
            &f.blobs_reused,
            &f.gc_deleted_bytes,
            &f.gc_deleted_objects,
        ] {
            drop(fam.get_or_create(&labels));
        }
        drop(f.gc_unreferenced_bytes.get_or_create(&labels));
        drop(f.restore_seconds.get_or_create(&labels));
        let entry = Arc::new(DbEntry {
            labels: labels.clone(),
            lag_bound,
            status: Mutex::new(None),
        });
        if let Ok(mut dbs) = self.dbs.write() {
            dbs.push(Arc::clone(&entry));
        }
        Arc::new(DbObserver {
            families: self.families.clone(),
            labels,
            entry,
        })
    }

    /// A handle that feeds the GC series of `tenant`'s databases.
    pub fn gc_recorder(&self, tenant: &str) -> GcRecorder {
        GcRecorder {
            families: self.families.clone(),
            tenant: tenant.to_string(),
        }
    }

    /// The text exposition of every metric, now.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn kind_labels(l: &DbLabels, kind: &str) -> KindLabels {
    KindLabels {
        tenant: l.tenant.clone(),
        db: l.db.clone(),
        kind: kind.to_string(),
    }
}

/// Feeds the GC series from the service's collections.
#[derive(Clone, Debug)]
pub struct GcRecorder {
    families: Families,
    tenant: String,
}

impl GcRecorder {
    /// Counts what one collection of `db` did.
    pub fn record(&self, db: &str, r: &GcReport) {
        let l = DbLabels {
            tenant: self.tenant.clone(),
            db: db.to_string(),
        };
        let f = &self.families;
        f.gc_deleted_bytes.get_or_create(&l).inc_by(r.bytes_deleted);
        f.gc_deleted_objects
            .get_or_create(&l)
            .inc_by(r.blobs_deleted);
        let kept = i64::try_from(r.unreferenced_in_grace.bytes).unwrap_or(i64::MAX);
        f.gc_unreferenced_bytes.get_or_create(&l).set(kept);
    }
}

/// Feeds one database's series from its replicate loop.
#[derive(Debug)]
pub struct DbObserver {
    families: Families,
    labels: DbLabels,
    entry: Arc<DbEntry>,
}

impl ReplicateObserver for DbObserver {
    fn checkpoint_started(&self, kind: SourceKind) {
        let k = kind_labels(&self.labels, kind.as_str());
        self.families.checkpoints_started.get_or_create(&k).inc();
    }

    fn checkpoint_finished(
        &self,
        kind: SourceKind,
        elapsed: Duration,
        outcome: Result<&CheckpointReport, &CairnError>,
    ) {
        let f = &self.families;
        let k = kind_labels(&self.labels, kind.as_str());
        f.checkpoint_seconds
            .get_or_create(&k)
            .observe(elapsed.as_secs_f64());
        match outcome {
            Ok(r) => {
                f.checkpoints_succeeded.get_or_create(&k).inc();
                let l = &self.labels;
                f.uploaded_bytes.get_or_create(l).inc_by(r.bytes_uploaded);
                f.blobs_uploaded.get_or_create(l).inc_by(r.blobs_uploaded);
                f.blobs_reused.get_or_create(l).inc_by(r.blobs_reused);
            }
            Err(_) => {
                f.checkpoints_failed.get_or_create(&k).inc();
            }
        }
    }

    fn step_finished(&self, status: &ReplicateStatus) {
        if let Ok(mut s) = self.entry.status.lock() {
            *s = Some(status.clone());
        }
    }
}

/// What is read at scrape time: per-database gauges from the newest status, and the
/// service-wide counters kept elsewhere.
struct Scraped {
    cp: Arc<Checkpointer>,
    dbs: DbTable,
}

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraped").finish_non_exhaustive()
    }
}

fn gauge<L, V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(L, V)],
) -> Result<(), std::fmt::Error>
where
    L: EncodeLabelSet,
    V: prometheus_client::encoding::EncodeGaugeValue + Copy + std::fmt::Debug,
{
    let mut m = enc.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(L, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

type Pairs = Vec<(&'static str, String)>;

fn db_pairs(l: &DbLabels) -> Pairs {
    vec![("tenant", l.tenant.clone()), ("db", l.db.clone())]
}

impl Collector for Scraped {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = now_ms();
        let dbs: Vec<Arc<DbEntry>> = self.dbs.read().map(|d| d.clone()).unwrap_or_default();
        let statuses: Vec<(Pairs, Option<ReplicateStatus>, Duration)> = dbs
            .iter()
            .map(|d| (db_pairs(&d.labels), d.status(), d.lag_bound))
            .collect();
        let secs = |ms: u64| ms as f64 / 1000.0;
        let per_db = |f: &dyn Fn(&ReplicateStatus) -> Option<f64>| -> Vec<(Pairs, f64)> {
            statuses
                .iter()
                .filter_map(|(l, s, _)| s.as_ref().and_then(f).map(|v| (l.clone(), v)))
                .collect()
        };
        gauge(
            &mut enc,
            "replication_lag_seconds",
            "Now minus the time before which every commit is durable in the store (before the first durable step: time since the start)",
            &per_db(&|s| Some(secs(s.lag_ms(now)))),
        )?;
        gauge(
            &mut enc,
            "replication_lag_bound_seconds",
            "The lag /ready allows",
            &statuses
                .iter()
                .map(|(l, _, b)| (l.clone(), b.as_secs_f64()))
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut enc,
            "generation",
            "The newest published generation",
            &per_db(&|s| s.generation.map(|g| g as f64)),
        )?;
        gauge(
            &mut enc,
            "generation_age_seconds",
            "Now minus the newest generation's publication time",
            &per_db(&|s| s.generation_created_ms.map(|c| secs(now.saturating_sub(c)))),
        )?;
        gauge(
            &mut enc,
            "watermark_lsn",
            "The truncation watermark: WAL below it is durable remotely and may be deleted",
            &per_db(&|s| s.watermark.map(|w| w as f64)),
        )?;
        gauge(
            &mut enc,
            "wal_end_lsn",
            "The end of the published WAL stream",
            &per_db(&|s| s.wal_end.map(|w| w as f64)),
        )?;
        gauge(
            &mut enc,
            "replicate_consecutive_failures",
            "Replication steps failed in a row (0: the last one succeeded)",
            &per_db(&|s| Some(f64::from(s.consecutive_failures))),
        )?;
        let steps: Vec<(Pairs, u64)> = statuses
            .iter()
            .filter_map(|(l, s, _)| s.as_ref().map(|s| (l.clone(), s.steps)))
            .collect();
        counter(&mut enc, "replicate_steps", "Replication steps run", &steps)?;
        let failed: Vec<(Pairs, u64)> = statuses
            .iter()
            .filter_map(|(l, s, _)| s.as_ref().map(|s| (l.clone(), s.steps_failed)))
            .collect();
        counter(
            &mut enc,
            "replicate_step_failures",
            "Replication steps that failed and were retried",
            &failed,
        )?;
        self.encode_store(&mut enc)?;
        self.encode_service(&mut enc)
    }
}

impl Scraped {
    /// The store's own counters ([`cairn_orchestrator::RemoteStore::stats`]).
    fn encode_store(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.cp.store().stats();
        let o = &s.by_op;
        let ops: Vec<([(&str, &str); 1], u64)> = [
            ("get", o.get),
            ("head", o.head),
            ("put", o.put),
            ("list", o.list),
            ("delete", o.delete),
            ("copy", o.copy),
            ("create_multipart", o.create_multipart),
            ("upload_part", o.upload_part),
            ("complete_multipart", o.complete_multipart),
            ("abort_multipart", o.abort_multipart),
        ]
        .into_iter()
        .map(|(op, n)| ([("op", op)], n))
        .collect();
        counter(
            enc,
            "store_requests",
            "Store request attempts by operation (each retry counts)",
            &ops,
        )?;
        let none: [(&str, &str); 0] = [];
        counter(
            enc,
            "store_retries",
            "Store requests retried after transient errors",
            &[(none, s.retries)],
        )?;
        let e = &s.errors;
        let errors: Vec<([(&str, &str); 2], u64)> = [
            ("connect", "transient", e.connect),
            ("timeout", "transient", e.timeout),
            ("interrupted", "transient", e.interrupted),
            ("server_error", "transient", e.server_error),
            ("throttled", "transient", e.throttled),
            ("cut_off", "transient", e.cut_off),
            ("bad_response", "transient", e.bad_response),
            ("unknown", "transient", e.unknown),
            ("not_found", "permanent", e.not_found),
            ("already_exists", "permanent", e.already_exists),
            ("denied", "permanent", e.denied),
            ("unsupported", "permanent", e.unsupported),
            ("rejected", "permanent", e.rejected),
            ("local_io", "permanent", e.local_io),
        ]
        .into_iter()
        .map(|(kind, class, n)| ([("kind", kind), ("class", class)], n))
        .collect();
        counter(
            enc,
            "store_errors",
            "Failed store request attempts by cause (kind) and class",
            &errors,
        )?;
        counter(
            enc,
            "store_sent_bytes",
            "Payload bytes sent to the store (each attempt counts)",
            &[(none, s.bytes_sent)],
        )?;
        counter(
            enc,
            "store_received_bytes",
            "Bytes received from the store (each attempt counts)",
            &[(none, s.bytes_received)],
        )?;
        counter(
            enc,
            "store_damaged_reads",
            "Blob reads whose bytes failed verification",
            &[(none, s.damaged_reads)],
        )?;
        counter(
            enc,
            "store_resumed_reads",
            "Streamed reads resumed after a cut-off",
            &[(none, s.resumed_reads)],
        )?;
        Ok(())
    }

    /// The job queue's depth, the quota levels and what the janitor removed.
    fn encode_service(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let none: [(&str, &str); 0] = [];
        match self.cp.queue_depth() {
            Ok(n) => gauge(
                enc,
                "job_queue_depth",
                "Jobs queued or running",
                &[(none, n)],
            )?,
            Err(e) => tracing::warn!(error = %e, "cannot read the job queue for /metrics"),
        }
        let levels = self.cp.quota_levels();
        let used: Vec<([(&str, String); 2], u64)> = levels
            .iter()
            .map(|q| {
                (
                    [("level", q.level.to_string()), ("name", q.name.clone())],
                    q.used,
                )
            })
            .collect();
        gauge(
            enc,
            "quota_used_bytes",
            "Bytes reserved at each budget level",
            &used,
        )?;
        let limit: Vec<([(&str, String); 2], u64)> = levels
            .iter()
            .map(|q| {
                (
                    [("level", q.level.to_string()), ("name", q.name.clone())],
                    q.limit,
                )
            })
            .collect();
        gauge(
            enc,
            "quota_limit_bytes",
            "The limit of each budget level",
            &limit,
        )?;
        let swept = self.cp.janitor_totals();
        counter(
            enc,
            "janitor_removed_dirs",
            "Job scratch directories the janitor removed",
            &[(none, swept.scratch_dirs)],
        )?;
        counter(
            enc,
            "janitor_removed_bytes",
            "Bytes of the job scratch directories the janitor removed",
            &[(none, swept.scratch_bytes)],
        )
    }
}
