//! SQL's reads of Parquet parts on object storage, kept in memory: a part never changes once
//! written, so after the first query reads a column chunk, later queries (a dashboard refreshing
//! every few seconds) take it from here, as the page cache serves a local folder's files. An entry
//! is keyed by the part's version (ETag) as the last listing gave it: a part written again under
//! the same name (a storage reset) is a new version and is read afresh. Bounded in bytes; the oldest
//! entries go first.
//!
//! Listings are reused for [`LISTING_TTL`]: the queries of one dashboard refresh list the same
//! tables, one request each. A checkpoint of this process forgets them at once
//! ([`PartCache::forget_listings`]), so its own rows never fall between its live rows and its parts;
//! another instance's new parts show up at most that much later.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions,
    PutPayload, PutResult,
};
use crate::sync::lock;

type Key = (Path, String, Range<u64>);

/// How long a listing is reused.
pub const LISTING_TTL: std::time::Duration = std::time::Duration::from_secs(1);

pub struct PartCache {
    inner: Arc<dyn ObjectStore>,
    /// The newest version each listing saw of each part.
    versions: Arc<Mutex<HashMap<Path, String>>>,
    chunks: Mutex<Chunks>,
    listings: Arc<Mutex<Listings>>,
}

/// Recent listings by (with a delimiter, prefix); `generation` moves on each forget, so that a
/// listing that started before it is not kept.
#[derive(Default)]
struct Listings {
    generation: u64,
    flat: HashMap<Option<Path>, (std::time::Instant, Vec<ObjectMeta>)>,
    delimited: HashMap<Option<Path>, (std::time::Instant, Vec<Path>, Vec<ObjectMeta>)>,
}

fn fresh(at: &std::time::Instant) -> bool {
    at.elapsed() < LISTING_TTL
}

#[derive(Default)]
struct Chunks {
    bytes: HashMap<Key, (Bytes, ObjectMeta)>,
    order: VecDeque<Key>,
    held: usize,
    limit: usize,
}

impl Chunks {
    fn insert(&mut self, key: Key, value: (Bytes, ObjectMeta)) {
        let size = value.0.len();
        if size > self.limit / 4 || self.bytes.contains_key(&key) {
            return;
        }
        while self.held + size > self.limit {
            let Some(oldest) = self.order.pop_front() else { break };
            if let Some((bytes, _)) = self.bytes.remove(&oldest) {
                self.held -= bytes.len();
            }
        }
        self.held += size;
        self.order.push_back(key.clone());
        self.bytes.insert(key, value);
    }
}

impl PartCache {
    pub fn new(inner: Arc<dyn ObjectStore>, limit_bytes: usize) -> PartCache {
        PartCache {
            inner,
            versions: Arc::default(),
            chunks: Mutex::new(Chunks { limit: limit_bytes, ..Chunks::default() }),
            listings: Arc::default(),
        }
    }

    /// Lists afresh from now on (this process just committed parts).
    pub fn forget_listings(&self) {
        let mut listings = lock(&self.listings);
        let generation = listings.generation + 1;
        *listings = Listings { generation, ..Listings::default() };
    }

    fn key(&self, location: &Path, range: &Range<u64>) -> Option<Key> {
        let versions = lock(&self.versions);
        versions.get(location).map(|tag| (location.clone(), tag.clone(), range.clone()))
    }

    fn cached(&self, key: &Key) -> Option<(Bytes, ObjectMeta)> {
        lock(&self.chunks).bytes.get(key).cloned()
    }

    fn keep(&self, key: Key, bytes: Bytes, meta: ObjectMeta) {
        lock(&self.chunks).insert(key, (bytes, meta));
    }
}

fn note(versions: &Mutex<HashMap<Path, String>>, objects: &[ObjectMeta]) {
    let mut versions = lock(&versions);
    for meta in objects.iter().filter(|m| m.location.as_ref().ends_with(".parquet")) {
        if let Some(tag) = &meta.e_tag {
            versions.insert(meta.location.clone(), tag.clone());
        }
    }
}

impl fmt::Debug for PartCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PartCache({})", self.inner)
    }
}

impl fmt::Display for PartCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PartCache({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for PartCache {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        // Only plain reads of a byte range of a listed part: anything conditional goes through.
        let plain = options.if_match.is_none()
            && options.if_none_match.is_none()
            && options.if_modified_since.is_none()
            && options.if_unmodified_since.is_none()
            && options.version.is_none()
            && !options.head;
        let key = match &options.range {
            Some(GetRange::Bounded(range)) if plain => self.key(location, range),
            _ => None,
        };
        let Some(key) = key else { return self.inner.get_opts(location, options).await };
        if let Some((bytes, meta)) = self.cached(&key) {
            return Ok(GetResult {
                range: key.2.clone(),
                payload: GetResultPayload::Stream(futures::stream::once(async move { Ok(bytes) }).boxed()),
                meta,
                attributes: Default::default(),
            });
        }
        let result = self.inner.get_opts(location, options).await?;
        let (meta, range, attributes) = (result.meta.clone(), result.range.clone(), result.attributes.clone());
        let bytes = result.bytes().await?;
        if meta.e_tag.as_deref() == Some(key.1.as_str()) {
            self.keep(key, bytes.clone(), meta.clone());
        }
        Ok(GetResult { payload: GetResultPayload::Stream(futures::stream::once(async move { Ok(bytes) }).boxed()), meta, range, attributes })
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let (inner, versions, listings, prefix) = (self.inner.clone(), self.versions.clone(), self.listings.clone(), prefix.cloned());
        let listing = async move {
            let generation = {
                let listings = lock(&listings);
                if let Some((_, objects)) = listings.flat.get(&prefix).filter(|(at, _)| fresh(at)) {
                    return Ok::<_, object_store::Error>(objects.clone());
                }
                listings.generation
            };
            let objects: Vec<ObjectMeta> = inner.list(prefix.as_ref()).try_collect().await?;
            // Noted: queries read the parts they listed.
            note(&versions, &objects);
            let mut listings = lock(&listings);
            if listings.generation == generation {
                listings.flat.insert(prefix, (std::time::Instant::now(), objects.clone()));
            }
            Ok(objects)
        };
        futures::stream::once(listing).map_ok(|objects| futures::stream::iter(objects.into_iter().map(Ok))).try_flatten().boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let key = prefix.cloned();
        let generation = {
            let listings = lock(&self.listings);
            if let Some((_, common_prefixes, objects)) = listings.delimited.get(&key).filter(|(at, _, _)| fresh(at)) {
                return Ok(ListResult { common_prefixes: common_prefixes.clone(), objects: objects.clone() });
            }
            listings.generation
        };
        let listed = self.inner.list_with_delimiter(prefix).await?;
        note(&self.versions, &listed.objects);
        let mut listings = lock(&self.listings);
        if listings.generation == generation {
            listings.delimited.insert(key, (std::time::Instant::now(), listed.common_prefixes.clone(), listed.objects.clone()));
        }
        Ok(listed)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn a_listed_part_is_read_once_and_a_new_version_is_read_afresh() {
        runtime().block_on(async {
            let inner = Arc::new(InMemory::new());
            let cache = PartCache::new(inner.clone(), 1 << 20);
            let part = Path::from("news/part-00000000.parquet");
            inner.put(&part, PutPayload::from_static(b"first version")).await.unwrap();
            let listed: Vec<ObjectMeta> = cache.list(Some(&Path::from("news"))).try_collect().await.unwrap();
            assert_eq!(listed.len(), 1);
            assert_eq!(&cache.get_range(&part, 0..5).await.unwrap()[..], b"first");
            // Gone from the store, still served: the listed version never changes.
            inner.delete(&part).await.unwrap();
            assert_eq!(&cache.get_range(&part, 0..5).await.unwrap()[..], b"first");
            // Written again under the same name: the next listing sees a new version.
            inner.put(&part, PutPayload::from_static(b"again, new")).await.unwrap();
            cache.forget_listings();
            let _: Vec<ObjectMeta> = cache.list(Some(&Path::from("news"))).try_collect().await.unwrap();
            assert_eq!(&cache.get_range(&part, 0..5).await.unwrap()[..], b"again");
            // Not listed: not kept.
            let other = Path::from("news/part-00000001.parquet");
            inner.put(&other, PutPayload::from_static(b"unlisted")).await.unwrap();
            cache.get_range(&other, 0..3).await.unwrap();
            inner.delete(&other).await.unwrap();
            assert!(cache.get_range(&other, 0..3).await.is_err());
        });
    }

    #[test]
    fn a_listing_is_reused_for_a_moment_and_forgotten_at_a_commit() {
        runtime().block_on(async {
            let inner = Arc::new(InMemory::new());
            let cache = PartCache::new(inner.clone(), 1 << 20);
            async fn count(cache: &PartCache) -> (usize, usize) {
                let news = Path::from("news");
                (cache.list(Some(&news)).try_collect::<Vec<_>>().await.unwrap().len(), cache.list_with_delimiter(Some(&news)).await.unwrap().objects.len())
            }
            inner.put(&Path::from("news/part-00000000.parquet"), PutPayload::from_static(b"a")).await.unwrap();
            assert_eq!(count(&cache).await, (1, 1));
            inner.put(&Path::from("news/part-00000001.parquet"), PutPayload::from_static(b"b")).await.unwrap();
            assert_eq!(count(&cache).await, (1, 1), "the listing of a moment ago");
            cache.forget_listings();
            assert_eq!(count(&cache).await, (2, 2), "after this process's commit: afresh");
            inner.put(&Path::from("news/part-00000002.parquet"), PutPayload::from_static(b"c")).await.unwrap();
            tokio::time::sleep(LISTING_TTL + std::time::Duration::from_millis(50)).await;
            assert_eq!(count(&cache).await, (3, 3), "another writer's part, once the listing expired");
        });
    }

    #[test]
    fn the_oldest_chunks_go_first_past_the_bound() {
        let meta = ObjectMeta { location: Path::from("p"), last_modified: chrono::Utc::now(), size: 0, e_tag: None, version: None };
        let mut chunks = Chunks { limit: 40, ..Chunks::default() };
        for i in 0..5u64 {
            chunks.insert((Path::from("p"), "v".into(), i * 10..i * 10 + 10), (Bytes::from(vec![0; 10]), meta.clone()));
        }
        assert_eq!(chunks.held, 40);
        assert!(!chunks.bytes.contains_key(&(Path::from("p"), "v".into(), 0..10)), "the oldest went");
        assert!(chunks.bytes.contains_key(&(Path::from("p"), "v".into(), 40..50)));
    }
}
