//! `ninja-migrate`: the command line of Ninja.

fn main() {
    eprintln!("ninja-migrate: no subcommands yet");
    std::process::exit(2);
}
