//! A fault-injecting TCP proxy for the network tests: `archiver` talks to a server through it,
//! and the test switches what the "network" does at run time. Every switch also applies to the
//! connections already open, since the driver keeps its pooled connections for a long time.
//!
//! Plain tokio: one task accepts, one task per connection relays both directions through two
//! queues, so that a delay or a slow peer on one side never stops the other.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards everything at once.
    Pass,
    /// The port refuses connections (the listener is closed) and open connections are closed,
    /// as when the server process is gone.
    Refuse,
    /// Open connections are reset (RST, `SO_LINGER` 0) and new ones are reset as soon as they
    /// are accepted, as when a firewall or a crashed host answers with resets.
    Reset,
    /// Connections are accepted and kept open but nothing gets through: bytes from both sides
    /// are swallowed. A connection that was blackholed stays silent after `Pass` returns (its
    /// bytes were lost, as when a middlebox forgets the connection's state); new connections
    /// pass again.
    Blackhole,
    /// Each chunk is forwarded after this delay, in both directions (a round trip gains twice
    /// the delay).
    Latency(Duration),
}

/// A running proxy; shared between the test and its helper tasks, stopped when dropped.
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    stop: CancellationToken,
}

/// Most chunks queued in one direction before the proxy stops reading that side.
const MAX_QUEUED: usize = 64;

impl Proxy {
    /// Starts a proxy on 127.0.0.1 (any free port) to `upstream`, in `Pass` mode.
    pub async fn start(upstream: SocketAddr) -> Arc<Proxy> {
        let listener = bind(0).expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, upstream, mode_rx, stop.clone()));
        Arc::new(Proxy { addr, upstream, mode, stop })
    }

    /// Starts a proxy to the server of a `mongodb://host:port/...` URI.
    pub async fn for_uri(uri: &str) -> Arc<Proxy> {
        Self::start(upstream_of(uri)).await
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// `uri` with its host replaced by this proxy's address. `directConnection=true` is kept or
    /// added, so the driver never follows a replica set's member list around the proxy.
    pub fn uri(&self, uri: &str) -> String {
        let (scheme, rest) = uri.split_once("://").expect("a mongodb:// URI");
        let (hosts, tail) = rest.split_once('/').unwrap_or((rest, ""));
        // Credentials, if any, stay in front of the host.
        let userinfo = hosts.rsplit_once('@').map(|(u, _)| format!("{u}@")).unwrap_or_default();
        let mut proxied = format!("{scheme}://{userinfo}{}/{tail}", self.addr);
        if !tail.contains("directConnection=") {
            proxied.push_str(if tail.contains('?') { "&" } else { "?" });
            proxied.push_str("directConnection=true");
        }
        proxied
    }

    /// Switches the fault; applies to open connections too.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// The current fault.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The first `host:port` of a `mongodb://` URI (a test server, so an address, not a name).
pub fn upstream_of(uri: &str) -> SocketAddr {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let hosts = rest.split('/').next().unwrap();
    let host = hosts.rsplit_once('@').map_or(hosts, |(_, h)| h);
    let first = host.split(',').next().unwrap();
    let first = first.replace("localhost", "127.0.0.1");
    first.parse().unwrap_or_else(|e| panic!("{first:?} is not an address: {e}"))
}

/// Binds 127.0.0.1:`port` with `SO_REUSEADDR`, so the port can be taken again after `Refuse`
/// while closed connections linger in TIME_WAIT.
fn bind(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    stop: CancellationToken,
) {
    let port = listener.local_addr().unwrap().port();
    let mut listener = Some(listener);
    loop {
        let current = *mode.borrow_and_update();
        if current == Mode::Refuse {
            // Closing the listener makes the kernel refuse connections, as a dead server does.
            listener = None;
        } else if listener.is_none() {
            match bind(port) {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    eprintln!("proxy: cannot bind port {port} again ({e}); retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
        let accepted = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = mode.changed() => if changed.is_err() { return },
            accepted = accepted => match accepted {
                Ok((client, _)) => {
                    tokio::spawn(relay(client, upstream, mode.clone(), stop.clone()));
                }
                Err(e) => eprintln!("proxy: accept failed: {e}"),
            },
        }
    }
}

/// Closes a socket with a reset rather than an orderly close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Swallows whatever `client` sends until the mode or the proxy ends it.
async fn swallow(client: TcpStream, mut mode: watch::Receiver<Mode>, stop: CancellationToken) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = mode.changed() => match changed.map(|_| *mode.borrow_and_update()) {
                Err(_) | Ok(Mode::Refuse) => return,
                Ok(Mode::Reset) => return reset(client),
                Ok(_) => {}
            },
            readable = client.readable() => {
                if readable.is_err() {
                    return;
                }
                match client.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }
    }
}

/// One direction of a connection: chunks read and not yet written, each with its due time.
#[derive(Default)]
struct Lane {
    queue: VecDeque<(Instant, Vec<u8>)>,
    /// How much of the front chunk was already written.
    written: usize,
    /// The reading side closed: once the queue is empty, the connection ends.
    eof: bool,
}

impl Lane {
    fn due(&self, now: Instant) -> bool {
        self.queue.front().is_some_and(|(at, _)| *at <= now)
    }

    fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(at, _)| *at)
    }

    /// Reads what `from` has; `Err` when the connection must end.
    fn read_from(&mut self, from: &TcpStream, delay: Duration, swallowing: bool) -> Result<(), ()> {
        let mut buf = vec![0u8; 16 * 1024];
        match from.try_read(&mut buf) {
            Ok(0) => {
                self.eof = true;
                Ok(())
            }
            Ok(n) if !swallowing => {
                buf.truncate(n);
                self.queue.push_back((Instant::now() + delay, buf));
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(_) => Err(()),
        }
    }

    /// Writes the due front chunk to `to` as far as it takes it.
    fn write_to(&mut self, to: &TcpStream) -> Result<(), ()> {
        let Some((_, chunk)) = self.queue.front() else {
            return Ok(());
        };
        match to.try_write(&chunk[self.written..]) {
            Ok(n) => {
                self.written += n;
                if self.written == chunk.len() {
                    self.queue.pop_front();
                    self.written = 0;
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(_) => Err(()),
        }
    }
}

/// Relays one client connection, obeying the mode as it changes.
async fn relay(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>, stop: CancellationToken) {
    // Copied out: a borrow held across an await would block `set_mode`.
    let initial = *mode.borrow_and_update();
    match initial {
        Mode::Refuse => return,
        Mode::Reset => return reset(client),
        Mode::Blackhole => return swallow(client, mode, stop).await,
        Mode::Pass | Mode::Latency(_) => {}
    }
    let server = tokio::select! {
        _ = stop.cancelled() => return,
        server = TcpStream::connect(upstream) => match server {
            Ok(server) => server,
            // The upstream itself is gone: the client sees what it would see without us.
            Err(_) => return reset(client),
        },
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut up = Lane::default();
    let mut down = Lane::default();
    // Sticky: a connection that lost bytes can never be trusted again.
    let mut swallowing = false;
    loop {
        let current = *mode.borrow();
        let delay = match current {
            Mode::Latency(d) => d,
            _ => Duration::ZERO,
        };
        let now = Instant::now();
        if (up.eof && up.queue.is_empty()) || (down.eof && down.queue.is_empty()) {
            return;
        }
        let wake = [up.next_due(), down.next_due()].into_iter().flatten().filter(|at| *at > now).min();
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                let switched = *mode.borrow_and_update();
                match switched {
                    Mode::Refuse => return,
                    Mode::Reset => {
                        reset(client);
                        reset(server);
                        return;
                    }
                    Mode::Blackhole => {
                        swallowing = true;
                        up.queue.clear();
                        down.queue.clear();
                        up.written = 0;
                        down.written = 0;
                    }
                    Mode::Pass | Mode::Latency(_) => {}
                }
            }
            r = client.readable(), if !up.eof && up.queue.len() < MAX_QUEUED => {
                if r.is_err() || up.read_from(&client, delay, swallowing).is_err() {
                    return;
                }
            }
            r = server.readable(), if !down.eof && down.queue.len() < MAX_QUEUED => {
                if r.is_err() || down.read_from(&server, delay, swallowing).is_err() {
                    return;
                }
            }
            w = server.writable(), if up.due(now) => {
                if w.is_err() || up.write_to(&server).is_err() {
                    return;
                }
            }
            w = client.writable(), if down.due(now) => {
                if w.is_err() || down.write_to(&client).is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
        }
    }
}
