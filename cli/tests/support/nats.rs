//! A real broker for booking-sync tests: Debian's `nats-server` on 127.0.0.1 at a free port,
//! requiring a token that is also written to a file, as a gateway's `[replicas] token_file`
//! reads it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("pdgate-nats-{}-{}", std::process::id(), next()));
        std::fs::create_dir_all(&dir).expect("dir");
        let token = format!("t{:x}{:x}", std::process::id(), next() + 0x5eed);
        std::fs::write(dir.join("token"), format!("{token}\n")).expect("token file");
        std::fs::write(
            dir.join("nats.conf"),
            format!("authorization {{ token: \"{token}\" }}\n"),
        )
        .expect("conf");
        let mut n = Self {
            port: 0,
            dir,
            child: None,
        };
        // A free port can be taken between probing and binding: try a few.
        for _ in 0..5 {
            n.port = free_tcp_port();
            if n.spawn() {
                return n;
            }
        }
        panic!("nats-server did not start (is it installed? tests/install-deps.sh installs it)");
    }

    fn spawn(&mut self) -> bool {
        let Ok(mut child) = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-c"])
            .arg(self.dir.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Stops the broker (its clients see the connection drop).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, as after a broker restart.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "nats-server restarts on its port");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.join("token")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback TCP port nothing listens on now.
pub fn free_tcp_port() -> u16 {
    let s = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    s.local_addr().expect("addr").port()
}

fn next() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}
