//! `kubectl hookfleet`: a kubectl plugin (any `kubectl-hookfleet` on the PATH) for day-2 work on hookfleet.
//!
//! - `status`: Integrations with their conditions, workers, consumers and backlog, and the Webhooks that are
//!   not delivering, from the API server (the current kubeconfig context);
//! - `replay NAME`: dead letters of an Integration back into its work queue (`replay` module);
//! - `test-delivery NAME`: one request sent from a pod made from the worker Deployment, the way the workers
//!   send it (`test_delivery` module).

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hookfleet_crds::contract::{Pod, WorkerSetup};
use hookfleet_crds::{Integration, Webhook};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

mod replay;
mod test_delivery;

#[derive(Parser, Debug)]
#[command(
    name = "kubectl hookfleet",
    version,
    about = "Day-2 commands for hookfleet Integrations and Webhooks"
)]
struct Args {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Integrations (Ready, workers, consumers, backlog, what is wrong) and the Webhooks not delivering.
    Status {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Dead letters of Integration NAME back into its work queue, attempts reset, ids kept.
    Replay {
        /// The Integration.
        name: String,
        /// Only dead letters with this reason (attempts_exhausted, too_large, http_status, delivery_limit, …).
        #[arg(long)]
        reason: Option<String>,
        /// Only the copies for this Webhook.
        #[arg(long)]
        webhook: Option<String>,
        /// At most this many messages per second.
        #[arg(long)]
        rate: Option<f64>,
        /// At most this many messages.
        #[arg(long)]
        limit: Option<u64>,
        /// Count what would be replayed, move nothing.
        #[arg(long)]
        dry_run: bool,
        /// The broker URI to use instead of the Integration's connection Secret (whose address may be
        /// reachable from the cluster only; e.g. through `kubectl port-forward`).
        #[arg(long, env = "HOOKFLEET_BROKER_URI", hide_env_values = true)]
        broker_uri: Option<String>,
    },
    /// One request to Integration NAME's destination (or one of its Webhooks), sent from a pod made from its
    /// worker Deployment the way the workers send it; prints request, answer and what a worker would do.
    /// Exit code: 0 delivered (2xx), 6 retry, 7 dead-letter, 5 gone (410), 2 invalid worker configuration,
    /// 1 nothing sent.
    TestDelivery {
        /// The Integration.
        name: String,
        /// The Webhook to deliver to (an Integration with Webhooks; else the one --event matches).
        #[arg(long)]
        webhook: Option<String>,
        /// Event name: the test message's routing key (and the event-name header, when one is configured).
        #[arg(long)]
        event: Option<String>,
        /// The test message's body (default `{}`).
        #[arg(long)]
        body: Option<String>,
        /// A file holding the body.
        #[arg(long, conflicts_with = "body")]
        body_file: Option<std::path::PathBuf>,
        /// NAME=VALUE: a header of the test message, as a publisher sets it (Webhook header matches, the
        /// event-name header, traceparent); repeatable. The request's HTTP headers are the destination's.
        #[arg(long = "header", value_parser = hookfleet_crds::contract::test_delivery::header)]
        headers: Vec<(String, String)>,
        /// How long to wait for the pod to run and the answer (Go duration).
        #[arg(long, default_value = "60s", value_parser = hookfleet_crds::duration::parse)]
        timeout: std::time::Duration,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The exit code.
async fn run(args: Args) -> Result<i32> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes client (kubeconfig)")?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    match args.command {
        Command::Status { all_namespaces } => {
            status(&client, (!all_namespaces).then_some(ns.as_str())).await?;
            Ok(0)
        }
        Command::TestDelivery {
            name,
            webhook,
            event,
            body,
            body_file,
            headers,
            timeout,
        } => {
            let options = test_delivery::Options {
                integration: name,
                test: hookfleet_crds::contract::test_delivery::TestDeliveryArgs {
                    webhook,
                    event,
                    body: test_delivery::body(body, body_file.as_deref())?,
                    headers,
                },
                timeout,
            };
            test_delivery::run(&client, &ns, &options).await
        }
        Command::Replay {
            name,
            reason,
            webhook,
            rate,
            limit,
            dry_run,
            broker_uri,
        } => {
            let api: Api<Integration> = Api::namespaced(client.clone(), &ns);
            let intg = api
                .get_opt(&name)
                .await?
                .with_context(|| format!("no Integration {ns}/{name}"))?;
            let source = &intg.spec.source;
            // The dead-letter queue (or subject) as the operator renders it for the workers.
            let dead = WorkerSetup::from_spec(&intg.spec, &Pod::any())
                .args
                .dead_letter_queue
                .context("the worker contract names no dead-letter queue")?;
            if let Some(n) = &source.nats {
                bail!(
                    "{ns}/{name} reads NATS JetStream stream {}: replay moves RabbitMQ dead letters only; its dead \
                     letters are in the stream that captures {dead} (created by the workers as {}-dead) and can be \
                     republished to the work stream's subjects with the nats CLI",
                    n.stream,
                    source.queue
                );
            }
            let uri = match broker_uri {
                Some(u) => u,
                None => {
                    let r = &source.connection_secret_ref;
                    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
                    let secret = secrets.get(&r.name).await.with_context(|| {
                        format!("Secret {ns}/{} (spec.source.connectionSecretRef)", r.name)
                    })?;
                    let value = secret
                        .data
                        .as_ref()
                        .and_then(|d| d.get(&r.key))
                        .with_context(|| format!("Secret {ns}/{} has no key {}", r.name, r.key))?;
                    let text = String::from_utf8(value.0.clone()).context("the broker URI is not UTF-8")?;
                    // A list (one URI per cluster node): the first.
                    text.split(',').next().unwrap_or_default().trim().to_owned()
                }
            };
            let options = replay::Options {
                filter: replay::Filter { reason, webhook },
                rate,
                limit,
                dry_run,
            };
            let r = replay::replay(&uri, &dead, &source.queue, &options).await?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!(
                "{ns}/{name}: {} dead letters in {dead} at start, {} examined, {} matched, {verb} {} into {}",
                r.at_start,
                r.examined,
                r.matched,
                if dry_run { r.matched } else { r.replayed },
                source.queue
            );
            Ok(0)
        }
    }
}

fn cond(c: Option<&Condition>) -> (&str, &str, &str) {
    c.map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
        .unwrap_or(("Unknown", "", ""))
}

fn num<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

async fn status(client: &Client, ns: Option<&str>) -> Result<()> {
    let (integrations, webhooks): (Api<Integration>, Api<Webhook>) = match ns {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let list = integrations.list(&ListParams::default()).await?.items;
    if list.is_empty() {
        bail!(
            "no Integrations{}",
            ns.map(|n| format!(" in {n}")).unwrap_or_default()
        );
    }
    println!(
        "{:<32} {:<6} {:<26} {:>8} {:>10} {:>9} {:>8}",
        "INTEGRATION", "READY", "REASON", "WORKERS", "READY-PODS", "CONSUMERS", "BACKLOG"
    );
    let mut problems = Vec::new();
    for i in &list {
        let id = format!("{}/{}", i.namespace().unwrap_or_default(), i.name_any());
        let (ready, reason, _) = cond(i.condition("Ready"));
        let s = i.status.clone().unwrap_or_default();
        println!(
            "{:<32} {:<6} {:<26} {:>8} {:>10} {:>9} {:>8}",
            id,
            ready,
            reason,
            num(s.replicas),
            num(s.ready_replicas),
            num(s.consumers),
            num(s.backlog)
        );
        let (degraded, reason, message) = cond(i.condition("Degraded"));
        if degraded == "True" {
            problems.push(format!("{id}: Degraded/{reason}: {message}"));
        }
        for e in &s.excluded_nodes {
            problems.push(format!(
                "{id}: workers kept off node {} since {}",
                e.node, e.since.0
            ));
        }
    }
    let hooks = match webhooks.list(&ListParams::default()).await {
        Ok(l) => l.items,
        // The Webhook CRD is optional (an Integration without webhooks needs none).
        Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut states: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut troubled = Vec::new();
    for w in &hooks {
        let key = format!("{}/{}", w.namespace().unwrap_or_default(), w.spec.integration);
        let (ready, reason, message) = cond(w.condition("Ready"));
        let state = if ready == "True" {
            "Ready".to_owned()
        } else {
            reason.to_owned()
        };
        *states.entry(key).or_default().entry(state).or_default() += 1;
        // A suspended fleet's Webhooks wait by design: counted above, not listed.
        if ready != "True" && reason != "FleetSuspended" {
            troubled.push(format!(
                "  {}/{}: {reason}: {message}",
                w.namespace().unwrap_or_default(),
                w.name_any()
            ));
        }
    }
    if !states.is_empty() {
        println!("\nWebhooks by Integration and state:");
        for (intg, by) in &states {
            let parts: Vec<String> = by.iter().map(|(s, n)| format!("{s} {n}")).collect();
            println!("  {intg}: {}", parts.join(", "));
        }
    }
    if !troubled.is_empty() {
        println!("\nWebhooks not delivering:");
        for t in troubled.iter().take(50) {
            println!("{t}");
        }
        if troubled.len() > 50 {
            println!("  … and {} more", troubled.len() - 50);
        }
    }
    if !problems.is_empty() {
        println!("\nProblems:");
        for p in &problems {
            println!("  {p}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("kubectl-hookfleet").chain(argv.iter().copied()))
    }

    #[test]
    fn the_command_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn test_delivery_arguments() {
        let a = parse(&[
            "test-delivery",
            "orders",
            "-n",
            "team-a",
            "--webhook",
            "acme",
            "--event",
            "temp/basement",
            "--body",
            r#"{"t": 21}"#,
            "--header",
            "device=d-1",
            "--header",
            "x=a=b",
            "--timeout",
            "30s",
        ])
        .unwrap();
        assert_eq!(a.namespace.as_deref(), Some("team-a"));
        let Command::TestDelivery {
            name,
            webhook,
            event,
            body,
            body_file,
            headers,
            timeout,
        } = a.command
        else {
            panic!("not test-delivery: {:?}", a.command);
        };
        assert_eq!(
            (
                name.as_str(),
                webhook.as_deref(),
                event.as_deref(),
                body.as_deref(),
                body_file
            ),
            (
                "orders",
                Some("acme"),
                Some("temp/basement"),
                Some(r#"{"t": 21}"#),
                None
            )
        );
        assert_eq!(
            headers,
            [("device".into(), "d-1".into()), ("x".into(), "a=b".into())]
        );
        assert_eq!(timeout, std::time::Duration::from_secs(30));
        // Defaults: a minute, no body (the worker sends `{}`).
        let Command::TestDelivery { timeout, body, .. } =
            parse(&["test-delivery", "orders"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!((timeout, body), (std::time::Duration::from_secs(60), None));
        for bad in [
            &["test-delivery", "orders", "--body", "{}", "--body-file", "b.json"][..],
            &["test-delivery", "orders", "--header", "no-equals"],
            &["test-delivery", "orders", "--timeout", "soon"],
            &["test-delivery"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
