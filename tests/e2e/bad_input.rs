//! Garbage, forged certificates and malformed configs get clear errors; no
//! process panics and the cluster keeps working.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use custody_cli::dev::GenOptions;
use custody_proto::cluster::v1::raft_transport_client::RaftTransportClient;
use custody_proto::cluster::v1::RaftBatch;
use protobuf::Message as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::harness::{self, TestCluster};

fn log(c: &TestCluster, id: u64) -> String {
    std::fs::read_to_string(c.log_path(id)).unwrap_or_default()
}

/// Sends raw bytes and returns what (if anything) came back before close.
async fn send_garbage(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    buf
}

/// A certificate and key for `name`, from a new CA or from `ca` (cert, key PEM).
fn cert_for(name: &str, ca: Option<(&str, &str)>) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    let cert = match ca {
        Some((ca_cert, ca_key)) => {
            let ca_key = rcgen::KeyPair::from_pem(ca_key).unwrap();
            let issuer = rcgen::Issuer::from_ca_cert_pem(ca_cert, ca_key).unwrap();
            params.signed_by(&key, &issuer).unwrap()
        }
        None => params.self_signed(&key).unwrap(),
    };
    (cert.pem(), key.serialize_pem())
}

/// A TLS client presenting (cert, key) to the raft port; returns the error the
/// connection ends with, if any.
async fn tls_with_client_cert(
    c: &TestCluster,
    addr: &str,
    cert: &str,
    key: &str,
) -> Option<String> {
    let ca = std::fs::read(c.ca_path()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = match connector
        .connect(ServerName::try_from("node-1.cluster.custody").unwrap(), tcp)
        .await
    {
        Ok(t) => t,
        Err(e) => return Some(e.to_string()),
    };
    // TLS 1.3: the server judges the client certificate after the client's
    // handshake completes; its verdict arrives on the first read.
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(0)) => Some("closed".into()),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => None,
    }
}

/// A channel to a node's Raft port presenting (cert, key).
async fn node_channel(
    (raft, node): (&str, u64),
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
) -> tonic::transport::Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(format!("node-{node}.cluster.custody"));
    Endpoint::from_shared(format!("https://{raft}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The error a Raft `Send` call presenting (cert, key) ends with.
pub async fn raft_call_as(raft: (&str, u64), ca: &[u8], cert: &[u8], key: &[u8]) -> tonic::Status {
    RaftTransportClient::new(node_channel(raft, ca, cert, key).await)
        .send(tokio_stream::iter(Vec::<RaftBatch>::new()))
        .await
        .unwrap_err()
}

/// The error a `Peer.LiveEdges` call presenting (cert, key) ends with.
pub async fn peer_call_as(raft: (&str, u64), ca: &[u8], cert: &[u8], key: &[u8]) -> tonic::Status {
    custody_proto::cluster::v1::peer_client::PeerClient::new(
        node_channel(raft, ca, cert, key).await,
    )
    .live_edges(custody_proto::cluster::v1::LiveEdgesRequest::default())
    .await
    .unwrap_err()
}

/// The error a `Peer.Relay` call presenting (cert, key) ends with, for a
/// session open on `edge_id` claimed to be admitted at `index`.
pub async fn relay_as(
    raft: (&str, u64),
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
    edge_id: u64,
    session_id: &str,
    index: u64,
) -> tonic::Status {
    use custody_proto::cluster::v1 as pb;
    use custody_proto::tunnel::v1 as t;
    use prost::Message as _;
    let open = t::SessionFrame {
        kind: Some(t::session_frame::Kind::Open(t::SessionOpen {
            session_id: session_id.into(),
            resource: "local-shell".into(),
            identity: "forged".into(),
        })),
    };
    let first = pb::RelayFrame {
        edge_id,
        frame: open.encode_to_vec().into(),
        admitted_index: index,
    };
    pb::peer_client::PeerClient::new(node_channel(raft, ca, cert, key).await)
        .relay(tokio_stream::iter(vec![first]))
        .await
        .expect_err("an unadmitted relay was accepted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_forged_certificates_are_refused_without_harm() {
    let (c, leader) = harness::started(GenOptions::default()).await;
    let target = 1;
    let raft = c.node(target).unwrap().raft_addr.clone();
    let api = c.node(target).unwrap().api_addr.clone();

    // Garbage bytes and a huge bogus length on both ports.
    for addr in [&raft, &api] {
        let back = send_garbage(addr, b"\x16\x03\x01\xff\xffgarbage garbage garbage").await;
        assert!(back.len() < 64, "unexpected answer to garbage: {back:?}");
        send_garbage(addr, &[0u8; 4096]).await;
        send_garbage(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    }

    // A self-signed client certificate, and one from another CA, are refused.
    let (cert, key) = cert_for("node-2.cluster.custody", None);
    let err = tls_with_client_cert(&c, &raft, &cert, &key).await;
    assert!(err.is_some(), "self-signed client certificate was accepted");
    let other_ca = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (cert, key) = cert_for("node-2.cluster.custody", Some((&other_ca.0, &other_ca.1)));
    let err = tls_with_client_cert(&c, &raft, &cert, &key).await;
    assert!(err.is_some(), "certificate from a foreign CA was accepted");

    let text = log(&c, target);
    assert!(
        text.contains("rejected connection: TLS handshake failed"),
        "no handshake error logged"
    );
    assert!(!text.contains("panicked"), "a node panicked");

    // With a genuine node certificate: malformed messages and spoofed senders
    // get precise gRPC errors.
    let ca = std::fs::read(c.ca_path()).unwrap();
    let node2_cert = std::fs::read(c.dir.join("node-2.pem")).unwrap();
    let node2_key = std::fs::read(c.dir.join("node-2-key.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .identity(Identity::from_pem(&node2_cert, &node2_key))
        .domain_name("node-1.cluster.custody");
    let ch = Endpoint::from_shared(format!("https://{raft}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = RaftTransportClient::new(ch);
    let garbage = RaftBatch {
        messages: vec![Bytes::from_static(b"\xff\xff\xff\xff\x0f not protobuf")],
    };
    let e = client
        .send(tokio_stream::iter(vec![garbage]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("malformed raft message"), "{e}");

    let mut spoof = raft::eraftpb::Message::default();
    spoof.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
    spoof.from = 3;
    spoof.to = target;
    let batch = RaftBatch {
        messages: vec![Bytes::from(spoof.write_to_bytes().unwrap())],
    };
    let e = client
        .send(tokio_stream::iter(vec![batch]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    // A certificate from the cluster CA that is not a node certificate.
    let ca_pem = std::fs::read_to_string(c.ca_path()).unwrap();
    let ca_key = std::fs::read_to_string(c.dir.join("ca-key.pem")).unwrap();
    let (cert, key) = cert_for("edge-7.custody", Some((&ca_pem, &ca_key)));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name("node-1.cluster.custody");
    let ch = Endpoint::from_shared(format!("https://{raft}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let e = RaftTransportClient::new(ch)
        .send(tokio_stream::iter(Vec::<RaftBatch>::new()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    // A node certificate minted with the CA key for a node that was never
    // added is no licence: Raft and Peer calls are refused.
    let (cert, key) = cert_for("node-99.cluster.custody", Some((&ca_pem, &ca_key)));
    let e = raft_call_as((&raft, target), &ca, cert.as_bytes(), key.as_bytes()).await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("not a member"), "{e}");
    let e = peer_call_as((&raft, target), &ca, cert.as_bytes(), key.as_bytes()).await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("not a member"), "{e}");

    // Everyone is still alive and the cluster still commits.
    let client = c.client(&[]).unwrap();
    client.put("after-garbage", b"ok".to_vec()).await.unwrap();
    let st = client.cluster_status().await.unwrap();
    assert_eq!(st.leader_id, leader);
    assert!(
        st.members.iter().all(|m| m.state != "unreachable"),
        "{st:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_config_files_get_clear_errors() {
    let c = harness::cluster(GenOptions::default());
    let good = std::fs::read_to_string(&c.node(1).unwrap().config).unwrap();
    let cases = [
        (
            "garbage",
            "\u{0}\u{1}not toml at all [[[".to_owned(),
            "parse config",
        ),
        (
            "missing field",
            good.replace("region = ", "regionx = "),
            "parse config",
        ),
        (
            "bad address",
            good.replacen("raft = \"127.0.0.1:", "raft = \"nowhere:", 1),
            "listen.raft",
        ),
        (
            "zero id",
            good.replacen("id = 1", "id = 0", 1),
            "id must be",
        ),
    ];
    for (what, text, expect) in cases {
        let path = c.dir.join(format!("bad-{}.toml", what.replace(' ', "-")));
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(&c.bins.coordinator)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(err.contains(expect), "{what}: unclear error: {err}");
        assert!(!err.contains("panicked"), "{what}: panicked: {err}");
    }
    let out = std::process::Command::new(&c.bins.coordinator)
        .args(["run", "--config", "/nonexistent/node.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("read config /nonexistent/node.toml"));
}

/// Open descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// 10 000 connections that never speak TLS do not exhaust the API listener:
/// the oldest handshakes are dropped, the node's descriptors stay bounded,
/// and a normal call made while they are all still open succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_are_capped_and_normal_calls_go_on() {
    let (c, _leader) = harness::started(GenOptions::default()).await;
    let node = c.node(1).unwrap();
    let pid = node.pid().unwrap();
    let api = node.api_addr.clone();
    let client = c.client(&[1]).unwrap();
    client.cluster_status().await.unwrap();
    let before = open_fds(pid);
    let mut idle = Vec::with_capacity(10_000);
    let mut peak = before;
    for i in 0..10_000 {
        match TcpStream::connect(&api).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connection {i} failed: {e}"),
        }
        if i % 1000 == 999 {
            peak = peak.max(open_fds(pid));
        }
    }
    // Every idle socket is still open on our side; a new call gets through.
    let t0 = std::time::Instant::now();
    let st = tokio::time::timeout(Duration::from_secs(20), client.cluster_status())
        .await
        .expect("a normal call within 20 s")
        .expect("a normal call succeeds");
    assert!(st.leader_id != 0);
    let fresh = c.client(&[1]).unwrap();
    fresh.whoami().await.expect("a new client connects");
    peak = peak.max(open_fds(pid));
    eprintln!(
        "idle connections: 10000; node fds before {before}, peak {peak}; call took {:?}",
        t0.elapsed()
    );
    assert!(
        peak < before + 1_000,
        "the node held {peak} descriptors (before: {before})"
    );
    drop(idle);
    assert!(!log(&c, 1).contains("panicked"));
}

/// A call whose request body never ends is cancelled at the API's request
/// timeout (here 2 s), and the node goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_finishes_is_cut_at_the_timeout() {
    let mut c = harness::cluster(GenOptions::default());
    for id in [1, 2, 3] {
        c.set_node_option(id, "api", "request_timeout_secs", toml::Value::Integer(2))
            .unwrap();
    }
    c.start_all().unwrap();
    c.wait_for_leader(&[], Duration::from_secs(30))
        .await
        .unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(c.ca_path()).unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let url = format!(
        "https://{}/custody.v1.Cluster/Status",
        c.node(1).unwrap().api_addr
    );
    let body =
        reqwest::Body::wrap_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
    let t0 = std::time::Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        http.post(&url)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .send(),
    )
    .await
    .expect("the server never answered a request that never ended")
    .unwrap();
    let waited = t0.elapsed();
    let status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    assert!(
        matches!(status.as_deref(), Some(s) if s != "0"),
        "expected an error status, got {status:?}: {:?}",
        resp.headers()
    );
    assert!(
        waited >= Duration::from_secs(2),
        "answered after {waited:?}"
    );
    // Normal calls go on.
    c.client(&[1]).unwrap().cluster_status().await.unwrap();
}
