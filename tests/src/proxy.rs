//! A TCP proxy on 127.0.0.1 that a test can take down and bring back, to make a server
//! (moto, which keeps its data in memory and so must not be restarted) unreachable and
//! reachable again.
//!
//! Contract: [`TcpProxy::start`] listens on a free loopback port and forwards every
//! connection to the target. [`TcpProxy::stop`] closes the listener and every forwarded
//! connection (new connections are refused, pooled ones break); [`TcpProxy::resume`]
//! listens on the same port again. It runs on its own tokio runtime thread, so synchronous
//! tests can use it. Crash: nothing is stored. Retries: none. Cancellation: dropping the
//! proxy stops it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A stoppable TCP forwarder (see the module docs).
pub struct TcpProxy {
    addr: SocketAddr,
    up: watch::Sender<bool>,
    rt: Option<tokio::runtime::Runtime>,
}

impl TcpProxy {
    /// Forwards a new loopback port to `target`.
    pub fn start(target: SocketAddr) -> std::io::Result<TcpProxy> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (up, rx) = watch::channel(true);
        rt.spawn(serve(listener, target, rx));
        Ok(TcpProxy {
            addr,
            up,
            rt: Some(rt),
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Refuses new connections and breaks the open ones.
    pub fn stop(&self) {
        self.up.send_replace(false);
        // The listener and connections close as their tasks see the signal.
        std::thread::sleep(Duration::from_millis(100));
    }

    /// Listens again on the same port (retrying briefly if the port is not free yet).
    pub fn resume(&self, target: SocketAddr) -> std::io::Result<()> {
        let Some(rt) = &self.rt else {
            return Err(std::io::Error::other("the proxy was dropped"));
        };
        let mut last = None;
        for _ in 0..50 {
            match rt.block_on(TcpListener::bind(self.addr)) {
                Ok(l) => {
                    self.up.send_replace(true);
                    rt.spawn(serve(l, target, self.up.subscribe()));
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("cannot listen again")))
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.up.send_replace(false);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn down(rx: &mut watch::Receiver<bool>) {
    while *rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn serve(listener: TcpListener, target: SocketAddr, mut up: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = down(&mut up) => return,
            r = listener.accept() => {
                let Ok((client, _)) = r else { continue };
                tokio::spawn(forward(client, target, up.clone()));
            }
        }
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr, mut up: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        () = down(&mut up) => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};

    fn echo() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn roundtrip(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"ping")?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        Ok(b.to_vec())
    }

    #[test]
    fn stops_refusing_and_resumes_forwarding() {
        let target = echo();
        let p = TcpProxy::start(target).unwrap();
        assert_eq!(roundtrip(p.addr()).unwrap(), b"ping");
        p.stop();
        assert!(roundtrip(p.addr()).is_err());
        p.resume(target).unwrap();
        assert_eq!(roundtrip(p.addr()).unwrap(), b"ping");
    }
}
