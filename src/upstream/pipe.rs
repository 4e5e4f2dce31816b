//! A request body sent on an h2 stream: frames from the client's body (through `ReplayBody`,
//! which keeps a copy for a resend) to the stream's send half, as the stream's flow-control
//! window allows, on a task of its own since a streaming call's body goes on long after the
//! response started. A bodiless request needs none of this: its HEADERS end the stream.

use std::future::poll_fn;
use std::sync::{Arc, OnceLock};
use std::task::Poll;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::task::JoinHandle;

use crate::replay::ReplayBody;
use crate::request_body::BodyFault;

/// The pipe's task; dropping this stops it (the stream's send half goes with it).
pub struct PipeTask(JoinHandle<()>);

impl Drop for PipeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the pipe says the client's body failed, for the request path to tell the client's
/// fault from the backend's when the stream then fails.
pub type ClientFault = Arc<OnceLock<BodyFault>>;

pub fn spawn(body: ReplayBody, tx: h2::SendStream<Bytes>, fault: ClientFault) -> PipeTask {
    PipeTask(tokio::spawn(pipe(body, tx, fault)))
}

/// Why the pipe stopped early: nothing to report beyond it, the stream's own error reaches
/// the request path through the response.
struct Stopped;

async fn pipe(mut body: ReplayBody, mut tx: h2::SendStream<Bytes>, fault: ClientFault) {
    let _ = run(&mut body, &mut tx, &fault).await;
}

async fn run(
    body: &mut ReplayBody,
    tx: &mut h2::SendStream<Bytes>,
    fault: &ClientFault,
) -> Result<(), Stopped> {
    loop {
        // Read on only while the stream has some window: a backend that reads slowly slows
        // the client down rather than filling our memory (h2 holds at most the one frame
        // beyond the window, as with hyper's own pipe).
        tx.reserve_capacity(1);
        while tx.capacity() == 0 {
            // A reset ends the wait as a closed stream would.
            let granted = poll_fn(|cx| match tx.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => tx.poll_capacity(cx),
            })
            .await;
            match granted {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(Stopped),
            }
        }
        // The next frame, unless the backend resets the stream first (a refusal, an early
        // answer): then the body goes back to the request path by `ReplayBody`'s drop.
        let frame = tokio::select! {
            biased;
            _ = poll_fn(|cx| tx.poll_reset(cx)) => return Err(Stopped),
            f = body.frame() => f,
        };
        let frame = match frame {
            None => {
                tx.send_data(Bytes::new(), true).map_err(|_| Stopped)?;
                return Ok(());
            }
            Some(Err(e)) => {
                let _ = fault.set(e.fault());
                tx.send_reset(h2::Reason::CANCEL);
                return Err(Stopped);
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let last = http_body::Body::is_end_stream(body);
                if !data.is_empty() || last {
                    tx.send_data(data, last).map_err(|_| Stopped)?;
                }
                if last {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    tx.send_trailers(trailers).map_err(|_| Stopped)?;
                    return Ok(());
                }
            }
        }
    }
}
