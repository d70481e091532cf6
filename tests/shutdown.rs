//! The binary under SIGTERM: stop accepting, finish requests in flight, exit 0.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_0() {
    let upstream = Upstream::start().await;
    let files = GatewayBuilder::new().upstream(upstream.addr).files().await;
    let gw = files.start("info");
    let addr = gw.plain;

    let in_flight = tokio::spawn(plain_get(addr, "/slow?ms=1500", "a.test"));
    // In flight: the upstream has it (it records a request on arrival).
    assert!(
        eventually(Duration::from_secs(5), || async { upstream.count() == 1 }).await,
        "the request never reached the upstream"
    );
    gw.signal("TERM");
    // New connections are refused once the gateway stops accepting...
    assert!(
        eventually(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await,
        "still accepting 5 s after SIGTERM"
    );
    // ...while the request is still in flight (else this proved nothing).
    assert!(
        !in_flight.is_finished(),
        "the request ended before accepting stopped"
    );

    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("/slow"));
    assert_eq!(gw.wait().await.code(), Some(0));
}
