use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use nvmm::cli::{BenchCommand, Cli, Command, RunArgs};
use nvmm::vcpu::VmExit;

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    nvmm::logger::init(cli.log_level);
    match cli.command {
        None => run(cli.run, start),
        Some(Command::Check { json }) => check(json),
        Some(Command::Bench { what: BenchCommand::Exits(args) }) => report(nvmm::bench::exits(args)),
        Some(Command::Ctl { socket, command }) => report(ctl(&socket, command)),
    }
}

/// Prints the server's JSON answer; a server error or a missing socket is the one-line failure.
fn ctl(socket: &std::path::Path, command: nvmm::api::client::Command) -> Result<(), String> {
    let answer = nvmm::api::client::call(socket, command).map_err(|e| e.to_string())?;
    println!("{answer}");
    Ok(())
}

/// One line on stderr for any failure, and a nonzero status.
fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("nvmm: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the host report; any FAIL line makes the status nonzero.
fn check(json: bool) -> ExitCode {
    let report = nvmm::check::run_checks(&nvmm::host::Host::real());
    let text = if json { format!("{}\n", report.to_json()) } else { report.render_text() };
    // A reader that stops early (`nvmm check | head`) is not an error of ours.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The guest's own status when it asked for one through the debug-exit port, else 0 or the error.
fn run(args: RunArgs, start: Instant) -> ExitCode {
    let result = args.into_config().map_err(|e| e.to_string()).and_then(|config| {
        nvmm::builder::build_and_run(&config, start).map_err(|e| e.to_string())
    });
    match result {
        Ok(VmExit::DebugExit(status)) => ExitCode::from(status),
        Ok(VmExit::Reset | VmExit::PowerOff | VmExit::Shutdown) => ExitCode::SUCCESS,
        Ok(VmExit::Error(msg)) => report(Err(format!("the VM stopped: {msg}"))),
        Err(msg) => report(Err(msg)),
    }
}
