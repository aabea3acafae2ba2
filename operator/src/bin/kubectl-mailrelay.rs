//! `kubectl-mailrelay`: the kubectl plugin (`kubectl mailrelay status|diagnose|queue|logs`); a
//! thin entry point over [`mailrelay_operator::plugin`].

use std::process::ExitCode;

use clap::Parser;
use mailrelay_operator::plugin::{self, Cli};

fn main() -> ExitCode {
    let code = plugin::main(Cli::parse());
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
