//! Every operation's future is `Send` for any lifetime of its arguments, so an embedding
//! engine can run them on spawned tasks. This is checked by compiling: a future that is not
//! (an async closure held across an await is one way to lose it) fails this build.
#![allow(dead_code)]
use cairn_core::BlobRef;
use cairn_remote_store::RemoteStore;

fn send<T: Send>(_: T) {}

/// Never run: it only has to compile.
fn probe(store: &'static RemoteStore, blob: &'static BlobRef, p: &'static std::path::Path) {
    send(store.head("k"));
    send(store.put_bytes("k", bytes::Bytes::new()));
    send(store.create_if_absent("k", bytes::Bytes::new()));
    send(store.get_bytes_verified("k", |_| Ok(())));
    send(store.get_blob("k", blob, |_, _| Ok(())));
    send(store.put_blob_file("k", p, blob));
    send(store.put_blob_range("k", p, 0, blob));
    send(store.list("p"));
    send(store.check_conditional_create());
    send(store.get_bytes("k"));
}

#[test]
fn store_futures_are_send() {
    // The check is `probe` compiling; this test names it in the test list.
    let _ = probe as fn(&'static RemoteStore, &'static BlobRef, &'static std::path::Path);
}
