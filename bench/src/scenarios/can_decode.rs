//! `can-decode`: frames decoded per second per core for a realistic DBC,
//! from the CAN crate's own benchmark (`crates/can/examples/decode_bench.rs`),
//! run here so its figures land with the others.

use std::process::Command;

use anyhow::Context;

use crate::report::ScenarioResult;
use crate::Ctx;

pub async fn run(ctx: &Ctx) -> anyhow::Result<ScenarioResult> {
    let mut result = ctx.result("can-decode");
    let seconds = if ctx.quick { "0.2" } else { "3" };
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(&ctx.workspace).args(["run", "--quiet"]);
    if !ctx.quick {
        command.arg("--release");
    }
    command.args([
        "-p",
        "edgefleet-can",
        "--example",
        "decode_bench",
        "--",
        seconds,
    ]);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await?
        .context("running the CAN decode benchmark")?;
    anyhow::ensure!(
        output.status.success(),
        "decode_bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let mut found = false;
    // The example's closing `RESULT` line repeats decode_into's rate for
    // people reading its output; the table has it already.
    for line in text.lines().filter(|l| !l.starts_with("RESULT")) {
        let (unit, figure_unit) = if line.contains(" frames/s") {
            (" frames/s", "frames/s")
        } else if line.contains(" lines/s") {
            (" lines/s", "lines/s")
        } else {
            continue;
        };
        let Some((before, _)) = line.split_once(unit) else {
            continue;
        };
        let Some((name, number)) = before.trim_end().rsplit_once(char::is_whitespace) else {
            continue;
        };
        let Ok(value) = number.parse::<f64>() else {
            continue;
        };
        let name = name.trim();
        if figure_unit == "lines/s" {
            result.figure(name, value, "lines/s");
            continue;
        }
        found = true;
        if name.starts_with("decode_into") {
            result.target(
                &format!("{name}, per core"),
                value,
                "frames/s",
                "≥ 2,000,000",
                value >= 2e6,
            );
        } else {
            result.figure(&format!("{name}, per core"), value, "frames/s");
        }
    }
    anyhow::ensure!(found, "no figures in decode_bench's output:\n{text}");
    if let Some(mix) = text.lines().find(|l| l.starts_with("vehicle.dbc")) {
        result.note(mix.to_string());
    }
    result.note("Per CPU-second of the decoding thread (from /proc/thread-self/schedstat), so other load on the machine does not distort it.");
    if ctx.quick {
        result.note("--quick: an unoptimised build for 0.2 s per variant; not a figure.");
    }
    Ok(result)
}
