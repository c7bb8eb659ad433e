//! tweedctl: tweed's container runtime CLI. All logic is in the library; see `cli.rs`.

mod cli;
mod netcli;

fn main() {
    std::process::exit(cli::main());
}
