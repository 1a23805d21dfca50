//! The etcd metadata store against a real `etcd` server (Debian's
//! `etcd-server` package; `tests/run-all.sh` installs it). Built only with
//! `--features etcd`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![cfg(feature = "etcd")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pdgate_transfer::{EtcdStore, MetadataStore, SegmentDesc, TransportKind};

struct Etcd {
    child: Child,
    client: String,
    dir: std::path::PathBuf,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_etcd() -> Etcd {
    let (c, p) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("pdgate-etcd-{}-{c}", std::process::id()));
    let client = format!("127.0.0.1:{c}");
    let child = Command::new(std::env::var("PDGATE_ETCD_BIN").unwrap_or_else(|_| "etcd".into()))
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen-client-urls",
            &format!("http://{client}"),
            "--advertise-client-urls",
            &format!("http://{client}"),
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{p}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{p}"),
            "--initial-cluster",
            &format!("default=http://127.0.0.1:{p}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "the `etcd` binary (apt-get install etcd-server) is needed for --features etcd tests",
        );
    let etcd = Etcd { child, client, dir };
    let t0 = Instant::now();
    loop {
        if let Ok(s) = EtcdStore::connect(&etcd.client, "/probe/", Duration::from_secs(5)).await {
            let _ = s.close().await;
            return etcd;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "etcd did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn desc(name: &str, port: u16) -> SegmentDesc {
    SegmentDesc {
        name: name.into(),
        endpoint: format!("127.0.0.1:{port}"),
        len: 4096,
        transport: TransportKind::Shm,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_publishes_shares_and_expires() {
    let etcd = start_etcd().await;
    let a = EtcdStore::connect(&etcd.client, "/pdgate/segments/", Duration::from_secs(2))
        .await
        .unwrap();
    // A second gateway sees what the first publishes.
    let b = EtcdStore::connect(&etcd.client, "/pdgate/segments/", Duration::from_secs(30))
        .await
        .unwrap();
    a.publish(desc("kv-b", 1)).await.unwrap();
    a.publish(desc("kv-a", 2)).await.unwrap();
    b.publish(desc("other", 3)).await.unwrap();
    assert_eq!(b.lookup("kv-a").await.unwrap(), Some(desc("kv-a", 2)));
    assert_eq!(b.lookup("missing").await.unwrap(), None);
    let names: Vec<_> = b
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["kv-a", "kv-b", "other"]);
    a.publish(desc("kv-a", 9)).await.unwrap();
    assert_eq!(
        b.lookup("kv-a").await.unwrap().unwrap().endpoint,
        "127.0.0.1:9"
    );
    b.remove("kv-b").await.unwrap();
    b.remove("kv-b").await.unwrap();
    assert_eq!(a.lookup("kv-b").await.unwrap(), None);

    // The lease is kept alive while `a` lives (well past its 2 s TTL)...
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(b.lookup("kv-a").await.unwrap().is_some());
    // ...and when its owner goes away without cleaning up, entries expire.
    drop(a);
    let t0 = Instant::now();
    while b.lookup("kv-a").await.unwrap().is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "entry never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A clean close removes an owner's entries at once.
    b.close().await.unwrap();
    let c = EtcdStore::connect(&etcd.client, "/pdgate/segments/", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(c.list().await.unwrap().is_empty());
    // A dead etcd is an error, not a hang.
    drop(etcd);
    assert!(c.lookup("x").await.is_err());
}
