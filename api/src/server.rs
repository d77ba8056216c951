//! The API socket: a Unix stream socket served by its own thread (`kiln-api`), one thread per
//! connection (`kiln-api-conn`). A connection's thread reads a whole request before it takes
//! the controller's lock, so a slow, stuck or vanished client holds up nobody but itself;
//! vCPUs and the VMM thread never wait for the API.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::controller::Controller;
use crate::http::{RequestReader, Response, CONTINUE};
use crate::router::Action;

/// Firecracker's default for `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;

/// Limits of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest request body accepted.
    pub max_payload: usize,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// How long an open connection may stay silent between requests.
    pub idle_timeout: Duration,
    /// How long a started request may take to arrive in full.
    pub request_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_connections: 256,
            idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A live server answers on the path.
    #[error("cannot use API socket '{0}': another process is listening on it")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("cannot use API socket '{0}': the path exists and is not a socket; Kiln does not replace it")]
    NotASocket(PathBuf),
    /// Any other failure.
    #[error("cannot use API socket '{path}': {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Binds the API socket at `path`. An existing socket nobody listens on (left behind by a
/// process that died) is replaced; a live one, or anything that is not a socket, is not.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
    match UnixListener::bind(path) {
        Ok(listener) => Ok(listener),
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
            let meta = std::fs::symlink_metadata(path).map_err(io)?;
            if !meta.file_type().is_socket() {
                return Err(BindError::NotASocket(path.to_path_buf()));
            }
            match UnixStream::connect(path) {
                Ok(_) => Err(BindError::InUse(path.to_path_buf())),
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
                    log::info!("replacing stale API socket '{}'", path.display());
                    std::fs::remove_file(path).map_err(io)?;
                    UnixListener::bind(path).map_err(io)
                }
                Err(err) => Err(io(err)),
            }
        }
        Err(err) => Err(io(err)),
    }
}

/// The running server; dropping it stops accepting and removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    identity: Option<(u64, u64)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves `listener` (bound at `path`) on a new thread.
    pub fn start(
        listener: UnixListener,
        path: &Path,
        controller: Arc<Mutex<Controller>>,
        limits: ServerLimits,
    ) -> std::io::Result<Self> {
        let identity = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-api".into())
            .spawn(move || accept_loop(listener, controller, limits, &stopping))?;
        Ok(Self {
            path: path.to_path_buf(),
            identity,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting connections (open ones end with their client) and removes the socket
    /// file if it is still this server's.
    pub fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept call; it sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = thread.join();
        let ours = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
            .is_some_and(|id| Some(id) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    listener: UnixListener,
    controller: Arc<Mutex<Controller>>,
    limits: ServerLimits,
    stop: &AtomicBool,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(err) => {
                log::warn!("API socket: accept failed: {err}");
                // EMFILE and friends: do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= limits.max_connections {
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = Response::fault(
                503,
                &format!(
                    "Kiln serves at most {} API connections at once; close idle ones and retry",
                    limits.max_connections
                ),
            )
            .write_to(&mut stream, false);
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let counter = active.clone();
        let controller = controller.clone();
        let spawned = std::thread::Builder::new()
            .name("kiln-api-conn".into())
            .stack_size(512 * 1024)
            .spawn(move || {
                serve_connection(stream, &controller, limits);
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(err) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            log::warn!("API socket: cannot start a connection thread: {err}");
        }
    }
}

/// Serves requests on one connection until the client closes it, asks to, or misbehaves.
fn serve_connection(stream: UnixStream, controller: &Mutex<Controller>, limits: ServerLimits) {
    let _ = stream.set_write_timeout(Some(limits.request_timeout));
    let mut reader = RequestReader::new(limits.max_payload);
    loop {
        let timeout = if reader.has_buffered() {
            limits.request_timeout
        } else {
            limits.idle_timeout
        };
        let _ = stream.set_read_timeout(Some(timeout));
        let mut input = &stream;
        let request = reader.read(
            &mut input,
            || {
                let _ = stream.set_read_timeout(Some(limits.request_timeout));
            },
            || (&stream).write_all(CONTINUE),
        );
        let request = match request {
            Ok(request) => request,
            Err(err) => {
                if let Some(status) = err.status() {
                    log::debug!("API request refused ({status}): {err}");
                    let _ = Response::fault(status, &err.to_string()).write_to(&mut &stream, false);
                } else {
                    log::debug!("API connection ended: {err}");
                }
                return;
            }
        };
        log::debug!(
            "API request: {} {}{}",
            request.method.as_str(),
            request.path,
            request
                .body
                .as_deref()
                .map(|body| format!(" with body {}", String::from_utf8_lossy(body)))
                .unwrap_or_default()
        );
        let response = match Action::parse(&request.method, &request.path, request.body.as_deref())
        {
            Ok(action) => controller
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .handle(action),
            Err(err) => {
                log::warn!("API request refused ({}): {}", err.status, err.message);
                Response::fault(err.status, &err.message)
            }
        };
        if response.write_to(&mut &stream, request.keep_alive).is_err() || !request.keep_alive {
            return;
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
