//! Users, tokens and the audit log: `hangar login`, `whoami`, `users`, `user add`,
//! `tokens`, `token create|revoke`, `audit`; and which token the CLI sends.
//!
//! The token comes from, in order: `--token` or `HANGAR_TOKEN`; the file `hangar login`
//! wrote (`$XDG_CONFIG_HOME/hangar/token`, mode 0600); the admin token the server wrote in
//! its data dir (`$HANGAR_DATA_DIR` or the default data dir, `admin.token`) when this user
//! may read it. So on the server's machine, as the user that runs it, no set-up is needed.

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use hangar_api::Role;
use hangar_api::client::Client;
use hangar_api::{AuditQuery, TokenBody, UserBody};

use crate::error::CliError;
use crate::output::{print_json, table};

/// Where `hangar login` keeps the token: `$XDG_CONFIG_HOME/hangar/token`, else
/// `$HOME/.config/hangar/token`.
pub fn login_file() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .map(|dir| dir.join("hangar").join("token"))
}

/// The token the CLI sends: `given` (`--token`/`HANGAR_TOKEN`), else the login file, else
/// the data dir's `admin.token` when readable; `None` when there is none.
pub fn resolve_token(given: Option<String>) -> Option<String> {
    let read = |path: PathBuf| {
        std::fs::read_to_string(path)
            .ok()
            .map(|text| text.trim().to_owned())
            .filter(|text| !text.is_empty())
    };
    given
        .map(|token| token.trim().to_owned())
        .filter(|token| !token.is_empty())
        .or_else(|| login_file().and_then(read))
        .or_else(|| {
            let data_dir = std::env::var_os("HANGAR_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(super::server::default_data_dir);
            read(data_dir.join("admin.token"))
        })
}

#[derive(clap::Args)]
pub struct JsonArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct LoginArgs {}

/// `hangar login`: reads a token (prompting on a terminal), checks it with the server and
/// keeps it, mode 0600, for later commands.
pub async fn login(client: &Client, _args: LoginArgs) -> Result<(), CliError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("API token: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|err| CliError::Failed(format!("cannot read the token: {err}")))?;
    let token = line.trim();
    if token.is_empty() {
        return Err(CliError::Usage("no token given on standard input".into()));
    }
    let who = client.clone().with_token(token).whoami().await?;
    let path = login_file()
        .ok_or_else(|| CliError::Failed("neither XDG_CONFIG_HOME nor HOME is set".into()))?;
    let failed =
        |err: std::io::Error| CliError::Failed(format!("cannot write {}: {err}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(failed)?;
    }
    // Written to a private file beside it, then renamed: never readable by others.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(failed)?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(failed)?;
    std::fs::rename(&tmp, &path).map_err(failed)?;
    eprintln!(
        "logged in as {} ({}); token kept in {}",
        who.user,
        who.role,
        path.display()
    );
    Ok(())
}

/// `hangar whoami`.
pub async fn whoami(client: &Client, args: JsonArgs) -> Result<(), CliError> {
    let who = client.whoami().await?;
    if args.json {
        return print_json(&who);
    }
    println!("{} ({}), token {}", who.user, who.role, who.token);
    Ok(())
}

/// `hangar users`.
pub async fn users(client: &Client, args: JsonArgs) -> Result<(), CliError> {
    let users = client.users().await?;
    if args.json {
        return print_json(&users);
    }
    table::print(
        &["USER", "ROLE", "CREATED"],
        users
            .into_iter()
            .map(|u| vec![u.name, u.role.to_string(), u.created_at]),
    );
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum UserCommand {
    /// Add a user (admin); give them a token with `hangar token create --user NAME`.
    Add {
        name: String,
        /// admin, provisioner or access.
        #[arg(long)]
        role: Role,
        #[arg(long)]
        json: bool,
    },
}

/// `hangar user ...`.
pub async fn user(client: &Client, command: UserCommand) -> Result<(), CliError> {
    match command {
        UserCommand::Add { name, role, json } => {
            let user = client.add_user(&UserBody { name, role }).await?;
            if json {
                return print_json(&user);
            }
            println!("{} ({})", user.name, user.role);
            Ok(())
        }
    }
}

/// `hangar tokens`: never their secrets.
pub async fn tokens(client: &Client, args: JsonArgs) -> Result<(), CliError> {
    let tokens = client.tokens().await?;
    if args.json {
        return print_json(&tokens);
    }
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".into());
    table::print(
        &[
            "ID",
            "USER",
            "ROLE",
            "CREATED",
            "EXPIRES",
            "REVOKED",
            "LAST USED",
        ],
        tokens.into_iter().map(|t| {
            vec![
                t.id,
                t.user,
                t.role.to_string(),
                t.created_at,
                or_dash(t.expires_at),
                or_dash(t.revoked_at),
                or_dash(t.last_used_at),
            ]
        }),
    );
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Make a token (for yourself; an admin: for any user) and print it: it is shown once.
    Create {
        /// Whose token (admins only; default: yours).
        #[arg(long)]
        user: Option<String>,
        /// Its scope (default: the user's role, and never more than yours).
        #[arg(long)]
        role: Option<Role>,
        /// How long it lasts (`30d`, `12h`; default: until revoked).
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token (yours; an admin: any): refused from now on.
    Revoke { id: String },
}

/// `hangar token ...`.
pub async fn token(client: &Client, command: TokenCommand) -> Result<(), CliError> {
    match command {
        TokenCommand::Create {
            user,
            role,
            expires,
            json,
        } => {
            if let Some(expires) = &expires {
                humantime::parse_duration(expires).map_err(|err| {
                    CliError::Usage(format!("--expires {expires:?} is not a duration: {err}"))
                })?;
            }
            let made = client
                .create_token(&TokenBody {
                    user,
                    role,
                    expires_in: expires,
                })
                .await?;
            if json {
                return print_json(&made);
            }
            eprintln!(
                "token {} for {} ({}), expires {}; shown this once:",
                made.info.id,
                made.info.user,
                made.info.role,
                made.info.expires_at.as_deref().unwrap_or("never")
            );
            println!("{}", made.token);
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let token = client.revoke_token(&id).await?;
            println!("revoked {} ({})", token.id, token.user);
            Ok(())
        }
    }
}

#[derive(clap::Args)]
pub struct AuditArgs {
    /// Entries from this long ago (`1h`, `2d`) or this RFC 3339 time on.
    #[arg(long)]
    since: Option<String>,
    /// The latest this many.
    #[arg(long)]
    limit: Option<u32>,
    #[arg(long)]
    json: bool,
}

/// `hangar audit`: mutating calls, oldest first.
pub async fn audit(client: &Client, args: AuditArgs) -> Result<(), CliError> {
    let entries = client
        .audit(&AuditQuery {
            since: args.since,
            limit: args.limit,
        })
        .await?;
    if args.json {
        return print_json(&entries);
    }
    table::print(
        &["AT", "USER", "CALL", "TARGET", "STATUS"],
        entries.into_iter().map(|e| {
            vec![
                e.at,
                e.user,
                format!("{} {}", e.method, e.route),
                e.target.unwrap_or_else(|| "-".into()),
                e.status.to_string(),
            ]
        }),
    );
    Ok(())
}
