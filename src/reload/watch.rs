//! The file watcher: notices that the config file may have changed, waits until changes
//! settle, and asks for one reload.
//!
//! It watches the config file's *directory*, not the file: editors and `sed -i` write a
//! new file and rename it over the old one, and Kubernetes swaps the `..data` symlink a
//! ConfigMap's files point through; a watch on the file itself would follow the old
//! inode and miss both. Of the directory's events it keeps those about a name the config
//! resolves through: every symlink met on the way (the file itself, `..data` for a
//! ConfigMap, a release's `current` directory), each in its real directory, and the real
//! file in its own (all watched as they really are, and re-pointed after every change).
//! Only names created, removed or renamed and files closed after writing reach it
//! ([`config_events`], filtered by the kernel): reading the file does not trigger
//! another reload, and the writes of a store kept in the same directory do not wake the
//! watcher at all.
//!
//! Changes settle when no relevant event has come for [`SETTLE`] (or after [`MAX_SETTLE`]
//! at most, for a file that never stops changing); then the whole file is read and
//! validated by the one reload path. Several writes, a rename and a cleanup thus make one
//! reload.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{Event, EventKindMask, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Trigger;

/// Quiet time after the last relevant event before the file is read.
pub(crate) const SETTLE: Duration = Duration::from_millis(200);
/// Longest wait from the first event of a burst to the reload.
pub(crate) const MAX_SETTLE: Duration = Duration::from_secs(2);

/// A running directory watch on the config file.
pub(crate) struct Watcher {
    config: PathBuf,
    inner: RecommendedWatcher,
    /// Directories watched now.
    dirs: HashSet<PathBuf>,
    interest: Arc<Mutex<Interest>>,
    changed: Arc<Notify>,
}

/// The paths whose events may mean the config changed, and the directories holding them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Interest {
    paths: HashSet<PathBuf>,
    dirs: HashSet<PathBuf>,
}

impl Watcher {
    /// Starts watching the directory of `config`. Start it before the config is first
    /// read, so that no change between the read and the watch goes unseen.
    pub(crate) fn start(config: &Path) -> notify::Result<Self> {
        let config = std::path::absolute(config)?;
        let interest = Arc::new(Mutex::new(Interest::default()));
        let changed = Arc::new(Notify::new());
        let inner = {
            let interest = interest.clone();
            let changed = changed.clone();
            directory_watcher(move |event: notify::Result<Event>| match event {
                Ok(event) => {
                    let relevant = interest.lock().expect("interest lock").wants(&event);
                    if relevant {
                        debug!(kind = ?event.kind, paths = ?event.paths, "config may have changed");
                        changed.notify_one();
                    }
                }
                Err(e) => {
                    // Lost events (e.g. a queue overflow): read the file to be sure.
                    warn!(error = %e, "config watcher error");
                    changed.notify_one();
                }
            })?
        };
        let mut watcher = Self {
            config,
            inner,
            dirs: HashSet::new(),
            interest,
            changed,
        };
        watcher.refresh()?;
        Ok(watcher)
    }

    /// Points the watches at where the config resolves now: a symlink may lead somewhere
    /// else than at the last look. Fails only when the config's own directory cannot be
    /// watched.
    fn refresh(&mut self) -> notify::Result<()> {
        let interest = Interest::of(&self.config);
        for dir in self.dirs.difference(&interest.dirs) {
            let _ = self.inner.unwatch(dir);
        }
        // The directory the file really is in: without a watch there, no change is seen.
        let own = resolve(&self.config).1.parent().map(Path::to_path_buf);
        let mut watched = HashSet::new();
        let mut failure = None;
        for dir in &interest.dirs {
            if self.dirs.contains(dir) {
                watched.insert(dir.clone());
                continue;
            }
            match self.inner.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir.clone());
                }
                Err(e) if Some(dir) == own.as_ref() => failure = Some(e),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "cannot watch a directory the config resolves through")
                }
            }
        }
        self.dirs = watched;
        *self.interest.lock().expect("interest lock") = interest;
        failure.map_or(Ok(()), Err)
    }

    /// Waits for changes, lets them settle, reloads; until `shutdown`.
    pub(crate) async fn run(mut self, reloader: Arc<super::Reloader>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = self.changed.notified() => {}
                () = shutdown.cancelled() => return,
            }
            let last_chance = Instant::now() + MAX_SETTLE;
            loop {
                tokio::select! {
                    () = self.changed.notified() => {}
                    () = tokio::time::sleep(SETTLE) => break,
                    () = tokio::time::sleep_until(last_chance) => break,
                    () = shutdown.cancelled() => return,
                }
            }
            if let Err(e) = self.refresh() {
                warn!(error = %e, "cannot watch the config's directory; reload with SIGHUP or POST /v1/reload");
            }
            reloader.reload(Trigger::Watch).await;
        }
    }
}

/// The kinds of events a config change makes: a name created, removed or renamed (a
/// rename-save, a ConfigMap's symlink swap), and a file written and closed (an in-place
/// save). Not writes as they happen: the kernel then does not wake the watcher for every
/// write to another file in the directory, such as a store kept beside the config (a
/// commit is several writes); an in-place save is seen when its writer closes the file,
/// complete.
fn config_events() -> EventKindMask {
    EventKindMask::CREATE
        | EventKindMask::REMOVE
        | EventKindMask::MODIFY_NAME
        | EventKindMask::ACCESS_CLOSE
}

/// A watcher that hands `handler` the [`config_events`] of the directories it watches.
fn directory_watcher(handler: impl notify::EventHandler) -> notify::Result<RecommendedWatcher> {
    RecommendedWatcher::new(
        handler,
        notify::Config::default().with_event_kinds(config_events()),
    )
}

impl Interest {
    /// Where `config` (absolute) resolves through now: every symlink met on the way (a
    /// ConfigMap's `..data`, a release's `current` directory, the file itself), named in
    /// its real directory, and the real file. Those directories are watched as they
    /// really are, so that a directory symlink swapped over (`current` -> `releases/2`)
    /// is seen, and the next look watches the directory it leads to now.
    fn of(config: &Path) -> Self {
        let mut interest = Self::default();
        let (links, real) = resolve(config);
        for path in links.into_iter().chain([real]) {
            if let Some(dir) = path.parent() {
                interest.dirs.insert(dir.to_path_buf());
                interest.paths.insert(path);
            }
        }
        interest
    }

    /// Whether `event` may have changed what the config file reads as.
    fn wants(&self, event: &Event) -> bool {
        let kind = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => false,
            _ => true,
        };
        // No paths: the watcher lost track (e.g. a rescan is needed).
        kind && (event.paths.is_empty() || event.paths.iter().any(|p| self.paths.contains(p)))
    }
}

/// Symlinks followed at most while resolving the config's path, as the kernel's own limit.
const MAX_LINKS: usize = 40;

/// Resolves `path` (absolute) one name at a time, as the kernel does: the symlinks met
/// (each as its real directory joined with its name, in the order met) and the real path
/// it ends at. A name that does not exist ends the walk there, as it is.
fn resolve(path: &Path) -> (Vec<PathBuf>, PathBuf) {
    let mut links = Vec::new();
    let mut real = PathBuf::from("/");
    let mut todo: Vec<std::ffi::OsString> = Vec::new();
    let push = |todo: &mut Vec<std::ffi::OsString>, path: &Path| {
        // Reversed, so that `pop` takes the first name next.
        let names: Vec<_> = path
            .components()
            .filter_map(|c| match c {
                Component::Normal(name) => Some(name.to_os_string()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            })
            .collect();
        todo.extend(names.into_iter().rev());
    };
    push(&mut todo, path);
    while let Some(name) = todo.pop() {
        if name == ".." {
            real.pop();
            continue;
        }
        let next = real.join(&name);
        match std::fs::read_link(&next) {
            Ok(target) if links.len() < MAX_LINKS => {
                links.push(next);
                if target.is_absolute() {
                    real = PathBuf::from("/");
                }
                push(&mut todo, &target);
            }
            _ => real = next,
        }
    }
    (links, real)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, MetadataKind, RenameMode};

    fn event(kind: EventKind, path: &Path) -> Event {
        Event::new(kind).add_path(path.to_path_buf())
    }

    #[test]
    fn the_file_and_the_configmap_symlink_are_of_interest() {
        let dir = tempfile::TempDir::new().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let stamped = root.join("..2026_01_01_00_00_00.1");
        std::fs::create_dir(&stamped).unwrap();
        std::fs::write(stamped.join("provisioning.toml"), "").unwrap();
        std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", root.join("..data")).unwrap();
        let config = root.join("provisioning.toml");
        std::os::unix::fs::symlink("..data/provisioning.toml", &config).unwrap();

        let interest = Interest::of(&config);
        assert_eq!(
            interest.dirs,
            HashSet::from([root.clone(), stamped.clone()])
        );
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(interest.wants(&event(rename, &root.join("..data"))));
        assert!(interest.wants(&event(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            &config
        )));
        assert!(!interest.wants(&event(
            EventKind::Create(CreateKind::Folder),
            &root.join("..2026_01_01_00_00_00.2")
        )));
        assert!(!interest.wants(&event(
            EventKind::Create(CreateKind::File),
            &root.join("..data_tmp")
        )));
        assert!(!interest.wants(&event(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            &config
        )));
        assert!(!interest.wants(&event(
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            &config
        )));
        assert!(interest.wants(&Event::new(EventKind::Other)));
    }

    /// Every event up to and including the one about `marker`, created after the rest.
    fn events_until(
        rx: &std::sync::mpsc::Receiver<notify::Result<Event>>,
        marker: &Path,
    ) -> Vec<Event> {
        std::fs::write(marker, "").unwrap();
        let mut seen = Vec::new();
        loop {
            let event = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the marker's event within 10 s")
                .expect("no watcher error");
            let done = event.paths.iter().any(|p| p == marker);
            seen.push(event);
            if done {
                return seen;
            }
        }
    }

    #[test]
    fn writes_to_a_store_beside_the_config_do_not_wake_the_watcher_and_saves_do() {
        use std::io::Write as _;
        let dir = tempfile::TempDir::new().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let config = root.join("provisioning.toml");
        std::fs::write(&config, "").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = directory_watcher(tx).unwrap();
        watcher.watch(&root, RecursiveMode::NonRecursive).unwrap();

        // A store's commits: writes to a file kept open.
        let store = root.join("provisiond.db");
        let mut file = std::fs::File::create(&store).unwrap();
        let created = events_until(&rx, &root.join("marker-1"));
        assert!(
            created.iter().any(|e| e.paths == [store.clone()]),
            "{created:?}"
        );
        for _ in 0..1000 {
            file.write_all(&[0; 512]).unwrap();
            file.sync_data().unwrap();
        }
        let during = events_until(&rx, &root.join("marker-2"));
        assert!(
            !during.iter().any(|e| e.paths.contains(&store)),
            "no event about the store: {during:?}"
        );

        // Saves of the config, in place and by rename, are seen, and taken as changes.
        let interest = Interest::of(&config);
        std::fs::write(&config, "# in place").unwrap();
        let in_place = events_until(&rx, &root.join("marker-3"));
        assert!(in_place.iter().any(|e| interest.wants(e)), "{in_place:?}");
        let saved = root.join(".provisioning.toml.swp");
        std::fs::write(&saved, "# renamed").unwrap();
        std::fs::rename(&saved, &config).unwrap();
        let renamed = events_until(&rx, &root.join("marker-4"));
        assert!(
            renamed
                .iter()
                .any(|e| matches!(e.kind, EventKind::Modify(ModifyKind::Name(_)))
                    && interest.wants(e)),
            "{renamed:?}"
        );
    }

    /// `-c /srv/provisiond/current/provisioning.toml`, `current` -> `releases/1`: a
    /// release deploy renames a new `current` over it and keeps the old release.
    #[test]
    fn a_swapped_directory_symlink_is_of_interest_and_the_watch_follows_it() {
        let dir = tempfile::TempDir::new().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for release in ["releases/1", "releases/2"] {
            std::fs::create_dir_all(root.join(release)).unwrap();
            std::fs::write(root.join(release).join("provisioning.toml"), "").unwrap();
        }
        std::os::unix::fs::symlink("releases/1", root.join("current")).unwrap();
        let config = root.join("current/provisioning.toml");

        let interest = Interest::of(&config);
        assert_eq!(
            interest.dirs,
            HashSet::from([root.clone(), root.join("releases/1")])
        );
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(interest.wants(&event(rename, &root.join("current"))));
        let write = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(interest.wants(&event(write, &root.join("releases/1/provisioning.toml"))));

        std::os::unix::fs::symlink("releases/2", root.join("current.tmp")).unwrap();
        std::fs::rename(root.join("current.tmp"), root.join("current")).unwrap();
        let interest = Interest::of(&config);
        assert_eq!(
            interest.dirs,
            HashSet::from([root.clone(), root.join("releases/2")])
        );
        assert!(interest.wants(&event(write, &root.join("releases/2/provisioning.toml"))));
        assert!(!interest.wants(&event(write, &root.join("releases/1/provisioning.toml"))));
    }

    #[test]
    fn a_symlink_adds_the_real_files_directory() {
        let a = tempfile::TempDir::new().unwrap();
        let b = tempfile::TempDir::new().unwrap();
        let real = std::fs::canonicalize(b.path()).unwrap().join("real.toml");
        std::fs::write(&real, "").unwrap();
        let config = std::fs::canonicalize(a.path())
            .unwrap()
            .join("provisioning.toml");
        std::os::unix::fs::symlink(&real, &config).unwrap();
        let interest = Interest::of(&config);
        assert!(interest.dirs.contains(real.parent().unwrap()));
        let write = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(interest.wants(&event(write, &real)));
        assert!(!interest.wants(&event(write, &real.with_file_name("other.toml"))));
    }
}
