//! A large model to many workers through the JetStream object store, against
//! a plain loopback copy of the same bytes (`scripts/bench_broadcast.sh`):
//!
//! `cargo run --release -p flame-transport --example broadcast -- NATS_URL MIB READERS`
//!
//! Stores MIB MiB as one blob the engine's way, then starts READERS processes
//! at once that each read it the worker's way (into a download folder,
//! resumably, checked against its digest) and then into memory only; then
//! the same processes read the same bytes from one TCP connection each on
//! the loopback interface (nothing checked): into memory, and into memory
//! and a file as they arrive (the resumable read's like: it writes its part
//! as it reads). Prints each pass's wall time, the bytes delivered per
//! second over all readers, their ratios, and the peak RSS (VmHWM) of the
//! process that stored the blob and of each reader.
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use flame_transport::blob::{BlobStore, NatsBlobs, digest};

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// CPU seconds (user and system) a process has used so far.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here; in clock ticks (100 a second).
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = vec![0u8; len];
    for word in out.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One reader's line: `seconds=S rss_mb=M cpu_s=C`.
fn parse(line: &str) -> (f64, f64, f64) {
    let field = |k: &str| -> f64 {
        line.split_whitespace().find_map(|kv| kv.strip_prefix(k)).and_then(|v| v.parse().ok()).expect("a reader's figures")
    };
    (field("seconds="), field("rss_mb="), field("cpu_s="))
}

/// Starts `readers` copies of this program with `args` at once; the wall time until all finish and their lines.
fn pass(readers: usize, args: &[String]) -> (f64, Vec<(f64, f64, f64)>) {
    let exe = std::env::current_exe().expect("this program");
    let started = Instant::now();
    let children: Vec<_> =
        (0..readers).map(|i| Command::new(&exe).args(args).arg(i.to_string()).stdout(Stdio::piped()).spawn().expect("a reader")).collect();
    let lines: Vec<(f64, f64, f64)> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("reader");
            assert!(out.status.success(), "a reader failed");
            parse(&String::from_utf8_lossy(&out.stdout))
        })
        .collect();
    (started.elapsed().as_secs_f64(), lines)
}

/// Reads the blob into `dir` (resumably), or into memory.
async fn read_nats(url: &str, d: &str, dir: Option<String>) {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("connect"));
    let blobs = NatsBlobs::new(&js).await.expect("blobs");
    let blobs = match dir {
        Some(dir) => blobs.resuming_in(dir, None).expect("download folder"),
        None => blobs,
    };
    let t = Instant::now();
    let bytes = blobs.get(d).await.expect("the blob (checked against its digest)");
    let seconds = t.elapsed().as_secs_f64();
    assert!(!bytes.is_empty());
    println!("seconds={seconds} rss_mb={} cpu_s={}", peak_rss_mb(), cpu_seconds("self"));
}

/// Reads the copy into memory, and with `file` into that file as well as it
/// arrives (removed at the end, as a finished download's part is).
fn read_tcp(addr: &str, size: usize, file: Option<String>) {
    let t = Instant::now();
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    let mut bytes = Vec::with_capacity(size);
    match &file {
        None => {
            stream.read_to_end(&mut bytes).expect("read");
        }
        Some(path) => {
            let mut out = std::fs::File::create(path).expect("the file");
            let mut block = vec![0u8; 1 << 20];
            loop {
                let n = stream.read(&mut block).expect("read");
                if n == 0 {
                    break;
                }
                bytes.extend_from_slice(&block[..n]);
                out.write_all(&block[..n]).expect("write");
            }
            drop(out);
            std::fs::remove_file(path).expect("removed");
        }
    }
    assert_eq!(bytes.len(), size, "the whole copy");
    println!("seconds={} rss_mb={} cpu_s={}", t.elapsed().as_secs_f64(), peak_rss_mb(), cpu_seconds("self"));
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--read-nats") => {
            let dir = if args[4] == "-" { None } else { Some(format!("{}/{}", args[4], args[5])) };
            return read_nats(&args[2], &args[3], dir).await;
        }
        Some("--read-tcp") => {
            let file = if args[4] == "-" { None } else { Some(format!("{}/{}.copy", args[4], args[5])) };
            return read_tcp(&args[2], args[3].parse().expect("size"), file);
        }
        _ => {}
    }
    let url = args.get(1).expect("NATS URL").clone();
    let mib: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let readers: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(10);
    let size = mib << 20;
    let bytes = noise(size);
    let d = digest(&bytes);
    let rss_before = peak_rss_mb();

    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connect"));
    let engine = NatsBlobs::with_replicas(&js, 1).await.expect("object store");
    let t = Instant::now();
    engine.put(bytes).await.expect("stored");
    let stored = t.elapsed().as_secs_f64();
    println!(
        "stored {mib} MiB in {stored:.2} s ({:.0} MB/s); the storing process's peak RSS {:.0} MB ({rss_before:.0} MB with the model in memory before the put; the model is {:.0} MB)",
        size as f64 / stored / 1e6,
        peak_rss_mb(),
        size as f64 / 1e6
    );
    // The same bytes again for the loopback copy (the put took the first).
    let bytes = noise(size);

    // The NATS server's CPU seconds in each pass, when the script names its process.
    let server = std::env::var("FLAME_BENCH_NATS_PID").unwrap_or_default();
    let server_cpu = || if server.is_empty() { f64::NAN } else { cpu_seconds(&server) };
    let downloads = tempfile_dir();
    let cpu0 = server_cpu();
    let (nats_wall, nats) = pass(readers, &["--read-nats".into(), url.clone(), d.clone(), downloads.clone()]);
    let cpu1 = server_cpu();
    let (memory_wall, memory) = pass(readers, &["--read-nats".into(), url.clone(), d.clone(), "-".into()]);
    let cpu2 = server_cpu();

    let shared = Arc::new(bytes);
    let (tcp_wall, tcp) = copy(&shared, readers, "-".into());
    let (file_wall, file) = copy(&shared, readers, downloads.clone());
    let _ = std::fs::remove_dir_all(&downloads);

    let total = (size * readers) as f64;
    let rate = |wall: f64| total / wall / 1e6;
    let (nats_rate, memory_rate, tcp_rate, file_rate) = (rate(nats_wall), rate(memory_wall), rate(tcp_wall), rate(file_wall));
    for (name, wall, rate, lines, server) in [
        ("object store, resumable (download folder)", nats_wall, nats_rate, &nats, cpu1 - cpu0),
        ("object store, into memory", memory_wall, memory_rate, &memory, cpu2 - cpu1),
        ("loopback TCP", tcp_wall, tcp_rate, &tcp, f64::NAN),
        ("loopback TCP, into memory and a file", file_wall, file_rate, &file, f64::NAN),
    ] {
        println!(
            "{name}: {readers} readers x {mib} MiB in {wall:.2} s = {rate:.0} MB/s over all; per reader median {:.2} s, peak RSS median {:.0} MB, max {:.0} MB; CPU s: readers {:.1}, NATS server {server:.1}",
            median(lines.iter().map(|l| l.0).collect()),
            median(lines.iter().map(|l| l.1).collect()),
            lines.iter().map(|l| l.1).fold(0.0, f64::max),
            lines.iter().map(|l| l.2).sum::<f64>(),
        );
    }
    println!(
        "broadcast through the object store / loopback copy: {:.2}x resumable, {:.2}x into memory; resumable / loopback copy also written to a file: {:.2}x",
        nats_rate / tcp_rate,
        memory_rate / tcp_rate,
        nats_rate / file_rate
    );
}

/// The bytes to `readers` copies of this program at once, one loopback TCP
/// connection each, read into memory and, unless `dir` is `-`, into a file
/// there as well.
fn copy(shared: &Arc<Vec<u8>>, readers: usize, dir: String) -> (f64, Vec<(f64, f64, f64)>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let serve = {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let writers: Vec<_> = (0..readers)
                .map(|_| {
                    let (mut conn, _) = listener.accept().expect("accept");
                    let shared = shared.clone();
                    std::thread::spawn(move || conn.write_all(&shared).expect("write"))
                })
                .collect();
            writers.into_iter().for_each(|w| w.join().expect("writer"));
        })
    };
    let passed = pass(readers, &["--read-tcp".into(), addr, shared.len().to_string(), dir]);
    serve.join().expect("server");
    passed
}

/// A fresh folder for the readers' downloads (one sub-folder each), under the system's temporary folder.
fn tempfile_dir() -> String {
    let dir = std::env::temp_dir().join(format!("flame-broadcast-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("download folder");
    dir.to_string_lossy().into_owned()
}
