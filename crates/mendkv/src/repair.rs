//! `mendkv repair`: starts an anti-entropy run on one node and follows it with a progress bar
//! (ranges, keys, bytes, ETA), then prints a summary. Exit status 1 when the run failed.

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mendkv_client::Client;
use std::time::Duration;

pub async fn run(client: Client, bucket: Option<&str>, no_wait: bool) -> Result<()> {
    let id = client.start_repair_of(bucket).await?;
    if no_wait {
        println!("{id}");
        return Ok(());
    }
    let bar = ranges_bar();
    let status = loop {
        let status = client.repair_status(id).await?;
        let number = |name: &str| status[name].as_u64().unwrap_or(0);
        bar.set_length(number("ranges_total"));
        bar.set_position(number("ranges_done"));
        bar.set_message(format!(
            "{} keys compared, {} different, {} repaired, {} B sent, {} B received",
            number("keys_compared"),
            number("keys_different"),
            number("keys_repaired"),
            number("bytes_sent"),
            number("bytes_received")
        ));
        if status["state"] != "running" {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    let number = |name: &str| status[name].as_u64().unwrap_or(0);
    println!(
        "repair {id} {}: {} ranges compared, {} keys compared, {} different, {} repaired, {} B sent, {} B received, {} ms",
        status["state"].as_str().unwrap_or("?"),
        number("ranges_done"),
        number("keys_compared"),
        number("keys_different"),
        number("keys_repaired"),
        number("bytes_sent"),
        number("bytes_received"),
        number("elapsed_ms")
    );
    if status["state"] == "failed" {
        bail!("repair {id} failed: some exchanges did not complete (a peer down?); run it again");
    }
    Ok(())
}

/// The progress bar of the commands that follow ranges on a node (`repair`, `decommission`,
/// `remove-node`): ranges done of total, a message, the ETA.
pub(crate) fn ranges_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} ranges  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}
