//! The `provisiond` command line: parse the arguments, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// mimalloc instead of the system allocator: events allocate on the runtime's threads and
/// free on the store writer's and the log writer's, and glibc's arenas contend on that
/// (a third of the CPU per event, measured). Built without transparent huge pages, which
/// would otherwise add some 7 MiB of resident memory at idle.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use provisiond::telemetry::{self, LogFormat};
use provisiond::{commands, errln, out, stdio};

/// A sidecar that dispatches JeraSoft Billing's provisioning events to the handlers in
/// provisioning.toml.
///
/// Without a subcommand it serves (`run`): the options below are `run`'s.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The config file.
    #[arg(
        short,
        long,
        global = true,
        env = "PROVISIOND_CONFIG",
        default_value = "provisioning.toml"
    )]
    config: PathBuf,
    /// `run`'s options, when no subcommand is given.
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Options of `run`, the default command; no other command logs.
#[derive(clap::Args)]
struct RunArgs {
    /// Log format: auto (the default) is pretty on a terminal and JSON otherwise.
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Log level or filter (e.g. "debug", "provisiond=debug"); overrides RUST_LOG.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Do not watch the config file; reload only on SIGHUP or POST /v1/reload.
    #[arg(long)]
    no_watch: bool,
    /// Threads that serve events and deliveries, 1 to 1024 (default: PROVISIOND_THREADS,
    /// else one per CPU). Where provisiond shares a few cores with the billing, 1 costs
    /// less CPU per event.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(THREADS))]
    threads: Option<u16>,
}

impl RunArgs {
    fn is_set(&self) -> bool {
        self.log_format.is_some()
            || self.log_level.is_some()
            || self.no_watch
            || self.threads.is_some()
    }

    /// `provisiond --log-level debug run --log-format json`: both apply, those after
    /// `run` win.
    fn or(self, outer: Self) -> Self {
        Self {
            log_format: self.log_format.or(outer.log_format),
            log_level: self.log_level.or(outer.log_level),
            no_watch: self.no_watch || outer.no_watch,
            threads: self.threads.or(outer.threads),
        }
    }
}

/// What `--threads` and `PROVISIOND_THREADS` take.
const THREADS: std::ops::RangeInclusive<i64> = 1..=1024;

/// `PROVISIOND_THREADS`, read by `run` only: a unit's `Environment=` line is no concern of
/// `check`'s. Empty is unset.
fn threads_from_env() -> Result<Option<u16>, String> {
    let Some(value) = std::env::var_os("PROVISIOND_THREADS") else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    let number = value.trim();
    if number.is_empty() {
        return Ok(None);
    }
    match number.parse::<u16>() {
        Ok(n) if THREADS.contains(&i64::from(n)) => Ok(Some(n)),
        _ => Err(format!(
            "PROVISIOND_THREADS={value}: not a number of threads from {} to {} (--threads)",
            THREADS.start(),
            THREADS.end()
        )),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve events (the default).
    Run(RunArgs),
    /// Validate the config: print a summary, or every error with its line; exit 1 on error.
    Check,
    /// Show which handlers an event would run, in which order, and why the others would
    /// not. Calls no handler.
    Explain {
        /// The event name, e.g. clients.create.
        event: String,
        /// The event's data: a JSON object in a file, or "-" for stdin ({} if not given).
        #[arg(long, value_name = "FILE|-")]
        data: Option<String>,
        /// The event's object_id.
        #[arg(long, default_value = "1")]
        object_id: String,
    },
    /// Run config test cases: for each envelope, the handlers expected; exit 1 on any
    /// failure.
    Test {
        /// The cases file ([[case]] tables).
        cases: PathBuf,
    },
    /// Print the config's JSON Schema.
    Schema {
        /// Accepted and ignored: the schema does not depend on a config. Hidden so that
        /// `schema --help` does not offer it.
        #[arg(short, long, hide = true)]
        config: Option<PathBuf>,
    },
    /// Post an envelope like the billing's to a running sidecar and print the reply.
    Send {
        /// The event name, e.g. clients.create.
        event: String,
        /// A file holding the `data` object as JSON, or - for stdin ({} when absent).
        #[arg(long)]
        data: Option<String>,
        /// The event's object_id: an integer, as the billing's ids are.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = object_id)]
        object_id: i64,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Show a running sidecar's execution log, newest first (with --follow, oldest
    /// first, then new rows as they come).
    Executions {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Only this event (e.g. clients.create).
        #[arg(long)]
        event: Option<String>,
        /// Only the calls made for this event id: the X-Provisioning-Event-Id the billing
        /// got back (evt_...).
        #[arg(long, value_name = "EVT")]
        event_id: Option<String>,
        /// Only this handler.
        #[arg(long)]
        handler: Option<String>,
        /// Only this object id.
        #[arg(long)]
        object_id: Option<String>,
        /// Only this outcome: allowed, denied, error, delivered, failed, dead.
        #[arg(long, value_parser = outcomes(), hide_possible_values = true)]
        outcome: Option<String>,
        /// Only calls since a time (2026-11-26T10:00:00Z) or for a duration back (15m).
        #[arg(long)]
        since: Option<String>,
        /// At most this many rows (default 100, at most 1000; with --follow, 20 to start).
        #[arg(long)]
        limit: Option<usize>,
        /// Keep running and print new rows as they come (Ctrl-C stops).
        #[arg(short, long)]
        follow: bool,
        /// table: aligned columns under a header row; json: the reply (with --follow,
        /// one row per line).
        #[arg(long, value_enum, default_value_t, conflicts_with = "json")]
        output: commands::Output,
        /// Same as --output json.
        #[arg(long)]
        json: bool,
    },
    /// List, replay or drop a running sidecar's dead letters.
    Deadletters {
        #[command(subcommand)]
        command: DeadLetters,
    },
    /// Exit 0 when a running sidecar answers /healthz (with --ready, /readyz), else 1:
    /// for container HEALTHCHECKs and Kubernetes exec probes.
    Health {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Ask whether it is ready (config loaded, store open, not shutting down).
        #[arg(long)]
        ready: bool,
        /// Longest the check may take.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration)]
        timeout: std::time::Duration,
    },
    /// Work on the configured store directly (no sidecar needed).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Print shell completions: provisiond completions bash > /etc/bash_completion.d/provisiond
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff): provisiond man > /usr/local/share/man/man1/provisiond.1
    Man,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Move what a redb store file holds (queued deliveries, dead letters) into the
    /// configured shared store (store.backend = "postgres"), then remove it from the
    /// file; its dedupe keys are copied too. Stop the sidecar that used the file first.
    Copy {
        /// The redb file (the old store.path).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
    },
}

/// The shells `completions` writes for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Where the running sidecar is, and how to authenticate to it.
#[derive(clap::Args)]
struct RemoteArgs {
    /// The sidecar: http://host:port or unix:/path.sock (default: the config's listen).
    #[arg(long)]
    url: Option<String>,
    /// The bearer token to send (default: the config's server.token, which is sent only
    /// to the config's own listener, never to another --url). From the environment, it
    /// stays out of the process list.
    #[arg(long, env = "PROVISIOND_CLIENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl RemoteArgs {
    fn target(self) -> provisiond::remote::Target {
        provisiond::remote::Target {
            url: self.url,
            token: self.token,
            timeout: None,
            no_token_needed: false,
        }
    }
}

/// Which dead letters `replay` and `drop` take: one id, a filter, or --all.
#[derive(clap::Args)]
#[group(id = "selection", required = true, multiple = true)]
struct SelectionArgs {
    /// The dead letter's id.
    #[arg(conflicts_with_all = FILTERS)]
    id: Option<u64>,
    /// Those of this handler.
    #[arg(long)]
    handler: Option<String>,
    /// Those of this event (e.g. clients.update).
    #[arg(long)]
    event: Option<String>,
    /// Those of this object id.
    #[arg(long)]
    object_id: Option<String>,
    /// Those of this entity (e.g. clients/12).
    #[arg(long)]
    entity: Option<String>,
    /// Those that died since a time (2026-11-26T10:00:00Z) or a duration back (2h).
    #[arg(long)]
    since: Option<String>,
    /// Those that died before a time, or a duration back.
    #[arg(long)]
    until: Option<String>,
    /// Every dead letter.
    #[arg(long, conflicts_with_all = FILTERS)]
    all: bool,
}

const FILTERS: [&str; 6] = ["handler", "event", "object_id", "entity", "since", "until"];

impl SelectionArgs {
    fn selection(self) -> commands::Selection {
        commands::Selection {
            id: self.id,
            handler: self.handler,
            event: self.event,
            object_id: self.object_id,
            entity: self.entity,
            since: self.since,
            until: self.until,
            all: self.all,
        }
    }
}

#[derive(Subcommand)]
enum DeadLetters {
    /// List dead letters, oldest first: those the same filters would replay or drop.
    List {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Only this handler's.
        #[arg(long)]
        handler: Option<String>,
        /// Only those of this event (e.g. clients.update).
        #[arg(long)]
        event: Option<String>,
        /// Only those of this object id.
        #[arg(long)]
        object_id: Option<String>,
        /// Only those of this entity (e.g. clients/12).
        #[arg(long)]
        entity: Option<String>,
        /// Only those that died since a time (2026-11-26T10:00:00Z) or a duration back (2h).
        #[arg(long)]
        since: Option<String>,
        /// Only those that died before a time, or a duration back.
        #[arg(long)]
        until: Option<String>,
        /// Only those with an id above this one: the next page after the last id shown.
        #[arg(long)]
        after: Option<u64>,
        /// At most this many (default 100, at most 1000).
        #[arg(long)]
        limit: Option<usize>,
        /// table: aligned columns under a header row; json: the reply.
        #[arg(long, value_enum, default_value_t, conflicts_with = "json")]
        output: commands::Output,
        /// Same as --output json.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back in the queue, behind their entities' pending deliveries, in
    /// the order their events arrived: one by ID, those matching the filters, or --all.
    Replay {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(flatten)]
        selection: SelectionArgs,
    },
    /// Delete dead letters: one by ID, those matching the filters, or --all.
    Drop {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(flatten)]
        selection: SelectionArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        None => Command::Run(cli.run),
        Some(Command::Run(args)) => Command::Run(args.or(cli.run)),
        Some(_) if cli.run.is_set() => Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--log-format, --log-level, --no-watch and --threads are options of `run` only",
            )
            .exit(),
        Some(command) => command,
    };
    let code = match command {
        Command::Check => commands::check(&cli.config),
        Command::Explain {
            event,
            data,
            object_id,
        } => commands::explain(&cli.config, &event, data.as_deref(), &object_id),
        Command::Test { cases } => commands::test(&cli.config, &cases),
        Command::Schema { .. } => {
            out!("{}", commands::schema());
            ExitCode::SUCCESS
        }
        Command::Send {
            event,
            data,
            object_id,
            remote,
        } => block_on(commands::send(
            &cli.config,
            &remote.target(),
            &event,
            data.as_deref(),
            object_id,
        )),
        Command::Executions {
            remote,
            event,
            event_id,
            handler,
            object_id,
            outcome,
            since,
            limit,
            follow,
            output,
            json,
        } => block_on(commands::executions(
            &cli.config,
            &remote.target(),
            commands::ExecutionQuery {
                event,
                handler,
                object_id,
                outcome,
                since,
                event_id,
                limit,
                follow,
                output: if json { commands::Output::Json } else { output },
            },
        )),
        Command::Deadletters { command } => {
            let (remote, command) = match command {
                DeadLetters::List {
                    remote,
                    handler,
                    event,
                    object_id,
                    entity,
                    since,
                    until,
                    after,
                    limit,
                    output,
                    json,
                } => (
                    remote,
                    commands::DeadLetterCommand::List {
                        filters: commands::Selection {
                            id: None,
                            handler,
                            event,
                            object_id,
                            entity,
                            since,
                            until,
                            all: false,
                        },
                        after,
                        limit,
                        output: if json { commands::Output::Json } else { output },
                    },
                ),
                DeadLetters::Replay { remote, selection } => (
                    remote,
                    commands::DeadLetterCommand::Replay(selection.selection()),
                ),
                DeadLetters::Drop { remote, selection } => (
                    remote,
                    commands::DeadLetterCommand::Drop(selection.selection()),
                ),
            };
            block_on(commands::dead_letters(
                &cli.config,
                &remote.target(),
                command,
            ))
        }
        Command::Health {
            remote,
            ready,
            timeout,
        } => {
            let mut target = remote.target();
            target.timeout = Some(timeout);
            // `/healthz` and `/readyz` take no token.
            target.no_token_needed = true;
            block_on(commands::health(&cli.config, &target, ready))
        }
        Command::Store {
            command: StoreCommand::Copy { from },
        } => match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime.block_on(commands::store_copy(&cli.config, &from)),
            Err(e) => {
                errln!("provisiond: cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Completions { shell } => {
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            // Written to memory first: clap_complete panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "provisiond", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            ExitCode::SUCCESS
        }
        Command::Man => {
            out!("{}", man_page());
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            let threads = match args.threads {
                Some(threads) => Some(threads),
                None => match threads_from_env() {
                    Ok(threads) => threads,
                    Err(e) => {
                        eprintln!("provisiond: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            // Held to the end of `run`: dropping it flushes the log lines still queued.
            let format = args.log_format.unwrap_or_default();
            let _logs = match telemetry::init(format, args.log_level.as_deref()) {
                Ok(guard) => guard,
                Err(e) => {
                    eprintln!("provisiond: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            // One per CPU the process may use, unless told: said here rather than left to
            // tokio, which would read its own TOKIO_WORKER_THREADS (and panic on a bad one).
            let threads = threads.map_or_else(
                || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
                usize::from,
            );
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("provisiond: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(commands::run(&cli.config, !args.no_watch)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("provisiond: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    // A client command's output that could not be written fails it (`run` prints
    // nothing this way: its code is as it was).
    stdio::exit_code(code)
}

/// `send --object-id`: an integer, said plainly when it is not.
fn object_id(text: &str) -> Result<i64, String> {
    text.trim()
        .parse()
        .map_err(|_| "must be an integer, as the billing's object ids are".to_owned())
}

/// `health --timeout`: a duration with a unit.
fn duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e}; write e.g. \"5s\" or \"500ms\""))
}

/// The man page: clap_mangen's page of the top-level command, with every command's
/// description, synopsis and options in it (under COMMANDS), where clap_mangen would
/// refer to a page of its own for each (`provisiond-run(1)`) that nothing installs.
fn man_page() -> String {
    /// What one of clap_mangen's renders writes.
    fn text(render: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> String {
        let mut out = Vec::new();
        render(&mut out).expect("a write to memory does not fail");
        String::from_utf8_lossy(&out).into_owned()
    }
    /// A section without its `.SH` line, for a page within the page.
    fn body(section: String) -> String {
        section
            .lines()
            .filter(|line| !line.starts_with(".SH "))
            .map(|line| format!("{line}\n"))
            .collect()
    }
    fn commands(page: &mut String, cmd: &clap::Command) {
        for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
            let man = clap_mangen::Man::new(sub.clone());
            let name = sub.get_bin_name().unwrap_or(sub.get_name());
            page.push_str(&format!(".SS \"{name}\"\n"));
            page.push_str(&body(text(|w| man.render_description_section(w))));
            page.push_str(".PP\n");
            page.push_str(&body(text(|w| man.render_synopsis_section(w))));
            if sub.get_arguments().any(|a| !a.is_hide_set()) {
                page.push_str(&body(text(|w| man.render_options_section(w))));
            }
            commands(page, sub);
        }
    }
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    let man = clap_mangen::Man::new(cli.clone());
    let mut page = text(|w| man.render_title(w));
    page.push_str(&text(|w| man.render_name_section(w)));
    page.push_str(&text(|w| man.render_synopsis_section(w)));
    page.push_str(&text(|w| man.render_description_section(w)));
    page.push_str(&text(|w| man.render_options_section(w)));
    page.push_str(".SH COMMANDS\n");
    commands(&mut page, &cli);
    page.push_str(&text(|w| man.render_version_section(w)));
    // Each render starts with the same definition of `\*(Aq`; once is enough.
    let preamble = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";
    format!("{preamble}{}", page.replace(preamble, ""))
}

/// Runs a client command on a small runtime; errors print as one line.
fn block_on(command: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("provisiond: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(code) => code,
        Err(e) => {
            errln!("provisiond: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The execution log's outcomes, for `--outcome`: checked, and offered by completions.
fn outcomes() -> clap::builder::PossibleValuesParser {
    provisiond::outcome::CallOutcome::ALL
        .iter()
        .map(|o| o.as_str())
        .collect::<Vec<_>>()
        .into()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use provisiond::outcome::CallOutcome;

    use super::Cli;

    #[test]
    fn the_outcome_help_names_every_outcome() {
        let cli = Cli::command();
        let executions = cli.find_subcommand("executions").unwrap();
        let outcome = executions
            .get_arguments()
            .find(|a| a.get_id() == "outcome")
            .unwrap();
        let names: Vec<&str> = CallOutcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            outcome.get_help().unwrap().to_string(),
            format!("Only this outcome: {}", names.join(", "))
        );
    }
}
