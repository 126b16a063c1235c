//! A data centre in one test process: a real manager on a loopback port with
//! an embedded store in a temp dir, and sim agents that can be stopped,
//! restarted and fault-injected.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use drove_agent::{Agent, AgentConfig};
use drove_client::Client;
use drove_hypervisor::sim::{SimConfig, SimHypervisor, SimPool};
use drove_manager::{Manager, ManagerConfig};
use drove_model::{Operation, OperationState};
use drove_store::embedded::EmbeddedStore;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Dc {
    pub dir: tempfile::TempDir,
    manager: Option<Arc<Manager>>,
    pub endpoint: String,
    pub admin: Client,
    pub agent_token: String,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    pub agents: Vec<TestAgent>,
    pub config: ManagerConfig,
    /// The shared storage every host sees (guests on it cannot run twice).
    pub pool: SimPool,
    /// How often agents added from now on sample their guests' usage.
    pub usage_every: Duration,
}

pub struct TestAgent {
    pub name: String,
    pub sim: SimHypervisor,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestAgent {
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// An agent for host `name` on `sim`, running until the sender is used.
pub fn spawn_agent(
    endpoint: &str,
    token: &str,
    name: &str,
    sim: &SimHypervisor,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    spawn_agent_with(endpoint, token, name, sim, AgentConfig::new(name).usage_every)
}

/// [`spawn_agent`], sampling its guests' usage every `usage_every`.
pub fn spawn_agent_with(
    endpoint: &str,
    token: &str,
    name: &str,
    sim: &SimHypervisor,
    usage_every: Duration,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let mut ac = AgentConfig::new(name);
    ac.usage_every = usage_every;
    ac.retry_after = Duration::from_millis(200);
    ac.restart_backoff = Duration::from_millis(500);
    ac.migration_address = Some(std::net::Ipv4Addr::LOCALHOST.into());
    let agent = Agent::new(ac, Client::new(endpoint, token), Arc::new(sim.clone()));
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async {
        let _ = rx.await;
    }));
    (tx, task)
}

pub fn fast_config(dir: &std::path::Path) -> ManagerConfig {
    let mut c = ManagerConfig::new(dir.to_owned());
    c.heartbeat_interval = Duration::from_millis(100);
    c.host_timeout = Duration::from_secs(3);
    c
}

impl Dc {
    pub async fn start(hosts: usize) -> Dc {
        let dir = tempfile::tempdir().unwrap();
        let config = fast_config(dir.path());
        Self::start_with(dir, config, hosts).await
    }

    pub async fn start_with(dir: tempfile::TempDir, config: ManagerConfig, hosts: usize) -> Dc {
        let mut dc = Dc {
            manager: Some(Self::open(&config).await),
            dir,
            endpoint: String::new(),
            admin: Client::new("http://unset", ""),
            agent_token: String::new(),
            server: None,
            agents: Vec::new(),
            config,
            pool: SimPool::default(),
            usage_every: AgentConfig::new("default").usage_every,
        };
        dc.serve(None).await;
        for i in 1..=hosts {
            dc.add_agent(&format!("host-{i}"), SimConfig::default()).await;
        }
        dc.wait_hosts_up(hosts).await;
        dc
    }

    async fn open(config: &ManagerConfig) -> Arc<Manager> {
        let store = EmbeddedStore::open(&config.data_dir.join("state.redb")).unwrap();
        Manager::open(config.clone(), Arc::new(store)).await.unwrap().0
    }

    async fn serve(&mut self, addr: Option<std::net::SocketAddr>) {
        let listener =
            tokio::net::TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())).await.unwrap();
        self.endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let m = self.manager();
        let task = tokio::spawn(async move {
            drove_manager::serve(m, listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        self.server = Some((tx, task));
        let admin = std::fs::read_to_string(self.config.data_dir.join("admin.token")).unwrap();
        self.agent_token = std::fs::read_to_string(self.config.data_dir.join("agent.token")).unwrap();
        self.admin = Client::new(&self.endpoint, &admin);
    }

    pub fn manager(&self) -> Arc<Manager> {
        self.manager.clone().expect("manager running")
    }

    /// Stop the manager's server and drop it with its store.
    pub async fn kill_manager(&mut self) {
        if let Some((tx, task)) = self.server.take() {
            let _ = tx.send(());
            if tokio::time::timeout(Duration::from_secs(10), task).await.is_err() {
                panic!("manager did not stop");
            }
        }
        self.manager = None;
    }

    /// Start a fresh manager on the same store and address.
    pub async fn restart_manager(&mut self) {
        self.kill_manager().await;
        let addr: std::net::SocketAddr = self.endpoint.trim_start_matches("http://").parse().unwrap();
        // In-flight handlers may hold the old store for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        self.manager = Some(loop {
            let store = EmbeddedStore::open(&self.config.data_dir.join("state.redb"));
            match store {
                Ok(s) => break Manager::open(self.config.clone(), Arc::new(s)).await.unwrap().0,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("reopening the store: {e}"),
            }
        });
        self.serve(Some(addr)).await;
    }

    pub async fn add_agent(&mut self, name: &str, cfg: SimConfig) -> usize {
        let state = self.dir.path().join(format!("{name}.json"));
        let sim = SimHypervisor::with_state_file(cfg, state).unwrap();
        sim.join_pool(&self.pool);
        let agent = self.start_agent(name, &sim);
        self.agents.push(agent);
        self.agents.len() - 1
    }

    /// A host that sees no shared pool.
    pub async fn add_agent_without_pool(&mut self, name: &str, cfg: SimConfig) -> usize {
        let state = self.dir.path().join(format!("{name}.json"));
        let sim = SimHypervisor::with_state_file(cfg, state).unwrap();
        let agent = self.start_agent(name, &sim);
        self.agents.push(agent);
        self.agents.len() - 1
    }

    fn start_agent(&self, name: &str, sim: &SimHypervisor) -> TestAgent {
        let (tx, task) = spawn_agent_with(&self.endpoint, &self.agent_token, name, sim, self.usage_every);
        TestAgent { name: name.into(), sim: sim.clone(), stop: Some(tx), task: Some(task) }
    }

    /// Restart agent `i` as a new process would: same name, same sim state.
    pub async fn restart_agent(&mut self, i: usize) {
        self.agents[i].stop().await;
        let state = self.agents[i].sim.state_file().unwrap().to_owned();
        let sim = SimHypervisor::with_state_file(self.agents[i].sim.config().clone(), state).unwrap();
        sim.join_pool(&self.pool);
        let name = self.agents[i].name.clone();
        self.agents[i] = self.start_agent(&name, &sim);
    }

    /// A running guest with a 1 GiB disk, placed on `host`.
    pub async fn running_guest_on(&self, name: &str, host: &str) -> drove_model::GuestId {
        let req = drove_api::CreateGuestRequest {
            disks: vec![drove_model::ByteSize::gib(1).into()],
            host: Some(host.into()),
            ..drove_api::CreateGuestRequest::new(name, 1, drove_model::ByteSize::mib(256))
        };
        let acc = self.admin.create_guest(&req).await.unwrap();
        self.wait_succeeded(&acc.operation).await;
        acc.guest
    }

    pub async fn wait_hosts_up(&self, n: usize) {
        self.eventually("hosts up", || async {
            let hosts = self.admin.list_hosts().await.ok()?;
            (hosts.iter().filter(|h| h.info.state == drove_model::HostState::Up && h.last_seen_ms.is_some()).count()
                >= n)
                .then_some(())
        })
        .await;
    }

    pub async fn wait_op(&self, op: &Operation) -> Operation {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = self.admin.wait_operation(op.id, Duration::from_secs(5)).await.unwrap();
            if o.state.is_final() {
                return o;
            }
            assert!(Instant::now() < deadline, "operation {} stuck: {o:?}", op.id);
        }
    }

    pub async fn wait_succeeded(&self, op: &Operation) {
        let o = self.wait_op(op).await;
        assert_eq!(o.state, OperationState::Succeeded, "{o:?}");
    }

    /// Poll `f` until it yields, for up to 30 s.
    pub async fn eventually<T, F, Fut>(&self, what: &str, f: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(mut self) {
        for a in &mut self.agents {
            a.stop().await;
        }
        self.kill_manager().await;
    }
}
