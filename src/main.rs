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
use provisiond::commands;
use provisiond::telemetry::{self, LogFormat};

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
}

impl RunArgs {
    fn is_set(&self) -> bool {
        self.log_format.is_some() || self.log_level.is_some() || self.no_watch
    }

    /// `provisiond --log-level debug run --log-format json`: both apply, those after
    /// `run` win.
    fn or(self, outer: Self) -> Self {
        Self {
            log_format: self.log_format.or(outer.log_format),
            log_level: self.log_level.or(outer.log_level),
            no_watch: self.no_watch || outer.no_watch,
        }
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
        /// The sidecar: http://host:port or unix:/path.sock (default: the config's listen).
        #[arg(long)]
        url: Option<String>,
    },
    /// Show a running sidecar's execution log, newest first.
    Executions {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Only this event (e.g. clients.create).
        #[arg(long)]
        event: Option<String>,
        /// Only this handler.
        #[arg(long)]
        handler: Option<String>,
        /// Only this object id.
        #[arg(long)]
        object_id: Option<String>,
        /// Only this outcome: allowed, denied, error, delivered, failed, dead.
        #[arg(long)]
        outcome: Option<String>,
        /// Only calls since a time (2026-11-26T10:00:00Z) or for a duration back (15m).
        #[arg(long)]
        since: Option<String>,
        /// At most this many rows (default 100, at most 1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List, replay or drop a running sidecar's dead letters.
    Deadletters {
        #[command(subcommand)]
        command: DeadLetters,
    },
}

/// Where the running sidecar is.
#[derive(clap::Args)]
struct RemoteArgs {
    /// The sidecar: http://host:port or unix:/path.sock (default: the config's listen).
    #[arg(long)]
    url: Option<String>,
}

#[derive(Subcommand)]
enum DeadLetters {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Only this handler's.
        #[arg(long)]
        handler: Option<String>,
        /// At most this many (default 100, at most 1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put a dead letter back in the queue, behind its entity's pending deliveries.
    Replay {
        #[command(flatten)]
        remote: RemoteArgs,
        /// The dead letter's id.
        id: u64,
    },
    /// Delete a dead letter.
    Drop {
        #[command(flatten)]
        remote: RemoteArgs,
        /// The dead letter's id.
        id: u64,
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
                "--log-format, --log-level and --no-watch are options of `run` only",
            )
            .exit(),
        Some(command) => command,
    };
    match command {
        Command::Check => commands::check(&cli.config),
        Command::Explain {
            event,
            data,
            object_id,
        } => commands::explain(&cli.config, &event, data.as_deref(), &object_id),
        Command::Test { cases } => commands::test(&cli.config, &cases),
        Command::Schema { .. } => {
            print!("{}", commands::schema());
            ExitCode::SUCCESS
        }
        Command::Send {
            event,
            data,
            object_id,
            url,
        } => block_on(commands::send(
            &cli.config,
            url.as_deref(),
            &event,
            data.as_deref(),
            object_id,
        )),
        Command::Executions {
            remote,
            event,
            handler,
            object_id,
            outcome,
            since,
            limit,
            json,
        } => block_on(commands::executions(
            &cli.config,
            remote.url.as_deref(),
            commands::ExecutionQuery {
                event,
                handler,
                object_id,
                outcome,
                since,
                limit,
                json,
            },
        )),
        Command::Deadletters { command } => {
            let (remote, command) = match command {
                DeadLetters::List {
                    remote,
                    handler,
                    limit,
                    json,
                } => (
                    remote,
                    commands::DeadLetterCommand::List {
                        handler,
                        limit,
                        json,
                    },
                ),
                DeadLetters::Replay { remote, id } => {
                    (remote, commands::DeadLetterCommand::Replay { id })
                }
                DeadLetters::Drop { remote, id } => {
                    (remote, commands::DeadLetterCommand::Drop { id })
                }
            };
            block_on(commands::dead_letters(
                &cli.config,
                remote.url.as_deref(),
                command,
            ))
        }
        Command::Run(args) => {
            // Held to the end of `run`: dropping it flushes the log lines still queued.
            let format = args.log_format.unwrap_or_default();
            let _logs = match telemetry::init(format, args.log_level.as_deref()) {
                Ok(guard) => guard,
                Err(e) => {
                    eprintln!("provisiond: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
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
    }
}

/// `send --object-id`: an integer, said plainly when it is not.
fn object_id(text: &str) -> Result<i64, String> {
    text.trim()
        .parse()
        .map_err(|_| "must be an integer, as the billing's object ids are".to_owned())
}

/// Runs a client command on a small runtime; errors print as one line.
fn block_on(command: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("provisiond: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("provisiond: {e:#}");
            ExitCode::FAILURE
        }
    }
}
