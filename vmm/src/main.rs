use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use nvmm::cli::{Cli, Command};
use nvmm::vcpu::VmExit;

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    nvmm::logger::init(cli.log_level);
    let result = match cli.command {
        None => run(cli.run, start),
        Some(Command::Check { json: _ }) => Err("check is not wired yet".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("nvmm: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: nvmm::cli::RunArgs, start: Instant) -> Result<(), String> {
    let config = args.into_config().map_err(|e| e.to_string())?;
    match nvmm::builder::build_and_run(&config, start).map_err(|e| e.to_string())? {
        VmExit::Reset => Ok(()),
        VmExit::Error(msg) => Err(format!("the VM stopped: {msg}")),
    }
}
