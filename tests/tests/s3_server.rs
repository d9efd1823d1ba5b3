//! Self-test of the S3 test harness (raw HTTP only, independent of the Cairn crates).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cairn_tests::s3::S3Server;
use std::thread;

fn check(server: &S3Server) {
    let bucket = server.bucket().to_owned();
    let list = server
        .request("GET", &format!("/{bucket}"), &[], b"")
        .unwrap();
    assert_eq!(list.status, 200, "list {bucket}: {}", list.body);
    assert!(list.body.contains(&bucket), "{}", list.body);

    let key = format!("/{bucket}/gen/0000000001.manifest");
    let create = [("If-None-Match", "*")];
    let first = server.request("PUT", &key, &create, b"one").unwrap();
    assert_eq!(first.status, 200, "first conditional put: {}", first.body);
    let second = server.request("PUT", &key, &create, b"two").unwrap();
    assert_eq!(
        second.status, 412,
        "second conditional put: {}",
        second.body
    );
    let get = server.request("GET", &key, &[], b"").unwrap();
    assert_eq!((get.status, get.body.as_str()), (200, "one"));
}

#[test]
fn two_servers_start_concurrently_and_support_conditional_create() {
    let handles: Vec<_> = (0..2)
        .map(|_| thread::spawn(|| S3Server::start().unwrap_or_else(|e| panic!("{e}"))))
        .collect();
    let servers: Vec<S3Server> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(servers[0].endpoint(), servers[1].endpoint());
    assert_ne!(servers[0].bucket(), servers[1].bucket());
    for server in &servers {
        check(server);
        assert_eq!(server.url("db/a"), format!("s3://{}/db/a", server.bucket()));
        let env = server.env();
        let endpoint = env.iter().find(|(k, _)| k == "AWS_ENDPOINT_URL").unwrap();
        assert_eq!(endpoint.1, server.endpoint());
        assert!(endpoint.1.starts_with("http://127.0.0.1:"));
    }
    // A bucket of one server does not exist on the other.
    let other = format!("/{}", servers[1].bucket());
    assert_eq!(
        servers[0].request("GET", &other, &[], b"").unwrap().status,
        404
    );
}
