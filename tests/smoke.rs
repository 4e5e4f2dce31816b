mod common;
use common::*;

/// The harness itself: two backends, the in-process balancer, four requests alternate.
#[tokio::test]
async fn forwards_and_round_robins() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&config(&[a.addr, b.addr], "round_robin", "")).await;
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let g = get(&c, &bal.url("/")).await;
        assert_eq!(g.status, 200);
        seen.push(g.body);
    }
    assert_eq!(seen, ["a", "b", "a", "b"]);
    bal.shutdown().await;
}
