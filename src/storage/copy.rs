//! Copies files users name into a table's folder as they are, for loads that keep their bytes
//! (zero-copy ingest).
//!
//! A copy is a real copy: on local disk `std::fs::copy` (which the kernel may make a reflink),
//! on an object store a server-side copy when the file is in the warehouse's own bucket, else
//! a streamed read and multipart upload. Never a hard link: a later write to the landing file
//! would then change the frozen core, so object_store's `LocalFileSystem::copy`, which links,
//! is never used.
//!
//! ## Invariants
//! - Every copy is recorded in the write's [`TrackedStore`] before it starts, so a failed or
//!   cancelled load takes back even a half-written copy (guarded by
//!   `zero_copy::a_file_that_disappears_mid_load_leaves_nothing_behind`).
//! - A copy into a local warehouse is never a hard link of the landing file (guarded by
//!   `zero_copy::parquet_that_fits_is_copied_as_it_is`).

use std::path::PathBuf;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use url::Url;

use super::WriteBase;
use crate::error::{IcePieError, Result};

/// Bytes per part of a streamed copy (S3 wants at least 5 MiB per part but the last).
const PART_BYTES: usize = 16 * 1024 * 1024;

/// A file to copy into a table: where it is, and its size when it was listed.
#[derive(Debug, Clone)]
pub(crate) struct Landing {
    /// The object store holding it.
    pub store: Arc<dyn ObjectStore>,
    /// That store's URL (`scheme://authority/`), to tell whether it is the warehouse's.
    pub store_url: Url,
    /// Its path in `store`.
    pub path: Path,
    /// Its size when listed.
    pub size: u64,
}

impl Landing {
    /// The file as a URL, for messages.
    pub(crate) fn url(&self) -> String {
        format!("{}{}", self.store_url, self.path)
    }
}

impl WriteBase {
    /// The store of the table being written, with paths relative to the table's folder; reads
    /// through it see what the write copied in.
    pub(crate) fn table_store(&self) -> Arc<dyn ObjectStore> {
        self.log_store.object_store(None)
    }

    /// Copies `file` into the table's folder as `name` (a fresh name); returns the size of
    /// the copy.
    pub(crate) async fn copy_in(&self, file: &Landing, name: &str) -> Result<u64> {
        let err = |e: String| IcePieError::BadLocation {
            location: file.url(),
            reason: format!("cannot copy it into the table: {e}"),
        };
        let target = self.table_path.clone().join(name);
        let same_store = file.store_url.scheme() == self.table_url.scheme()
            && file.store_url.authority() == self.table_url.authority();
        if let (Some(dir), "file") = (&self.local_dir, file.store_url.scheme()) {
            let from = object_store::local::LocalFileSystem::new()
                .path_to_filesystem(&file.path)
                .map_err(|e| err(e.to_string()))?;
            let to: PathBuf = dir.join(name);
            self.tracked.expect(&target);
            let dir = dir.clone();
            return tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)?;
                std::fs::copy(&from, &to)
            })
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| err(e.to_string()));
        }
        if same_store && file.store_url.scheme() != "file" {
            // A server-side copy; the tracked store records it. A store that cannot copy this
            // object (S3 copies at most 5 GB at once) gets the streamed copy below.
            match self.tracked.copy(&file.path, &target).await {
                Ok(()) => return Ok(self.tracked.head(&target).await?.size),
                Err(e @ object_store::Error::NotFound { .. }) => return Err(err(e.to_string())),
                Err(_) => {}
            }
        }
        // Streamed: read from the landing store, upload through the table's.
        let got = file
            .store
            .get(&file.path)
            .await
            .map_err(|e| err(e.to_string()))?;
        let upload = self.table_store().put_multipart(&Path::from(name)).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut stream = got.into_stream();
        let mut copied = 0u64;
        let streamed: std::result::Result<(), String> = async {
            while let Some(bytes) = stream.try_next().await.map_err(|e| e.to_string())? {
                copied += bytes.len() as u64;
                writer
                    .wait_for_capacity(4)
                    .await
                    .map_err(|e| e.to_string())?;
                writer.put(bytes);
            }
            Ok(())
        }
        .await;
        if let Err(e) = streamed {
            let _ = writer.abort().await;
            return Err(err(e));
        }
        writer.finish().await.map_err(|e| err(e.to_string()))?;
        Ok(copied)
    }
}
