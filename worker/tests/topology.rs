//! The queues a real worker declares on a real RabbitMQ are exactly the contract's
//! `WorkerArgs::declared_queues` for its arguments: the set the operator deletes for
//! `deletionPolicy: Delete` (`operator/src/core/deletion.rs`), so it can never miss one or take another.

mod common;

use std::collections::BTreeSet;

use anyhow::Result;
use clap::Parser;
use common::*;
use hookfleet_crds::contract::WorkerArgs;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::process::free_port;
use hookfleet_testkit::sink::Sink;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_declares_exactly_the_contracts_queues() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    let extra = [
        "--backoff-initial",
        "200ms",
        "--backoff-max",
        "3s",
        "--dead-letter-queue",
        "topo.parked",
    ];
    let _w = start_worker(&rmq, "topo.q", &sink.url(), &extra, &[], dir.path(), "worker").await?;
    let names = rmq.ctl(&["list_queues", "-q", "--no-table-headers", "name"])?;
    let declared: BTreeSet<String> = names
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with("topo."))
        .map(str::to_owned)
        .collect();
    let mut args = vec!["hookfleet-worker".to_owned()];
    args.extend(base_args(&rmq, "topo.q", &sink.url(), free_port()?, dir.path()));
    args.extend(extra.iter().map(|s| s.to_string()));
    let contract: BTreeSet<String> = WorkerArgs::try_parse_from(&args)?
        .declared_queues()
        .into_iter()
        .collect();
    eprintln!("declared by the worker: {declared:?}");
    assert!(contract.contains("topo.parked") && contract.contains("topo.q.delay.3000ms"));
    assert_eq!(declared, contract);
    Ok(())
}
