//! Large blobs through the JetStream object store: a download cut short goes
//! on from where it stopped, in a later reader with the same folder (a worker
//! killed and started again), and still yields the blob's own bytes.

use std::sync::{Arc, Mutex};

use flame_transport::blob::{BlobStore, NatsBlobs, digest};
use flame_transport::download::{Downloads, Progress};

/// Bytes that differ from run to run (a blob of this run's own).
fn noise(len: usize, seed: &str) -> Vec<u8> {
    let mut state = u64::from_str_radix(&digest(seed.as_bytes())[..16], 16).expect("hex") | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Reads `d` through `blobs` and drops the read once `cut_at` bytes are on disk, as a kill would.
async fn read_until_cut(blobs: &NatsBlobs, d: &str, seen: tokio::sync::watch::Receiver<u64>, cut_at: u64) {
    let mut seen = seen;
    tokio::select! {
        biased;
        _ = seen.wait_for(|done| *done >= cut_at) => {}
        got = blobs.get(d) => panic!("the read finished before it could be cut short ({} bytes)", got.map(|b| b.len()).unwrap_or(0)),
    }
}

/// The mark once the cut read's writer has finished what it was given (the
/// chunks it had received are written in a thread that a dropped read does
/// not stop at once; a killed process stops it with everything else).
async fn settled_mark(marks: &Downloads, d: &str) -> flame_transport::download::Mark {
    let mut last = None;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = marks.mark(d);
        if let Some(mark) = &now
            && now == last
        {
            return mark.clone();
        }
        last = now;
    }
}

fn watching() -> (flame_transport::download::Observer, tokio::sync::watch::Receiver<u64>, Arc<Mutex<Vec<Progress>>>) {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let told = Arc::new(Mutex::new(Vec::new()));
    let keep = told.clone();
    let observer: flame_transport::download::Observer = Arc::new(move |p: &Progress| {
        keep.lock().expect("told").push(p.clone());
        tx.send_replace(p.done);
    });
    (observer, rx, told)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_short_goes_on_from_its_last_checkpoint_and_yields_the_same_digest() {
    let url = crate::util::nats_url();
    let js = async_nats::jetstream::new(crate::util::connect(&url).await);
    let engine = NatsBlobs::new(&js).await.expect("object store");
    let model = noise(24 << 20, &crate::util::unique());
    let size = model.len() as u64;
    let d = engine.put(model.clone()).await.expect("stored");
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("downloads");
    let marks = Downloads::new(&folder, None).expect("folder");

    // A reader cut short a quarter of the way leaves a part and a mark that says how far it is good.
    let (observer, seen, _) = watching();
    let first = NatsBlobs::new(&js).await.expect("blobs").resuming_in(&folder, Some(observer)).expect("downloads");
    read_until_cut(&first, &d, seen, size / 4).await;
    drop(first);
    let mark = settled_mark(&marks, &d).await;
    assert!(mark.bytes > 0 && mark.bytes < size, "cut short mid-way: {mark:?} of {size}");
    assert_eq!(mark.bytes % (128 << 10), 0, "whole chunks: {mark:?}");
    let part_len = std::fs::metadata(marks.part(&d)).expect("the part").len();
    assert!(part_len >= mark.bytes, "the part holds at least what its mark says: {part_len} < {mark:?}");

    // A new reader on the same folder (the worker started again) reads only the rest.
    let (observer, _, told) = watching();
    let second = NatsBlobs::new(&js).await.expect("blobs").resuming_in(&folder, Some(observer)).expect("downloads");
    let got = second.get(&d).await.expect("the blob, resumed");
    assert_eq!(digest(&got), d);
    assert!(got == model, "the same bytes");
    let told = told.lock().expect("told").clone();
    assert!(!told.is_empty() && told.iter().all(|p| p.resumed_from == mark.bytes), "went on from the mark: {:?}", told.first());
    let chunks_read = told.len() as u64;
    assert_eq!(chunks_read, (size - mark.bytes).div_ceil(128 << 10), "read only the chunks after the mark");
    assert!(!marks.part(&d).exists() && marks.mark(&d).is_none(), "a finished download leaves nothing behind");

    // A part spoiled on disk (a byte flipped before its mark) is found out by the digest and read again whole.
    let (observer, seen, _) = watching();
    let third = NatsBlobs::new(&js).await.expect("blobs").resuming_in(&folder, Some(observer)).expect("downloads");
    read_until_cut(&third, &d, seen, size / 3).await;
    drop(third);
    let mark = settled_mark(&marks, &d).await;
    let mut part = std::fs::read(marks.part(&d)).expect("part");
    part[(mark.bytes / 2) as usize] ^= 0xff;
    std::fs::write(marks.part(&d), part).expect("spoiled");
    let (observer, _, told) = watching();
    let fourth = NatsBlobs::new(&js).await.expect("blobs").resuming_in(&folder, Some(observer)).expect("downloads");
    let got = fourth.get(&d).await.expect("the blob, read again");
    assert!(got == model, "the blob's own bytes, not the spoiled part's");
    let told = told.lock().expect("told").clone();
    assert_eq!(told.first().map(|p| p.resumed_from), Some(mark.bytes), "it first went on from the mark");
    assert_eq!(told.last().map(|p| (p.resumed_from, p.done)), Some((0, size)), "then read the whole blob again");

    // A download folder that cannot take the part (here a folder stands where the part
    // would go) does not stop the read: it goes on in memory.
    let other = noise(3 << 20, &format!("{}-other", crate::util::unique()));
    let other_d = engine.put(other.clone()).await.expect("stored");
    std::fs::create_dir_all(marks.part(&other_d)).expect("a folder in the part's place");
    let got = NatsBlobs::new(&js).await.expect("blobs").resuming_in(&folder, None).expect("downloads").get(&other_d).await;
    assert!(got.expect("read in memory") == other);

    // Without a download folder the blob reads the same (into memory).
    assert!(NatsBlobs::new(&js).await.expect("blobs").get(&d).await.expect("read") == model);

    // The chunks were published many at a time, not through the object store's own put: its
    // own reader, which checks the SHA-256 the description records, reads the same bytes.
    let store = js.get_object_store(flame_transport::blob::BUCKET).await.expect("bucket");
    let mut object = store.get(&d).await.expect("described");
    assert_eq!(object.info().size as u64, size);
    let mut read = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut read).await.expect("the library's reader accepts the digest");
    assert!(read == model);
}

/// A trainer process SIGKILLed while it downloads the global model (an MLP
/// of 1.1M parameters, 4.4 MB: 34 chunks, a checkpoint every 8), then started again with the same id and
/// download folder: it goes on from the part it left (its log says from
/// which byte, the byte its mark recorded), and the job completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_killed_mid_download_goes_on_from_where_it_stopped() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::util::{Processes, bin, free_port, root};

    let dir = tempfile::tempdir().expect("tempdir");
    let nats = crate::util::Nats::start(free_port(), &dir.path().join("js"));
    crate::util::connect(&nats.url).await;
    let workflow = crate::util::digits_workflow(|wf| {
        wf["dataSpec"][0]["datasetGroups"]["default"] = serde_json::json!(["dataset1.json"]);
        let h = &mut wf["modelSpec"]["hyperparameters"];
        h["rounds"] = 1.into();
        h["epochs"] = 1.into();
        h["hidden"] = serde_json::json!([1024, 1024]);
    });
    let job_file = dir.path().join("job.json");
    std::fs::write(&job_file, serde_json::to_vec(&workflow).expect("json")).expect("write");
    let downloads = dir.path().join("downloads");
    let id = format!("big-{}", crate::util::unique());
    let trainer = |log: &str| {
        let mut c = Command::new(bin("flame-worker"));
        c.args(["--nats", &nats.url, "--id", &id, "--roles", "trainer", "--realm", "default/site1", "--data-root"])
            .arg(crate::util::examples())
            .arg("--download-dir")
            .arg(&downloads)
            .env("RUST_LOG", "warn,flame_transport=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(log)).expect("log"));
        c
    };
    let mut procs = Processes::default();
    procs.spawn(&mut trainer("first.log"));
    let run = Command::new(bin("flamectl"))
        .arg("run")
        .arg(&job_file)
        .args(["-o", "json", "--nats", &nats.url, "--data-root"])
        .arg(crate::util::examples())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("flamectl");

    // Killed as soon as its first checkpoint is on disk.
    let started = Instant::now();
    let mark_file = loop {
        let found = std::fs::read_dir(&downloads)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "next"));
        if let Some(p) = found {
            break p;
        }
        assert!(procs.0[0].try_wait().expect("wait").is_none(), "the trainer ended before its download was cut");
        assert!(started.elapsed() < Duration::from_secs(120), "no download into {} began", downloads.display());
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    procs.0[0].kill().expect("SIGKILL");
    procs.0[0].wait().expect("reaped");
    let d = mark_file.file_stem().and_then(|s| s.to_str()).expect("digest").to_string();
    let mark = Downloads::new(&downloads, None).expect("folder").mark(&d).expect("the mark the killed trainer left");
    let part = std::fs::metadata(downloads.join(format!("{d}.part")))
        .expect("its part (none: the download finished before the kill landed)")
        .len();
    assert!(mark.bytes > 0 && part >= mark.bytes, "cut mid-way: {mark:?}, part of {part} bytes");

    procs.spawn(&mut trainer("second.log"));
    let out = run.wait_with_output().expect("flamectl");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON summary");
    assert_eq!(summary["state"], "completed", "{summary}");
    let log = std::fs::read_to_string(dir.path().join("second.log")).expect("second log");
    let said = format!("blob {d}: going on from byte {} of ", mark.bytes);
    assert!(log.contains(&said), "the restarted trainer went on from its mark ({said}): {log}");
    assert!(!downloads.join(format!("{d}.part")).exists(), "the finished download leaves no part");
}

/// A blob read to a file (how an aggregator takes a large update, so that
/// it is never whole in its memory): written under the folder it is given as
/// it arrives, checked against its digest, and removed when dropped; a small
/// blob the same; a folder that cannot take it fails the read, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_read_to_a_file_is_checked_and_goes_when_dropped() {
    let url = crate::util::nats_url();
    let js = async_nats::jetstream::new(crate::util::connect(&url).await);
    let engine = NatsBlobs::new(&js).await.expect("object store");
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("updates");
    // A reader with a download folder of its own still writes where it is told.
    let reader = NatsBlobs::new(&js).await.expect("blobs").resuming_in(dir.path().join("downloads"), None).expect("downloads");
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&folder)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    for (len, what) in [(6 << 20, "large"), (100 << 10, "small")] {
        let model = noise(len, &format!("{}-{what}", crate::util::unique()));
        let d = engine.put(model.clone()).await.expect("stored");
        let file = reader.get_file(&d, &folder).await.expect("read to a file");
        assert!(file.path().starts_with(&folder), "{what}: {}", file.path().display());
        assert_eq!(file.len(), len as u64);
        assert!(std::fs::read(file.path()).expect("the file") == model, "{what}: the blob's bytes");
        assert_eq!(listing().len(), 1, "{what}: the file alone, no part or mark left: {:?}", listing());
        drop(file);
        assert!(listing().is_empty(), "{what}: removed when dropped: {:?}", listing());
    }
    let model = noise(3 << 20, &format!("{}-blocked", crate::util::unique()));
    let d = engine.put(model).await.expect("stored");
    let blocked = dir.path().join("a-file");
    std::fs::write(&blocked, b"not a folder").expect("file");
    let refused = reader.get_file(&d, &blocked).await.expect_err("no folder to write to");
    assert!(refused.to_string().contains("a-file"), "{refused}");
}

/// A read to a file (the aggregator's, for updates over its memory budget)
/// that finds a part and mark in its folder goes on from them: only the
/// rest is read, the part's first bytes are hashed from the disk rather
/// than read again afterwards, and a part spoiled before its mark is found
/// out by the digest and the blob read again whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_to_a_file_goes_on_from_a_part_and_reads_a_spoiled_one_again() {
    let url = crate::util::nats_url();
    let js = async_nats::jetstream::new(crate::util::connect(&url).await);
    let engine = NatsBlobs::new(&js).await.expect("object store");
    let model = noise(24 << 20, &format!("{}-to-file", crate::util::unique()));
    let size = model.len() as u64;
    let d = engine.put(model.clone()).await.expect("stored");
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("updates");
    let marks = Downloads::new(&folder, None).expect("folder");
    let cut = |at: u64| {
        let (js, folder, d) = (js.clone(), folder.clone(), d.clone());
        async move {
            let (observer, seen, _) = watching();
            let reader = NatsBlobs::new(&js).await.expect("blobs").resuming_in(&folder, Some(observer)).expect("downloads");
            read_until_cut(&reader, &d, seen, at).await;
        }
    };
    let (observer, _, told) = watching();
    // The reader's own download folder is elsewhere: the file goes where it is asked to.
    let reader = NatsBlobs::new(&js).await.expect("blobs").resuming_in(dir.path().join("own"), Some(observer)).expect("downloads");

    cut(size / 4).await;
    let mark = settled_mark(&marks, &d).await;
    assert!(mark.bytes > 0 && mark.bytes < size, "cut short mid-way: {mark:?} of {size}");
    let file = reader.get_file(&d, &folder).await.expect("the blob in a file, resumed");
    assert!(std::fs::read(file.path()).expect("the file") == model, "the blob's bytes");
    assert_eq!(file.len(), size);
    let seen = std::mem::take(&mut *told.lock().expect("told"));
    assert!(!seen.is_empty() && seen.iter().all(|p| p.resumed_from == mark.bytes), "went on from the mark: {:?}", seen.first());
    assert_eq!(seen.len() as u64, (size - mark.bytes).div_ceil(128 << 10), "read only the chunks after the mark");
    assert!(!marks.part(&d).exists() && marks.mark(&d).is_none(), "the part became the file; no mark is left");
    drop(file);

    cut(size / 3).await;
    let mark = settled_mark(&marks, &d).await;
    let mut part = std::fs::read(marks.part(&d)).expect("part");
    part[(mark.bytes / 2) as usize] ^= 0xff;
    std::fs::write(marks.part(&d), part).expect("spoiled");
    let file = reader.get_file(&d, &folder).await.expect("the blob in a file, read again");
    assert!(std::fs::read(file.path()).expect("the file") == model, "the blob's own bytes, not the spoiled part's");
    let seen = told.lock().expect("told").clone();
    assert_eq!(seen.first().map(|p| p.resumed_from), Some(mark.bytes), "it first went on from the mark");
    assert_eq!(seen.last().map(|p| (p.resumed_from, p.done)), Some((0, size)), "then read the whole blob again");
}

/// Two `flame-worker` processes given one download folder (one
/// `FLAME_DOWNLOAD_DIR` for a machine's workers): the second is refused at
/// its start, naming the folder and the process that holds it, and leaves
/// the folder as it was: the updates the first is aggregating from stay
/// (before, its start removed them). Once the first is killed, a worker
/// started with the folder takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_folder_in_use_by_a_worker_is_refused_to_another() {
    use crate::util::{Processes, aggregator_worker, exit_at_start, unique, within_30s};

    let dir = tempfile::tempdir().expect("tempdir");
    let shared = dir.path().join("downloads");
    let worker = |id: &str, log: &str| {
        let mut c = aggregator_worker(id, &dir.path().join(log));
        c.env("FLAME_DOWNLOAD_DIR", &shared);
        c
    };
    let lock = shared.join(flame_workers::claim::LOCK);
    let mut procs = Processes::default();
    let log = dir.path().join("first.log");
    let first = procs.spawn(&mut worker(&format!("first-{}", unique()), "first.log")).id();
    // Started: past its claim and the clearing of what a killed aggregator left in the folder.
    within_30s(&format!("the first worker did not start on {}", shared.display()), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("datasets are read under these folders only")
    })
    .await;
    assert_eq!(std::fs::read_to_string(&lock).expect("its lock file").trim(), first.to_string());
    // As if the first were aggregating from disk.
    let updates = shared.join(flame_workers::spill::FOLDER).join("updates-held");
    std::fs::create_dir_all(&updates).expect("mkdir");
    std::fs::write(updates.join("0.f32"), [0u8; 16]).expect("an update");

    let second = procs.spawn(&mut worker(&format!("second-{}", unique()), "second.log"));
    let (status, said) = exit_at_start(second, &dir.path().join("second.log"), "the second worker started on a folder in use").await;
    assert!(!status.success(), "the second worker started on a folder in use: {said}");
    assert!(said.contains(&format!("the folder {} is in use by another flame-worker (process {first})", shared.display())), "{said}");
    assert!(said.contains("--download-dir"), "says what to do: {said}");
    assert!(updates.join("0.f32").exists(), "the first worker's updates were removed by the second's start");

    procs.0[0].kill().expect("SIGKILL");
    procs.0[0].wait().expect("reaped");
    let third = procs.spawn(&mut worker(&format!("third-{}", unique()), "third.log")).id();
    // What the killed worker left is cleared by the next to hold the folder.
    within_30s("the folder of a killed worker was not taken by the next, or its updates not cleared", || {
        std::fs::read_to_string(&lock).is_ok_and(|s| s.trim() == third.to_string()) && !updates.exists()
    })
    .await;
}

/// Two `flame-worker` processes started with one `--id` on two machines
/// (here: two download folders): the second is refused while the first
/// heartbeats, saying why, and does not register; once the first is killed,
/// a worker started with that id takes it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_id_a_live_worker_holds_is_refused_to_another_process() {
    use crate::util::{Processes, aggregator_worker_in, exit_at_start, unique, within_30s};

    let dir = tempfile::tempdir().expect("tempdir");
    let id = format!("twice-{}", unique());
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let worker = |name: &str| aggregator_worker_in(&id, dir.path(), name);
    let ready = |name: &str| std::fs::read_to_string(log(name)).unwrap_or_default().contains("worker ready");
    let mut procs = Processes::default();
    procs.spawn(&mut worker("first"));
    within_30s("the first worker did not start", || ready("first")).await;

    let second = procs.spawn(&mut worker("second"));
    let (status, said) = exit_at_start(second, &log("second"), "a second process started as a live worker").await;
    assert!(!status.success(), "{said}");
    assert!(said.contains(&format!("worker id '{id}' is in use by another live process")), "{said}");
    assert!(!said.contains("worker ready"), "{said}");

    procs.0[0].kill().expect("SIGKILL");
    procs.0[0].wait().expect("reaped");
    procs.spawn(&mut worker("third"));
    within_30s("the id of a killed worker was not taken over", || {
        assert!(
            procs.0[2].try_wait().expect("wait").is_none(),
            "the next worker was refused: {}",
            std::fs::read_to_string(log("third")).unwrap_or_default()
        );
        ready("third")
    })
    .await;
}
