//! `mendkv decommission` and `mendkv remove-node`: start a cluster change on a node and
//! follow it with a progress bar (ranges, keys, bytes, ETA) until it is done, in the style
//! of `mendkv repair`.

use anyhow::{anyhow, Result};
use mendkv_client::Client;
use std::time::Duration;

pub async fn decommission(client: Client, no_wait: bool) -> Result<()> {
    let started = client.decommission().await?;
    let node = started["node"]
        .as_str()
        .ok_or_else(|| anyhow!("bad answer: {started}"))?
        .to_string();
    follow(&client, &node, started, no_wait, "left").await
}

pub async fn remove_node(client: Client, id: &str, no_wait: bool) -> Result<()> {
    let started = client.remove_node(id).await?;
    follow(&client, id, started, no_wait, "left").await
}

/// Polls `/admin/membership/{node}` until the node reaches `target` (with no change left).
async fn follow(
    client: &Client,
    node: &str,
    first: serde_json::Value,
    no_wait: bool,
    target: &str,
) -> Result<()> {
    if no_wait {
        println!("{}", serde_json::to_string_pretty(&first)?);
        return Ok(());
    }
    let bar = crate::repair::ranges_bar();
    let mut status = first;
    loop {
        let number = |name: &str| status[name].as_u64().unwrap_or(0);
        bar.set_length(number("ranges_total"));
        bar.set_position(number("ranges_done"));
        bar.set_message(format!(
            "{} {}, {} keys, {} B streamed{}",
            status["change"].as_str().unwrap_or("change"),
            status["phase"].as_str().unwrap_or("?"),
            number("keys_streamed"),
            number("bytes_streamed"),
            status["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ));
        if status["state"] == target && status["change"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        status = client.membership(node).await?;
    }
    bar.finish_and_clear();
    println!(
        "{node} is {target} after {} ms",
        status["elapsed_ms"].as_u64().unwrap_or(0)
    );
    Ok(())
}
