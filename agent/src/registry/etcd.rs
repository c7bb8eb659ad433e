use super::{CreateOutcome, RawLease, RegistryError, Snapshot, WatchEvent};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use std::path::PathBuf;
use std::time::Duration;
use tweed_config::{LeaseAttrs, SubnetKey};

#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Per-request deadline: without it a request to a dead member hangs instead of failing over.
    pub request_timeout: Duration,
}

pub struct EtcdRegistry {
    client: Client,
    prefix: String,
}

fn etcd_err(op: &'static str, key: &str) -> impl FnOnce(etcd_client::Error) -> RegistryError {
    let key = key.to_string();
    move |e| RegistryError::Etcd {
        op,
        key,
        source: Box::new(e),
    }
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|source| RegistryError::TlsFile {
        path: path.clone(),
        source,
    })
}

impl EtcdRegistry {
    /// Connects lazily: the channel dials on first use and re-dials after failures, so an etcd that
    /// is down at start (or later) delays requests instead of failing the agent.
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
        if opts.ca_file.is_some() || opts.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &opts.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read_file(ca)?));
            }
            if let (Some(c), Some(k)) = (&opts.cert_file, &opts.key_file) {
                tls = tls.identity(Identity::from_pem(read_file(c)?, read_file(k)?));
            }
            co = co.with_tls(tls);
        }
        let endpoints = opts.endpoints.join(",");
        let client = Client::connect(&opts.endpoints, Some(co))
            .await
            .map_err(etcd_err("connect", &endpoints))?;
        Ok(EtcdRegistry {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
        })
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
            .client
            .kv_client()
            .get(key.as_str(), None)
            .await
            .map_err(etcd_err("get", &key))?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    pub async fn list_leases(&self) -> Result<Snapshot, RegistryError> {
        let dir = self.subnets();
        let resp = self
            .client
            .kv_client()
            .get(dir.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_err("list", &dir))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let leases = resp
            .kvs()
            .iter()
            .map(|kv| RawLease {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                lease_id: kv.lease(),
                mod_revision: kv.mod_revision(),
            })
            .collect();
        Ok(Snapshot { leases, revision })
    }

    pub async fn create_lease(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<CreateOutcome, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        let ttl_secs = ttl.as_secs().max(1) as i64;
        let grant = self
            .client
            .lease_client()
            .grant(ttl_secs, None)
            .await
            .map_err(etcd_err("lease grant for", &k))?;
        let lease_id = grant.id();
        let txn = Txn::new()
            .when([Compare::version(k.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                k.as_str(),
                attrs.to_json(),
                Some(PutOptions::new().with_lease(lease_id)),
            )]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(etcd_err("create", &k))?;
        if resp.succeeded() {
            Ok(CreateOutcome::Created { lease_id })
        } else {
            // The grant is ours alone and now useless; let it go rather than wait out its TTL.
            let _ = self.client.lease_client().revoke(lease_id).await;
            Ok(CreateOutcome::Taken)
        }
    }

    pub async fn update_lease(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        lease_id: i64,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                k.as_str(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([TxnOp::put(
                k.as_str(),
                attrs.to_json(),
                Some(PutOptions::new().with_lease(lease_id)),
            )]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(etcd_err("update", &k))?;
        Ok(resp.succeeded())
    }

    pub async fn renew(&self, lease_id: i64) -> Result<Option<Duration>, RegistryError> {
        let key = format!("lease {lease_id:x}");
        match self.client.lease_client().keep_alive(lease_id).await {
            Ok((_keeper, _stream)) => {
                let ttl = self
                    .client
                    .lease_client()
                    .time_to_live(lease_id, None)
                    .await
                    .map_err(etcd_err("lease ttl", &key))?;
                Ok((ttl.ttl() > 0).then(|| Duration::from_secs(ttl.ttl() as u64)))
            }
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(None),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Ok(None)
            }
            Err(e) => Err(etcd_err("lease keepalive", &key)(e)),
        }
    }

    pub async fn watch(&self, from_revision: i64) -> Result<EtcdWatch, RegistryError> {
        let dir = self.subnets();
        let stream = self
            .client
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
            .map_err(etcd_err("watch", &dir))?;
        Ok(EtcdWatch {
            stream,
            prefix: dir,
            requested: from_revision,
        })
    }
}

pub struct EtcdWatch {
    stream: WatchStream,
    prefix: String,
    requested: i64,
}

impl EtcdWatch {
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>, RegistryError> {
        loop {
            let msg = self
                .stream
                .message()
                .await
                .map_err(etcd_err("watch", &self.prefix))?;
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
