//! The least vhost permissions a worker needs (managed topology: it declares its queues), checked with a
//! RabbitMQ user that has exactly those, on a real node and the real worker binary: `configure` and `read`
//! on the Integration's queues (`^<queue>(\..*)?$`), `write` on the default exchange only (`amq.default`,
//! through which retries and dead letters are published; dead-lettering from a delay queue is the broker's). With them, messages that fail
//! once come back through the delay and retry-ready queues and are delivered, and oversized ones are
//! dead-lettered. Without any one of the three the worker stays unready, and its log names the refusal
//! (ACCESS_REFUSED with the queue or exchange: declaring a delay queue, which dead-letters, checks `write`
//! on the default exchange and `read` on the queue) instead of failing later. docs/worker.md, "Broker
//! permissions".

mod common;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Result, ensure};
use common::*;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::sink::{Mode, Sink};

const QUEUE: &str = "perm.orders";
const CONFIGURE: &str = r"^perm\.orders(\..*)?$";
const WRITE: &str = r"^amq\.default$";
const READ: &str = r"^perm\.orders(\..*)?$";

fn user_uri(rmq: &RabbitMq, user: &str) -> String {
    rmq.amqp_uri()
        .replacen("guest:guest", &format!("{user}:{user}"), 1)
}

fn add_user(rmq: &RabbitMq, user: &str, perms: [&str; 3]) -> Result<()> {
    rmq.ctl(&["add_user", user, user])?;
    rmq.ctl(&["set_permissions", "-p", "/", user, perms[0], perms[1], perms[2]])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_exactly_the_documented_permissions_delivers_retries_and_dead_letters() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let rmq = RabbitMq::start().await?;
    let sink = Sink::start().await?;
    add_user(&rmq, "hooks", [CONFIGURE, WRITE, READ])?;
    let dir = tempfile::tempdir()?;
    let uri = user_uri(&rmq, "hooks");
    ensure!(uri.contains("hooks:hooks@"), "user URI: {uri}");
    // Every other request fails (503): about half the messages take the retry path (delay queue, then the
    // retry-ready queue), some more than once.
    sink.set_mode(Mode::flaky(503, 1, Duration::ZERO));
    let url = format!("{}/hooks", sink.url().trim_end_matches('/'));
    let w = start_worker_uri(
        &uri,
        QUEUE,
        &url,
        &["--backoff-initial", "200ms", "--max-message-bytes", "1024"],
        &[],
        dir.path(),
        "worker",
    )
    .await?;
    let ids = ids("perm", 100);
    publish_existing(&rmq, QUEUE, &ids).await?;
    let big: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("big-{i}"), vec![b'x'; 4096])).collect();
    publish_bodies(&rmq, QUEUE, &big).await?;
    let want: HashSet<String> = ids.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;
    let mut dead = Vec::new();
    for _ in 0..40 {
        dead.extend(drain(&rmq, &hookfleet_crds::contract::queues::dead_letter(QUEUE)).await?);
        if dead.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ensure!(
        dead.len() == 5,
        "{} of 5 oversized messages dead-lettered",
        dead.len()
    );
    let retried = sink
        .attempts()
        .iter()
        .filter(|(id, a)| want.contains(*id) && a.len() >= 2)
        .count();
    println!("least permissions: 100 delivered ({retried} after a retry), 5 oversized dead-lettered");
    ensure!(retried >= 20, "only {retried} of 100 took the retry path");
    drop(w);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_missing_permission_leaves_the_worker_unready_and_says_what_was_refused() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let url = "http://127.0.0.1:9/hooks";
    for (user, perms, refused) in [
        ("noconfigure", ["^$", WRITE, READ], "queue 'perm.orders'"),
        ("nowrite", [CONFIGURE, "^$", READ], "exchange 'amq.default'"),
        ("noread", [CONFIGURE, WRITE, "^$"], "queue 'perm.orders"),
    ] {
        add_user(&rmq, user, perms)?;
        let port = hookfleet_testkit::process::free_port()?;
        let mut args = base_args_uri(&user_uri(&rmq, user), QUEUE, url, port, dir.path());
        args.push("--queue-type".into());
        args.push("classic".into());
        let log = dir.path().join(format!("{user}.log"));
        let process = hookfleet_testkit::process::Process::spawn(user, &worker_bin(), &args, &[], &log)?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (status, _) = http_get(port, "/readyz").await?;
        let text = std::fs::read_to_string(&log)?;
        drop(process);
        ensure!(
            status != 200,
            "{user}: the worker is ready without its permission"
        );
        ensure!(
            text.contains("ACCESS_REFUSED") && text.contains(refused),
            "{user}: the log does not name the refusal ({refused}):\n{text}"
        );
    }
    Ok(())
}
