//! The accept loop every TCP front door shares: a bound on connections held
//! at once (past it, new ones are closed at once), no Nagle delay, one task
//! per connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Accepts connections until the listener fails; `what` names the front
/// door in logs.
pub async fn serve<F, Fut>(listener: TcpListener, what: &'static str, max: usize, connection: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "{what} listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many {what} connections; refusing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let task = connection(tcp, peer);
        tokio::spawn(async move {
            task.await;
            drop(permit);
        });
    }
}
