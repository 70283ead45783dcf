//! The deployment under test, on this machine: Tansu, PostgreSQL, three `weir serve` replicas in
//! one group, one `weir retry-worker` and one `weir outbox-relay`; and the faults done to it.
//!
//! Each process's peak resident memory (`VmHWM`) is read while it runs and just before it is
//! stopped or killed, and kept per process name.

use crate::support::broker::{free_port, Tansu};
use crate::support::db::TestDb;
use crate::support::process::{wait_until, ServeOptions, TestDir, WeirProcess, FAST_GROUP_TOML};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Replicas of `weir serve` in the group.
pub(crate) const REPLICAS: usize = 3;
/// How long a SIGTERMed process may take to exit (drain timeout, closing the consumer).
const GRACE: Duration = Duration::from_secs(20);
/// How long a process may take to start serving.
const START: Duration = Duration::from_secs(60);

/// Processes alive now, by name, with their pids: what the monitor samples.
pub(crate) type Live = Arc<Mutex<BTreeMap<String, u32>>>;
/// Peak resident memory in KiB, by process name.
pub(crate) type Peaks = Arc<Mutex<BTreeMap<String, u64>>>;

/// A `/proc/<pid>/status` field in KiB (`VmHWM`: the peak resident set so far).
pub(crate) fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Notes `pid`'s peak memory under `name`.
pub(crate) fn note_peak(peaks: &Peaks, name: &str, pid: u32) {
    if let Some(kib) = proc_kib(pid, "VmHWM") {
        let mut peaks = peaks.lock().unwrap();
        let peak = peaks.entry(name.to_owned()).or_default();
        *peak = (*peak).max(kib);
    }
}

/// The database: a private PostgreSQL cluster of the soak's own (which it may restart), or a
/// schema on the shared test server (which it must not restart; the database fault is then
/// left out and the report says so).
pub(crate) enum Database {
    Private(PrivatePg),
    Shared(TestDb),
}

impl Database {
    /// A private cluster if `initdb` is there and works, else a schema on the shared server.
    pub(crate) async fn start(dir: &Path) -> (Database, Option<String>) {
        match PrivatePg::start(dir) {
            Ok(pg) => (Database::Private(pg), None),
            Err(why) => (Database::Shared(TestDb::new().await), Some(why)),
        }
    }

    pub(crate) fn url(&self) -> String {
        match self {
            Database::Private(pg) => pg.url(),
            Database::Shared(db) => db.url(),
        }
    }

    pub(crate) fn can_restart(&self) -> bool {
        matches!(self, Database::Private(_))
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        match self {
            Database::Private(pg) => pg.pid(),
            Database::Shared(_) => None,
        }
    }

    /// Restarts the private cluster (`pg_ctl restart -m fast`).
    pub(crate) fn restart(&mut self) -> Result<(), String> {
        match self {
            Database::Private(pg) => pg.restart(),
            Database::Shared(_) => Err("the shared test server is not restarted".into()),
        }
    }
}

/// A PostgreSQL cluster in a temp dir on a free port, run by the `postgres` user when the test
/// runs as root (PostgreSQL refuses root). Stopped (`-m immediate`) and removed on drop.
pub(crate) struct PrivatePg {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    /// Kills the postmaster if the test dies without dropping this (see `support::watchdog`).
    watchdog: Option<std::process::Child>,
}

impl PrivatePg {
    fn start(parent: &Path) -> Result<PrivatePg, String> {
        let bin = std::env::var_os("WEIR_SOAK_PG_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                    .ok()?
                    .filter_map(|e| Some(e.ok()?.path().join("bin")))
                    .filter(|b| b.join("initdb").is_file())
                    .collect();
                found.sort();
                found.pop()
            })
            .ok_or("no initdb (set WEIR_SOAK_PG_BIN to PostgreSQL's bin dir)")?;
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let dir = parent.join("postgres");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let pg = PrivatePg {
            bin,
            dir,
            port: free_port(),
            as_postgres,
            watchdog: None,
        };
        if as_postgres {
            pg.run(
                "chown",
                &["-R", "postgres:", &pg.dir.display().to_string()],
                false,
            )?;
            // The parent dirs must be traversable by the postgres user.
            let _ = pg.run("chmod", &["a+rx", &parent.display().to_string()], false);
        }
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            true,
        )?;
        let mut pg = pg;
        pg.ctl(&["start"])?;
        pg.watch();
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str], postgres_bin: bool) -> Result<(), String> {
        let program = if postgres_bin {
            self.bin.join(program).display().to_string()
        } else {
            program.to_owned()
        };
        let mut command = if self.as_postgres && postgres_bin {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &program]);
            c
        } else {
            Command::new(&program)
        };
        let output = command
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} {args:?} failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    fn ctl(&self, action: &[&str]) -> Result<(), String> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("postgres.log").display().to_string();
        let data = self.data();
        let mut args = vec!["-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60"];
        args.extend_from_slice(action);
        self.run("pg_ctl", &args, true)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The postmaster's pid (first line of `postmaster.pid`).
    pub(crate) fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("data").join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    fn watch(&mut self) {
        crate::support::kill_wait(self.watchdog.take());
        self.watchdog = self.pid().and_then(crate::support::watchdog);
    }

    fn restart(&mut self) -> Result<(), String> {
        crate::support::kill_wait(self.watchdog.take());
        let result = self.ctl(&["-m", "fast", "restart"]);
        self.watch();
        result
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        crate::support::kill_wait(self.watchdog.take());
        let _ = self.ctl(&["-m", "immediate", "stop"]);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The `weir` processes and the services they need.
pub(crate) struct Fleet {
    pub(crate) dir: TestDir,
    pub(crate) broker: Tansu,
    pub(crate) db: Database,
    /// Why the database is not private (its restart left out), if it is not.
    pub(crate) db_note: Option<String>,
    options: ServeOptions,
    replicas: Vec<Option<WeirProcess>>,
    retry_worker: Option<WeirProcess>,
    relay: Option<WeirProcess>,
    started: BTreeMap<String, u32>,
    pub(crate) live: Live,
    pub(crate) peaks: Peaks,
    /// The API of each replica serving.
    pub(crate) apis: crate::tasks::Apis,
}

/// `weir serve` settings of the soak: fast group timeouts, in-place retries then durable ones
/// (parking), status reports every second; no relay or retry worker inside (they run as their
/// own processes, as the chart deploys them).
fn config() -> String {
    format!(
        "{FAST_GROUP_TOML}
[retry]
initial_interval = \"100ms\"
backoff_coefficient = 2.0
maximum_interval = \"400ms\"
maximum_attempts = 3
jitter = 0.0

[retry.durable]
initial_interval = \"1s\"
backoff_coefficient = 1.5
maximum_interval = \"3s\"
maximum_attempts = 1000
"
    )
}

impl Fleet {
    /// Starts the broker (sqlite storage, so it survives its restart) with `topics`, the
    /// database (migrated), and every process; returns once all of them serve.
    pub(crate) async fn start(topics: &[(&str, i32)], group: &str) -> Fleet {
        let dir = TestDir::new("weir-soak");
        let broker = Tansu::start_sqlite();
        for (topic, partitions) in topics {
            broker.create_topic(topic, *partitions);
        }
        let (db, db_note) = Database::start(dir.path()).await;
        let options = ServeOptions::new(&broker.brokers(), group, &dir.join("ledger.jsonl"))
            .env("WEIR_DATABASE__URL", db.url())
            .env("WEIR_DATABASE__MAX_CONNECTIONS", "8")
            .env("WEIR_HTTP__ADDR", "127.0.0.1:0")
            .env(
                "WEIR_STORAGE__DIR",
                dir.join("storage").display().to_string(),
            )
            .env("WEIR_SERVICE__RELAY", "false")
            .env("WEIR_SERVICE__RETRY_WORKER", "false")
            .env("WEIR_CONSUMER__COMMIT_INTERVAL", "50ms")
            .env("WEIR_CONTROL__REPORT_INTERVAL", "1s")
            .env("WEIR_KAFKA__PRODUCER__BATCH.NUM.MESSAGES", "1")
            .env("WEIR_OUTBOX__POLL_INTERVAL", "100ms")
            .config(&config());
        let mut migrate = WeirProcess::command(dir.path(), "migrate", "migrate", &options);
        let status = migrate
            .wait_exit(START)
            .await
            .unwrap_or_else(|| panic!("weir migrate still running\n{}", migrate.stderr()));
        assert!(
            status.success(),
            "weir migrate failed\n{}",
            migrate.stderr()
        );
        let mut fleet = Fleet {
            dir,
            broker,
            db,
            db_note,
            options,
            replicas: (0..REPLICAS).map(|_| None).collect(),
            retry_worker: None,
            relay: None,
            started: BTreeMap::new(),
            live: Live::default(),
            peaks: Peaks::default(),
            apis: Default::default(),
        };
        fleet.note_infrastructure();
        for slot in 0..REPLICAS {
            fleet.start_replica(slot).await;
        }
        fleet.start_retry_worker().await;
        fleet.start_relay().await;
        fleet
    }

    /// The ledger every handler appends to.
    pub(crate) fn ledger(&self) -> PathBuf {
        self.options.record_file.clone()
    }

    pub(crate) fn brokers(&self) -> String {
        self.broker.brokers()
    }

    /// Puts the broker and the database among the sampled processes.
    pub(crate) fn note_infrastructure(&self) {
        let mut live = self.live.lock().unwrap();
        live.retain(|name, _| name != "tansu" && name != "postgres");
        if let Some(pid) = self.broker.pid() {
            live.insert("tansu".into(), pid);
        }
        if let Some(pid) = self.db.pid() {
            live.insert("postgres".into(), pid);
        }
    }

    fn spawn(&mut self, base: &str, command: &str) -> WeirProcess {
        let n = self.started.entry(base.to_owned()).or_default();
        *n += 1;
        let name = format!("{base}.{n}");
        let process = WeirProcess::command(self.dir.path(), &name, command, &self.options);
        self.live.lock().unwrap().insert(name, process.pid());
        process
    }

    async fn serving(process: &WeirProcess, message: &str) {
        let what = format!("{} to start", process.name());
        wait_until(&what, START, || {
            process
                .logged_addr(message, "admin_addr")
                .map(|_| ())
                .ok_or_else(|| "not yet".to_owned())
        })
        .await;
    }

    /// Starts replica `slot` and waits until it serves.
    pub(crate) async fn start_replica(&mut self, slot: usize) {
        let process = self.spawn(&format!("serve-{slot}"), "serve");
        Fleet::serving(&process, "Serving.").await;
        if let Some(addr) = process.http_addr() {
            self.apis
                .lock()
                .unwrap()
                .insert(process.name().to_owned(), addr);
        }
        self.replicas[slot] = Some(process);
    }

    async fn start_retry_worker(&mut self) {
        let process = self.spawn("retry-worker", "retry-worker");
        Fleet::serving(&process, "Retrying parked records.").await;
        self.retry_worker = Some(process);
    }

    async fn start_relay(&mut self) {
        let process = self.spawn("outbox-relay", "outbox-relay");
        self.relay = Some(process);
    }

    /// Notes the peak memory of a process about to go, and forgets it.
    fn retire(&self, process: &WeirProcess) {
        note_peak(&self.peaks, process.name(), process.pid());
        self.apis.lock().unwrap().remove(process.name());
        self.live.lock().unwrap().remove(process.name());
    }

    async fn kill(&self, mut process: WeirProcess) {
        self.retire(&process);
        process.kill_and_wait().await;
    }

    /// SIGTERM and wait for the exit; SIGKILL after [`GRACE`]. Whether it exited by itself.
    async fn stop(&self, mut process: WeirProcess) -> bool {
        self.retire(&process);
        process.sigterm();
        if process.wait_exit(GRACE).await.is_some() {
            return true;
        }
        process.kill_and_wait().await;
        false
    }

    /// SIGKILL of replica `slot`, restarted at once.
    pub(crate) async fn kill_replica(&mut self, slot: usize) {
        if let Some(process) = self.replicas[slot].take() {
            self.kill(process).await;
        }
        self.start_replica(slot).await;
    }

    /// SIGTERM of replica `slot`, then a new one. Whether the old one stopped within the grace.
    pub(crate) async fn restart_replica(&mut self, slot: usize) -> bool {
        let clean = match self.replicas[slot].take() {
            Some(process) => self.stop(process).await,
            None => true,
        };
        self.start_replica(slot).await;
        clean
    }

    /// SIGTERM of the replicas but the first; they stay down until [`scale_up`](Self::scale_up).
    pub(crate) async fn scale_down(&mut self) -> bool {
        let mut clean = true;
        for slot in 1..REPLICAS {
            if let Some(process) = self.replicas[slot].take() {
                clean &= self.stop(process).await;
            }
        }
        clean
    }

    pub(crate) async fn scale_up(&mut self) {
        for slot in 0..REPLICAS {
            if self.replicas[slot].is_none() {
                self.start_replica(slot).await;
            }
        }
    }

    pub(crate) async fn kill_retry_worker(&mut self) {
        if let Some(process) = self.retry_worker.take() {
            self.kill(process).await;
        }
        self.start_retry_worker().await;
    }

    pub(crate) async fn kill_relay(&mut self) {
        if let Some(process) = self.relay.take() {
            self.kill(process).await;
        }
        self.start_relay().await;
    }

    /// Restarts the broker on its storage (blocking the runner while it does).
    pub(crate) fn restart_broker(&mut self) {
        if let Some(pid) = self.broker.pid() {
            note_peak(&self.peaks, "tansu", pid);
        }
        tokio::task::block_in_place(|| self.broker.restart());
        self.note_infrastructure();
    }

    pub(crate) fn restart_database(&mut self) -> Result<(), String> {
        if let Some(pid) = self.db.pid() {
            note_peak(&self.peaks, "postgres", pid);
        }
        let result = tokio::task::block_in_place(|| self.db.restart());
        self.note_infrastructure();
        result
    }

    /// Processes that exited without being told to: their names and logs' tails. Each is
    /// restarted, so the run goes on and the report lists it.
    pub(crate) async fn check_exits(&mut self) -> Vec<String> {
        let mut exits = Vec::new();
        for slot in 0..REPLICAS {
            let exited = match self.replicas[slot].as_mut() {
                Some(p) => p.try_status().map(|s| (s, p.stderr_tail(2048))),
                None => None,
            };
            if let Some((status, tail)) = exited {
                let process = self.replicas[slot].take().unwrap();
                self.apis.lock().unwrap().remove(process.name());
                self.live.lock().unwrap().remove(process.name());
                exits.push(format!("{} exited ({status})\n{tail}", process.name()));
                self.start_replica(slot).await;
            }
        }
        for (which, slot) in [("retry-worker", 0), ("outbox-relay", 1)] {
            let process = if slot == 0 {
                &mut self.retry_worker
            } else {
                &mut self.relay
            };
            let exited = match process.as_mut() {
                Some(p) => p.try_status().map(|s| (s, p.stderr_tail(2048))),
                None => None,
            };
            if let Some((status, tail)) = exited {
                let process = process.take().unwrap();
                self.live.lock().unwrap().remove(process.name());
                exits.push(format!("{} exited ({status})\n{tail}", process.name()));
                if which == "retry-worker" {
                    self.start_retry_worker().await;
                } else {
                    self.start_relay().await;
                }
            }
        }
        exits
    }

    /// Stops every `weir` process (SIGTERM), noting peaks first.
    pub(crate) async fn stop_all(&mut self) {
        let mut all: Vec<WeirProcess> = self.replicas.iter_mut().filter_map(Option::take).collect();
        all.extend(self.retry_worker.take());
        all.extend(self.relay.take());
        for process in all {
            self.stop(process).await;
        }
        if let Some(pid) = self.broker.pid() {
            note_peak(&self.peaks, "tansu", pid);
        }
        if let Some(pid) = self.db.pid() {
            note_peak(&self.peaks, "postgres", pid);
        }
    }

    /// Tasks by status now (`pending`, `processing`, `completed`, `failed`).
    pub(crate) async fn task_statuses(&self) -> Result<BTreeMap<String, i64>, String> {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.db.url())
            .await
            .map_err(|e| e.to_string())?;
        let rows: Result<Vec<(String, i64)>, String> =
            sqlx::query_as("SELECT status, count(*) FROM tasks GROUP BY status")
                .fetch_all(&mut conn)
                .await
                .map_err(|e| e.to_string());
        let _ = conn.close().await;
        Ok(rows?.into_iter().collect())
    }

    /// Records parked now (durable retries not finished).
    pub(crate) async fn parked(&self) -> Result<i64, String> {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.db.url())
            .await
            .map_err(|e| e.to_string())?;
        let n = sqlx::query_scalar("SELECT count(*) FROM weir_parked")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| e.to_string());
        let _ = conn.close().await;
        n
    }
}
