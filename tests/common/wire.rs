//! A proxy that speaks the wire protocol just enough to answer some commands itself: for the
//! server answers a test cannot provoke on the test server, such as a change event too large to
//! send (`BSONObjectTooLarge`, which SecantusDB never raises), or the oplog's storage statistics
//! (which SecantusDB does not keep). Every other message passes as it is. Uncompressed `OP_MSG` only, which is what the driver sends without `compressors`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use mongodb::bson::{doc, RawDocument};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// The `OP_MSG` opcode.
const OP_MSG: i32 = 2013;

/// A running proxy that fails some change stream commands with `BSONObjectTooLarge`.
pub struct Injector {
    addr: SocketAddr,
    /// `getMore`s still to fail.
    get_mores: AtomicU32,
    /// Openings (or resumptions) of the delivered-orders stream still to fail: `aggregate`s
    /// whose pipeline starts with `$changeStream` and reads `fullDocument`.
    openings: AtomicU32,
    /// Commands failed so far.
    injected: AtomicU32,
    /// The oplog's size and cap to answer `$collStats` on `local.oplog.rs` with, if any.
    oplog_fill: std::sync::Mutex<Option<(i64, i64)>>,
    /// Whether every change stream is refused, as to a user without the `changeStream` action.
    deny_streams: std::sync::atomic::AtomicBool,
    stop: CancellationToken,
}

impl Injector {
    /// Starts a proxy on 127.0.0.1 (any free port) to `upstream`, failing nothing yet.
    pub async fn start(upstream: SocketAddr) -> Arc<Injector> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the wire proxy");
        let injector = Arc::new(Injector {
            addr: listener.local_addr().unwrap(),
            get_mores: AtomicU32::new(0),
            openings: AtomicU32::new(0),
            injected: AtomicU32::new(0),
            oplog_fill: std::sync::Mutex::new(None),
            deny_streams: std::sync::atomic::AtomicBool::new(false),
            stop: CancellationToken::new(),
        });
        let accepting = injector.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = accepting.stop.cancelled() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                tokio::spawn(relay(client, server, accepting.clone()));
            }
        });
        injector
    }

    /// `uri` through this proxy (see `Proxy::uri`).
    pub fn uri(&self, uri: &str) -> String {
        let (scheme, rest) = uri.split_once("://").expect("a mongodb:// URI");
        let (_, tail) = rest.split_once('/').unwrap_or((rest, ""));
        let mut proxied = format!("{scheme}://{}/{tail}", self.addr);
        if !tail.contains("directConnection=") {
            proxied.push_str(if tail.contains('?') { "&" } else { "?" });
            proxied.push_str("directConnection=true");
        }
        proxied
    }

    /// Fails the next `get_mores` `getMore`s and the next `openings` openings of the stream.
    pub fn fail_with_too_large(&self, get_mores: u32, openings: u32) {
        self.get_mores.store(get_mores, Ordering::SeqCst);
        self.openings.store(openings, Ordering::SeqCst);
    }

    /// Answers `$collStats` on the oplog with these storage statistics from now on.
    pub fn answer_oplog_fill(&self, used_bytes: i64, max_bytes: i64) {
        *self.oplog_fill.lock().unwrap() = Some((used_bytes, max_bytes));
    }

    /// The answer to `$collStats` on the oplog, when one is set and `body` asks for it.
    fn oplog_stats(&self, body: &RawDocument) -> Option<mongodb::bson::Document> {
        let (used, max) = (*self.oplog_fill.lock().unwrap())?;
        let asks = body.get_str("aggregate").ok() == Some("oplog.rs")
            && format!("{:?}", mongodb::bson::Document::try_from(body)).contains("$collStats");
        asks.then(|| {
            let stats =
                doc! { "ns": "local.oplog.rs", "storageStats": { "size": used, "maxSize": max, "capped": true } };
            doc! { "ok": 1.0, "cursor": { "id": 0_i64, "ns": "local.oplog.rs", "firstBatch": [stats] } }
        })
    }

    /// Refuses every change stream from now on (`Unauthorized`), as MongoDB does for a user
    /// without the `changeStream` action.
    #[allow(dead_code)]
    pub fn deny_change_streams(&self) {
        self.deny_streams.store(true, Ordering::SeqCst);
    }

    /// How many commands were failed so far.
    pub fn injected(&self) -> u32 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Whether the command `body` is to be failed (and counts it).
    fn should_fail(&self, body: &RawDocument) -> bool {
        let Some(Ok((name, _))) = body.into_iter().next() else { return false };
        let budget = match name {
            "getMore" => &self.get_mores,
            "aggregate" if opens_the_delivered_stream(body) => &self.openings,
            _ => return false,
        };
        let took = budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if took {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        took
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Whether an `aggregate` opens the stream of delivered orders (not the stream that reads past
/// large events, which never names `fullDocument`).
fn opens_the_delivered_stream(body: &RawDocument) -> bool {
    let Ok(pipeline) = body.get_array("pipeline") else { return false };
    let Some(Ok(first)) = pipeline.into_iter().next() else { return false };
    let starts_a_stream = first.as_document().is_some_and(|stage| stage.get("$changeStream").ok().flatten().is_some());
    let text = format!("{:?}", mongodb::bson::Document::try_from(body));
    starts_a_stream && text.contains("fullDocument.")
}

/// Relays one connection: client messages are read whole and either forwarded or answered here.
async fn relay(client: TcpStream, server: TcpStream, injector: Arc<Injector>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let client_write = Arc::new(Mutex::new(client_write));
    let replies = tokio::spawn(forward(server_read, client_write.clone()));
    let _ = requests(client_read, server_write, client_write, &injector).await;
    replies.abort();
}

/// Reads one whole message (header included).
async fn read_message(from: &mut OwnedReadHalf) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 16];
    from.read_exact(&mut header).await?;
    let length = i32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
    let mut message = header.to_vec();
    message.resize(length.max(16), 0);
    from.read_exact(&mut message[16..]).await?;
    Ok(message)
}

/// Server to client, message by message (so that an injected answer never splits one).
async fn forward(mut server: OwnedReadHalf, client: Arc<Mutex<OwnedWriteHalf>>) -> std::io::Result<()> {
    loop {
        let message = read_message(&mut server).await?;
        client.lock().await.write_all(&message).await?;
    }
}

/// Client to server, answering the commands to fail.
async fn requests(
    mut client: OwnedReadHalf,
    mut server: OwnedWriteHalf,
    client_write: Arc<Mutex<OwnedWriteHalf>>,
    injector: &Injector,
) -> std::io::Result<()> {
    loop {
        let message = read_message(&mut client).await?;
        let op_code = i32::from_le_bytes(message[12..16].try_into().unwrap());
        // OP_MSG: header, flag bits, then a kind-0 section holding the command.
        let body = (op_code == OP_MSG && message.len() > 21 && message[20] == 0)
            .then(|| RawDocument::from_bytes(&message[21..]).ok())
            .flatten();
        let request_id = i32::from_le_bytes(message[4..8].try_into().unwrap());
        let opens_a_stream = body.is_some_and(|body| {
            body.get_array("pipeline").ok().and_then(|p| p.into_iter().next()).and_then(Result::ok).is_some_and(
                |first| first.as_document().is_some_and(|stage| stage.get("$changeStream").ok().flatten().is_some()),
            )
        });
        if opens_a_stream && injector.deny_streams.load(Ordering::SeqCst) {
            client_write.lock().await.write_all(&answer(request_id, &unauthorized())).await?;
            continue;
        }
        if body.is_some_and(|body| injector.should_fail(body)) {
            client_write.lock().await.write_all(&answer(request_id, &too_large())).await?;
            continue;
        }
        if let Some(stats) = body.and_then(|body| injector.oplog_stats(body)) {
            client_write.lock().await.write_all(&answer(request_id, &stats)).await?;
            continue;
        }
        server.write_all(&message).await?;
    }
}

/// The server's answer to a command whose result would hold a document over 16 MB.
fn too_large() -> mongodb::bson::Document {
    doc! {
        "ok": 0.0,
        "errmsg": "BSONObj size: 16777300 (0x1000054) is invalid. Size must be between 0 and 16793600(16MB)",
        "code": 10334,
        "codeName": "BSONObjectTooLarge",
    }
}

/// The server's answer to a command the user has no privilege to run.
fn unauthorized() -> mongodb::bson::Document {
    doc! { "ok": 0.0, "errmsg": "not authorized to execute command aggregate", "code": 13, "codeName": "Unauthorized" }
}

/// An `OP_MSG` reply to the request `response_to`, holding `reply`.
fn answer(response_to: i32, reply: &mongodb::bson::Document) -> Vec<u8> {
    let body = mongodb::bson::to_vec(reply).unwrap();
    let length = 16 + 4 + 1 + body.len();
    let mut message = Vec::with_capacity(length);
    message.extend_from_slice(&(length as i32).to_le_bytes());
    message.extend_from_slice(&0x7fff_0000_i32.to_le_bytes());
    message.extend_from_slice(&response_to.to_le_bytes());
    message.extend_from_slice(&OP_MSG.to_le_bytes());
    message.extend_from_slice(&0u32.to_le_bytes());
    message.push(0);
    message.extend_from_slice(&body);
    message
}
