//! A loopback HTTP server for the weights tests: nothing leaves 127.0.0.1.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Serves `body` for every request (only its first `send` bytes, while announcing all of
/// them, when `send` is shorter) and counts the requests.
pub struct Server {
    pub base: String,
    requests: Arc<AtomicUsize>,
}

impl Server {
    pub fn start(body: Vec<u8>, send: usize) -> Server {
        Self::with_header(body, send, String::new())
    }

    /// [`Server::start`] with an extra header line (`ETag: "..."`) in every response.
    pub fn with_header(body: Vec<u8>, send: usize, header: String) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{header}Connection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(header.as_bytes());
                let _ = stream.write_all(&body[..send.min(body.len())]);
            }
        });
        Server { base, requests }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}
