//! A real DNS server for discovery tests: Debian's `dnsmasq` on 127.0.0.1 at a free port,
//! authoritative for `.test`, its A records in an `--addn-hosts` file the test rewrites (a SIGHUP
//! re-reads it) and its SRV records on the command line (changed by a restart on the same port).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct Dnsmasq {
    pub port: u16,
    hosts: PathBuf,
    srv: Vec<String>,
    child: Option<Child>,
}

impl Dnsmasq {
    /// Starts with `hosts` (lines of `ip name`) and `srv` (`_http._tcp.name,target,port`).
    pub fn start(hosts: &str, srv: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "pdgate-dnsmasq-{}-{}",
            std::process::id(),
            uuid_ish()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let hosts_file = dir.join("hosts");
        std::fs::write(&hosts_file, hosts).expect("hosts");
        let mut d = Self {
            port: 0,
            hosts: hosts_file,
            srv: srv.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        // A free port can be taken between probing and binding: try a few.
        for _ in 0..5 {
            d.port = free_udp_port();
            if d.spawn() {
                return d;
            }
        }
        panic!("dnsmasq did not start (is it installed? tests/install-deps.sh)");
    }

    fn spawn(&mut self) -> bool {
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--pid-file=",
            "--local=/test/",
            "--local-ttl=0",
        ])
        .arg(format!("--port={}", self.port))
        .arg(format!("--addn-hosts={}", self.hosts.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        for s in &self.srv {
            cmd.arg(format!("--srv-host={s}"));
        }
        let Ok(mut child) = cmd.spawn() else {
            return false;
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        self.child = Some(child);
        true
    }

    pub fn nameserver(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// New A records, re-read at once (SIGHUP).
    pub fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).expect("hosts");
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// New SRV records: a restart on the same port.
    pub fn set_srv(&mut self, srv: &[&str]) {
        self.stop();
        self.srv = srv.iter().map(|s| s.to_string()).collect();
        assert!(self.spawn(), "dnsmasq restarts on its port");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.hosts.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    s.local_addr().expect("addr").port()
}

fn uuid_ish() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}
