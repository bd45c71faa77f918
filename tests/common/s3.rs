//! A local S3-compatible server (`s3s-fs`, installed by scripts/test.sh) for the tests of the
//! Delta tables on object storage: one per test, on a free port, over a temporary directory in
//! which each subdirectory is a bucket. Stopped when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key the server accepts.
const ACCESS_KEY: &str = "archiver-test";
/// Its secret.
const SECRET_KEY: &str = "archiver-test-secret";

/// A running `s3s-fs`.
pub struct S3Server {
    child: Child,
    port: u16,
    _root: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server holding the empty bucket `bucket`.
    pub fn start(bucket: &str) -> S3Server {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(bucket)).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY])
            .args(["--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs, the S3 server of the tests, is installed by scripts/test.sh (cargo install s3s-fs)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "s3s-fs did not listen on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        S3Server { child, port, _root: root }
    }

    /// The standard AWS variables that point a client at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
