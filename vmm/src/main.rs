use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use nvmm::cli::{BenchCommand, Cli, Command, Refusal, Run, RunArgs};
use nvmm::vcpu::VmExit;

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => match nvmm::cli::refusal(&e) {
            Refusal::Print(text) => {
                // A reader that stops early (`nvmm --help | head`) is not an error of ours.
                let _ = std::io::stdout().lock().write_all(text.as_bytes());
                return ExitCode::SUCCESS;
            }
            Refusal::Error(msg) => return report(Err(msg)),
        },
    };
    nvmm::logger::init(cli.log_level);
    nvmm::logger::install_panic_hook();
    let status = match cli.command {
        None => run(cli.run, start),
        Some(Command::Check { json }) => check(json),
        Some(Command::Bench { what: BenchCommand::Exits(args) }) => report(nvmm::bench::exits(args)),
        Some(Command::Ctl { socket, command }) => report(ctl(&socket, &command)),
        Some(Command::SnapshotInfo { dir }) => report(snapshot_info(&dir)),
    };
    nvmm::logger::report_suppressed();
    status
}

fn snapshot_info(dir: &std::path::Path) -> Result<(), String> {
    let info = nvmm::snapshot::info(dir).map_err(|e| e.to_string())?;
    println!("{}", serde_json::to_string_pretty(&info).map_err(|e| e.to_string())?);
    Ok(())
}

/// Prints the server's JSON answer; a server error or a missing socket is the one-line failure.
fn ctl(socket: &std::path::Path, command: &nvmm::api::client::Command) -> Result<(), String> {
    let answer = nvmm::api::client::call(socket, command).map_err(|e| e.to_string())?;
    // A reader that stops early is not an error of ours.
    let _ = writeln!(std::io::stdout().lock(), "{answer}");
    Ok(())
}

/// One line on stderr for any failure, and a nonzero status.
fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            nvmm::logger::write_stderr(&format!("nvmm: error: {msg}\n"));
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

/// The guest's own status when it asked for one through the debug-exit port; after an orderly
/// stop on SIGTERM or SIGINT, the status shells report for that signal; else 0 or the error.
fn run(args: RunArgs, start: Instant) -> ExitCode {
    let result = args.into_run().map_err(|e| e.to_string()).and_then(|run| {
        match run {
            Run::Boot(config) => nvmm::builder::build_and_run(&config, start),
            Run::Restore(restore) => nvmm::builder::restore_and_run(&restore, start),
        }
        .map_err(|e| e.to_string())
    });
    match result {
        Ok(VmExit::DebugExit(status)) => ExitCode::from(status),
        Ok(VmExit::Reset | VmExit::PowerOff | VmExit::Shutdown) => {
            nvmm::signals::received().map_or(ExitCode::SUCCESS, |sig| ExitCode::from(nvmm::signals::exit_status(sig)))
        }
        Ok(VmExit::Error(msg)) => report(Err(format!("the VM stopped: {msg}"))),
        Err(msg) => report(Err(msg)),
    }
}
