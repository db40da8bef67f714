//! Measures the candidate chains of `configs/strategies/` against the baseline on the
//! `process` workload and prints the table of `docs/strategies.md`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use phoenix_bench::strategies::{evaluate, Fleet, PROTECTED};

#[derive(Parser)]
#[command(about = "Evaluate candidate chains (strategies) on the process workload")]
struct Args {
    /// Agent configs whose `candidate` pipeline is evaluated.
    #[arg(default_values = [
        "configs/strategies/process-conservative.yaml",
        "configs/strategies/process-balanced.yaml",
        "configs/strategies/process-aggressive.yaml",
    ])]
    configs: Vec<PathBuf>,
    #[arg(long, default_value_t = 20)]
    hosts: usize,
    #[arg(long, default_value_t = 300)]
    processes: usize,
    /// Scrape rounds (10 s windows), the first `--warm-up` of them not measured.
    #[arg(long, default_value_t = 18)]
    rounds: usize,
    #[arg(long, default_value_t = 3)]
    warm_up: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let fleet = Fleet {
        seed: 1,
        hosts: args.hosts,
        processes: args.processes,
        rounds: args.rounds,
        warm_up: args.warm_up,
    };
    println!(
        "| strategy | series / 10 s window | data points / s | bytes / s | process.cpu.time increase | process.memory.usage sum | protected processes with own series |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut first = true;
    for path in &args.configs {
        let report = evaluate(path, fleet, PROTECTED)?;
        if first {
            println!(
                "| baseline | {:.0} | {:.0} | {:.0} | {:.1} s | {:.0} B | all |",
                report.baseline.series,
                report.baseline.points_per_s,
                report.baseline.bytes_per_s,
                report.cpu_in,
                report.memory_in
            );
            first = false;
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        println!(
            "| {name} | {:.0} (−{:.1}%) | {:.0} (−{:.1}%) | {:.0} (−{:.1}%) | {:.1} s (error {:.4}%) | {:.0} B (error {:.4}%) | {} of {} |",
            report.candidate.series,
            100.0 * report.series_reduction(),
            report.candidate.points_per_s,
            100.0 * report.points_reduction(),
            report.candidate.bytes_per_s,
            100.0 * report.bytes_reduction(),
            report.cpu_out,
            100.0 * report.cpu_error(),
            report.memory_out,
            100.0 * report.memory_error(),
            report.protected_kept,
            report.protected,
        );
    }
    Ok(())
}
