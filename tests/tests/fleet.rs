//! Virtual workers (`flame-worker --virtual N`): one process runs 200
//! trainer identities through the deployment's own path (real NATS, a served
//! engine on the MongoDB-wire server), each registered under its own id and
//! sent its own commands (through one consumer for the group).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::util::{Served, digits_workflow, wait_for_events};

const CLIENTS: usize = 200;
const ROUNDS: u64 = 3;

/// The digits job with `clients` trainers, each on its own slice of the digits.
fn many_clients(clients: usize) -> Value {
    digits_workflow(|wf| {
        let refs: Vec<String> = (0..clients).map(|i| format!("d{i}.json")).collect();
        wf["dataSpec"][0]["datasetGroups"]["default"] = json!(refs);
        wf["datasets"] = refs
            .iter()
            .enumerate()
            .map(|(i, r)| (r.clone(), json!({"name": r, "url": format!("builtin://digits?part={i}&of={clients}"), "realm": "default"})))
            .collect::<serde_json::Map<_, _>>()
            .into();
        wf["modelSpec"]["hyperparameters"]["rounds"] = json!(ROUNDS);
        // A few rows each: small batches, so that each client takes a few steps a round.
        wf["modelSpec"]["hyperparameters"]["epochs"] = json!(3);
        wf["modelSpec"]["hyperparameters"]["batchSize"] = json!(2);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_200_virtual_workers_in_one_process_counts_every_update_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet: Vec<String> =
        ["--id", "sim", "--virtual", &CLIENTS.to_string(), "--roles", "trainer", "--concurrency", "8"].map(String::from).to_vec();
    let agg: Vec<String> = ["--id", "agg", "--roles", "aggregator"].map(String::from).to_vec();
    let served = Served::start_with(dir.path(), &[], &[agg, fleet]).await;
    let job = served.submit(&many_clients(CLIENTS));
    let store = served.store().await;
    let events = wait_for_events(&store, &job, "the job's end", |e| {
        e.iter().any(|e| matches!(e.event_type.as_str(), "JobCompleted" | "JobFailed" | "JobTerminated"))
    })
    .await;
    let of = |kind: &'static str| events.iter().filter(move |e| e.event_type == kind);
    assert_eq!(of("JobCompleted").count(), 1, "the job completed: {:?}", events.last().map(|e| (&e.event_type, &e.payload)));

    // Every trainer task ran on its own virtual worker of the one fleet.
    let expected: BTreeSet<String> = flame_workers::fleet::virtual_ids("sim", CLIENTS).into_iter().collect();
    let placed: BTreeMap<String, String> = of("TaskAssigned")
        .map(|e| {
            (e.payload["task_id"].as_str().unwrap_or_default().to_string(), e.payload["worker_id"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    let trainers: BTreeSet<String> = placed.values().filter(|w| w.starts_with("sim-")).cloned().collect();
    assert_eq!(trainers, expected, "the 200 trainer tasks went to the 200 virtual workers, one each");
    let deployed: u64 = of("TaskDeployed").filter_map(|e| e.payload["samples"].as_u64()).sum();
    assert!(deployed > 0, "the trainers loaded their slices");

    for round in 1..=ROUNDS {
        let updates: Vec<&Value> = of("UpdateReported").map(|e| &e.payload).filter(|p| p["round"] == round).collect();
        let workers: BTreeSet<String> = updates.iter().map(|p| p["worker_id"].as_str().unwrap_or_default().to_string()).collect();
        assert_eq!(updates.len(), CLIENTS, "round {round}: one update per client, none twice");
        assert_eq!(workers, expected, "round {round}: an update from every virtual worker");
        let samples: u64 = updates.iter().filter_map(|p| p["samples"].as_u64()).sum();
        assert_eq!(samples, deployed, "round {round}: the updates carry every training sample once");
        let aggregated: Vec<&Value> = of("RoundAggregated").map(|e| &e.payload).filter(|p| p["round"] == round).collect();
        assert_eq!(aggregated.len(), 1, "round {round} aggregated once");
        let mut inputs: Vec<String> =
            aggregated[0]["inputs"].as_array().expect("inputs").iter().map(|d| d.as_str().unwrap_or_default().to_string()).collect();
        let mut digests: Vec<String> = updates.iter().map(|p| p["digest"].as_str().unwrap_or_default().to_string()).collect();
        inputs.sort();
        digests.sort();
        assert_eq!(inputs, digests, "round {round}: the aggregate took exactly the reported updates");
    }
    assert_eq!(of("ReportRejected").count(), 0, "no report was refused");
    let accuracy: Vec<f64> = of("RoundAggregated").filter_map(|e| e.payload["metrics"]["accuracy"].as_f64()).collect();
    eprintln!("accuracy by round: {accuracy:?}");
    assert!(accuracy[accuracy.len() - 1] > 0.5, "200 clients of a few digits each learn together: accuracy by round {accuracy:?}");
}

/// An aggregate command lists every update of its round: at about 10,000
/// trainers it is larger than a NATS message may be (1 MiB by default). It goes
/// through the object store and arrives whole, to a worker's own inbox and to
/// a group's; the message alone reads, to a worker that predates this, as a
/// command of a kind it does not know (answered `failed`, not left waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_larger_than_a_message_arrives_whole_through_the_object_store() {
    use flame_events::protocol::{Command, CommandBody, UpdateRef};
    use flame_transport::{COMMAND_BLOB_HEADER, COMMAND_STREAM, Nats, Transport};
    use futures::StreamExt;

    let url = crate::util::nats_url();
    let engine = Nats::connect(&url).await.expect("engine");
    let run = uuid::Uuid::now_v7().simple().to_string();
    let run = &run[20..];
    // Enough updates (about 110 bytes each) to pass the server's limit, whatever it is set to.
    let client = async_nats::connect(&url).await.expect("connect");
    let max_payload = client.server_info().max_payload;
    let n = max_payload / 100 + 1_000;
    let updates: Vec<UpdateRef> = (0..n).map(|i| UpdateRef::new(format!("trainer-{i}"), format!("{i:064x}"), 10)).collect();
    let aggregate = |worker: &str| crate::util::aggregate_command(run, worker, format!("{:064x}", 7), updates.clone());
    let (own, member) = (format!("big-{run}-a"), format!("big-{run}-b"));
    let (to_own, to_member) = (aggregate(&own), aggregate(&member));
    assert!(serde_json::to_vec(&to_own).expect("json").len() > max_payload, "the command must not fit in one message");

    engine.send_command(&own, &to_own).await.expect("a large command is sent");
    let mut inbox = engine.command_inbox(&own).await.expect("inbox");
    let got = tokio::time::timeout(std::time::Duration::from_secs(20), inbox.next()).await.expect("in time").expect("open").expect("read");
    assert_eq!(got.message, to_own, "the worker's own inbox gets the whole command");
    got.ack().await.expect("ack");

    engine.send_command(&member, &to_member).await.expect("a large command is sent");
    let mut group = engine.group_inbox(&format!("big-{run}"), &[own.clone(), member.clone()]).await.expect("group inbox");
    // The group's own consumer reads both members' commands, each with the id it is addressed to.
    let mut arrived = Vec::new();
    for _ in 0..2 {
        let got =
            tokio::time::timeout(std::time::Duration::from_secs(20), group.next()).await.expect("in time").expect("open").expect("read");
        arrived.push(got.message.clone());
        got.ack().await.expect("ack");
    }
    assert_eq!(arrived, vec![(own.clone(), to_own.clone()), (member.clone(), to_member)], "a group's inbox gets them whole");

    // What is on the stream: a small message, the command's digest in a header.
    let js = async_nats::jetstream::new(client);
    let raw = js
        .get_stream(COMMAND_STREAM)
        .await
        .expect("stream")
        .get_last_raw_message_by_subject(&format!("flame.cmd.{own}"))
        .await
        .expect("the message");
    assert!(raw.payload.len() < 4096, "{} bytes on the stream", raw.payload.len());
    assert!(raw.headers.get(COMMAND_BLOB_HEADER).is_some(), "the digest header");
    let old = Command::decode(&raw.payload).expect("the head reads");
    assert_eq!(old.id, to_own.id);
    assert!(matches!(&old.body, CommandBody::Unreadable { reason } if reason.contains("in_object_store")), "{:?}", old.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_batches_arrive_whole_and_come_again_until_every_part_is_acknowledged() {
    use flame_events::protocol::{Report, ReportBody};
    use flame_transport::{Nats, Transport};
    use futures::StreamExt;

    let url = crate::util::nats_url();
    let engine = Nats::connect(&url).await.expect("engine");
    let fleet = Nats::connect(&url).await.expect("fleet");
    let run = uuid::Uuid::now_v7().simple().to_string();
    let run = &run[20..];
    let group = format!("g-{run}");
    let members: Vec<String> = (0..3).map(|i| format!("v-{run}-{i}")).collect();
    // Commands: three members' in one batch on the group's subject; each arrives with its worker.
    let commands: Vec<(String, flame_events::protocol::Command)> =
        members.iter().map(|m| (m.clone(), crate::util::aggregate_command(run, m, format!("{:064x}", 1), Vec::new()))).collect();
    engine.send_commands(&group, &commands).await.expect("a batch is sent");
    let mut inbox = fleet.group_inbox(&group, &members).await.expect("group inbox");
    let mut got = Vec::new();
    for _ in 0..3 {
        let d =
            tokio::time::timeout(std::time::Duration::from_secs(20), inbox.next()).await.expect("in time").expect("open").expect("read");
        got.push(d);
    }
    assert_eq!(got.iter().map(|d| d.message.clone()).collect::<Vec<_>>(), commands, "every command, in order, with its worker");
    for d in got {
        d.ack().await.expect("ack");
    }

    // Reports: a batch of two reports of one job; the engine's inbox reads each with the group as its publisher.
    let job = format!("job-{run}");
    let report = |m: &str, round: u32| Report {
        v: flame_events::protocol::VERSION,
        command_id: format!("{job}/r{round}/train/{m}"),
        job_id: job.clone(),
        task_id: format!("trainer-{m}"),
        worker_id: m.to_string(),
        round,
        body: ReportBody::Failed { error: "test".into() },
        via: None,
    };
    let sent = vec![report(&members[0], 1), report(&members[1], 1)];
    fleet.send_reports(&group, &sent).await.expect("a report batch is sent");
    let mut reports = engine.report_inbox(&job).await.expect("report inbox");
    let (first, second) = (read(&mut reports).await, read(&mut reports).await);
    let mut want = sent.clone();
    for r in &mut want {
        r.via = Some(group.clone());
    }
    assert_eq!(vec![first.message.clone(), second.message.clone()], want);
    // One part acknowledged, the other not: after the ack wait (3 s) the batch comes again whole.
    first.ack().await.expect("ack");
    drop(second);
    let (again1, again2) = (read(&mut reports).await, read(&mut reports).await);
    assert_eq!(vec![again1.message.clone(), again2.message.clone()], want, "the whole batch again");
    again1.ack().await.expect("ack");
    again2.ack().await.expect("ack");
    // Both acknowledged: nothing more comes.
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(5), reports.next()).await.is_err(),
        "a batch acknowledged whole is not delivered again"
    );
}

/// The next delivery of an inbox, within 20 s.
async fn read<T>(inbox: &mut flame_transport::Inbox<T>) -> flame_transport::Delivery<T> {
    use futures::StreamExt;
    tokio::time::timeout(std::time::Duration::from_secs(20), inbox.next()).await.expect("in time").expect("open").expect("read")
}
