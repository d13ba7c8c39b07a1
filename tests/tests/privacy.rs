//! The privacy ledger (issue 18, part 5): the RDP accountant against Google's
//! `dp-accounting` on a table of settings.

use std::process::Command;

use flame_engine::accountant::{Runs, default_orders, epsilon};

/// The reference's python (`scripts/dp-venv.sh` installs it; `scripts/test.sh` exports it).
fn reference() -> Option<String> {
    std::env::var("FLAME_DP_PYTHON").ok().filter(|p| !p.is_empty())
}

const REFERENCE: &str = r#"
import json, sys
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp
orders, table = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = []
for q, z, steps, delta in table:
    acc = rdp.RdpAccountant(orders=orders)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), int(steps))
    out.append(acc.get_epsilon(delta))
print(json.dumps(out))
"#;

#[test]
fn the_accountant_agrees_with_dp_accounting_within_one_percent() {
    let Some(python) = reference() else {
        eprintln!("skipped: the accountant's comparison with dp-accounting: FLAME_DP_PYTHON is unset (scripts/test.sh sets it)");
        return;
    };
    // (sampling rate, noise multiplier, steps, delta): DP-SGD-like sampling and whole-update rounds (q = 1).
    let table: Vec<(f64, f64, u64, f64)> = vec![
        (0.01, 1.1, 1000, 1e-5),
        (0.01, 0.8, 10_000, 1e-5),
        (0.004, 1.3, 60_000, 1e-6),
        (0.05, 2.0, 500, 1e-5),
        (0.1, 1.0, 100, 1e-5),
        (0.25, 4.0, 50, 1e-6),
        (0.5, 1.5, 20, 1e-5),
        (0.02, 0.6, 3000, 1e-5),
        (1.0, 1.0, 10, 1e-5),
        (1.0, 2.0, 50, 1e-5),
        (1.0, 5.0, 200, 1e-6),
        (1.0, 0.7, 3, 1e-3),
    ];
    let orders = default_orders();
    let out = Command::new(&python)
        .arg("-c")
        .arg(REFERENCE)
        .arg(serde_json::to_string(&orders).expect("json"))
        .arg(serde_json::to_string(&table).expect("json"))
        .output()
        .expect("run the reference");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want: Vec<f64> = serde_json::from_slice(&out.stdout).expect("reference output");
    let mut rows = Vec::new();
    for ((q, z, steps, delta), want) in table.iter().zip(&want) {
        let (got, order) = epsilon(&[Runs { q: *q, z: *z, steps: *steps }], *delta, &orders);
        let off = (got - want).abs() / want;
        rows.push(format!("q={q} z={z} steps={steps} delta={delta}: {got:.4} against {want:.4} (order {order}, {:.3}% off)", off * 100.0));
        assert!(off < 0.01, "{}", rows.join("\n"));
    }
    eprintln!("{}", rows.join("\n"));
}

fn flamectl(args: &[&str]) -> std::process::Output {
    Command::new(crate::util::bin("flamectl")).args(args).current_dir(crate::util::root()).output().expect("run flamectl")
}

fn said(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn a_dataset_budget_spans_jobs_and_stops_a_site_before_it_would_overspend() {
    use serde_json::{Value, json};
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("job");
    std::fs::create_dir_all(&folder).expect("mkdir");
    for entry in std::fs::read_dir(crate::util::root().join("examples/digits-two-tier")).expect("example") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), folder.join(entry.file_name())).expect("copy");
    }
    // Site 3's rows in a file of its own, with a budget of epsilon 8 at delta 1e-5.
    let data = flame_workers::data::load("builtin://digits?part=2&of=3").expect("digits");
    let csv: String = data
        .train
        .x
        .chunks(data.train.features)
        .zip(&data.train.y)
        .map(|(row, y)| format!("{},{y}\n", row.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")))
        .collect();
    std::fs::write(folder.join("site3.csv"), csv).expect("csv");
    let edit = |file: &str, f: &dyn Fn(&mut Value)| {
        let path = folder.join(file);
        let mut v: Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        f(&mut v);
        std::fs::write(&path, v.to_string()).expect("write");
    };
    edit("dataset3.json", &|d| {
        d["url"] = json!("site3.csv");
        d["privacyBudget"] = json!({"epsilon": 8.0, "delta": 1e-5});
    });
    let folder_s = folder.to_str().expect("utf8");
    let data_dir = dir.path().join("flame");
    let data_s = data_dir.to_str().expect("utf8");

    // Without differential privacy a budgeted dataset is refused at validation, naming the file and the fix.
    let out = flamectl(&["run", folder_s, "--data-dir", data_s]);
    assert_eq!(out.status.code(), Some(2), "{}", said(&out));
    assert!(
        said(&out).contains("hyperparameters/noise_factor") && said(&out).contains("dataset3.json has a privacy budget"),
        "{}",
        said(&out)
    );
    edit("modelSpec.json", &|m| {
        let h = &mut m["hyperparameters"];
        h["clip_threshold"] = json!(0.05);
        h["noise_factor"] = json!(2.0);
        h["minClients"] = json!(2);
    });

    // Job 1: five rounds, five noised updates of site 3 (epsilon 5.38 at z = 2).
    let run = || {
        let out = flamectl(&["run", folder_s, "--data-dir", data_s, "-o", "json"]);
        assert!(out.status.success(), "{}", said(&out));
        let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
        summary["job_id"].as_str().expect("id").to_string()
    };
    let first = run();
    // Job 2: rounds 1-4 fit (9 runs: 7.6); round 5 would make it 8.08, over 8: site 3 sits it out,
    // and the round goes on with the other two (minClients 2).
    let second = run();
    let store = format!("sqlite:{data_s}/events.db");
    let events = |job: &str, t: &str| -> Vec<Value> {
        let out = flamectl(&["events", job, "--store", &store, "--type", t, "-o", "json"]);
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("json")).collect()
    };
    assert!(events(&first, "PrivacyRefused").is_empty());
    let refused = events(&second, "PrivacyRefused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    let r = &refused[0]["payload"];
    // A relative path is read as the file in the job's folder: the ledger names it by its full path.
    let site3 = folder.join("site3.csv").to_str().expect("utf8").to_string();
    assert_eq!((r["round"].as_u64(), r["task_id"].as_str(), r["dataset"].as_str()), (Some(5), Some("trainer-2"), Some(site3.as_str())));
    assert!(r["spent_epsilon"].as_f64().is_some_and(|e| e <= 8.0) && r["epsilon_after"].as_f64().is_some_and(|e| e > 8.0), "{r}");
    let round5: Vec<Value> = events(&second, "UpdateReported").into_iter().filter(|u| u["payload"]["round"] == 5).collect();
    assert_eq!(round5.len(), 2);
    assert!(round5.iter().all(|u| u["payload"]["task_id"] != "trainer-2"));
    let done = events(&second, "JobCompleted");
    assert_eq!(done.len(), 1, "the job completes without that site");

    // The ledger: both jobs, the refusal, and what is left; it agrees with the accountant.
    let out = flamectl(&["privacy", &site3, "--store", &store, "-o", "json"]);
    assert!(out.status.success(), "{}", said(&out));
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!((rows[0]["job_id"].as_str(), rows[0]["updates"].as_u64()), (Some(first.as_str()), Some(5)));
    assert_eq!((rows[1]["job_id"].as_str(), rows[1]["updates"].as_u64()), (Some(second.as_str()), Some(4)));
    assert_eq!(rows[1]["refused"], json!([5]));
    let want = epsilon(&[Runs { q: 1.0, z: 2.0, steps: 9 }], 1e-5, &default_orders()).0;
    assert!((rows[2]["spent"].as_f64().expect("spent") - want).abs() < 1e-9 && want <= 8.0, "{rows:?}");
    let table = flamectl(&["privacy", &site3, "--store", &store]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("of a budget of 8"), "{}", said(&table));
    // The audit says why the site sat out.
    let audit = flamectl(&["audit", &second, "--store", &store]);
    assert!(String::from_utf8_lossy(&audit.stdout).contains("over its budget of 8"), "{}", said(&audit));
}
