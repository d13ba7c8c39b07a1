//! Times sending commands through JetStream with many worker consumers:
//! `cargo run --release -p flame-transport --example command_rate -- nats://127.0.0.1:4222 1000`.
//! For 0 and N consumers (one per worker, as `command_inbox` makes them),
//! sends one command to each of N workers with 64, 256 and N in flight and
//! prints the milliseconds for all N.
use std::time::Instant;

use flame_events::protocol::{Command, CommandBody};
use flame_transport::{Nats, Transport};
use futures::StreamExt;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let nats = Nats::connect(&args[1]).await.expect("connect");
    let run = std::process::id();
    for consumers in [false, true] {
        let ids: Vec<String> = (0..n).map(|i| format!("rate-{run}-{consumers}-{i}")).collect();
        let mut inboxes = Vec::new();
        if consumers {
            let t = Instant::now();
            for id in &ids {
                inboxes.push(nats.command_inbox(id).await.expect("inbox"));
            }
            println!("{n} consumers made in {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);
        }
        for (pass, in_flight) in [64, 256, n].into_iter().enumerate() {
            let commands: Vec<(String, Command)> = ids
                .iter()
                .map(|id| {
                    let command = Command {
                        v: 1,
                        id: format!("job/{pass}/{id}"),
                        job_id: "job".into(),
                        task_id: id.clone(),
                        round: 1,
                        body: CommandBody::Deploy { role: "trainer".into(), dataset: Some("x".repeat(300)) },
                        traceparent: None,
                    };
                    (id.clone(), command)
                })
                .collect();
            let t = Instant::now();
            let sent: Vec<_> =
                futures::stream::iter(&commands).map(|(id, c)| nats.send_command(id, c)).buffer_unordered(in_flight).collect().await;
            if let Some(Err(e)) = sent.iter().find(|r| r.is_err()) {
                panic!("{e}");
            }
            println!(
                "{} consumers, {n} commands, {in_flight} in flight: {:.0} ms",
                if consumers { n } else { 0 },
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
        drop(inboxes);
    }
}
