//! The binary under SIGTERM: stop accepting, finish requests in flight, exit 0.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_0() {
    let upstream = Upstream::start().await;
    let (_dir, path) = binary_config(upstream.addr, DEFAULT_SITES, "");
    let (mut child, addrs) = start_binary(&path);
    let addr = addrs.plain;

    let in_flight = tokio::spawn(plain_get(addr, "/slow?ms=1500", "a.test"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "TERM");
    // New connections are refused once the gateway stops accepting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("/slow"));
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}
