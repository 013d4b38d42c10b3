//! An object store that remembers what one write wrote, so that a write that fails can take
//! back exactly its own files and nothing else.
//!
//! A failed write (a refresh whose query errors, a commit that loses a race, a first build or
//! a `CREATE CORE TABLE` that fails) leaves Parquet files no commit references. Deleting
//! "whatever is under the table's folder" would also delete the files of another process
//! writing the same table at that moment; deleting only the paths this write created is
//! always safe, because every file delta-rs writes has a fresh unique name.
//!
//! Only writes that succeeded are remembered; a commit file that this write created (by
//! put-if-absent, copy or rename) tells that the write's commit landed, whatever error came
//! after it (a failed checkpoint, say): then nothing may be taken back.
//!
//! ## Invariants
//! - [`TrackedStore::take_back`] deletes only paths this store created, and nothing once a
//!   commit file was created through it (guarded by
//!   `lifetime::a_failed_first_build_deletes_only_its_own_files`).

use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
    UploadPart,
};

/// Wraps an object store and records the paths created through it.
#[derive(Debug)]
pub(crate) struct TrackedStore {
    inner: Arc<dyn ObjectStore>,
    written: Arc<Mutex<Vec<Path>>>,
    /// Where to note a commit: the warehouse's store and the table's folder in it.
    journal: Option<(super::journal::Journal, String)>,
}

impl TrackedStore {
    /// Tracks writes through `inner`.
    pub(crate) fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            written: Arc::default(),
            journal: None,
        }
    }

    /// Also notes each commit in `journal` as a change of the table at `rel`.
    pub(crate) fn with_journal(mut self, journal: super::journal::Journal, rel: &str) -> Self {
        self.journal = Some((journal, rel.to_string()));
        self
    }

    async fn record(&self, path: &Path) {
        if let Ok(mut w) = self.written.lock() {
            w.push(path.clone());
        }
        if let Some((journal, rel)) = &self.journal {
            if commit_version(path).is_some() {
                journal.note(rel).await;
            }
        }
    }

    /// Records `path` as created by this write although something else creates it (a copy
    /// made outside the store): recorded before it starts, so that even a half-made file is
    /// taken back.
    pub(crate) fn expect(&self, path: &Path) {
        if let Ok(mut w) = self.written.lock() {
            w.push(path.clone());
        }
    }

    /// Paths created so far.
    pub(crate) fn written(&self) -> Vec<Path> {
        self.written.lock().map(|w| w.clone()).unwrap_or_default()
    }

    /// True when a Delta commit file (`_delta_log/<version>.json`) was created through this
    /// store: the write committed.
    pub(crate) fn committed(&self) -> bool {
        self.committed_version().is_some()
    }

    /// The version of the Delta commit file created through this store, if any: the write
    /// committed as that version, whatever error came after (a failed checkpoint, a failed
    /// read of the new version).
    pub(crate) fn committed_version(&self) -> Option<i64> {
        self.written().iter().find_map(commit_version)
    }

    /// Deletes every path this write created, unless it committed. Returns how many were
    /// deleted. Best effort: a file that cannot be deleted is an orphan VACUUM removes later.
    pub(crate) async fn take_back(&self) -> usize {
        if self.committed() {
            return 0;
        }
        let mut deleted = 0;
        for path in self.written() {
            match self.inner.delete(&path).await {
                Ok(()) => deleted += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(_) => {}
            }
        }
        deleted
    }

    /// Deletes every path this write created, its commit first, although it committed: the
    /// table it committed to was dropped meanwhile, and what is left is no table. Best effort.
    pub(crate) async fn withdraw(&self) {
        let mut written = self.written();
        // The commit goes first: without it the rest is unreferenced.
        written.sort_by_key(|p| commit_version(p).is_none());
        for path in written {
            let _ = self.inner.delete(&path).await;
        }
    }
}

/// The version of a Delta commit file's path (`…/_delta_log/<20 digits>.json`).
fn commit_version(p: &Path) -> Option<i64> {
    let mut parts: Vec<String> = p.parts().map(|x| x.as_ref().to_string()).collect();
    let file = parts.pop().unwrap_or_default();
    if parts.last().is_none_or(|d| d != "_delta_log") {
        return None;
    }
    let digits = file.strip_suffix(".json")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Takes back what a write created unless told it succeeded: awaited when the write fails
/// ([`TakeBack::finish`]), spawned when the write is dropped half-way (a cancelled statement).
#[derive(Debug)]
pub(crate) struct TakeBack(Option<Arc<TrackedStore>>);

impl TakeBack {
    /// Guards the write going through `store`.
    pub(crate) fn new(store: Arc<TrackedStore>) -> Self {
        Self(Some(store))
    }

    /// The write ended: keeps its files if it succeeded, deletes them if it failed.
    pub(crate) async fn finish<T, E>(mut self, result: &std::result::Result<T, E>) {
        if let Some(store) = self.0.take() {
            if result.is_err() {
                store.take_back().await;
            }
        }
    }
}

impl Drop for TakeBack {
    fn drop(&mut self) {
        if let (Some(store), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(async move { store.take_back().await });
        }
    }
}

impl fmt::Display for TrackedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tracked({})", self.inner)
    }
}

/// A multipart upload whose path is recorded once it completes.
#[derive(Debug)]
struct TrackedUpload {
    inner: Box<dyn MultipartUpload>,
    path: Path,
    written: Arc<Mutex<Vec<Path>>>,
}

#[async_trait]
impl MultipartUpload for TrackedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        let result = self.inner.complete().await?;
        if let Ok(mut w) = self.written.lock() {
            w.push(self.path.clone());
        }
        Ok(result)
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}

#[async_trait]
impl ObjectStore for TrackedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let result = self.inner.put_opts(location, payload, opts).await?;
        self.record(location).await;
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(TrackedUpload {
            inner,
            path: location.clone(),
            written: self.written.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await?;
        self.record(to).await;
        Ok(())
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await?;
        self.record(to).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn takes_back_only_its_own_files_and_nothing_once_committed() {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        inner
            .put(&Path::from("t/other.parquet"), "x".into())
            .await
            .unwrap();
        let tracked = TrackedStore::new(inner.clone());
        tracked
            .put(&Path::from("t/mine.parquet"), "y".into())
            .await
            .unwrap();
        assert!(!tracked.committed());
        assert_eq!(tracked.take_back().await, 1);
        assert!(inner.head(&Path::from("t/mine.parquet")).await.is_err());
        assert!(inner.head(&Path::from("t/other.parquet")).await.is_ok());

        let tracked = TrackedStore::new(inner.clone());
        tracked
            .put(&Path::from("t/data.parquet"), "z".into())
            .await
            .unwrap();
        tracked
            .put(&Path::from("t/_delta_log/tmp.json.tmp"), "c".into())
            .await
            .unwrap();
        tracked
            .rename(
                &Path::from("t/_delta_log/tmp.json.tmp"),
                &Path::from("t/_delta_log/00000000000000000000.json"),
            )
            .await
            .unwrap();
        assert!(tracked.committed());
        assert_eq!(tracked.take_back().await, 0);
        assert!(inner.head(&Path::from("t/data.parquet")).await.is_ok());
    }
}
