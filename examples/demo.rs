//! `cargo run --release --example demo`: three small demo backends on 127.0.0.1:9001-9003 and
//! the balancer in front of them, on the shipped `balancer.toml`. Instructions go to stderr;
//! stdout carries the access log (redirect it to keep a wrk run quiet: `> access.log`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

async fn backend(addr: SocketAddr, name: &'static str) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    let body = if req.uri().path() == "/healthz" {
                        "ok\n".to_string()
                    } else {
                        format!("hello from {name} ({})\n", req.uri().path())
                    };
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let path = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "balancer.toml".into()),
    );
    let config = balancer::Config::load(&path)?;
    for (port, name) in [
        (9001, "backend-1"),
        (9002, "backend-2"),
        (9003, "backend-3"),
    ] {
        backend(SocketAddr::from(([127, 0, 0, 1], port)), name).await?;
    }
    let listen = config.listeners[0].bind;
    let admin = config.admin.as_ref().map(|a| a.bind);
    eprintln!("demo backends on 127.0.0.1:9001-9003; balancer on {listen}");
    eprintln!("  curl -i http://{listen}/            # pool web: round-robin, weights 1:2");
    eprintln!("  curl -i http://{listen}/api/users   # pool api: least connections");
    if let Some(a) = admin {
        eprintln!("  curl -s http://{a}/status; curl -s http://{a}/metrics; curl -XPOST http://{a}/reload");
    }
    eprintln!("  wrk -t2 -c64 -d10s http://{listen}/  (run the demo with > access.log to keep stdout quiet)");
    eprintln!("Ctrl-C drains and exits.");
    let opts = balancer::Options {
        config_path: path,
        config,
        prebound: Vec::new(),
        sighup: true,
    };
    balancer::run(
        opts,
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
        |_| {},
    )
    .await?;
    Ok(())
}
