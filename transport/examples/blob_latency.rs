//! Times object-store reads: `cargo run --release -p flame-transport --example blob_latency -- nats://127.0.0.1:4222 N`.
use flame_transport::blob::{BlobStore, NatsBlobs};
use std::time::Instant;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(200);
    let client = async_nats::connect(&args[1]).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let blobs = NatsBlobs::new(&js).await.expect("blobs");
    let mut ds = Vec::new();
    let t = Instant::now();
    for i in 0..n {
        ds.push(blobs.put(format!("blob {i} {}", "x".repeat(10_000)).into_bytes()).await.expect("put"));
    }
    println!("put {n}: {:.1} ms each", t.elapsed().as_secs_f64() * 1000.0 / n as f64);
    let t = Instant::now();
    for d in &ds {
        blobs.get(d).await.expect("get");
    }
    println!("get {n} one by one: {:.1} ms each", t.elapsed().as_secs_f64() * 1000.0 / n as f64);
    let t = Instant::now();
    use futures::StreamExt;
    let got: Vec<_> = futures::stream::iter(ds.iter()).map(|d| blobs.get(d)).buffered(32).collect().await;
    assert!(got.iter().all(Result::is_ok));
    println!("get {n} 32 at a time: {:.1} ms each", t.elapsed().as_secs_f64() * 1000.0 / n as f64);
}
