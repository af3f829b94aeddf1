//! A scheduler embedding Ninja: run a migration plan and print its events as JSON lines.
//!
//! `cargo run --example run_plan -- PLAN.toml LOG_DIR`

use std::path::Path;
use symvirt::controller::{Controller, Event, Outcome};

fn main() -> Result<(), symvirt::Error> {
    let args: Vec<String> = std::env::args().collect();
    let (plan_path, log_dir) = match args.as_slice() {
        [_, plan, logs] => (plan.clone(), logs.clone()),
        _ => {
            eprintln!("usage: run_plan PLAN.toml LOG_DIR");
            std::process::exit(2);
        }
    };
    let plan = symvirt::plan::load(Path::new(&plan_path))?;
    let sink = |e: &Event| eprintln!("{}", serde_json::to_string(e).unwrap());
    let report = Controller::new(plan, &sink).run_qemu(Path::new(&log_dir))?;
    if !matches!(report.outcome, Outcome::Completed) {
        std::process::exit(3);
    }
    Ok(())
}
