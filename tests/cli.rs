//! Invalid configuration and flags stop the binary with an error naming the field.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_recstream"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_config_values_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[engine.lists]\nmax_genre_share = 2.0\n",
            "engine.lists.max_genre_share",
        ),
        (
            "[engine.decay]\ntrending_half_life_hours = 9000\n",
            "engine.decay.trending_half_life_hours",
        ),
        (
            "[processing]\nbatch_max_records = 0\n",
            "processing.batch_max_records",
        ),
        ("[http]\nlisten = \"nowhere\"\n", "http.listen"),
        (
            "[topics]\ninteractions = \"bad name\"\n",
            "topics.interactions",
        ),
        ("[kafka]\nbrokerz = \"x\"\n", "brokerz"),
        ("[engine.event_weights]\nlike = \"lots\"\n", "like"),
    ];
    for (i, (toml, field)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let (ok, stderr) = run(&["check-config", "--config", path.to_str().unwrap()]);
        assert!(!ok, "{toml} was accepted");
        assert!(stderr.contains(field), "{field} not named in: {stderr}");
    }
}

#[test]
fn invalid_flags_are_rejected() {
    let (ok, stderr) = run(&["run", "--http-listen", "not-an-address"]);
    assert!(!ok);
    assert!(stderr.contains("http.listen"), "{stderr}");
    let (ok, stderr) = run(&["refresh"]);
    assert!(!ok);
    assert!(stderr.contains("--user"), "{stderr}");
    let (ok, stderr) = run(&[
        "run",
        "--catalog",
        "/nonexistent/movies.csv",
        "--brokers",
        "127.0.0.1:1",
    ]);
    assert!(!ok);
    assert!(stderr.contains("catalog"), "{stderr}");
}

#[test]
fn the_example_config_checks() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/ops/recstream.example.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_recstream"))
        .args(["check-config", "--config", path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_genre_share"));
}
