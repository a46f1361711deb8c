//! Where the tables, the checkpoint and the journals live: a local folder, or a bucket and prefix
//! on S3-compatible object storage (`s3://bucket/prefix`).
//!
//! The object-store side is the `object_store` crate DataFusion reads through. Its calls are async;
//! storage's callers are not (they write at checkpoints, from the pipeline's thread), so a
//! [`Bucket`] owns a small runtime and blocks on it from a scoped thread: that works from inside
//! another runtime's task as well as from plain threads. Every call has a timeout and is retried
//! with backoff by the client, and is counted by operation.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig, UpdateVersion};

use super::StorageError;
use super::config::S3Config;

/// Requests in flight at once when many objects are read or deleted together (a merge's inputs).
const MANY_AT_ONCE: usize = 16;
/// Objects per call of many at once: each call's time limit covers all of its requests.
const MANY_PER_CALL: usize = 256;

/// A storage root: what `[storage] path` and `--storage` name.
#[derive(Clone)]
pub enum Location {
    Local(PathBuf),
    Bucket(Arc<Bucket>),
}

impl Location {
    /// A folder, or `s3://bucket/prefix` with the client settings of `s3` (each unset one from the
    /// standard `AWS_*` environment variables: `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`).
    pub fn parse(text: &str, s3: &S3Config) -> Result<Location, StorageError> {
        match text.split_once("://") {
            Some(("s3", rest)) => Ok(Location::Bucket(Arc::new(Bucket::open(rest, s3)?))),
            Some((scheme, _)) if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()) => Err(StorageError::Config {
                reason: format!("{text}: storage is a local folder or an s3:// URL (S3 or an S3-compatible server); {scheme}:// is not supported"),
            }),
            _ => Ok(Location::Local(PathBuf::from(text))),
        }
    }

    pub fn as_local(&self) -> Option<&Path> {
        match self {
            Location::Local(path) => Some(path),
            Location::Bucket(_) => None,
        }
    }
}

impl From<&Path> for Location {
    fn from(path: &Path) -> Location {
        Location::Local(path.to_path_buf())
    }
}

impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Location {
        Location::Local(path)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(path) => write!(f, "{}", path.display()),
            Location::Bucket(bucket) => f.write_str(&bucket.url),
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How a write treats an object already at its key.
pub(crate) enum Mode<'a> {
    Overwrite,
    /// Only if nothing is there (S3's `If-None-Match: *`).
    Create,
    /// Only if what is there is still the version read (`If-Match: <etag>`).
    Replace(&'a str),
}

/// What SQL keeps of the parts it read (see `storage::cache`).
const SQL_CACHE_BYTES: usize = 256 << 20;

/// The `op` label of the object-store metrics.
const OPERATIONS: [&str; 5] = ["get", "head", "put", "list", "delete"];

/// A bucket and prefix on an S3-compatible store.
pub struct Bucket {
    /// `s3://bucket/prefix`, as written (no trailing slash).
    url: String,
    bucket: String,
    prefix: Key,
    builder: AmazonS3Builder,
    store: Arc<AmazonS3>,
    runtime: tokio::runtime::Runtime,
    timeout: Duration,
    /// SQL's client, made once: building one loads the system's TLS roots.
    sql_client: std::sync::OnceLock<Arc<super::cache::PartCache>>,
    /// Whether instances were seen here: once they are, they stay (see `storage::instances`).
    instances_seen: std::sync::atomic::AtomicBool,
}

impl Bucket {
    fn open(rest: &str, s3: &S3Config) -> Result<Bucket, StorageError> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let url = format!("s3://{}", rest.trim_end_matches('/'));
        if bucket.is_empty() {
            return Err(StorageError::Config { reason: format!("{url}: the URL names no bucket") });
        }
        let prefix = Key::parse(prefix.trim_matches('/')).map_err(|e| StorageError::Config { reason: format!("{url}: {e}") })?;
        let builder = s3.builder(bucket);
        let store = Arc::new(builder.clone().build().map_err(|e| StorageError::Config { reason: format!("{url}: {e}") })?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("object-store")
            .enable_all()
            .build()
            .map_err(|e| StorageError::Config { reason: format!("{url}: cannot start its client: {e}") })?;
        for op in OPERATIONS {
            metrics::counter!("bearwatch_object_store_requests_total", "op" => op).increment(0);
            metrics::counter!("bearwatch_object_store_errors_total", "op" => op).increment(0);
        }
        Ok(Bucket {
            url,
            bucket: bucket.to_string(),
            prefix,
            builder,
            store,
            runtime,
            timeout: s3.timeout.0,
            sql_client: std::sync::OnceLock::new(),
            instances_seen: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `s3://bucket`: the store's URL, as DataFusion registers it.
    pub fn store_url(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    /// SQL's client, apart from storage's own (which runs on storage's runtime): its connections
    /// belong to the runtimes of the queries that open them, and a connection whose runtime has
    /// ended is not reused. It keeps the column chunks it read, up to 256 MiB (`storage::cache`).
    pub fn client(&self) -> Result<Arc<dyn ObjectStore>, StorageError> {
        if let Some(client) = self.sql_client.get() {
            return Ok(client.clone());
        }
        let store = Arc::new(self.builder.clone().build().map_err(|e| StorageError::Config { reason: format!("{}: {e}", self.url) })?);
        let store = Arc::new(super::cache::PartCache::new(store, SQL_CACHE_BYTES));
        Ok(self.sql_client.get_or_init(|| store).clone())
    }

    /// SQL lists the tables afresh from now on: this process just committed parts.
    pub(crate) fn forget_listings(&self) {
        if let Some(client) = self.sql_client.get() {
            client.forget_listings();
        }
    }

    pub(crate) fn instances_seen(&self) -> bool {
        self.instances_seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn saw_instances(&self) {
        self.instances_seen.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The key of `relative` (slash-separated) under the prefix.
    fn key(&self, relative: &str) -> Key {
        relative.split('/').filter(|p| !p.is_empty()).fold(self.prefix.clone(), |key, part| key.clone().join(part))
    }

    /// `relative` as a URL, for messages and for DataFusion's table paths.
    pub fn url_of(&self, relative: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(relative))
    }

    /// Runs one request on the bucket's runtime, whatever thread or runtime the caller is on,
    /// counted by `op`.
    fn call<T: Send>(&self, op: &'static str, relative: &str, request: impl Future<Output = object_store::Result<T>> + Send) -> Result<T, StorageError> {
        self.calls(op, 1, relative, request)
    }

    /// As [`Bucket::call`], for `requests` requests made at once (counted each; the latency is all of them).
    fn calls<T: Send>(
        &self,
        op: &'static str,
        requests: u64,
        relative: &str,
        request: impl Future<Output = object_store::Result<T>> + Send,
    ) -> Result<T, StorageError> {
        let started = Instant::now();
        let outcome = std::thread::scope(|s| {
            s.spawn(|| self.runtime.block_on(async { tokio::time::timeout(self.timeout * 4, request).await }))
                .join()
                .unwrap_or_else(|_| Ok(Err(object_store::Error::Generic { store: "S3", source: "the request's thread stopped".into() })))
        });
        metrics::counter!("bearwatch_object_store_requests_total", "op" => op).increment(requests);
        metrics::histogram!("bearwatch_object_store_request_seconds", "op" => op).record(started.elapsed().as_secs_f64());
        let result = match outcome {
            Ok(result) => result,
            Err(_) => Err(object_store::Error::Generic { store: "S3", source: format!("no answer within {:?}", self.timeout * 4).into() }),
        };
        result.map_err(|e| {
            let precondition = matches!(e, object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. });
            if !precondition {
                metrics::counter!("bearwatch_object_store_errors_total", "op" => op).increment(1);
            }
            StorageError::Object { url: self.url_of(relative), reason: e.to_string(), precondition }
        })
    }

    /// The object's bytes and version, or none when there is no such object.
    pub(crate) fn get(&self, relative: &str) -> Result<Option<(Bytes, Option<String>)>, StorageError> {
        let key = self.key(relative);
        let got = self.call("get", relative, async {
            match self.store.get(&key).await {
                Ok(result) => {
                    let etag = result.meta.e_tag.clone();
                    Ok(Some((result.bytes().await?, etag)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })?;
        Ok(got)
    }

    /// Several objects' bytes, in the order asked, [`MANY_AT_ONCE`] requests in flight; none for
    /// one that is not there.
    pub(crate) fn get_many(&self, relatives: &[String]) -> Result<Vec<Option<Bytes>>, StorageError> {
        let mut all = Vec::with_capacity(relatives.len());
        for chunk in relatives.chunks(MANY_PER_CALL) {
            let gets = chunk.iter().map(|relative| {
                let key = self.key(relative);
                async move {
                    match self.store.get(&key).await {
                        Ok(result) => result.bytes().await.map(Some),
                        Err(object_store::Error::NotFound { .. }) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
            });
            let fetched = futures::stream::iter(gets).buffered(MANY_AT_ONCE).try_collect::<Vec<_>>();
            all.extend(self.calls("get", chunk.len() as u64, &chunk[0], fetched)?);
        }
        Ok(all)
    }

    /// Deletes several objects, [`MANY_AT_ONCE`] requests in flight; one that is not there is no error.
    pub(crate) fn delete_many(&self, relatives: &[String]) -> Result<(), StorageError> {
        for chunk in relatives.chunks(MANY_PER_CALL) {
            let deletes = chunk.iter().map(|relative| {
                let key = self.key(relative);
                async move {
                    match self.store.delete(&key).await {
                        Err(object_store::Error::NotFound { .. }) => Ok(()),
                        other => other,
                    }
                }
            });
            self.calls("delete", chunk.len() as u64, &chunk[0], futures::stream::iter(deletes).buffer_unordered(MANY_AT_ONCE).try_collect::<Vec<()>>())?;
        }
        Ok(())
    }

    /// Writes one object in one request (so readers see all of it or none). Returns its version.
    pub(crate) fn put(&self, relative: &str, bytes: Vec<u8>, mode: Mode<'_>) -> Result<Option<String>, StorageError> {
        let key = self.key(relative);
        let mode = match mode {
            Mode::Overwrite => PutMode::Overwrite,
            Mode::Create => PutMode::Create,
            Mode::Replace(etag) => PutMode::Update(UpdateVersion { e_tag: Some(etag.to_string()), version: None }),
        };
        let options = PutOptions { mode, ..PutOptions::default() };
        let put = self.call("put", relative, self.store.put_opts(&key, PutPayload::from(bytes), options))?;
        Ok(put.e_tag)
    }

    /// Writes several objects at once, each in one request that may replace what is there.
    pub(crate) fn put_all(&self, objects: Vec<(String, Vec<u8>)>) -> Result<(), StorageError> {
        let Some(first) = objects.first().map(|(relative, _)| relative.clone()) else { return Ok(()) };
        let requests = objects.len() as u64;
        let puts = objects.into_iter().map(|(relative, bytes)| {
            let key = self.key(&relative);
            async move { self.store.put(&key, PutPayload::from(bytes)).await }
        });
        self.calls("put", requests, &first, futures::future::try_join_all(puts)).map(drop)
    }

    /// Names (relative to `folder`) and sizes of the objects directly under `folder`.
    pub(crate) fn list(&self, folder: &str) -> Result<Vec<(String, u64)>, StorageError> {
        Ok(self.list_meta(folder)?.into_iter().map(|(name, meta)| (name, meta.size)).collect())
    }

    /// Names (relative to `folder`) and the store's last-modified times of the objects directly
    /// under `folder`.
    pub(crate) fn list_modified(&self, folder: &str) -> Result<Vec<(String, DateTime<Utc>)>, StorageError> {
        Ok(self.list_meta(folder)?.into_iter().map(|(name, meta)| (name, meta.last_modified)).collect())
    }

    fn list_meta(&self, folder: &str) -> Result<Vec<(String, object_store::ObjectMeta)>, StorageError> {
        let key = self.key(folder);
        let listed = self.call("list", folder, async { self.store.list_with_delimiter(Some(&key)).await })?;
        Ok(listed.objects.into_iter().filter_map(|o| Some((o.location.filename()?.to_string(), o))).collect())
    }

    /// The object's version and the store's last-modified time, or none when there is no such object.
    pub(crate) fn head(&self, relative: &str) -> Result<Option<(Option<String>, DateTime<Utc>)>, StorageError> {
        let key = self.key(relative);
        self.call("head", relative, async {
            match self.store.head(&key).await {
                Ok(meta) => Ok(Some((meta.e_tag, meta.last_modified))),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// Every object under `folder`, at any depth, relative to it.
    pub(crate) fn list_all(&self, folder: &str) -> Result<Vec<String>, StorageError> {
        let key = self.key(folder);
        let listed: Vec<object_store::ObjectMeta> = self.call("list", folder, self.store.list(Some(&key)).try_collect())?;
        Ok(listed.into_iter().filter_map(|o| o.location.prefix_match(&key).map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"))).collect())
    }

    /// Renames objects (a server-side copy, then a delete of the source), all at once. A source that
    /// is gone while its destination is there was renamed already.
    pub(crate) fn rename_all(&self, renames: Vec<(String, String)>) -> Result<(), StorageError> {
        let Some(first) = renames.first().map(|(from, _)| from.clone()) else { return Ok(()) };
        let requests = renames.len() as u64 * 2;
        let moves = renames.into_iter().map(|(from, to)| {
            let (from, to) = (self.key(&from), self.key(&to));
            async move {
                match self.store.rename(&from, &to).await {
                    Err(object_store::Error::NotFound { .. }) => self.store.head(&to).await.map(drop),
                    other => other,
                }
            }
        });
        self.calls("rename", requests, &first, futures::future::try_join_all(moves)).map(drop)
    }

    pub(crate) fn delete(&self, relative: &str) -> Result<(), StorageError> {
        self.delete_many(&[relative.to_string()])
    }
}

impl S3Config {
    /// The client: environment first, then what the config file sets; path-style requests unless
    /// `virtual_hosted_style`, plain HTTP allowed for an `http://` endpoint.
    fn builder(&self, bucket: &str) -> AmazonS3Builder {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket).with_virtual_hosted_style_request(self.virtual_hosted_style);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.as_str());
        }
        if let Some(region) = &self.region {
            builder = builder.with_region(region.as_str());
        }
        if let Some(key) = &self.access_key_id {
            builder = builder.with_access_key_id(key.as_str());
        }
        if let Some(secret) = &self.secret_access_key {
            builder = builder.with_secret_access_key(secret.as_str());
        }
        let endpoint = self.endpoint.as_ref().map(|e| e.as_str().to_string()).or_else(|| std::env::var("AWS_ENDPOINT_URL").ok()).unwrap_or_default();
        let mut client = ClientOptions::new().with_timeout(self.timeout.0).with_connect_timeout(self.timeout.0.min(Duration::from_secs(10)));
        if endpoint.starts_with("http://") {
            client = client.with_allow_http(true);
        }
        let retry = RetryConfig {
            backoff: BackoffConfig { init_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(5), base: 2.0 },
            max_retries: self.retries,
            retry_timeout: self.timeout.0 * 3,
        };
        builder.with_client_options(client).with_retry(retry)
    }
}
