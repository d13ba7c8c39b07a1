//! NATS servers that require credentials: the engine's and workers' flags.

use std::process::{Command, Stdio};
use std::time::Duration;

use flame_transport::{Nats, NatsAuth, Transport};

use crate::util::{self, Processes, bin, free_port};

async fn wait_for_port(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nats-server on port {port} did not come up");
}

async fn refused(url: &str, auth: &NatsAuth) -> String {
    match Nats::connect_with(url, auth).await {
        Ok(_) => panic!("connected to {url} with {auth:?}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn user_password_and_token_servers_take_only_the_right_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = util::Nats::start_with(port, dir.path(), &["--user", "flame", "--pass", "s3cret"]);
    wait_for_port(port).await;
    let url = server.url.clone();

    let none = refused(&url, &NatsAuth::default()).await;
    assert!(none.contains("cannot connect to NATS") && none.to_lowercase().contains("authorization"), "{none}");
    let wrong = NatsAuth { user: Some("flame".into()), password: Some("guess".into()), ..NatsAuth::default() };
    assert!(refused(&url, &wrong).await.to_lowercase().contains("authorization"));
    let right = NatsAuth { user: Some("flame".into()), password: Some("s3cret".into()), ..NatsAuth::default() };
    let transport = Nats::connect_with(&url, &right).await.expect("the right password connects");

    // A flame-worker given the same flags registers with the registry.
    let mut procs = Processes::default();
    procs.spawn(
        Command::new(bin("flame-worker"))
            .args(["--nats", &url, "--id", "w-auth", "--roles", "aggregator", "--nats-user", "flame"])
            .env("FLAME_NATS_PASSWORD", "s3cret")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    );
    let mut seen = false;
    for _ in 0..150 {
        if transport.workers().await.expect("registry").iter().any(|w| w.id == "w-auth") {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen, "the worker authenticated and registered");
    drop(procs);
    server.stop();

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = util::Nats::start_with(port, dir.path(), &["--auth", "t0ken"]);
    wait_for_port(port).await;
    assert!(refused(&server.url, &NatsAuth::default()).await.to_lowercase().contains("authorization"));
    Nats::connect_with(&server.url, &NatsAuth { token: Some("t0ken".into()), ..NatsAuth::default() }).await.expect("the token connects");
    server.stop();
}

#[tokio::test]
async fn unreadable_or_conflicting_credentials_are_named() {
    let url = "nats://127.0.0.1:1";
    let missing = NatsAuth { creds: Some("/no/such/user.creds".into()), ..NatsAuth::default() };
    let err = refused(url, &missing).await;
    assert!(err.contains("/no/such/user.creds"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("seed.nk");
    std::fs::write(&seed, "not a seed\n").expect("write");
    let err = refused(url, &NatsAuth { nkey: Some(seed), ..NatsAuth::default() }).await;
    assert!(err.contains("no user NKey seed"), "{err}");
    let both = NatsAuth { token: Some("t".into()), user: Some("u".into()), password: Some("p".into()), ..NatsAuth::default() };
    assert!(refused(url, &both).await.contains("one way to authenticate"));
    // The worker binary says the same before it tries to connect.
    let out = Command::new(bin("flame-worker"))
        .args(["--nats", url, "--id", "w", "--roles", "aggregator", "--nats-creds", "/no/such/user.creds"])
        .output()
        .expect("run flame-worker");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/user.creds"), "{}", String::from_utf8_lossy(&out.stderr));
}
