//! `refract demo`: the runtime with the example plugins, fed sample orders
//! and account movements, and queries to try.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use refract::config::Config;
use refract_client::Client;

use super::serve::RunArgs;

/// Run the demo: `args` as for `refract run`, with `events` orders.
pub(crate) fn run(args: RunArgs, events: usize) -> anyhow::Result<()> {
    let mut config: Config = args.config()?;
    if args.data_dir.is_none() && args.config.is_none() {
        config.data_dir = PathBuf::from("refract-demo-data");
    }
    config.streams.partitions.entry("accounts".into()).or_insert(1);
    // The join enricher's routes, unless the configuration has its own.
    config.plugins.entry("orders-payments-join".into()).or_insert_with(|| {
        let routes = "- { types: [OrderReadyForShipment], to: [shipping, notifications] }\n\
                      - { types: [OrderUnpaid], to: [notifications] }";
        refract::config::PluginConfig {
            routes: serde_saphyr::from_str(routes).expect("the demo's routes parse"),
            ..Default::default()
        }
    });
    super::serve::run(config, Some(events))
}

pub(crate) fn ndjson(events: &[serde_json::Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        serde_json::to_writer(&mut out, e).expect("events serialize");
        out.push(b'\n');
    }
    out
}

pub(crate) fn feed(url: &str, n: usize) -> anyhow::Result<()> {
    let token = std::env::var("REFRACT_ADMIN_TOKEN").ok();
    let client = Client::new(url).with_token(token.as_deref());
    let orders = refract_client::fixtures::orders(n, 1, 0.01);
    let accounts = refract_client::fixtures::accounts(n / 2, 1, 0.02);
    let started = Instant::now();
    for (stream, events) in [("orders", &orders), ("accounts", &accounts)] {
        for chunk in events.chunks(2000) {
            let reply = client.append_ndjson(stream, &ndjson(chunk))?;
            if reply.status != 200 {
                bail!("appending to {stream}: {} {}", reply.status, reply.body);
            }
        }
    }
    let caught_up = client.wait_caught_up(Duration::from_secs(120))?;
    // Dead letters per projection, and where to see them: the fixtures carry
    // malformed and out-of-order events on purpose.
    let list = client.get("/v1/projections")?.body;
    let mut dead = String::new();
    for p in list["projections"].as_array().into_iter().flatten() {
        let (name, count) = (p["name"].as_str().unwrap_or_default(), p["deadLetters"].as_u64().unwrap_or(0));
        if count > 0 {
            dead.push_str(&format!("\x20 {name}: {count} — refract dead-letters {name} --url {url}\n"));
        }
    }
    if dead.is_empty() {
        dead.push_str("\x20 none\n");
    }
    let customer = orders[0]["data"]["customerId"].as_str().unwrap_or("c-1");
    let order = orders[0]["key"].as_str().unwrap_or("o-1");
    println!(
        "\nRefract demo: appended {} orders events and {} accounts events; projections {} in {:.1}s.\n\
         Dead letters (events a plugin rejected on purpose: payments for unknown orders, overdrafts, …):\n\
         {dead}\
         \x20 and in the console: {url}/ (Dead letters)\n\
         Try:\n\
         \x20 curl -s {url}/v1/projections | jq\n\
         \x20 curl -s {url}/v1/projections/order-summary/tables/orders/items/{order} | jq\n\
         \x20 curl -s '{url}/v1/projections/order-summary/tables/customer-orders/items?prefix={customer}/' | jq\n\
         \x20 curl -s {url}/v1/projections/account-balance/tables/balances/items/a-1 | jq\n\
         \x20 curl -s '{url}/v1/projections/account-balance/tables/history/items?prefix=a-1/&limit=5' | jq\n\
         \x20 curl -s {url}/v1/projections/order-summary/dead-letters | jq\n\
         \x20 curl -s '{url}/v1/projections/order-search/indexes/orders/search?q=lamp+AND+coffee&sort=total:desc&limit=3' | jq\n\
         \x20 curl -s '{url}/v1/projections/order-search/indexes/orders/search?filter=total:%5B100+TO+*%5D&facets=status&limit=1' | jq\n\
         \x20 curl -s '{url}/v1/projections?kind=enricher' | jq   # orders-payments-join: orders joined with payments\n\
         \x20 curl -s '{url}/v1/projections/shipments/tables/ready/items?limit=3' | jq   # paid orders, from the `shipping` stream\n\
         \x20 echo '{{\"type\":\"OrderPlaced\",\"key\":\"o-new\",\"data\":{{\"orderId\":\"o-new\",\"customerId\":\"c-1\",\"total\":42.5}}}}' \\\n\
         \x20   | curl -s -H 'content-type: application/x-ndjson' --data-binary @- {url}/v1/streams/orders/events\n\
         Press Ctrl-C to stop.\n",
        orders.len(),
        accounts.len(),
        if caught_up { "caught up" } else { "are still catching up" },
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}
