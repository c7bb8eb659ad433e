use super::{
    holder_like, reservation_value, CreateOutcome, RawLease, RegistryError, ReserveOutcome,
    Snapshot, UnreserveOutcome, WatchEvent,
};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tweed_config::LeaseAttrs;

/// Keys per request of the initial list.
pub const LIST_PAGE: i64 = 1000;

/// The smallest key after every key that starts with `prefix` (etcd's `--prefix` range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

#[derive(Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// `--etcd-cafile`: the CA that signed etcd's server certificate. `https://` endpoints need
    /// it: tweed does not consult the system trust store.
    pub ca_file: Option<PathBuf>,
    /// `--etcd-certfile`/`--etcd-keyfile`: a client certificate for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// `--etcd-username`/`--etcd-password`: etcd's own authentication (simple tokens, refreshed
    /// when they expire).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Per-request deadline: without it a request to a dead member hangs instead of failing over.
    pub request_timeout: Duration,
}

/// Never prints the password.
impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

pub struct EtcdRegistry {
    /// The client in use and the index of the endpoint it is pinned to (usize::MAX: the
    /// balanced client over all endpoints made at start).
    pinned: tokio::sync::Mutex<(usize, Client)>,
    endpoint_list: Vec<String>,
    connect_opts: ConnectOptions,
    prefix: String,
    ctx: Ctx,
}

/// The whole chain of an etcd-client error: its Display stops at "transport error", which says
/// nothing about a refused certificate or a closed port.
pub(crate) fn describe(e: &etcd_client::Error) -> String {
    fn chain(mut out: String, mut next: Option<&(dyn std::error::Error + 'static)>) -> String {
        while let Some(e) = next {
            let s = e.to_string();
            if !out.contains(&s) {
                out.push_str(": ");
                out.push_str(&s);
            }
            next = e.source();
        }
        out
    }
    use std::error::Error as _;
    match e {
        etcd_client::Error::TransportError(t) => chain(t.to_string(), t.source()),
        etcd_client::Error::GRpcStatus(st) => {
            chain(format!("{:?}: {}", st.code(), st.message()), st.source())
        }
        other => other.to_string(),
    }
}

/// Whether an error is a TLS failure (handshake refused, certificate not trusted, ...).
fn is_tls_failure(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "unknownissuer", "ssl"]
        .iter()
        .any(|w| d.contains(w))
}

/// Whether etcd refused the credentials themselves (as opposed to being unreachable).
fn is_auth_rejection(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(st) => {
            let m = st.message();
            m.contains("authentication failed")
                || m.contains("invalid user ID or password")
                || m.contains("user name")
                || st.code() == tonic::Code::PermissionDenied
                || st.code() == tonic::Code::Unauthenticated
        }
        _ => false,
    }
}

/// What error messages need to know about the connection.
#[derive(Clone)]
struct Ctx {
    endpoints: String,
    tls: bool,
    /// Set when a request failed in a way another member may not: the next request moves on.
    failover: Arc<AtomicBool>,
}

impl Ctx {
    fn classify(&self, op: &'static str, key: &str, e: etcd_client::Error) -> RegistryError {
        let mut detail = describe(&e);
        if is_transient(&detail) {
            self.failover.store(true, Ordering::Relaxed);
        }
        if is_tls_failure(&detail) {
            return RegistryError::Tls {
                op,
                key: key.to_string(),
                endpoints: self.endpoints.clone(),
                detail,
                source: Box::new(e),
            };
        }
        let closed = ["connection closed", "broken pipe", "connection reset"]
            .iter()
            .any(|w| detail.contains(w));
        if self.tls && closed {
            // TLS 1.3: a server that refuses the client's certificate (or its absence) does so
            // after the client considers the handshake done, so the client only sees a close.
            detail.push_str(
                " (if this persists: an etcd with --client-cert-auth, or with --trusted-ca-file, \
                 which implies it, closes connections from clients without a certificate it \
                 trusts; check --etcd-certfile/--etcd-keyfile)",
            );
        }
        if detail.contains("user name is empty") {
            detail.push_str(
                " (etcd has authentication enabled: pass --etcd-username and --etcd-password-file)",
            );
        } else if detail.contains("permission denied") {
            detail.push_str(" (the etcd user needs a role with readwrite on the prefix)");
        }
        RegistryError::Etcd {
            op,
            key: key.to_string(),
            detail,
            source: Box::new(e),
        }
    }
}

/// Errors worth waiting out while authenticating at start: etcd not up (yet), no leader.
fn is_transient(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    [
        "connection refused",
        "connect error",
        "timed out",
        "timeout",
        "deadline",
        "dns error",
        "unreachable",
        "no route to host",
        "no leader",
        "leader changed",
        "too many requests",
    ]
    .iter()
    .any(|w| d.contains(w))
}

fn read_pem(flag: &'static str, path: &Path, marker: &str) -> Result<Vec<u8>, RegistryError> {
    let err = |source| RegistryError::TlsFile {
        flag,
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(err)?;
    if !String::from_utf8_lossy(&bytes).contains(marker) {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a PEM file: no line containing {marker:?}"),
        )));
    }
    Ok(bytes)
}

/// The rustls client config: the CA (required for `https://`; the system store is not used) and
/// optionally the client identity.
fn tls_options(opts: &EtcdOptions) -> Result<Option<TlsOptions>, RegistryError> {
    let https = opts.endpoints.iter().any(|e| e.starts_with("https://"));
    let http = opts.endpoints.iter().any(|e| e.starts_with("http://"));
    let files = opts.ca_file.is_some() || opts.cert_file.is_some() || opts.key_file.is_some();
    if https && http {
        return Err(RegistryError::Options(format!(
            "--etcd-endpoints mixes http:// and https:// ({}); use one scheme",
            opts.endpoints.join(",")
        )));
    }
    if !https {
        if files {
            return Err(RegistryError::Options(format!(
                "--etcd-cafile/--etcd-certfile/--etcd-keyfile are given but the endpoints ({}) are \
                 plain http://; use https:// endpoints",
                opts.endpoints.join(",")
            )));
        }
        return Ok(None);
    }
    let Some(ca) = &opts.ca_file else {
        return Err(RegistryError::Options(format!(
            "https:// endpoints ({}) need --etcd-cafile, the CA that signed etcd's server \
             certificate (the system trust store is not used)",
            opts.endpoints.join(",")
        )));
    };
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem(
        "--etcd-cafile",
        ca,
        "BEGIN CERTIFICATE",
    )?));
    match (&opts.cert_file, &opts.key_file) {
        (Some(c), Some(k)) => {
            let cert = read_pem("--etcd-certfile", c, "BEGIN CERTIFICATE")?;
            let key = read_pem("--etcd-keyfile", k, "PRIVATE KEY")?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        (None, None) => {}
        _ => {
            return Err(RegistryError::Options(
                "--etcd-certfile and --etcd-keyfile go together: give both or neither".into(),
            ))
        }
    }
    Ok(Some(tls))
}

impl EtcdRegistry {
    /// Without credentials this connects lazily: the channel dials on first use and re-dials after
    /// failures, so an etcd that is down at start (or later) delays requests instead of failing
    /// the agent. With `--etcd-username`, etcd-client must authenticate before the first request:
    /// an unreachable etcd is then waited for here (with backoff), while a refused password or a
    /// TLS failure fails at once. Bad TLS files fail at once, naming the flag and file.
    pub async fn connect(opts: EtcdOptions) -> Result<Self, RegistryError> {
        let timeout = if opts.request_timeout.is_zero() {
            Duration::from_secs(5)
        } else {
            opts.request_timeout
        };
        let mut co = ConnectOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(10), timeout)
            .with_require_leader(true);
        if let Some(tls) = tls_options(&opts)? {
            co = co.with_tls(tls);
        }
        let endpoints = opts.endpoints.join(",");
        let ctx = Ctx {
            failover: Arc::default(),
            endpoints: endpoints.clone(),
            tls: opts.endpoints.iter().any(|e| e.starts_with("https://")),
        };
        let with_creds = match (&opts.username, &opts.password) {
            (Some(u), Some(p)) => Some(
                co.clone()
                    .with_user(u.clone(), p.clone())
                    .with_auto_token_refresh(true),
            ),
            (Some(_), None) | (None, Some(_)) => {
                return Err(RegistryError::Options(
                    "--etcd-username and --etcd-password go together: give both or neither".into(),
                ))
            }
            (None, None) => None,
        };
        // Credentials are dropped below when etcd has auth off; failover follows the same choice.
        let mut connect_opts = with_creds.clone().unwrap_or_else(|| co.clone());
        let client = match with_creds {
            None => Client::connect(&opts.endpoints, Some(co))
                .await
                .map_err(|e| ctx.classify("connect", "", e))?,
            Some(cred_opts) => {
                let user = opts.username.clone().unwrap_or_default();
                let mut backoff = Duration::from_millis(500);
                loop {
                    match Client::connect(&opts.endpoints, Some(cred_opts.clone())).await {
                        Ok(c) => break c,
                        Err(etcd_client::Error::GRpcStatus(st))
                            if st.message().contains("authentication is not enabled") =>
                        {
                            // What etcd's Go client does too: credentials are not needed.
                            tracing::warn!(
                                %endpoints,
                                "etcd has authentication disabled; ignoring --etcd-username"
                            );
                            connect_opts = co.clone();
                            break Client::connect(&opts.endpoints, Some(co))
                                .await
                                .map_err(|e| ctx.classify("connect", "", e))?;
                        }
                        Err(e) if is_auth_rejection(&e) => {
                            return Err(RegistryError::Auth {
                                user,
                                endpoints,
                                detail: describe(&e),
                                source: Box::new(e),
                            })
                        }
                        Err(e) => {
                            let transient = is_transient(&describe(&e));
                            let err = ctx.classify("authenticate as", &user, e);
                            if !transient || matches!(err, RegistryError::Tls { .. }) {
                                return Err(err);
                            }
                            tracing::warn!("{err}; retrying in {backoff:?}");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            }
        };
        Ok(EtcdRegistry {
            pinned: tokio::sync::Mutex::new((usize::MAX, client)),
            endpoint_list: opts.endpoints.clone(),
            connect_opts,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
            ctx,
        })
    }

    /// The client for the next request. etcd-client's balanced channel keeps sending requests to
    /// a member that died (seen: "connection refused" for as long as the member was down), so
    /// after a transient failure this pins the next endpoint that accepts a connection, in turn.
    async fn client(&self) -> Client {
        let mut pinned = self.pinned.lock().await;
        let n = self.endpoint_list.len();
        if n > 1 && self.ctx.failover.swap(false, Ordering::Relaxed) {
            let from = if pinned.0 == usize::MAX { 0 } else { pinned.0 };
            for step in 1..=n {
                let idx = (from + step) % n;
                let ep = &self.endpoint_list[idx];
                match Client::connect([ep.as_str()], Some(self.connect_opts.clone())).await {
                    Ok(c) => {
                        tracing::warn!(endpoint = %ep, "etcd: a request failed; using this member next");
                        *pinned = (idx, c);
                        break;
                    }
                    Err(e) => tracing::debug!(endpoint = %ep, "etcd: not usable: {}", describe(&e)),
                }
            }
        }
        pinned.1.clone()
    }

    fn err<'a>(
        &'a self,
        op: &'static str,
        key: &'a str,
    ) -> impl FnOnce(etcd_client::Error) -> RegistryError + 'a {
        move |e| self.ctx.classify(op, key, e)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn subnets(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub async fn get_config(&self) -> Result<Option<String>, RegistryError> {
        let key = format!("{}/config", self.prefix);
        let resp = self
            .client()
            .await
            .kv_client()
            .get(key.as_str(), None)
            .await
            .map_err(self.err("get", &key))?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// The whole subnet directory, read in pages of [`LIST_PAGE`] keys at one revision: a single
    /// get of 20,000 leases is ~3.6 MB, near the gRPC client's 4 MiB decode limit.
    pub async fn list_leases(&self) -> Result<Snapshot, RegistryError> {
        self.list_leases_paged(LIST_PAGE).await
    }

    /// [`list_leases`](Self::list_leases) with `page` keys a request. Every page after the first
    /// reads at the first page's revision, so the pages together are one consistent snapshot (a
    /// compaction in between fails the list, and the caller lists again).
    pub async fn list_leases_paged(&self, page: i64) -> Result<Snapshot, RegistryError> {
        let dir = self.subnets();
        let end = prefix_end(dir.as_bytes());
        let mut from = dir.clone().into_bytes();
        let mut revision = 0;
        let mut leases = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(page.max(1));
            if revision != 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self
                .client()
                .await
                .kv_client()
                .get(from.clone(), Some(opts))
                .await
                .map_err(self.err("list", &dir))?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            leases.extend(resp.kvs().iter().map(|kv| RawLease {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                lease_id: kv.lease(),
                mod_revision: kv.mod_revision(),
                create_revision: kv.create_revision(),
            }));
            match resp.kvs().last() {
                // The next page starts just after the last key seen.
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(Snapshot { leases, revision })
    }

    pub async fn create_lease(
        &self,
        key: &dyn super::KeyName,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<CreateOutcome, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        let lease_id = self.grant(&k, ttl).await?;
        let absent = Compare::version(k.as_str(), CompareOp::Equal, 0);
        if self
            .put_if("create", &k, absent, attrs.to_json(), lease_id)
            .await?
        {
            Ok(CreateOutcome::Created { lease_id })
        } else {
            // The grant is ours alone and now useless; let it go rather than wait out its TTL.
            let _ = self.client().await.lease_client().revoke(lease_id).await;
            Ok(CreateOutcome::Taken)
        }
    }

    pub async fn update_lease(
        &self,
        key: &dyn super::KeyName,
        attrs: &LeaseAttrs,
        lease_id: i64,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        let unchanged = Compare::mod_revision(k.as_str(), CompareOp::Equal, mod_revision);
        self.put_if("update", &k, unchanged, attrs.to_json(), lease_id)
            .await
    }

    /// Deletes `key` only if nobody wrote it since `mod_revision`; false when it changed or is
    /// gone. A node renaming its own key (its IPv6 half changed) removes the old one this way,
    /// never a value someone wrote over it meanwhile.
    pub async fn delete_lease(
        &self,
        key: &dyn super::KeyName,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        let unchanged = Compare::mod_revision(k.as_str(), CompareOp::Equal, mod_revision);
        let txn = Txn::new()
            .when([unchanged])
            .and_then([TxnOp::delete(k.as_str(), None)]);
        let resp = self
            .client()
            .await
            .kv_client()
            .txn(txn)
            .await
            .map_err(self.err("delete", &k))?;
        Ok(resp.succeeded())
    }

    /// Writes `value` at `k`, attached to `lease_id` (0: no lease), only if `cmp` holds; false
    /// when it did not (someone else wrote first).
    async fn put_if(
        &self,
        op: &'static str,
        k: &str,
        cmp: Compare,
        value: impl Into<Vec<u8>>,
        lease_id: i64,
    ) -> Result<bool, RegistryError> {
        let opts = (lease_id != 0).then(|| PutOptions::new().with_lease(lease_id));
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(k, value, opts)]);
        let resp = self
            .client()
            .await
            .kv_client()
            .txn(txn)
            .await
            .map_err(self.err(op, k))?;
        Ok(resp.succeeded())
    }

    async fn grant(&self, k: &str, ttl: Duration) -> Result<i64, RegistryError> {
        let grant = self
            .client()
            .await
            .lease_client()
            .grant(ttl.as_secs().max(1) as i64, None)
            .await
            .map_err(self.err("lease grant for", k))?;
        Ok(grant.id())
    }

    /// Drops the connection in use for a fresh one (dialed lazily, as at start). After this
    /// node's own address changed, a connection made from the old one is dead, and HTTP/2
    /// keepalive notices only some 15 s later; requests meanwhile time out.
    pub async fn redial(&self) -> Result<(), RegistryError> {
        let c = Client::connect(&self.endpoint_list, Some(self.connect_opts.clone()))
            .await
            .map_err(|e| self.ctx.classify("connect", "", e))?;
        *self.pinned.lock().await = (usize::MAX, c);
        Ok(())
    }

    pub async fn revoke(&self, lease_id: i64) -> Result<(), RegistryError> {
        let key = format!("lease {lease_id:x}");
        match self.client().await.lease_client().revoke(lease_id).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Ok(())
            }
            Err(e) => Err(self.err("lease revoke", &key)(e)),
        }
    }

    pub async fn renew(&self, lease_id: i64) -> Result<Option<Duration>, RegistryError> {
        let key = format!("lease {lease_id:x}");
        match self
            .client()
            .await
            .lease_client()
            .keep_alive(lease_id)
            .await
        {
            Ok((_keeper, _stream)) => {
                let ttl = self
                    .client()
                    .await
                    .lease_client()
                    .time_to_live(lease_id, None)
                    .await
                    .map_err(self.err("lease ttl", &key))?;
                Ok((ttl.ttl() > 0).then(|| Duration::from_secs(ttl.ttl() as u64)))
            }
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(None),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Ok(None)
            }
            Err(e) => Err(self.err("lease keepalive", &key)(e)),
        }
    }

    /// One key, with its lease and revision; `None` when absent.
    async fn get_one(&self, k: &str, op: &'static str) -> Result<Option<RawLease>, RegistryError> {
        let resp = self
            .client()
            .await
            .kv_client()
            .get(k, None)
            .await
            .map_err(self.err(op, k))?;
        Ok(resp.kvs().first().map(|kv| RawLease {
            key: k.to_string(),
            value: kv.value().to_vec(),
            lease_id: kv.lease(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
        }))
    }

    /// Each step is a transaction guarded by what was read (absent, or that mod revision), so a
    /// concurrent writer makes it read again instead of being overwritten.
    pub async fn reserve(
        &self,
        key: &dyn super::KeyName,
        holder: IpAddr,
    ) -> Result<ReserveOutcome, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        for _ in 0..16 {
            let (cmp, value, created) = match self.get_one(&k, "reserve").await? {
                None => (
                    Compare::version(k.as_str(), CompareOp::Equal, 0),
                    reservation_value(holder),
                    true,
                ),
                Some(l) => {
                    match holder_like(&l.value, holder) {
                        Ok(ip) if ip == holder => {}
                        Ok(ip) => return Ok(ReserveOutcome::HeldBy(ip.to_string())),
                        Err(v) => return Ok(ReserveOutcome::HeldBy(v)),
                    }
                    if l.lease_id == 0 {
                        return Ok(ReserveOutcome::Reserved { created: false });
                    }
                    // The same value without a lease: detached from its TTL, it never expires.
                    (
                        Compare::mod_revision(k.as_str(), CompareOp::Equal, l.mod_revision),
                        l.value,
                        false,
                    )
                }
            };
            if self.put_if("reserve", &k, cmp, value, 0).await? {
                return Ok(ReserveOutcome::Reserved { created });
            }
        }
        Err(RegistryError::Raced {
            op: "reserve",
            key: k,
        })
    }

    pub async fn unreserve(
        &self,
        key: &dyn super::KeyName,
        ttl: Duration,
    ) -> Result<UnreserveOutcome, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        for _ in 0..16 {
            let l = match self.get_one(&k, "unreserve").await? {
                None => return Ok(UnreserveOutcome::NotFound),
                Some(l) if l.lease_id != 0 => {
                    return Ok(UnreserveOutcome::NotReserved {
                        lease_id: l.lease_id,
                    })
                }
                Some(l) => l,
            };
            let lease_id = self.grant(&k, ttl).await?;
            let unchanged = Compare::mod_revision(k.as_str(), CompareOp::Equal, l.mod_revision);
            if self
                .put_if("unreserve", &k, unchanged, l.value, lease_id)
                .await?
            {
                return Ok(UnreserveOutcome::Released { lease_id });
            }
            let _ = self.client().await.lease_client().revoke(lease_id).await;
        }
        Err(RegistryError::Raced {
            op: "unreserve",
            key: k,
        })
    }

    pub async fn watch(&self, from_revision: i64) -> Result<EtcdWatch, RegistryError> {
        let dir = self.subnets();
        let stream = self
            .client()
            .await
            .watch_client()
            .watch(
                dir.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from_revision),
                ),
            )
            .await
            .map_err(self.err("watch", &dir))?;
        Ok(EtcdWatch {
            stream,
            prefix: dir,
            requested: from_revision,
            ctx: self.ctx.clone(),
        })
    }
}

pub struct EtcdWatch {
    stream: WatchStream,
    prefix: String,
    requested: i64,
    ctx: Ctx,
}

impl EtcdWatch {
    fn err<'a>(
        &'a self,
        op: &'static str,
        key: &'a str,
    ) -> impl FnOnce(etcd_client::Error) -> RegistryError + 'a {
        move |e| self.ctx.classify(op, key, e)
    }

    pub async fn next(&mut self) -> Result<Vec<WatchEvent>, RegistryError> {
        loop {
            let msg = self
                .stream
                .message()
                .await
                .map_err(self.err("watch", &self.prefix))?;
            let Some(resp) = msg else {
                return Err(RegistryError::WatchEnded {
                    prefix: self.prefix.clone(),
                    reason: "stream closed by server".into(),
                });
            };
            if resp.compact_revision() > 0 {
                return Err(RegistryError::Compacted {
                    requested: self.requested,
                    compacted: resp.compact_revision(),
                });
            }
            if resp.canceled() {
                return Err(RegistryError::WatchEnded {
                    prefix: self.prefix.clone(),
                    reason: format!("canceled: {}", resp.cancel_reason()),
                });
            }
            if resp.events().is_empty() {
                continue; // creation ack or progress notification
            }
            let events = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    Some(match ev.event_type() {
                        EventType::Put => WatchEvent::Put(RawLease {
                            key,
                            value: kv.value().to_vec(),
                            lease_id: kv.lease(),
                            mod_revision: kv.mod_revision(),
                            create_revision: kv.create_revision(),
                        }),
                        EventType::Delete => WatchEvent::Delete {
                            key,
                            revision: kv.mod_revision(),
                        },
                    })
                })
                .collect::<Vec<_>>();
            if let Some(last) = events.last() {
                self.requested = last.revision() + 1;
            }
            return Ok(events);
        }
    }
}

#[cfg(test)]
mod paging_tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/subnets/"), b"/a/subnets0".to_vec());
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
