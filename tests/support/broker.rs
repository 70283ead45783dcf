//! A real Tansu broker (Kafka-compatible) per test, run as a child process.
//!
//! The binary comes from `WEIR_TANSU_BIN`, else `tansu` on `PATH`, else
//! `$CARGO_HOME/bin/tansu` (default `$HOME/.cargo/bin/tansu`). `scripts/test.sh`
//! installs the pinned version and sets `WEIR_TANSU_BIN`.
//!
//! Each broker gets its own temp dir (working directory, log file and, for
//! sqlite storage, the database). The dir is removed on drop, unless the test is
//! panicking: then the log's tail is printed and the dir is kept for inspection.
//! Set `WEIR_TANSU_LOG` (e.g. `debug`) to pass a `RUST_LOG` filter to the broker.
//!
//! If the test process dies without dropping the `Tansu` (killed by a timeout,
//! Ctrl-C, or kept in a `static`), a small `sh` watchdog kills the broker: it
//! waits on a pipe from the test process and fires when the pipe closes.

use std::{
    env, fs,
    fs::File,
    io::{Read, Seek, SeekFrom},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{kill_wait, watchdog};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    ClientConfig,
};

/// How long a broker may take to accept TCP connections after spawning.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a created topic may take to show all its partitions in metadata.
const TOPIC_TIMEOUT: Duration = Duration::from_secs(30);
/// Ports are picked below the kernel's ephemeral range (32768-60999 on Linux),
/// so an outgoing client connection can never be holding the port we pick.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// A fresh name for a topic or consumer group: `prefix-<uuid v4 simple>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storage {
    /// `memory://tansu/`: nothing survives a restart.
    Memory,
    /// `sqlite://tansu.db`, relative to the broker's working directory (its temp dir).
    Sqlite,
}

impl Storage {
    fn url(self) -> &'static str {
        match self {
            Storage::Memory => "memory://tansu/",
            Storage::Sqlite => "sqlite://tansu.db",
        }
    }
}

/// A running Tansu broker listening on 127.0.0.1 at a port of its own.
pub struct Tansu {
    bin: PathBuf,
    storage: Storage,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    watchdog: Option<Child>,
}

impl Tansu {
    /// A broker with in-memory storage (lost on `restart`).
    pub fn start_memory() -> Tansu {
        Tansu::start(Storage::Memory)
    }

    /// A broker with sqlite storage in a fresh temp dir; data and committed offsets
    /// survive `restart`.
    pub fn start_sqlite() -> Tansu {
        Tansu::start(Storage::Sqlite)
    }

    fn start(storage: Storage) -> Tansu {
        let bin = tansu_bin();
        let dir = env::temp_dir().join(unique("weir-tansu"));
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create broker dir {}: {e}", dir.display()));
        let log = dir.join("broker.log");
        let mut broker = Tansu {
            bin,
            storage,
            port: 0,
            dir,
            log,
            child: None,
            watchdog: None,
        };
        // A port picked as free can still be taken before the broker binds it; then
        // the broker exits at once and we try another port.
        let mut last_error = String::new();
        for _ in 0..5 {
            broker.port = free_port();
            match broker.spawn_and_wait() {
                Ok(()) => return broker,
                Err(e) => last_error = e,
            }
        }
        panic!("{last_error}");
    }

    /// Bootstrap servers for clients: `127.0.0.1:PORT`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The broker's log file (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Kill the broker and wait for it to exit. Idempotent.
    pub fn stop(&mut self) {
        // Watchdog first, so it can never fire at a recycled pid.
        kill_wait(self.watchdog.take());
        kill_wait(self.child.take());
    }

    /// Stop the broker and start it again on the same port with the same storage.
    /// With `start_sqlite` the data and committed offsets survive; with
    /// `start_memory` the new broker is empty.
    pub fn restart(&mut self) {
        self.stop();
        // The port was just released; retry a few times in case the kernel still
        // holds it for a moment.
        let mut last_error = String::new();
        for attempt in 0..5 {
            if attempt > 0 {
                thread::sleep(Duration::from_millis(500));
            }
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
        }
        panic!("restart failed: {last_error}");
    }

    /// Create a topic with the `tansu topic create` CLI and wait until the topic
    /// and all its partitions are visible in metadata.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        let output = Command::new(&self.bin)
            .current_dir(&self.dir)
            .args(["topic", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--partitions")
            .arg(partitions.to_string())
            .arg(name)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} topic create: {e}", self.bin.display()));
        assert!(
            output.status.success(),
            "tansu topic create {name} --partitions {partitions} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        self.wait_for_topic(name, partitions);
    }

    /// Wait until `name` has `partitions` partitions, each with a leader, in metadata.
    pub fn wait_for_topic(&self, name: &str, partitions: i32) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("allow.auto.create.topics", "false")
            .create()
            .expect("metadata client");
        let deadline = Instant::now() + TOPIC_TIMEOUT;
        let mut last = String::from("no metadata yet");
        while Instant::now() < deadline {
            match consumer.fetch_metadata(Some(name), Duration::from_secs(5)) {
                Ok(metadata) => {
                    let topic = metadata.topics().iter().find(|t| t.name() == name);
                    match topic {
                        Some(t)
                            if t.error().is_none()
                                && t.partitions().len() == partitions as usize
                                && t.partitions().iter().all(|p| p.leader() >= 0) =>
                        {
                            return;
                        }
                        Some(t) => {
                            last = format!(
                                "topic error {:?}, {} partitions",
                                t.error(),
                                t.partitions().len()
                            )
                        }
                        None => last = "topic absent from metadata".into(),
                    }
                }
                Err(e) => last = format!("metadata error: {e}"),
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "topic {name} not visible with {partitions} partitions after {TOPIC_TIMEOUT:?}: {last}\n{}",
            self.log_tail()
        );
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut command = Command::new(&self.bin);
        command
            .current_dir(&self.dir)
            .arg("broker")
            .arg("--listener-url")
            .arg(&listener)
            .arg("--advertised-listener-url")
            .arg(&listener)
            .arg("--storage-engine")
            .arg(self.storage.url())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // Tansu also reads these from the environment; keep a developer's shell
        // settings out of the test broker. (It loads a `.env` from its working
        // directory or above too: running in the temp dir keeps the repo's out.)
        for var in [
            "CLUSTER_ID",
            "LISTENER_URL",
            "ADVERTISED_LISTENER_URL",
            "STORAGE_ENGINE",
            "SCHEMA_REGISTRY",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            command.env_remove(var);
        }
        match env::var("WEIR_TANSU_LOG") {
            Ok(filter) => command.env("RUST_LOG", filter),
            Err(_) => command.env_remove("RUST_LOG"),
        };
        let started = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", self.bin.display()))?;
        self.watchdog = watchdog(child.id());
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                kill_wait(self.watchdog.take());
                return Err(format!(
                    "tansu exited ({status}) before accepting connections on {addr}\n{}",
                    self.log_tail()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                // The port answers; make sure it is our broker and not a squatter.
                if let Ok(Some(status)) = child.try_wait() {
                    kill_wait(self.watchdog.take());
                    return Err(format!(
                        "tansu exited ({status}) while {addr} answered\n{}",
                        self.log_tail()
                    ));
                }
                self.child = Some(child);
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                kill_wait(self.watchdog.take());
                kill_wait(Some(child));
                panic!(
                    "tansu did not accept connections on {addr} within {READY_TIMEOUT:?}\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last few KiB of the broker's log, headed by its path.
    fn log_tail(&self) -> String {
        const TAIL: u64 = 8 * 1024;
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        format!(
            "--- tail of broker log {} ---\n{text}\n--- end of broker log ---",
            self.log.display()
        )
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("{}", self.log_tail());
            eprintln!("broker dir kept: {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
        let port = PORT_RANGE.start + (uuid::Uuid::new_v4().as_u128() % u128::from(span)) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    // Fall back to a kernel-assigned port.
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// The tansu binary: `WEIR_TANSU_BIN`, else `tansu` on `PATH`, else cargo's bin dir.
fn tansu_bin() -> PathBuf {
    const HINT: &str = "run scripts/test.sh, which installs Tansu 0.6.0 and sets WEIR_TANSU_BIN";
    if let Some(bin) = env::var_os("WEIR_TANSU_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "WEIR_TANSU_BIN={} does not exist; {HINT}",
            bin.display()
        );
        return bin;
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(bin) = env::split_paths(&path)
            .map(|dir| dir.join("tansu"))
            .find(|bin| bin.is_file())
        {
            return bin;
        }
    }
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    if let Some(bin) = cargo_home
        .map(|home| home.join("bin").join("tansu"))
        .filter(|bin| bin.is_file())
    {
        return bin;
    }
    panic!("tansu not found (WEIR_TANSU_BIN unset, not on PATH, not in cargo's bin dir); {HINT}");
}
