//! Stopping `weir serve` while it is still starting: Kubernetes may send SIGTERM at any moment,
//! and a stop is a stop, not a crash.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Waits for the child to exit, up to `limit`.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn sigterm_during_start_up_exits_cleanly() {
    // A "database" that accepts connections and never answers: start-up waits on it.
    let database = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = database.local_addr().expect("addr").port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("serve")
        .env(
            "WEIR_DATABASE__URL",
            format!("postgres://postgres@127.0.0.1:{port}/test"),
        )
        .env("WEIR_BROKERS", "127.0.0.1:9")
        .env("WEIR_ADMIN_ADDR", "127.0.0.1:0")
        .env("WEIR_HTTP__ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weir serve");

    // Its connection to the database means it is in start-up now.
    let (_connection, _) = database
        .accept()
        .expect("weir serve connects to the database");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());

    let exit = wait_exit(&mut child, Duration::from_secs(30));
    let mut log = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        if exit.is_none() {
            let _ = child.kill();
        }
        let _ = stderr.read_to_string(&mut log);
    }
    let exit = exit.expect("weir serve exits within 30 s of SIGTERM");
    assert_eq!(
        exit.code(),
        Some(0),
        "a clean exit, not a kill by signal: {exit:?}\n{log}"
    );
    assert!(log.contains("during start-up"), "{log}");
}
