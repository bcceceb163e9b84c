//! What changed between the live config and a newly loaded one: the reload's summary,
//! and whether there is anything to swap at all.

use std::sync::Arc;

use crate::config::{Config, Handler};

/// The difference between two configs, by handler name and by setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Handlers only in the new config, in file order.
    pub added: Vec<String>,
    /// Handlers only in the old config, in file order.
    pub removed: Vec<String>,
    /// Handlers in both whose definition differs (also through `[defaults]`).
    pub changed: Vec<String>,
    /// Other settings that differ, e.g. `server.deadline`, and `handler order` when the
    /// same handlers appear in another order in the file.
    pub settings: Vec<String>,
}

impl Changes {
    pub fn between(old: &Config, new: &Config) -> Self {
        let mut changes = Self::default();
        for h in &new.handlers {
            match old.handler(&h.name) {
                None => changes.added.push(h.name.clone()),
                Some(was) if !same_handler(was, h) => changes.changed.push(h.name.clone()),
                Some(_) => {}
            }
        }
        for h in &old.handlers {
            if new.handler(&h.name).is_none() {
                changes.removed.push(h.name.clone());
            }
        }
        let names = |c: &Config| {
            c.handlers
                .iter()
                .map(|h| h.name.clone())
                .collect::<Vec<_>>()
        };
        if changes.added.is_empty() && changes.removed.is_empty() && names(old) != names(new) {
            changes.settings.push("handler order".into());
        }

        let (a, b) = (&old.server, &new.server);
        let mut setting = |name: &str, differs: bool| {
            if differs {
                changes.settings.push(name.to_owned());
            }
        };
        setting("server.token", a.token != b.token);
        setting(
            "server.allow_insecure",
            a.allow_insecure != b.allow_insecure,
        );
        setting("server.max_body", a.max_body != b.max_body);
        setting("server.deadline", a.deadline != b.deadline);
        setting("server.max_depth", a.max_depth != b.max_depth);
        let (c, d) = (&old.store, &new.store);
        setting("store.dedupe_window", c.dedupe_window != d.dedupe_window);
        setting(
            "store.keep_executions",
            c.keep_age != d.keep_age || c.keep_rows != d.keep_rows,
        );
        setting("events.extra", old.extra_events != new.extra_events);
        // Settings added later are still noticed, if not named.
        let named = changes.settings.iter().any(|s| s.starts_with("server."));
        if a != b && !named {
            changes.settings.push("server".into());
        }
        let named = changes.settings.iter().any(|s| s.starts_with("store."));
        if c != d && !named {
            changes.settings.push("store".into());
        }
        changes
    }

    /// Nothing that dispatch can see differs.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.settings.is_empty()
    }
}

/// Whether two handlers behave the same: the same table in the file, and the same values
/// inherited from `[defaults]`.
fn same_handler(a: &Handler, b: &Handler) -> bool {
    a.raw == b.raw
        && a.timeout == b.timeout
        && a.on_error == b.on_error
        && a.max_concurrency == b.max_concurrency
        && a.retry == b.retry
}

/// Puts the live `Arc<Handler>` of every unchanged handler (same definition, same place
/// in the file) into `new`, so that it keeps its identity and its `max_concurrency`
/// slots across the reload.
pub(crate) fn keep_unchanged_handlers(old: &Config, new: &mut Config) {
    for slot in &mut new.handlers {
        if let Some(was) = old.handler(&slot.name)
            && was.position == slot.position
            && same_handler(was, slot)
        {
            *slot = Arc::clone(was);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[defaults]
timeout = "5s"
[[handler]]
name = "a"
events = ["clients.create"]
stage = "before"
url = "http://127.0.0.1:1/a"
[[handler]]
name = "b"
events = ["clients.update"]
stage = "before"
url = "http://127.0.0.1:1/b"
[[handler]]
name = "c"
events = ["clients.update"]
stage = "before"
url = "http://127.0.0.1:1/c"
"#;

    fn config(text: &str) -> Config {
        Config::parse(text, "p.toml").unwrap()
    }

    #[test]
    fn comments_and_layout_are_no_change() {
        let old = config(BASE);
        let new = config(&format!(
            "# a comment\n{}",
            BASE.replace("\"5s\"", "  \"5s\"  ")
        ));
        assert_ne!(old.hash, new.hash);
        assert!(Changes::between(&old, &new).is_empty());
    }

    #[test]
    fn handlers_are_added_removed_and_changed_by_name() {
        let old = config(BASE);
        let text = BASE
            .replace("name = \"a\"", "name = \"z\"")
            .replace("/b\"", "/b2\"");
        let new = config(&text);
        let changes = Changes::between(&old, &new);
        assert_eq!(changes.added, ["z"]);
        assert_eq!(changes.removed, ["a"]);
        assert_eq!(changes.changed, ["b"]);
        assert!(changes.settings.is_empty(), "{changes:?}");
    }

    #[test]
    fn a_default_change_changes_the_handlers_that_inherit_it() {
        let old = config(BASE);
        let new = config(&BASE.replace("timeout = \"5s\"", "timeout = \"2s\""));
        let changes = Changes::between(&old, &new);
        assert_eq!(changes.changed, ["a", "b", "c"]);
    }

    #[test]
    fn settings_and_order_are_named() {
        let old = config(BASE);
        let new = config(&format!("[server]\ndeadline = \"3s\"\n{BASE}"));
        assert_eq!(Changes::between(&old, &new).settings, ["server.deadline"]);

        // The same tables, b and c swapped: only the order differs.
        let tables: Vec<&str> = BASE.split("[[handler]]").collect();
        let reordered = [tables[0], tables[1], tables[3], tables[2]].join("[[handler]]");
        let new = config(&reordered);
        let changes = Changes::between(&old, &new);
        assert_eq!(changes.settings, ["handler order"], "{changes:?}");
        assert!(changes.changed.is_empty());
    }

    #[test]
    fn unchanged_handlers_keep_their_identity() {
        let old = config(BASE);
        let mut new = config(&BASE.replace("/b\"", "/b2\""));
        keep_unchanged_handlers(&old, &mut new);
        assert!(Arc::ptr_eq(&old.handlers[0], &new.handlers[0]));
        assert!(!Arc::ptr_eq(&old.handlers[1], &new.handlers[1]));
        assert!(Arc::ptr_eq(&old.handlers[2], &new.handlers[2]));
    }
}
