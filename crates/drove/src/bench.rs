//! Benchmarks that print figures.
use anyhow::Result;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {}

pub async fn run(c: BenchCommand) -> Result<()> {
    match c {}
}
