//! The etcd registry over TLS and with etcd's user/password authentication, against a real etcd
//! (Debian's etcd-server 3.4) started by each test with certificates the test makes (rcgen): a CA,
//! a server certificate for 127.0.0.1 (an IP SAN), a client certificate, and an unrelated CA.
//! No root needed.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tweed_agent::registry::{
    CreateOutcome, EtcdOptions, EtcdRegistry, Registry, RegistryError, WatchEvent,
};
use tweed_config::{LeaseAttrs, SubnetKey};
use tweed_lab::etcd::{EtcdProcess, EtcdTls};

const P: &str = "/coreos.com/network";

/// PEM files in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();

        let (ca, ca_key) = make_ca("tweed test CA");
        write("ca.pem", ca.pem());
        let (other_ca, _) = make_ca("some other CA");
        write("other-ca.pem", other_ca.pem());

        let server_key = KeyPair::generate().unwrap();
        let mut sp = CertificateParams::new(Vec::<String>::new()).unwrap();
        sp.distinguished_name.push(DnType::CommonName, "etcd");
        sp.subject_alt_names = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::DnsName("localhost".try_into().unwrap()),
        ];
        sp.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server = sp.signed_by(&server_key, &ca, &ca_key).unwrap();
        write("server.pem", server.pem());
        write("server-key.pem", server_key.serialize_pem());

        let client_key = KeyPair::generate().unwrap();
        let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
        cp.distinguished_name.push(DnType::CommonName, "tweedd");
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = cp.signed_by(&client_key, &ca, &ca_key).unwrap();
        write("client.pem", client.pem());
        write("client-key.pem", client_key.serialize_pem());
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server_tls(&self, client_cert_auth: bool) -> EtcdTls {
        EtcdTls {
            cert_file: self.path("server.pem"),
            key_file: self.path("server-key.pem"),
            ca_file: self.path("ca.pem"),
            client_cert_auth,
            client_cert_file: Some(self.path("client.pem")),
            client_key_file: Some(self.path("client-key.pem")),
        }
    }
}

fn make_ca(cn: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    (cert, key)
}

fn start_etcd(dir: &Path, tls: Option<EtcdTls>, extra: &[&str]) -> EtcdProcess {
    let mut o = tweed_lab::etcd::EtcdOptions::local("tls", dir.join("etcd-data"));
    o.log_file = Some(dir.join("etcd.log"));
    o.tls = tls;
    o.extra_args = extra.iter().map(|s| s.to_string()).collect();
    EtcdProcess::start(o).expect("start etcd (apt-get install etcd-server etcd-client)")
}

fn opts(etcd: &EtcdProcess) -> EtcdOptions {
    EtcdOptions {
        endpoints: etcd.endpoints(),
        prefix: P.into(),
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    }
}

fn key(third: u8) -> SubnetKey {
    SubnetKey::new(format!("10.244.{third}.0/24").parse().unwrap())
}

fn attrs() -> LeaseAttrs {
    LeaseAttrs::new(
        "198.18.0.2".parse().unwrap(),
        "vxlan",
        Some(&serde_json::json!({"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"})),
    )
}

/// Creates a lease, lists it back and checks etcdctl sees it too.
async fn create_and_list(reg: &Registry, etcd_get: impl Fn(&str) -> String, third: u8) {
    let k = key(third);
    let out = reg
        .create_lease(&k, &attrs(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(out, CreateOutcome::Created { .. }), "{out:?}");
    let snap = reg.list_leases().await.unwrap();
    assert!(
        snap.leases.iter().any(|l| l.key == k.etcd_key(P)),
        "{:?}",
        snap.leases
    );
    let v = etcd_get(&k.etcd_key(P));
    assert!(v.contains("198.18.0.2"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_lists_creates_and_watches() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let etcd = start_etcd(dir.path(), Some(pki.server_tls(true)), &[]);
    assert!(etcd.endpoints()[0].starts_with("https://127.0.0.1:"));
    let reg = Registry::etcd(
        EtcdRegistry::connect(EtcdOptions {
            ca_file: Some(pki.path("ca.pem")),
            cert_file: Some(pki.path("client.pem")),
            key_file: Some(pki.path("client-key.pem")),
            ..opts(&etcd)
        })
        .await
        .unwrap(),
    );
    let rev = reg.list_leases().await.unwrap().revision;
    let mut watch = reg.watch(rev + 1).await.unwrap();
    create_and_list(
        &reg,
        |k| etcd.ctl(&["get", "--print-value-only", k]).unwrap(),
        3,
    )
    .await;
    let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("watch event over TLS")
        .unwrap();
    assert!(
        matches!(&ev[0], WatchEvent::Put(l) if l.key.ends_with("10.244.3.0-24")),
        "{ev:?}"
    );
}

/// The error of the first request through a client that connected with `o`.
async fn list_error(o: EtcdOptions) -> RegistryError {
    let reg = EtcdRegistry::connect(o).await.unwrap();
    Registry::etcd(reg).list_leases().await.unwrap_err()
}

/// Why connecting with `o` is refused before any request.
async fn refused(o: EtcdOptions) -> RegistryError {
    EtcdRegistry::connect(o)
        .await
        .err()
        .expect("the options must be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_say_tls_and_name_files() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let etcd = start_etcd(dir.path(), Some(pki.server_tls(true)), &[]);

    // A CA that did not sign etcd's certificate: the handshake fails, and the error says so.
    let err = list_error(EtcdOptions {
        ca_file: Some(pki.path("other-ca.pem")),
        cert_file: Some(pki.path("client.pem")),
        key_file: Some(pki.path("client-key.pem")),
        ..opts(&etcd)
    })
    .await;
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Tls { .. }), "{msg}");
    assert!(msg.contains("TLS") && msg.contains("certificate"), "{msg}");
    assert!(msg.contains("--etcd-cafile"), "{msg}");
    eprintln!("wrong CA: {msg}");

    // No client certificate while etcd requires one.
    let err = list_error(EtcdOptions {
        ca_file: Some(pki.path("ca.pem")),
        ..opts(&etcd)
    })
    .await;
    let msg = err.to_string();
    // Depending on timing the client sees the server's alert or only the closed connection.
    assert!(
        matches!(err, RegistryError::Tls { .. }) || msg.contains("--etcd-certfile"),
        "{msg}"
    );
    eprintln!("no client cert: {msg}");

    // A missing file fails at once, naming the flag and the file.
    let missing = pki.path("no-such-client.pem");
    let msg = refused(EtcdOptions {
        ca_file: Some(pki.path("ca.pem")),
        cert_file: Some(missing.clone()),
        key_file: Some(pki.path("client-key.pem")),
        ..opts(&etcd)
    })
    .await
    .to_string();
    assert!(
        msg.contains("--etcd-certfile") && msg.contains(missing.to_str().unwrap()),
        "{msg}"
    );

    // A file that is not PEM (key given as CA, say) is named too.
    let msg = refused(EtcdOptions {
        ca_file: Some(pki.path("client-key.pem")),
        ..opts(&etcd)
    })
    .await
    .to_string();
    assert!(
        msg.contains("--etcd-cafile") && msg.contains("client-key.pem") && msg.contains("PEM"),
        "{msg}"
    );

    // https:// without a CA, and TLS files with http://: refused before dialing.
    let err = refused(opts(&etcd)).await.to_string();
    assert!(err.contains("--etcd-cafile"), "{err}");
    let mut o = opts(&etcd);
    o.endpoints = vec!["http://127.0.0.1:1".into()];
    o.ca_file = Some(pki.path("ca.pem"));
    let err = refused(o).await.to_string();
    assert!(err.contains("https://"), "{err}");
}

/// Sets up etcd auth: root (required by `auth enable`) and a `tweed` user that may only
/// read and write under the prefix, as an operator would.
fn enable_auth(etcd: &EtcdProcess) {
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["role", "add", "tweed"],
        &[
            "role",
            "grant-permission",
            "tweed",
            "--prefix=true",
            "readwrite",
            "/coreos.com/network/",
        ],
        &["user", "add", "tweed:tweedpw"],
        &["user", "grant-role", "tweed", "tweed"],
        &["auth", "enable"],
    ] {
        etcd.ctl(args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_password_over_server_tls() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    // Server TLS only (--etcd-cafile, no client certificate), and simple tokens that expire
    // after 2 s so the test also sees a token refresh.
    let etcd = start_etcd(
        dir.path(),
        Some(pki.server_tls(false)),
        &["--auth-token-ttl=2"],
    );
    enable_auth(&etcd);
    let server_tls = EtcdOptions {
        ca_file: Some(pki.path("ca.pem")),
        ..opts(&etcd)
    };

    let reg = Registry::etcd(
        EtcdRegistry::connect(EtcdOptions {
            username: Some("tweed".into()),
            password: Some("tweedpw".into()),
            ..server_tls.clone()
        })
        .await
        .unwrap(),
    );
    let root_get = |k: &str| {
        etcd.ctl(&["--user=root:rootpw", "get", "--print-value-only", k])
            .unwrap()
    };
    create_and_list(&reg, root_get, 7).await;
    // The token has expired by now; etcd-client re-authenticates and retries.
    tokio::time::sleep(Duration::from_secs(4)).await;
    create_and_list(&reg, root_get, 8).await;

    // Outside its prefix the user may not write: etcd's own permission error comes through.
    let e = etcd.ctl(&["--user=tweed:tweedpw", "put", "/elsewhere", "x"]);
    assert!(e.is_err(), "role limits the user to the prefix");

    // A wrong password fails at connect, clearly.
    let err = refused(EtcdOptions {
        username: Some("tweed".into()),
        password: Some("wrong".into()),
        ..server_tls.clone()
    })
    .await;
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Auth { .. }), "{msg}");
    assert!(
        msg.contains("authentication") && msg.contains("\"tweed\"") && !msg.contains("wrong"),
        "{msg}"
    );
    eprintln!("wrong password: {msg}");

    // No credentials at all against an etcd with auth enabled: requests fail, not hang.
    let err = list_error(server_tls).await;
    assert!(err.to_string().contains("--etcd-username"), "{err}");
}

/// With credentials, etcd-client authenticates inside `connect`; an etcd that is not up yet is
/// waited for there (an agent started before etcd keeps trying) instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_credentials_waits_for_an_etcd_that_is_down() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let connect = EtcdRegistry::connect(EtcdOptions {
        endpoints: vec![format!("http://127.0.0.1:{port}")],
        prefix: P.into(),
        username: Some("tweed".into()),
        password: Some("pw".into()),
        request_timeout: Duration::from_millis(500),
        ..Default::default()
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(3), connect)
            .await
            .is_err(),
        "still retrying after 3 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_against_etcd_without_auth_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = start_etcd(dir.path(), None, &[]);
    let reg = Registry::etcd(
        EtcdRegistry::connect(EtcdOptions {
            username: Some("tweed".into()),
            password: Some("pw".into()),
            ..opts(&etcd)
        })
        .await
        .unwrap(),
    );
    create_and_list(
        &reg,
        |k| etcd.ctl(&["get", "--print-value-only", k]).unwrap(),
        9,
    )
    .await;
}
