//! Shared by the end-to-end tests and the benchmarks: building the example
//! plugins, running the real `refract` binary, and reference folds of the
//! example events computed independently of the plugins.
#![allow(dead_code, reason = "each test binary uses a different part")]

pub(crate) mod kafka;
pub(crate) mod reference;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use refract_client::Client;
use serde_json::Value;

/// The example and test plugins, built for `wasm32-wasip2`.
pub(crate) struct Plugins {
    pub order_summary: PathBuf,
    pub order_search: PathBuf,
    pub account_balance: PathBuf,
    pub chaos: PathBuf,
    pub orders_cdc: PathBuf,
    pub orders_payments_join: PathBuf,
    pub shipments: PathBuf,
    pub order_upcaster: PathBuf,
    pub customers: PathBuf,
    pub order_customer_names: PathBuf,
    /// `testkit-chaos` declaring schema-version 2.
    pub chaos_v2: PathBuf,
    /// `testkit-chaos` whose `manifest()` panics.
    pub chaos_trap: PathBuf,
    /// `testkit-chaos` mapping one more index field, same schema-version.
    pub chaos_mapping: PathBuf,
    /// `order-summary` storing a cancelled order's status as `canceled`.
    pub order_summary_canceled: PathBuf,
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("runtime/ is in the workspace").to_owned()
}

/// Build the plugins (incrementally: a no-op when nothing changed, so a test
/// never runs a stale component) into their own target directory, which
/// keeps this nested cargo off the lock of the build that runs the tests.
pub(crate) fn plugins() -> &'static Plugins {
    static PLUGINS: OnceLock<Plugins> = OnceLock::new();
    PLUGINS.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| exe.ancestors().nth(3).expect("target/<profile>/deps/<exe>").to_owned());
        let target = target.join("wasm-plugins");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let build = |packages: &[&str], target: &Path, variant: Option<&str>| {
            let mut command = Command::new(&cargo);
            command
                .current_dir(workspace_root())
                .args(["build", "--target", "wasm32-wasip2", "--profile", "plugin", "--quiet"])
                .args(packages.iter().flat_map(|p| ["-p", p]))
                .arg("--target-dir")
                .arg(target)
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .env_remove("RUSTFLAGS")
                .env_remove("RUSTC_WORKSPACE_WRAPPER")
                .env_remove("CARGO_TARGET_DIR");
            match variant {
                Some(v) => command.env("TESTKIT_VARIANT", v),
                None => command.env_remove("TESTKIT_VARIANT"),
            };
            let status = command.status().expect("running cargo to build the plugins");
            assert!(
                status.success(),
                "building the plugins failed; is the target installed? `rustup target add wasm32-wasip2`"
            );
            target.join("wasm32-wasip2").join("plugin")
        };
        let packages = [
            "order-summary",
            "order-search",
            "account-balance",
            "testkit-chaos",
            "orders-cdc",
            "orders-payments-join",
            "shipments",
            "order-upcaster",
            "customers",
            "order-customer-names",
        ];
        build(&packages, &target, None);
        // Variants build in their own directories, so that none rebuilds another.
        let v2 = build(&["testkit-chaos"], &target.with_file_name("wasm-plugins-v2"), Some("v2"));
        let trap = build(&["testkit-chaos"], &target.with_file_name("wasm-plugins-trap"), Some("trap"));
        let mapping = build(&["testkit-chaos"], &target.with_file_name("wasm-plugins-mapping"), Some("mapping"));
        let canceled = build(&["order-summary"], &target.with_file_name("wasm-plugins-canceled"), Some("canceled"));
        let dir = target.join("wasm32-wasip2").join("plugin");
        Plugins {
            order_summary: dir.join("order_summary.wasm"),
            order_search: dir.join("order_search.wasm"),
            account_balance: dir.join("account_balance.wasm"),
            chaos: dir.join("testkit_chaos.wasm"),
            orders_cdc: dir.join("orders_cdc.wasm"),
            orders_payments_join: dir.join("orders_payments_join.wasm"),
            shipments: dir.join("shipments.wasm"),
            order_upcaster: dir.join("order_upcaster.wasm"),
            customers: dir.join("customers.wasm"),
            order_customer_names: dir.join("order_customer_names.wasm"),
            chaos_v2: v2.join("testkit_chaos.wasm"),
            chaos_trap: trap.join("testkit_chaos.wasm"),
            chaos_mapping: mapping.join("testkit_chaos.wasm"),
            order_summary_canceled: canceled.join("order_summary.wasm"),
        }
    })
}

/// `order-summary` written in Python and in JavaScript, built with
/// `refract plugin build` (componentize-py, componentize-js).
pub(crate) struct LangPlugins {
    pub order_summary_py: PathBuf,
    pub order_summary_js: PathBuf,
    pub order_search_py: PathBuf,
    pub order_search_js: PathBuf,
}

/// Build the Python and JavaScript plugins, or reuse a build of the same
/// sources: each takes 10–30 s, so components are kept under a hash of the
/// plugin's sources, the SDKs and the WIT package.
pub(crate) fn lang_plugins() -> &'static LangPlugins {
    static PLUGINS: OnceLock<LangPlugins> = OnceLock::new();
    PLUGINS.get_or_init(|| {
        let root = workspace_root();
        let exe = std::env::current_exe().expect("test executable path");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| exe.ancestors().nth(3).expect("target/<profile>/deps/<exe>").to_owned())
            .join("lang-plugins");
        std::fs::create_dir_all(&target).unwrap();
        let build = |plugin: &str, sdk: &str| -> PathBuf {
            use sha2::Digest;
            let mut hash = sha2::Sha256::new();
            let mut files = Vec::new();
            // The plugin, its SDK, the packed encoding and the WIT package.
            for dir in
                [root.join("plugins").join(plugin), root.join("sdk").join(sdk), root.join("abi"), root.join("wit")]
            {
                collect_files(&dir, &mut files);
            }
            files.sort();
            for f in &files {
                hash.update(f.strip_prefix(&root).unwrap().to_string_lossy().as_bytes());
                hash.update(std::fs::read(f).unwrap());
            }
            let digest: String = hash.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
            let out = target.join(format!("{}-{digest}.wasm", plugin.replace('-', "_")));
            if !out.exists() {
                let tmp = out.with_extension("tmp");
                let status = Command::new(env!("CARGO_BIN_EXE_refract"))
                    .args(["plugin", "build"])
                    .arg(root.join("plugins").join(plugin))
                    .arg("--out")
                    .arg(&tmp)
                    .status()
                    .expect("running refract plugin build");
                assert!(
                    status.success(),
                    "refract plugin build {plugin} failed; are the toolchains installed? scripts/install-tools"
                );
                std::fs::rename(&tmp, &out).unwrap();
            }
            out
        };
        LangPlugins {
            order_summary_py: build("order-summary-py", "python"),
            order_summary_js: build("order-summary-js", "js"),
            order_search_py: build("order-search-py", "python"),
            order_search_js: build("order-search-js", "js"),
        }
    })
}

/// Every source file under `dir` (not `.refract/`, `__pycache__` or built components).
fn collect_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "__pycache__" || name.ends_with(".wasm") || name == "templates" {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, into);
        } else {
            into.push(path);
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind :0").local_addr().expect("local addr").port()
}

/// A `refract run` process with its own data and plugins directories.
pub(crate) struct Server {
    child: Option<Child>,
    pub dir: PathBuf,
    pub port: u16,
    pub url: String,
    /// Extra environment for the process, from the next (re)start on.
    pub env: Vec<(String, String)>,
    /// A soft limit on open files for the process (as a small machine's
    /// default), from the next (re)start on.
    pub soft_nofile: Option<u64>,
}

impl Server {
    /// Write `dir/refract.yaml` (data and plugins under `dir`, plus `extra`
    /// YAML), copy `plugins` into `dir/plugins`, start the binary and wait until it answers.
    pub(crate) fn start(dir: &Path, plugins: &[&Path], extra: &str) -> Server {
        let plugins_dir = dir.join("plugins");
        std::fs::create_dir_all(&plugins_dir).unwrap();
        for p in plugins {
            std::fs::copy(p, plugins_dir.join(p.file_name().unwrap())).unwrap();
        }
        let port = free_port();
        let config = format!("data-dir: data\nplugins-dir: plugins\nlisten: 127.0.0.1:{port}\n{extra}");
        std::fs::write(dir.join("refract.yaml"), config).unwrap();
        let mut server = Server {
            child: None,
            dir: dir.to_owned(),
            port,
            url: format!("http://127.0.0.1:{port}"),
            env: Vec::new(),
            soft_nofile: None,
        };
        server.restart();
        server
    }

    /// Start the process again (after [`Server::kill`]) on the same directory and port.
    pub(crate) fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("refract.log")).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_refract"));
        if let Some(soft) = self.soft_nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only async-signal-safe calls: getrlimit, setrlimit.
            unsafe {
                command.pre_exec(move || {
                    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                    limit.rlim_cur = soft.min(limit.rlim_max);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    Ok(())
                });
            }
        }
        let child = command
            .arg("run")
            .arg("--config")
            .arg(self.dir.join("refract.yaml"))
            .env("RUST_LOG", "info,wasmtime=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting refract");
        self.child = Some(child);
        let client = self.client();
        // Generous: a Python or JavaScript component takes ~20 s to compile the first time.
        let until = Instant::now() + Duration::from_secs(300);
        loop {
            if client.get("/healthz").is_ok_and(|r| r.status == 200) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("refract exited with {status}; log:\n{}", self.log());
            }
            assert!(Instant::now() < until, "refract did not start; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL the process: no shutdown, no flushing.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaping the process");
        }
    }

    /// Stop the process gracefully (SIGTERM) and wait for it.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            child.wait().expect("reaping the process");
        }
    }

    /// Run the `refract` CLI against this server (`--url`), with
    /// `admin_token` as `REFRACT_ADMIN_TOKEN` when given, to completion.
    pub(crate) fn cli(&self, args: &[&str], admin_token: Option<&str>) -> std::process::Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_refract"));
        command.args(args).args(["--url", &self.url]);
        if let Some(token) = admin_token {
            command.env("REFRACT_ADMIN_TOKEN", token);
        }
        command.output().expect("running the refract CLI")
    }

    /// The process id of the running server.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub(crate) fn client(&self) -> Client {
        Client::new(&self.url)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("refract.log")).unwrap_or_default()
    }

    /// Wait until no projection lags behind the log.
    pub(crate) fn wait_caught_up(&self) {
        let caught_up = self.client().wait_caught_up(Duration::from_secs(180)).expect("querying status");
        assert!(caught_up, "projections did not catch up; status: {}", self.get("/v1/projections"));
    }

    /// Wait until the checkpoints of `projection` add up to `records` (every
    /// record of its streams read, for sources whose offsets are dense).
    pub(crate) fn wait_checkpoints(&self, projection: &str, records: u64) -> Value {
        let until = Instant::now() + Duration::from_secs(180);
        loop {
            let status = self.get(&format!("/v1/projections/{projection}"));
            let read: u64 =
                status["partitions"].as_array().unwrap().iter().map(|p| p["checkpoint"].as_u64().unwrap()).sum();
            if read == records {
                return status;
            }
            assert!(read < records, "{projection} read {read} records of {records}: {status}");
            assert!(Instant::now() < until, "{projection} read only {read} records of {records}: {status}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Assert that `order-summary` holds exactly the reference fold of
    /// `events`: both tables, and counters showing each event applied or
    /// dead-lettered once (counters commit with the batches, so a batch
    /// applied twice would show).
    pub(crate) fn assert_order_summary_is_the_fold_of(&self, events: &[Value]) {
        let expected = reference::orders(events);
        let got: Vec<(String, Value)> = self.table("order-summary", "orders");
        assert_eq!(got.len(), expected.orders.len(), "orders lost or invented");
        assert!(got == expected.orders.into_iter().collect::<Vec<_>>(), "orders differ from the reference fold");
        let got = self.table("order-summary", "customer-orders");
        assert!(got == expected.customer_orders.into_iter().collect::<Vec<_>>(), "customer-orders differ");
        let status = self.get("/v1/projections/order-summary");
        assert_eq!(status["deadLetters"], expected.rejected, "{status}");
        assert_eq!(status["eventsApplied"], events.len() - expected.rejected, "{status}");
    }

    /// Every event of `stream` in the embedded log, partition by partition.
    pub(crate) fn stream(&self, stream: &str) -> Vec<Value> {
        let streams = self.get("/v1/streams");
        let Some(info) = streams["streams"].as_array().unwrap().iter().find(|s| s["name"] == stream) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for partition in 0..info["partitions"].as_u64().unwrap() {
            let mut from = 0;
            loop {
                let page =
                    self.get(&format!("/v1/streams/{stream}/events?partition={partition}&from={from}&limit=1000"));
                let events = page["events"].as_array().unwrap();
                if events.is_empty() {
                    break;
                }
                out.extend(events.iter().cloned());
                from = page["next"].as_u64().unwrap();
            }
        }
        out
    }

    /// `GET path`, asserting a 200, returning the body.
    pub(crate) fn get(&self, path: &str) -> Value {
        let reply = self.client().get(path).expect("GET");
        assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
        reply.body
    }

    /// Every entry of a projection's table, paging with `after`.
    pub(crate) fn table(&self, projection: &str, table: &str) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/v1/projections/{projection}/tables/{table}/items?limit=1000");
            if let Some(a) = &after {
                path.push_str(&format!("&after={}", encode(a)));
            }
            let page = self.get(&path);
            for item in page["items"].as_array().unwrap() {
                out.push((item["key"].as_str().unwrap().to_owned(), item["value"].clone()));
            }
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return out,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wait until `GET path` answers `status`, failing with `what` after `within`.
pub(crate) fn wait_status(client: &Client, path: &str, status: u16, within: Duration, what: &str) {
    let until = Instant::now() + within;
    while client.get(path).unwrap().status != status {
        assert!(Instant::now() < until, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Percent-encode a query value.
pub(crate) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Events as NDJSON.
pub(crate) fn ndjson(events: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        serde_json::to_writer(&mut out, e).unwrap();
        out.push(b'\n');
    }
    out
}
