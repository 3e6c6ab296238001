//! Our own proxy-wasm host: loads the real filter `.wasm` with wasmtime and plays Envoy's part
//! of the proxy-wasm 0.2.1 ABI, so the filter can be tested without Envoy, deterministically.
//!
//! One module per group of host calls: `logging`, `clock`, `headers`, `buffers`,
//! `properties`, `http_calls`, `redis_calls`, `shared_data`, `metrics`, `stream`, `wasi`.
//! A `Plugin` is one filter configuration; each `Vm` is one instance of it (one per Envoy
//! worker), and its VMs share shared data, metrics, logs and the clock.

pub mod abi;
mod buffers;
mod clock;
mod headers;
mod http_calls;
mod logging;
mod memory;
mod metrics;
mod properties;
mod redis_calls;
mod shared_data;
pub mod state;
mod stream;
mod wasi;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use wasmtime::{CallHook, Engine, Instance, Linker, Module, Store, WasmParams, WasmResults};

pub use abi::Pairs;
use state::{Callout, PluginShared, RedisUpstream, Stream, VmState};
pub use state::{Clock, LocalReply, LogLine};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{0}: cannot load the module: {1}")]
    Load(String, String),
    #[error("the filter imports {0}, which this host does not provide")]
    UnknownImport(String),
    #[error("the filter refused its configuration (proxy_on_configure returned false); log:\n{0}")]
    ConfigureRefused(String),
    #[error("wasm trap or host error in {0}: {1:?}")]
    Trap(&'static str, wasmtime::Error),
}

/// Where the filter's outbound calls go.
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    /// `proxy_http_call` clusters: name -> `host:port` (e.g. webdis).
    pub http: HashMap<String, String>,
    /// Redis host-call clusters: name -> `redis://host:port/`.
    pub redis: HashMap<String, String>,
    /// Redis host-call clusters that are a Redis Cluster: name -> its masters' URLs (each call
    /// goes to the master of its first key's slot, as Higress's Redis cluster client routes).
    pub redis_cluster: HashMap<String, Vec<String>>,
}

/// Each group module's `add_to_linker`.
type AddHostCalls = fn(&mut Linker<VmState>) -> wasmtime::Result<()>;

pub struct Plugin {
    engine: Engine,
    module: Module,
    linker: Linker<VmState>,
    shared: Arc<PluginShared>,
    configuration: Vec<u8>,
    upstreams: Upstreams,
    /// The root id of a second filter of the same module right after this one (Envoy as
    /// envoy.yaml renders it: the hold filter), if any.
    hold_root_id: Option<String>,
    vms: usize,
}

/// Envoy's property saying where a response came from.
pub const CODE_DETAILS: &str = "response.code_details";

/// What the filter did with a request (or where it stands).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Sent on towards the upstream.
    Continue,
    /// Held, waiting for a call's answer.
    Paused,
    /// Its headers went on, but the hold filter stopped them before the upstream: the filter
    /// answers once the body is in.
    Held,
    /// Answered by the filter itself.
    Responded(LocalReply),
}

impl Plugin {
    /// Compiles the module and checks that this host provides every import it needs.
    pub fn load(
        wasm: &Path,
        configuration: &[u8],
        upstreams: Upstreams,
    ) -> Result<Self, HostError> {
        let engine = Engine::default();
        let module = Module::from_file(&engine, wasm)
            .map_err(|e| HostError::Load(wasm.display().to_string(), format!("{e:?}")))?;
        Self::from_module(engine, module, configuration, upstreams)
    }

    pub fn from_module(
        engine: Engine,
        module: Module,
        configuration: &[u8],
        upstreams: Upstreams,
    ) -> Result<Self, HostError> {
        let mut linker = Linker::new(&engine);
        let add: [AddHostCalls; 11] = [
            logging::add_to_linker,
            clock::add_to_linker,
            headers::add_to_linker,
            buffers::add_to_linker,
            properties::add_to_linker,
            http_calls::add_to_linker,
            redis_calls::add_to_linker,
            shared_data::add_to_linker,
            metrics::add_to_linker,
            stream::add_to_linker,
            wasi::add_to_linker,
        ];
        for add in add {
            add(&mut linker).expect("host functions are defined once");
        }
        let shared = Arc::new(PluginShared::default());
        let plugin = Self {
            engine,
            module,
            linker,
            shared,
            configuration: configuration.to_vec(),
            upstreams,
            hold_root_id: None,
            vms: 0,
        };
        let mut store = Store::new(&plugin.engine, plugin.vm_state(0));
        for import in plugin.module.imports() {
            if plugin.linker.get_by_import(&mut store, &import).is_none() {
                return Err(HostError::UnknownImport(format!(
                    "{}.{}",
                    import.module(),
                    import.name()
                )));
            }
        }
        plugin.shared.clock.set_nanos(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        );
        Ok(plugin)
    }

    /// `module.name` of every import of the filter.
    pub fn imports(&self) -> Vec<String> {
        self.module
            .imports()
            .map(|i| format!("{}.{}", i.module(), i.name()))
            .collect()
    }

    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// VMs started from now on also run a second filter of the module, under `root_id`
    /// (without configuration), right after this one on every stream.
    pub fn with_second_filter(&mut self, root_id: &str) {
        self.hold_root_id = Some(root_id.to_string());
    }

    pub fn metric(&self, name: &str) -> u64 {
        let metrics = self.shared.metrics.lock().unwrap();
        metrics
            .by_name
            .get(name)
            .and_then(|id| metrics.values.get(id))
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }

    pub fn logs(&self) -> Vec<LogLine> {
        self.shared.logs.lock().unwrap().clone()
    }

    fn vm_state(&self, index: usize) -> VmState {
        VmState {
            index,
            shared: self.shared.clone(),
            plugin_configuration: self.configuration.clone(),
            vm_configuration: Vec::new(),
            root_context_id: 1,
            effective_context: 1,
            streams: HashMap::new(),
            tick_period_ms: 0,
            next_token: 0,
            pending: Default::default(),
            http_call_response: None,
            redis_call_response: None,
            http_clusters: self.upstreams.http.clone(),
            redis_clusters: self
                .upstreams
                .redis
                .iter()
                .map(|(name, url)| (name.clone(), RedisUpstream::One(url.clone())))
                .chain(
                    self.upstreams
                        .redis_cluster
                        .iter()
                        .map(|(name, urls)| (name.clone(), RedisUpstream::Cluster(urls.clone()))),
                )
                .collect(),
            redis_initialized: HashMap::new(),
            plugin_properties: HashMap::from([
                ("plugin_name".to_string(), b"plan_limits".to_vec()),
                ("plugin_root_id".to_string(), b"plan_limits".to_vec()),
                ("plugin_vm_id".to_string(), b"plan_limits".to_vec()),
            ]),
            hold_root: None,
            aliases: HashMap::new(),
            random_state: 0x5EED_0000 + index as u64,
            done_called: false,
            host_calls: 0,
        }
    }

    /// Starts one VM the way Envoy starts a worker's: instantiate, create the root context,
    /// `proxy_on_vm_start`, `proxy_on_configure`.
    pub fn start_vm(&mut self) -> Result<Vm, HostError> {
        self.vms += 1;
        let mut store = Store::new(&self.engine, self.vm_state(self.vms));
        store.call_hook(|mut state, hook| {
            if matches!(hook, CallHook::CallingHost) {
                state.data_mut().host_calls += 1;
            }
            Ok(())
        });
        let instance = self
            .linker
            .instantiate(&mut store, &self.module)
            .map_err(|e| HostError::Trap("instantiate", e))?;
        let mut vm = Vm {
            store,
            instance,
            redis: HashMap::new(),
            next_context: 2,
            hold: None,
        };
        if vm.instance.get_func(&mut vm.store, "_initialize").is_some() {
            vm.call::<(), ()>("_initialize", ())?;
        }
        vm.call::<(i32, i32), ()>("proxy_on_context_create", (1, 0))?;
        vm.call::<(i32, i32), i32>("proxy_on_vm_start", (1, 0))?;
        let size = self.configuration.len() as i32;
        if vm.call::<(i32, i32), i32>("proxy_on_configure", (1, size))? == 0 {
            let log = self
                .logs()
                .iter()
                .map(|l| l.message.clone())
                .collect::<Vec<_>>()
                .join("\n");
            return Err(HostError::ConfigureRefused(log));
        }
        if let Some(root_id) = self.hold_root_id.clone() {
            vm.start_second_filter(root_id)?;
        }
        Ok(vm)
    }
}

pub struct Vm {
    store: Store<VmState>,
    instance: Instance,
    /// Open connections per Redis cluster, with the init settings they were opened with.
    redis: HashMap<String, (state::RedisInit, redis_calls::RedisConnection)>,
    next_context: u32,
    /// The second filter's root context, and its HTTP context on each stream.
    hold: Option<(u32, HashMap<u32, u32>)>,
}

impl Vm {
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        name: &'static str,
        params: P,
    ) -> Result<R, HostError> {
        let func = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, name)
            .map_err(|e| HostError::Trap(name, e))?;
        func.call(&mut self.store, params)
            .map_err(|e| HostError::Trap(name, e))
    }

    /// Calls `name` on behalf of context `id` (it is the effective context meanwhile).
    fn call_on<P: WasmParams, R: WasmResults>(
        &mut self,
        id: u32,
        name: &'static str,
        params: P,
    ) -> Result<R, HostError> {
        self.store.data_mut().effective_context = id;
        let result = self.call(name, params);
        self.store.data_mut().effective_context = self.store.data().root_context_id;
        result
    }

    /// How many calls the filter has made into the host so far.
    pub fn host_calls(&self) -> u64 {
        self.store.data().host_calls
    }

    pub fn root_context_id(&self) -> u32 {
        self.store.data().root_context_id
    }

    /// The second filter's root context: created, started and configured (with nothing) as
    /// Envoy does for each filter of a VM.
    fn start_second_filter(&mut self, root_id: String) -> Result<(), HostError> {
        let root = self.next_context;
        self.next_context += 1;
        self.store.data_mut().hold_root = Some((root, root_id));
        let configuration = std::mem::take(&mut self.store.data_mut().plugin_configuration);
        self.call_on::<(i32, i32), ()>(root, "proxy_on_context_create", (root as i32, 0))?;
        self.call_on::<(i32, i32), i32>(root, "proxy_on_vm_start", (root as i32, 0))?;
        let accepted =
            self.call_on::<(i32, i32), i32>(root, "proxy_on_configure", (root as i32, 0));
        self.store.data_mut().plugin_configuration = configuration;
        if accepted? == 0 {
            return Err(HostError::ConfigureRefused("the second filter".into()));
        }
        self.hold = Some((root, HashMap::new()));
        Ok(())
    }

    /// Reconfigures the running VM (Envoy does this on a config update); `Ok(false)` when the
    /// filter refused the new configuration.
    pub fn configure(&mut self, configuration: &[u8]) -> Result<bool, HostError> {
        self.store.data_mut().plugin_configuration = configuration.to_vec();
        let root = self.root_context_id();
        let accepted = self.call_on::<(i32, i32), i32>(
            root,
            "proxy_on_configure",
            (root as i32, configuration.len() as i32),
        )?;
        Ok(accepted != 0)
    }

    /// A new HTTP stream; its request headers go in with `request_headers`.
    pub fn new_stream(&mut self) -> Result<u32, HostError> {
        let id = self.next_context;
        self.next_context += 1;
        self.store.data_mut().streams.insert(id, Stream::default());
        let root = self.root_context_id();
        self.call_on::<(i32, i32), ()>(id, "proxy_on_context_create", (id as i32, root as i32))?;
        if let Some((hold_root, _)) = self.hold {
            let second = self.next_context;
            self.next_context += 1;
            self.store.data_mut().aliases.insert(second, id);
            if let Some((_, contexts)) = &mut self.hold {
                contexts.insert(id, second);
            }
            self.call_on::<(i32, i32), ()>(
                second,
                "proxy_on_context_create",
                (second as i32, hold_root as i32),
            )?;
        }
        Ok(id)
    }

    /// Sets a property of stream `id` the filter may read (as Envoy's filters before it would
    /// have: `jwt_authn`'s payload in the dynamic metadata, say), at `path`.
    pub fn set_property(&mut self, id: u32, path: &[&str], value: Vec<u8>) {
        self.stream_mut(id)
            .properties
            .insert(path.join("."), Some(value));
    }

    /// A property of stream `id` Envoy has but cannot encode for the filter (a map with a
    /// null in it: a token's payload with a null claim): reading it fails.
    pub fn set_unencodable_property(&mut self, id: u32, path: &[&str]) {
        self.stream_mut(id).properties.insert(path.join("."), None);
    }

    /// The request headers of stream `id` as they stand (as the filter left them).
    pub fn request_headers_of(&self, id: u32) -> Pairs {
        self.store
            .data()
            .streams
            .get(&id)
            .map(|s| s.request_headers.clone())
            .unwrap_or_default()
    }

    /// Request headers (with pseudo-headers `:method`, `:path`, `:authority`) arrive.
    pub fn request_headers(
        &mut self,
        id: u32,
        headers: Pairs,
        end_of_stream: bool,
    ) -> Result<Flow, HostError> {
        let count = headers.len() as i32;
        self.stream_mut(id).request_headers = headers;
        let action = self.call_on::<(i32, i32, i32), i32>(
            id,
            "proxy_on_request_headers",
            (id as i32, count, end_of_stream as i32),
        )?;
        if action == abi::ACTION_CONTINUE {
            self.stream_mut(id).resumed = true;
        }
        self.stream_mut(id).end_of_stream = end_of_stream;
        self.pass_on(id)?;
        self.encode_local_reply(id)?;
        Ok(self.flow(id))
    }

    /// Headers the filter let go on (at once, or when it resumed) reach the second filter.
    fn pass_on(&mut self, id: u32) -> Result<(), HostError> {
        let stream = self.stream_mut(id);
        if !stream.resumed || stream.passed_on || stream.local_response.is_some() {
            return Ok(());
        }
        stream.passed_on = true;
        let (count, end_of_stream) = (stream.request_headers.len() as i32, stream.end_of_stream);
        let Some(second) = self.hold.as_ref().and_then(|(_, c)| c.get(&id).copied()) else {
            return Ok(());
        };
        let action = self.call_on::<(i32, i32, i32), i32>(
            second,
            "proxy_on_request_headers",
            (second as i32, count, end_of_stream as i32),
        )?;
        self.stream_mut(id).held = action != abi::ACTION_CONTINUE;
        Ok(())
    }

    /// A piece of stream `id`'s request body arrives (`end_of_stream`: the last). Returns the
    /// bytes of it that went on to the upstream (the filter may empty or stop it, the
    /// second filter may hold the request).
    pub fn request_body(
        &mut self,
        id: u32,
        piece: Vec<u8>,
        end_of_stream: bool,
    ) -> Result<u64, HostError> {
        let len = piece.len() as i32;
        self.stream_mut(id).request_body = piece;
        let action = self.call_on::<(i32, i32, i32), i32>(
            id,
            "proxy_on_request_body",
            (id as i32, len, end_of_stream as i32),
        )?;
        self.encode_local_reply(id)?;
        let stream = self.stream_mut(id);
        let went_on = std::mem::take(&mut stream.request_body).len() as u64;
        if action != abi::ACTION_CONTINUE || stream.held || stream.local_response.is_some() {
            return Ok(0);
        }
        stream.upstream_body_bytes += went_on;
        Ok(went_on)
    }

    /// The response headers of stream `id` as they stand (as the filter left them).
    pub fn response_headers_of(&self, id: u32) -> Pairs {
        self.store
            .data()
            .streams
            .get(&id)
            .map(|s| s.response_headers.clone())
            .unwrap_or_default()
    }

    /// Body bytes of stream `id` that reached the upstream.
    pub fn upstream_body_bytes(&self, id: u32) -> u64 {
        self.store.data().streams[&id].upstream_body_bytes
    }

    /// Where stream `id` stands now.
    pub fn flow(&self, id: u32) -> Flow {
        let stream = &self.store.data().streams[&id];
        match (&stream.local_response, stream.resumed, stream.held) {
            (Some(reply), _, _) => Flow::Responded(reply.clone()),
            (None, true, false) => Flow::Continue,
            (None, true, true) => Flow::Held,
            (None, false, _) => Flow::Paused,
        }
    }

    /// A local reply goes through the response path too, as in Envoy.
    fn encode_local_reply(&mut self, id: u32) -> Result<(), HostError> {
        let stream = self.stream_mut(id);
        let Some(reply) = stream.local_response.clone() else {
            return Ok(());
        };
        if !stream.response_headers.is_empty() {
            return Ok(());
        }
        let mut headers = vec![(":status".to_string(), reply.status.to_string().into_bytes())];
        headers.extend(reply.headers.iter().cloned());
        let count = headers.len() as i32;
        stream.response_headers = headers;
        self.call_on::<(i32, i32, i32), i32>(
            id,
            "proxy_on_response_headers",
            (id as i32, count, 0),
        )?;
        Ok(())
    }

    /// The upstream answers stream `id` with `status`.
    pub fn response_headers(
        &mut self,
        id: u32,
        status: u16,
        headers: Pairs,
    ) -> Result<(), HostError> {
        let mut all = vec![(":status".to_string(), status.to_string().into_bytes())];
        all.extend(headers);
        let count = all.len() as i32;
        let stream = self.stream_mut(id);
        stream.response_headers = all;
        // As Envoy says of an answer: the upstream's own, unless a test set Envoy's reason
        // for answering in its place (`response_timeout`, ...).
        stream
            .properties
            .entry(CODE_DETAILS.into())
            .or_insert_with(|| Some(b"via_upstream".to_vec()));
        let action = self.call_on::<(i32, i32, i32), i32>(
            id,
            "proxy_on_response_headers",
            (id as i32, count, 1),
        )?;
        if action != abi::ACTION_CONTINUE {
            self.stream_mut(id).response_paused = true;
        }
        Ok(())
    }

    /// Whether the filter holds stream `id`'s response (until it continues it).
    pub fn response_paused(&self, id: u32) -> bool {
        self.store
            .data()
            .streams
            .get(&id)
            .is_some_and(|s| s.response_paused)
    }

    /// The stream ends (completed, reset or abandoned): `proxy_on_log`, `_done`, `_delete`
    /// (the second filter's too). A stream that went on towards the upstream has reached one
    /// (`upstream.local_address`: Envoy had its connection).
    pub fn end_stream(&mut self, id: u32) -> Result<(), HostError> {
        if self.flow(id) == Flow::Continue {
            self.set_property(
                id,
                &["upstream", "local_address"],
                b"127.0.0.1:40000".to_vec(),
            );
        }
        let second = self.hold.as_mut().and_then(|(_, c)| c.remove(&id));
        for context in std::iter::once(id).chain(second) {
            self.call_on::<(i32,), ()>(context, "proxy_on_log", (context as i32,))?;
            self.call_on::<(i32,), i32>(context, "proxy_on_done", (context as i32,))?;
            self.call_on::<(i32,), ()>(context, "proxy_on_delete", (context as i32,))?;
        }
        if let Some(second) = second {
            self.store.data_mut().aliases.remove(&second);
        }
        self.store.data_mut().streams.remove(&id);
        Ok(())
    }

    pub fn tick(&mut self) -> Result<(), HostError> {
        let root = self.root_context_id();
        self.call_on::<(i32,), ()>(root, "proxy_on_tick", (root as i32,))
    }

    pub fn pending_calls(&self) -> usize {
        self.store.data().pending.len()
    }

    /// Lets every call made so far run for real and delivers the answers, in order.
    pub fn deliver_calls(&mut self) -> Result<(), HostError> {
        let calls: Vec<_> = self.store.data_mut().pending.drain(..).collect();
        for call in calls {
            self.deliver(call, false)?;
        }
        Ok(())
    }

    /// Answers every call made so far as Envoy answers one that timed out (nothing ran).
    pub fn time_out_calls(&mut self) -> Result<(), HostError> {
        let calls: Vec<_> = self.store.data_mut().pending.drain(..).collect();
        for call in calls {
            self.deliver(call, true)?;
        }
        Ok(())
    }

    fn deliver(&mut self, call: state::PendingCall, time_out: bool) -> Result<(), HostError> {
        let id = self.root_context_id();
        match call.callout {
            Callout::Http {
                cluster,
                headers,
                body,
                timeout_ms,
            } => {
                let address = self.store.data().http_clusters[&cluster].clone();
                let response = if time_out {
                    None
                } else {
                    http_calls::perform(&address, &headers, &body, timeout_ms)
                };
                let (h, b, t) = response
                    .as_ref()
                    .map(|r| (r.headers.len(), r.body.len(), r.trailers.len()))
                    .unwrap_or((0, 0, 0));
                self.store.data_mut().http_call_response = Some(response.unwrap_or_default());
                let result = self.call_on::<(i32, i32, i32, i32, i32), ()>(
                    id,
                    "proxy_on_http_call_response",
                    (id as i32, call.token as i32, h as i32, b as i32, t as i32),
                );
                self.store.data_mut().http_call_response = None;
                result?;
            }
            Callout::Redis { cluster, query } => {
                let reply = if time_out {
                    None
                } else {
                    self.run_redis(&cluster, &query)
                };
                let (status, size) = match &reply {
                    Some(bytes) => (0, bytes.len()),
                    None => (1, 0),
                };
                self.store.data_mut().redis_call_response = reply;
                let result = self.call_on::<(i32, i32, i32, i32), ()>(
                    id,
                    "proxy_on_redis_call_response",
                    (id as i32, call.token as i32, status, size as i32),
                );
                self.store.data_mut().redis_call_response = None;
                result?;
            }
        }
        self.after_callback()
    }

    /// What a callback did to streams: answers go through the response path, resumed
    /// headers on to the second filter.
    fn after_callback(&mut self) -> Result<(), HostError> {
        let ids: Vec<u32> = self.store.data().streams.keys().copied().collect();
        for id in ids {
            self.pass_on(id)?;
            self.encode_local_reply(id)?;
        }
        Ok(())
    }

    fn run_redis(&mut self, cluster: &str, query: &[u8]) -> Option<Vec<u8>> {
        let init = self.store.data().redis_initialized.get(cluster)?.clone();
        // Higress drops a cluster's connections when it is initialized with other settings.
        if self
            .redis
            .get(cluster)
            .is_some_and(|(with, _)| *with != init)
        {
            self.redis.remove(cluster);
        }
        if !self.redis.contains_key(cluster) {
            let upstream = self.store.data().redis_clusters.get(cluster)?.clone();
            let (conn, notes) = match redis_calls::connect_to(&upstream, &init) {
                Ok(opened) => opened,
                Err(e) => {
                    self.store.data().log(1, format!("redis {cluster}: {e}"));
                    return None;
                }
            };
            for note in notes {
                self.store.data().log(1, format!("{cluster}: {note}"));
            }
            self.redis.insert(cluster.to_string(), (init, conn));
        }
        // A call that fails or outlives the timeout answers as a failed call; the connection,
        // whose late reply would answer the next call, goes.
        let reply = redis_calls::perform(self.redis.get_mut(cluster)?.1.as_dyn(), query);
        if reply.is_none() {
            self.redis.remove(cluster);
        }
        reply
    }

    /// Envoy shutting the VM down: `proxy_on_done` on the root; `true` when the filter is done
    /// at once (or called `proxy_done`).
    pub fn shut_down(&mut self) -> Result<bool, HostError> {
        let root = self.root_context_id();
        let done = self.call_on::<(i32,), i32>(root, "proxy_on_done", (root as i32,))?;
        Ok(done != 0 || self.store.data().done_called)
    }

    /// The filter called `proxy_done` (it finished what it had to do before stopping).
    pub fn done_called(&self) -> bool {
        self.store.data().done_called
    }

    fn stream_mut(&mut self, id: u32) -> &mut Stream {
        self.store
            .data_mut()
            .streams
            .get_mut(&id)
            .expect("a live stream")
    }
}
