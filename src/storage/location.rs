//! What a location a statement names will actually open: the one place that turns location
//! text into a local path or an object-store key, for the checks that decide whether it may be
//! read or written (a server's `--allow-path`, the warehouse's own files).
//!
//! A check on the text the user sent is a check on the wrong thing: DataFusion reads the text
//! with [`ListingTableUrl::parse`], so `file:///allowed/%2e%2e/secret` opens `/secret`,
//! `s3://b/landing/../x` opens `s3://b/x`, `file:/x` and `file://localhost/x` open `/x`, a
//! path's glob lists under its fixed part, and the operating system then follows symbolic
//! links. [`resolve`] reads the text with that same function (so `.`, `..`, percent-encoding,
//! hosts and globs mean to it exactly what they mean to DataFusion), then follows the links of
//! the part of a local path that exists. Unbounded (stream) external tables hand their text to
//! the file system unparsed; [`Opening::FilePath`] judges them the way the kernel resolves a
//! path.
//!
//! What it cannot judge with certainty it refuses, and never lets through: an unknown scheme,
//! text DataFusion cannot parse, a Windows-style drive or backslash, control characters (NUL
//! included; the URL parser silently drops tabs and newlines), a name still percent-encoded
//! after decoding (another layer could decode it again into `..`), a file URL naming a host, a
//! link that cannot be followed, a `..` in a glob, text over [`MAX_LEN`] bytes.
//!
//! **Invariants**
//! - A location is judged on what DataFusion opens, never on its text
//!   (`tests::resolves_as_datafusion_opens`, `tests::agrees_with_datafusion_listing_table_url`).
//! - What cannot be judged is refused (`tests::what_cannot_be_judged_is_refused`).
//! - A local location is judged with its existing links followed, so a link out of a directory
//!   is outside it (`tests::links_are_followed`).

use std::fmt;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use datafusion::datasource::listing::ListingTableUrl;

/// The longest location text judged, in bytes (Linux's `PATH_MAX`): anything longer is no
/// location a client needs, and costs a file-system call per part to resolve.
pub(crate) const MAX_LEN: usize = 4096;

/// The schemes of object stores (those `object_store::ObjectStoreScheme` knows); any other is
/// refused, since what a store registered under it would open cannot be known here.
const OBJECT_SCHEMES: &[&str] = &[
    "s3", "s3a", "gs", "az", "adl", "azure", "abfs", "abfss", "http", "https", "memory",
];

/// How the text of a location reaches storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opening {
    /// Through [`ListingTableUrl::parse`] and an object store: `INGEST … FROM`, `CREATE CORE
    /// TABLE … FROM`, `CREATE EXTERNAL TABLE`, `COPY … TO`.
    Listing,
    /// Handed to the file system as it is (`std::fs::File::open`): the file of an unbounded
    /// (stream) external table. Nothing is decoded, and `..` follows links as the kernel does.
    FilePath,
}

/// Where a location leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// A local file or directory: absolute, without `.` or `..`, its existing part free of
    /// symbolic links.
    Local(PathBuf),
    /// An object, or a prefix of objects, in an object store.
    Object(ObjectLocation),
}

/// An object-store location, normalised: what the store is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObjectLocation {
    /// The scheme, lower case (`s3`).
    pub(crate) scheme: String,
    /// Everything between `//` and the path (user, bucket or host, port), as parsed.
    pub(crate) authority: String,
    /// The key's parts, decoded as the store receives them; none is empty, `.` or `..`.
    pub(crate) key: Vec<String>,
}

/// Why a location cannot be judged (and so is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unjudgeable(pub(crate) String);

impl fmt::Display for Unjudgeable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(path) => write!(f, "{}", path.display()),
            Location::Object(o) => write!(f, "{}://{}/{}", o.scheme, o.authority, o.key.join("/")),
        }
    }
}

impl Location {
    /// True when `self` is `root` or lies under it (whole parts compared: `landing2` is not
    /// under `landing`).
    pub(crate) fn is_within(&self, root: &Location) -> bool {
        match (self, root) {
            (Location::Local(path), Location::Local(root)) => path.starts_with(root),
            (Location::Object(o), Location::Object(root)) => {
                o.scheme == root.scheme
                    && o.authority == root.authority
                    && o.key.starts_with(&root.key)
            }
            _ => false,
        }
    }
}

/// Where `text` leads when opened as `opening` says, or why that cannot be told.
///
/// A glob (`dir/*.csv`) leads to its fixed part (`dir`), under which its files are listed.
/// Local paths without a scheme are relative to the current directory, as DataFusion takes
/// them.
pub(crate) fn resolve(text: &str, opening: Opening) -> Result<Location, Unjudgeable> {
    check_text(text)?;
    match opening {
        Opening::Listing => listing(text),
        Opening::FilePath => {
            let path = Path::new(text);
            let absolute = if path.is_absolute() {
                path.to_path_buf()
            } else {
                let cwd = std::env::current_dir()
                    .map_err(|e| refuse(format!("the current directory is unknown: {e}")))?;
                cwd.join(path)
            };
            for part in absolute.components() {
                if let Component::Normal(name) = part {
                    check_part(&name.to_string_lossy())?;
                }
            }
            Ok(Location::Local(follow_links(&absolute)?))
        }
    }
}

fn refuse(reason: impl Into<String>) -> Unjudgeable {
    Unjudgeable(reason.into())
}

/// Refuses text whose meaning depends on more than DataFusion's parser: see the module docs.
fn check_text(text: &str) -> Result<(), Unjudgeable> {
    if text.trim().is_empty() {
        return Err(refuse("it is empty"));
    }
    if text.len() > MAX_LEN {
        return Err(refuse(format!("it is longer than {MAX_LEN} bytes")));
    }
    if text.chars().any(char::is_control) {
        return Err(refuse("it contains a control character"));
    }
    if text.contains('\\') {
        return Err(refuse(
            "it contains a backslash, which a Windows path reads as a separator",
        ));
    }
    // `C:` reads as a one-letter URL scheme here and as a drive on Windows.
    let mut chars = text.chars();
    if chars.next().is_some_and(|c| c.is_ascii_alphabetic()) && chars.next() == Some(':') {
        return Err(refuse("it starts with a Windows drive letter"));
    }
    Ok(())
}

/// Refuses a part of a path or key that another layer could read differently.
fn check_part(part: &str) -> Result<(), Unjudgeable> {
    if part.contains('\\') || part.chars().any(char::is_control) {
        return Err(refuse(format!(
            "its part '{part}' decodes to a backslash or control character"
        )));
    }
    let bytes = part.as_bytes();
    let encoded = bytes
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit());
    if encoded {
        return Err(refuse(format!(
            "its part '{part}' is still percent-encoded once decoded, and a second decoding \
             could make it another name"
        )));
    }
    Ok(())
}

/// What [`ListingTableUrl::parse`] makes of `text`: its URL and its fixed path (DataFusion
/// has resolved `.`, `..` and percent-encoding, and refused empty, `.` and `..` parts).
fn listing(text: &str) -> Result<Location, Unjudgeable> {
    let parsed = ListingTableUrl::parse(text)
        .map_err(|e| refuse(format!("DataFusion cannot read it as a location: {e}")))?;
    if let Some(glob) = parsed.get_glob() {
        // Files are listed under the fixed part and matched against the glob, so a glob
        // cannot climb out; one that tries matches nothing, and is refused to keep this simple.
        if glob.as_str().split('/').any(|part| part == "..") {
            return Err(refuse("its glob contains '..'"));
        }
    }
    let key: Vec<String> = parsed
        .prefix()
        .parts()
        .map(|part| part.as_ref().to_string())
        .collect();
    for part in &key {
        check_part(part)?;
    }
    let url = parsed.get_url();
    match url.scheme() {
        "file" => {
            // The only local store is registered for `file://` with no host (the URL parser
            // turns `localhost` into none).
            let hostless = url.host_str().is_none_or(str::is_empty)
                && url.username().is_empty()
                && url.password().is_none()
                && url.port().is_none();
            if !hostless {
                return Err(refuse("it is a file URL naming a host"));
            }
            let mut path = PathBuf::from("/");
            path.extend(&key);
            Ok(Location::Local(follow_links(&path)?))
        }
        scheme if OBJECT_SCHEMES.contains(&scheme) => Ok(Location::Object(ObjectLocation {
            scheme: scheme.to_string(),
            authority: url[url::Position::BeforeUsername..url::Position::AfterPort].to_string(),
            key,
        })),
        scheme => Err(refuse(format!("'{scheme}' is not a known object store"))),
    }
}

/// `path` (absolute) with the symbolic links of its existing part followed and each `..`
/// taken from where the links led, as the kernel resolves a path. What does not exist yet
/// cannot be a link; a `..` below it would fail to open, and is refused.
fn follow_links(path: &Path) -> Result<PathBuf, Unjudgeable> {
    let mut resolved = PathBuf::new();
    let mut missing = false;
    for part in path.components() {
        match part {
            Component::Prefix(_) => return Err(refuse("it has a Windows path prefix")),
            Component::RootDir => resolved.push(Component::RootDir.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir if missing => {
                return Err(refuse("it has '..' after a part that does not exist"));
            }
            Component::ParentDir => {
                // `resolved` has no links, so its parent is the real one.
                resolved.pop();
            }
            Component::Normal(name) => {
                resolved.push(name);
                if missing {
                    continue;
                }
                match std::fs::symlink_metadata(&resolved) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        // A dangling link or a loop cannot be followed: a write would create
                        // the file wherever the link points.
                        resolved = std::fs::canonicalize(&resolved).map_err(|e| {
                            refuse(format!(
                                "{} is a link that cannot be followed: {e}",
                                resolved.display()
                            ))
                        })?;
                    }
                    Ok(_) => {}
                    Err(e)
                        if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) =>
                    {
                        missing = true;
                    }
                    Err(e) => {
                        return Err(refuse(format!(
                            "{} cannot be examined: {e}",
                            resolved.display()
                        )))
                    }
                }
            }
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(text: &str) -> PathBuf {
        match resolve(text, Opening::Listing) {
            Ok(Location::Local(path)) => path,
            other => panic!("{text}: {other:?}"),
        }
    }

    fn object(text: &str) -> String {
        match resolve(text, Opening::Listing) {
            Ok(location @ Location::Object(_)) => location.to_string(),
            other => panic!("{text}: {other:?}"),
        }
    }

    /// A directory without links in its path, so that resolved paths can be compared.
    fn tempdir() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        (dir, real.display().to_string())
    }

    #[test]
    fn resolves_as_datafusion_opens() {
        let (_dir, d) = tempdir();
        let p = |rel: &str| PathBuf::from(format!("{d}{rel}"));
        // Percent-encoded dot segments are dot segments to the URL parser.
        assert_eq!(local(&format!("file://{d}/a/%2e%2e/b.csv")), p("/b.csv"));
        assert_eq!(local(&format!("file://{d}/a/%2E%2e/b.csv")), p("/b.csv"));
        assert_eq!(local(&format!("file://{d}/a/.%2e/b.csv")), p("/b.csv"));
        assert_eq!(local(&format!("FILE://{d}/a/../b.csv")), p("/b.csv"));
        // `file:` without `//`, and `localhost`, are the local root.
        assert_eq!(local(&format!("file:{d}/b.csv")), p("/b.csv"));
        assert_eq!(local(&format!("file://localhost{d}/b.csv")), p("/b.csv"));
        assert_eq!(
            local("file:relative/x.csv"),
            PathBuf::from("/relative/x.csv")
        );
        // Decoded once, as DataFusion decodes.
        assert_eq!(local(&format!("file://{d}/d%61ta.csv")), p("/data.csv"));
        // `//..` removes the empty part in a URL.
        assert_eq!(local(&format!("file://{d}/a//../b.csv")), p("/a/b.csv"));
        // A path: `.` and `..` resolved, doubled slashes ignored, relative to the current
        // directory; a glob by its fixed part.
        assert_eq!(local(&format!("{d}/a/./../b.csv")), p("/b.csv"));
        assert_eq!(local(&format!("/{d}//a//b.csv")), p("/a/b.csv"));
        assert_eq!(local(&format!("{d}/a/*.csv")), p("/a"));
        assert_eq!(local(&format!("{d}/a/../b/x?.csv")), p("/b"));
        let cwd = std::fs::canonicalize(".").unwrap();
        assert_eq!(local("x/y.csv"), cwd.join("x/y.csv"));
        assert_eq!(local("*.csv"), cwd);
        // A query or fragment is no part of what is opened.
        assert_eq!(local(&format!("file://{d}/b.csv?x=/../y")), p("/b.csv"));
        // Object stores: the bucket and the key, dot segments resolved.
        assert_eq!(
            object("s3://bucket/a/../b/x.parquet"),
            "s3://bucket/b/x.parquet"
        );
        assert_eq!(object("s3://bucket/a/%2e%2e/b"), "s3://bucket/b");
        assert_eq!(object("S3://bucket/a/"), "s3://bucket/a");
        assert_eq!(object("s3://user@bucket:9000/a"), "s3://user@bucket:9000/a");
        assert_eq!(object("memory:///x"), "memory:///x");
        assert_eq!(
            object("abfss://fs@acct.dfs.core.windows.net/a/b"),
            "abfss://fs@acct.dfs.core.windows.net/a/b"
        );
    }

    #[test]
    fn agrees_with_datafusion_listing_table_url() {
        // Where both accept a local location, the path is the one DataFusion lists.
        let (_dir, d) = tempdir();
        for text in [
            format!("file://{d}/a/%2e%2e/b.csv"),
            format!("file:{d}/a/./b"),
            format!("file://localhost{d}/x/../y/"),
            format!("{d}/a/../b/*.csv"),
            format!("{d}/a/b/../../c.csv"),
            format!("file://{d}/%2e%2e/%2e%2e/x"),
            format!("file://{d}/a%2fb/c"),
        ] {
            let Ok(Location::Local(ours)) = resolve(&text, Opening::Listing) else {
                continue;
            };
            let theirs = ListingTableUrl::parse(&text).unwrap();
            assert_eq!(
                ours,
                Path::new("/").join(theirs.prefix().as_ref()),
                "{text}"
            );
        }
    }

    #[test]
    fn what_cannot_be_judged_is_refused() {
        let (_dir, d) = tempdir();
        for text in [
            String::new(),
            "  ".to_string(),
            format!("{d}/a\0b"),
            format!("file://{d}/.\t./x"),
            format!("{d}\\..\\x"),
            "C:\\Windows".to_string(),
            "c:/Windows".to_string(),
            "c:x".to_string(),
            format!("{d}/{}", "a/".repeat(MAX_LEN / 2)),
            format!("file://{d}/%252e%252e/x"),
            format!("{d}/%2e%2e/x"),
            format!("file://{d}/a%2f..%2fb"),
            format!("file://{d}/%5c..%5cx"),
            format!("file://host{d}/x"),
            format!("file://127.0.0.1{d}/x"),
            "ftp://host/x".to_string(),
            "hdfs://namenode/x".to_string(),
            "unknown://x/y".to_string(),
            "data:text/plain,x".to_string(),
            format!("{d}/*/../../x"),
        ] {
            assert!(resolve(&text, Opening::Listing).is_err(), "{text:?}");
        }
        assert!(resolve("", Opening::FilePath).is_err());
        assert!(resolve(&format!("{d}/%2e%2e/x"), Opening::FilePath).is_err());
        assert!(resolve(&format!("{d}/missing/../x"), Opening::FilePath).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn links_are_followed() {
        let (_dir, d) = tempdir();
        let p = |rel: &str| PathBuf::from(format!("{d}{rel}"));
        std::fs::create_dir_all(p("/in/sub")).unwrap();
        std::fs::create_dir(p("/out")).unwrap();
        std::os::unix::fs::symlink(p("/out"), p("/in/link")).unwrap();
        std::os::unix::fs::symlink(p("/out/new.csv"), p("/in/dangling")).unwrap();
        std::os::unix::fs::symlink(p("/in/loop"), p("/in/loop")).unwrap();
        assert_eq!(local(&format!("{d}/in/link/x.csv")), p("/out/x.csv"));
        assert_eq!(local(&format!("file://{d}/in/link/")), p("/out"));
        assert_eq!(local(&format!("{d}/in/link/*.csv")), p("/out"));
        assert!(resolve(&format!("{d}/in/dangling"), Opening::Listing).is_err());
        assert!(resolve(&format!("{d}/in/loop/x"), Opening::Listing).is_err());
        // DataFusion takes `..` before the link is followed; the kernel after.
        assert_eq!(local(&format!("{d}/in/link/../sub")), p("/in/sub"));
        let Ok(Location::Local(kernel)) =
            resolve(&format!("{d}/in/link/../sub"), Opening::FilePath)
        else {
            panic!("a path the kernel resolves");
        };
        assert_eq!(kernel, p("/sub"));
        // A stream table's `file://` text is a relative path to the file system.
        let Ok(Location::Local(literal)) = resolve(&format!("file://{d}/in"), Opening::FilePath)
        else {
            panic!("a relative path");
        };
        assert!(
            literal.starts_with(std::fs::canonicalize(".").unwrap()),
            "{literal:?}"
        );
    }

    #[test]
    fn within_compares_whole_parts() {
        let (_dir, d) = tempdir();
        let at = |t: &str| resolve(t, Opening::Listing).unwrap();
        let root = at(&format!("{d}/landing"));
        assert!(at(&format!("{d}/landing")).is_within(&root));
        assert!(at(&format!("{d}/landing/x.csv")).is_within(&root));
        assert!(!at(&format!("{d}/landing2/x.csv")).is_within(&root));
        assert!(!at(&format!("file://{d}/landing/%2e%2e/x")).is_within(&root));
        let bucket = at("s3://bucket/landing");
        assert!(at("s3://bucket/landing/x").is_within(&bucket));
        assert!(!at("s3://bucket/landing2/x").is_within(&bucket));
        assert!(!at("s3a://bucket/landing/x").is_within(&bucket));
        assert!(!at("s3://other/landing/x").is_within(&bucket));
        assert!(!at("s3://user@bucket/landing/x").is_within(&bucket));
        assert!(!at("s3://bucket/landing/../x").is_within(&bucket));
        assert!(!root.is_within(&bucket) && !bucket.is_within(&root));
    }
}
