//! Control-stream strictness: malformed, oversized and truncated frames, a wrong version and a
//! wrong zone each close that peer's connection with an error code, while the gateway keeps
//! serving its other peers.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use causeway_protocol::control::{self, Hello, Message};
use causeway_protocol::{ErrorCode, GatewayId, ZoneName};
use causeway_tests::rogue;
use causeway_tests::*;

/// Connects to b as zone c, sends `bytes` on the control stream (optionally finishing it), and
/// returns the code b closed the connection with.
async fn send_as_c(m: &TestMesh, bytes: Bytes, finish: bool) -> (u64, String) {
    let creds =
        rogue::credentials(&m.pki, &m.ids[2], Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    let (_ep, conn) = rogue::dial(creds.0, creds.1, &m.ids[1], m.addrs[1]).await.unwrap();
    let mut ctl = rogue::open_control(&conn).await.unwrap();
    ctl.stream.send_data(bytes).await.unwrap();
    if finish {
        ctl.stream.finish().await.unwrap();
    }
    rogue::close_code(&conn, Duration::from_secs(5)).await.expect("b did not close the connection")
}

fn hello(zone: &str) -> Bytes {
    control::encode(&Message::Hello(Hello {
        zone: ZoneName::new(zone).unwrap(),
        gateway: GatewayId::new("gw-1").unwrap(),
        features: 0,
    }))
    .unwrap()
}

fn with_preface(frames: &[&[u8]]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_slice(&control::preface(control::VERSION));
    for f in frames {
        b.put_slice(f);
    }
    b.freeze()
}

async fn assert_still_serving(m: &TestMesh, listen: std::net::SocketAddr, code: ErrorCode) {
    let (banner, _) = echo_flow(listen, b"after the rogue").await.unwrap();
    assert_eq!(banner, "b");
    assert_eq!(
        metric(&m.gw(1).metrics_text(), "causeway_peer_control_errors_total", &[("code", &code.to_string())]),
        Some(1.0),
        "b counts the error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_closes_the_connection() {
    let (m, listen) = echo_pair_with_c("").await;
    // A frame of 3 bytes that are not a postcard Message.
    let bad = with_preface(&[&hello("c"), &[0, 0, 0, 3, 0xff, 0xff, 0xff]]);
    let (code, reason) = send_as_c(&m, bad, false).await;
    assert_eq!(ErrorCode(code), ErrorCode::CONTROL_MALFORMED, "{reason}");
    assert_still_serving(&m, listen, ErrorCode::CONTROL_MALFORMED).await;
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_from_its_length_alone() {
    let (m, listen) = echo_pair_with_c("").await;
    // Declares 16 MiB and sends nothing more: refused before any body is buffered.
    let bad = with_preface(&[&hello("c"), &(16u32 << 20).to_be_bytes()]);
    let (code, reason) = send_as_c(&m, bad, false).await;
    assert_eq!(ErrorCode(code), ErrorCode::CONTROL_OVERSIZED, "{reason}");
    assert!(reason.contains("16777216"), "{reason}");
    assert_still_serving(&m, listen, ErrorCode::CONTROL_OVERSIZED).await;
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_frame_closes_the_connection() {
    let (m, listen) = echo_pair_with_c("").await;
    let h = hello("c");
    let bad = with_preface(&[&h[..h.len() - 2]]);
    let (code, reason) = send_as_c(&m, bad, true).await;
    assert_eq!(ErrorCode(code), ErrorCode::CONTROL_TRUNCATED, "{reason}");
    assert_still_serving(&m, listen, ErrorCode::CONTROL_TRUNCATED).await;
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_version_is_refused_with_a_clear_reason() {
    let (m, listen) = echo_pair_with_c("").await;
    let mut b = BytesMut::new();
    b.put_slice(&control::preface(control::VERSION + 1));
    b.put_slice(&hello("c"));
    let (code, reason) = send_as_c(&m, b.freeze(), false).await;
    assert_eq!(ErrorCode(code), ErrorCode::VERSION_MISMATCH);
    assert!(reason.contains(&format!("version {}", control::VERSION + 1)), "{reason}");
    assert_still_serving(&m, listen, ErrorCode::VERSION_MISMATCH).await;
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_announcing_another_zone_is_refused() {
    let (m, listen) = echo_pair_with_c("").await;
    // c's identity claims to be zone b.
    let (code, reason) = send_as_c(&m, with_preface(&[&hello("b")]), false).await;
    assert_eq!(ErrorCode(code), ErrorCode::PEER_MISMATCH, "{reason}");
    assert_still_serving(&m, listen, ErrorCode::PEER_MISMATCH).await;
    // b's routes are as they were: echo.test is still local to b only and a is still up.
    assert_eq!(
        causeway::admin::peers_json(&m.gw(0).mesh)["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == "up")
            .count(),
        1
    );
    m.shutdown().await;
}
