//! Unit tests of admission at the cap and of connection deadlines ([`super::Listener`],
//! [`super::ConnState`]).

use std::sync::Arc;
use std::time::Duration;

use super::listener::{Admission, CLOSING_SLACK};
use super::{ConnHandle, Listener, Timeouts};

fn admit(l: &Arc<Listener>, peer: &str, authenticated: bool) -> Option<ConnHandle> {
    match l.try_admit(peer, None, authenticated) {
        Admission::Admitted(c) => Some(c),
        _ => None,
    }
}

fn timeouts() -> Timeouts {
    Timeouts {
        handshake: Duration::from_secs(10),
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        request: Duration::from_secs(300),
    }
}

#[test]
fn at_cap_the_least_busy_connection_makes_room() {
    let l = Listener::new("test", 3, timeouts(), None);
    let authed_busy = admit(&l, "a", true).unwrap();
    let _req = authed_busy.state().request_started();
    let idle = admit(&l, "b", false).unwrap();
    drop(idle.state().request_started());
    let fresh = admit(&l, "c", false).unwrap();
    // At the cap: the one that sent nothing goes first.
    let d = admit(&l, "d", false).unwrap();
    assert!(fresh.state().is_closing());
    assert!(!idle.state().is_closing() && !authed_busy.state().is_closing());
    drop(fresh);
    // Then an idle one, once nothing is left that sent nothing.
    let _d_req = d.state().request_started();
    d.state().set_authenticated();
    let _e = admit(&l, "e", false).unwrap();
    assert!(idle.state().is_closing());
    drop(idle);
    let _e_req = _e.state().request_started();
    _e.state().set_authenticated();
    // Authenticated clients' requests in flight are never closed for room.
    assert!(admit(&l, "f", false).is_none());
    assert!(!authed_busy.state().is_closing() && !d.state().is_closing());
}

#[test]
fn only_the_clients_a_listener_exists_for_are_kept_from_eviction_and_only_a_few_each() {
    // Leaves stand in for certificates here: "agent-N" is an agent, anything else a
    // workload whose certificate chains to the bundle all the same.
    let immunity: super::Immunity = Arc::new(|leaf: &[u8]| {
        std::str::from_utf8(leaf)
            .ok()
            .filter(|id| id.starts_with("agent-"))
            .map(str::to_string)
    });
    let cap = super::MAX_IMMUNE_PER_IDENTITY + 3;
    let l = Listener::with_immunity("test", cap, timeouts(), None, Some(immunity));
    let busy = |l: &Arc<Listener>, leaf: &str| {
        let c = admit(l, leaf, false).unwrap();
        let immune = l.authenticate(c.state(), leaf.as_bytes());
        let req = c.state().request_started();
        (c, req, immune)
    };
    // A workload's certificate is verified, yet never makes its connection immune.
    let (workload, _w, immune) = busy(&l, "workload");
    assert!(!immune);
    // One agent: a few connections immune, the next not.
    let mut agent: Vec<_> = (0..super::MAX_IMMUNE_PER_IDENTITY)
        .map(|_| busy(&l, "agent-1"))
        .collect();
    assert!(agent.iter().all(|(_, _, immune)| *immune));
    let (extra, _x, immune) = busy(&l, "agent-1");
    assert!(!immune, "over the identity's share");
    let (other, _o, immune) = busy(&l, "agent-2");
    assert!(immune, "another agent has its own share");
    // At the cap, busy non-immune connections make room, oldest first; immune never.
    let (_new, _n, _) = busy(&l, "new");
    assert!(workload.state().is_closing());
    assert!(admit(&l, "new2", false).is_some());
    assert!(extra.state().is_closing());
    assert!(!other.state().is_closing());
    assert!(agent.iter().all(|(c, _, _)| !c.state().is_closing()));
    // A closed connection gives its identity's share back.
    agent.pop();
    assert!(busy(&l, "agent-1").2);
}

#[test]
fn deadlines_follow_activity() {
    let l = Listener::new("test", 3, timeouts(), None);
    let c = admit(&l, "a", false).unwrap();
    let (_, why) = c.state().deadline(&timeouts());
    assert_eq!(why, "no request within the request header timeout");
    let g = c.state().request_started();
    let (_, why) = c.state().deadline(&timeouts());
    assert_eq!(why, "a request exceeded the request timeout");
    drop(g);
    let (_, why) = c.state().deadline(&timeouts());
    assert_eq!(why, "idle past the idle timeout");
    drop(c);
    assert_eq!(l.open_connections(), 0);
}

#[test]
fn over_the_slack_new_connections_are_refused() {
    let l = Listener::new("test", 1, timeouts(), None);
    let mut held = vec![admit(&l, "0", true).unwrap()];
    let _busy = held[0].state().request_started();
    // The only connection is busy and authenticated: nothing can make room.
    assert!(admit(&l, "x", false).is_none());
    drop(_busy);
    for i in 0..CLOSING_SLACK {
        held.push(admit(&l, &i.to_string(), false).unwrap());
    }
    assert!(admit(&l, "y", false).is_none());
}

#[tokio::test]
async fn a_closing_connection_lingers_so_its_last_words_arrive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = tokio::net::TcpStream::connect(tcp.local_addr().unwrap())
        .await
        .unwrap();
    let (server, peer) = tcp.accept().await.unwrap();
    let l = Listener::new("test", 3, timeouts(), None);
    let conn = l.admit_now(peer.to_string(), Some(peer), false).unwrap();
    let mut guarded = super::Guarded::new(server, conn);
    let (mut from_server, mut to_server) = client.into_split();
    // The client has written what the server will never read (a flood, a body the
    // server refused unread) and keeps writing while it reads, as a client writing
    // before it reads does: a TLS stream with output pending, the e2e flooder.
    to_server.write_all(&vec![7u8; 64 * 1024]).await.unwrap();
    let server = tokio::spawn(async move {
        guarded.write_all(b"GOAWAY").await.unwrap();
        let started = std::time::Instant::now();
        guarded.shutdown().await.unwrap();
        started.elapsed()
    });
    let mut last_words = [0u8; 6];
    from_server.read_exact(&mut last_words).await.unwrap();
    assert_eq!(&last_words, b"GOAWAY");
    // Without the linger the server's close with unread input is a RST, and this write
    // fails (the client then never gets to read).
    to_server
        .write_all(&vec![7u8; 16 * 1024])
        .await
        .expect("the server still reads while it closes");
    let mut rest = Vec::new();
    let read = from_server.read_to_end(&mut rest).await;
    assert!(
        read.is_ok() && rest.is_empty(),
        "a FIN after the last words: {read:?}"
    );
    drop((from_server, to_server));
    // The client closed its side: the linger ends there, not at its bound.
    let lingered = server.await.unwrap();
    assert!(lingered < super::LINGER, "lingered {lingered:?}");
    assert_eq!(l.open_connections(), 0);
}
