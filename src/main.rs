//! The `warden` binary: parses the command line and hands over to the library.

use clap::Parser;

fn main() {
    let code = warden::cli::main(warden::cli::Cli::parse());
    std::process::exit(code);
}
