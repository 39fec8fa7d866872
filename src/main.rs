//! `sked`: parse the command line and hand over. No logic here.

use clap::{CommandFactory, Parser};
use sked::config::{AdminCommand, Cli, Command};

/// mimalloc instead of glibc's malloc: a firing pass builds and drops
/// thousands of JSON params and events at once, and glibc's allocator was
/// ~45 % of a node's CPU in `perf` while 10 000 aligned bindings fired.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Client(cmd) => {
            // A client prints what it was asked for, not a node's logs.
            let code = sked::cli::run(cmd, &mut Cli::command()).await;
            std::process::exit(code);
        }
        other => other,
    };
    sked::telemetry::init(cli.log_format);
    match command {
        Command::Serve(args) => sked::app::run_serve(args).await?,
        Command::Migrate(args) => {
            let pool = sked::db::connect(&args.database_url, 2).await?;
            sked::db::migrate(&pool).await?;
            tracing::info!("migrations applied");
        }
        Command::Admin(AdminCommand::BootstrapKey(args)) => {
            let token = sked::app::bootstrap_key(&args.database_url, &args.name).await?;
            // The only place the secret is shown: stdout, once.
            println!("{token}");
        }
        Command::Client(_) => unreachable!("handled above"),
    }
    Ok(())
}
