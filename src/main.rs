//! `sked`: parse the command line and hand over. No logic here.

use clap::Parser;
use sked::config::{AdminCommand, Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    sked::telemetry::init(cli.log_format);
    match cli.command {
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
    }
    Ok(())
}
