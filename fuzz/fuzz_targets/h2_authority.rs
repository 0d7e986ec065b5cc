//! The HTTP/2 `:authority` adapter (`ztid_h2_authority::AuthorityFixingStream`): arbitrary
//! bytes are the client side of an in-memory duplex stream and the harness reads what the
//! adapter forwards, with read buffers of varying sizes. It must never panic, must end
//! (EOF or an I/O error) once the client has sent everything, and must stay within the
//! memory limit the run sets (`-rss_limit_mb`, `-malloc_limit_mb` in scripts/fuzz.sh).
//!
//! The first byte picks the read sizes and how the client writes (all at once, or in
//! small pieces that split frames).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztid_h2_authority::AuthorityFixingStream;

const READ_SIZES: [usize; 8] = [1, 7, 9, 333, 4096, 16_384, 16_393, 65_536];
const WRITE_PIECES: [usize; 4] = [usize::MAX, 1, 9, 1000];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

async fn run(mode: u8, input: &[u8]) {
    let (mut client, server) = tokio::io::duplex(16 * 1024);
    let piece = WRITE_PIECES[(mode >> 3) as usize % WRITE_PIECES.len()];
    let write = async move {
        for chunk in input.chunks(piece.min(input.len().max(1))) {
            if client.write_all(chunk).await.is_err() {
                return;
            }
        }
        let _ = client.shutdown().await;
        // Keep the client half open until the adapter has read everything: dropping it
        // would be a reset, not an orderly end.
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
    };
    let read = async move {
        let mut adapter = AuthorityFixingStream::new(server);
        let mut buf = vec![0u8; 65_536];
        let mut k = (mode & 7) as usize;
        let mut forwarded = 0usize;
        loop {
            let size = READ_SIZES[k % READ_SIZES.len()];
            k += 1;
            match adapter.read(&mut buf[..size]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => forwarded += n,
            }
        }
        // Dropping the adapter (and the server half) here ends the writer too.
        drop(adapter);
        forwarded
    };
    let ((), _forwarded) = tokio::join!(write, read);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    runtime().block_on(run(mode, input));
});
