//! `make chaos`: the chaos soak on 3 real nodes and a 3-node RabbitMQ cluster (root), a report at the end
//! (see `hookfleet_e2e::chaos` and docs/faults.md). Knobs: `HOOKFLEET_CHAOS_MINUTES` (30),
//! `HOOKFLEET_CHAOS_SEED` (from the clock; printed), `HOOKFLEET_CHAOS_RATE` (50 messages/s),
//! `HOOKFLEET_CHAOS_SETTLE_SECS` (600), `HOOKFLEET_CHAOS_KEEP` (keep logs even when nothing is lost).
//! Exits 1 when a message was lost, 2 when the run itself failed.

use hookfleet_e2e::chaos::{self, Options};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    hookfleet_e2e::init_tracing();
    let outcome = match Options::from_env() {
        Ok(o) => chaos::run(&o).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(o) if o.lost == 0 => {}
        Ok(_) => std::process::exit(1),
        Err(e) => {
            eprintln!("hookfleet-chaos: {e:#}");
            std::process::exit(2);
        }
    }
}
