//! stale-while-revalidate's background request: the client already has the stale copy; one
//! request per key (the flight) asks a backend for a fresh one and stores it, exactly as a
//! miss would (`Miss::finish` and the tee), with nobody reading but the tee.
//!
//! It is a single attempt: a failure leaves the stale copy in place for the next request to
//! try again. The attempt is counted on the backend like any other (breaker, counters).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use http::{Method, Request, Uri, Version};
use http_body_util::BodyExt;

use super::collapse::Leader;
use super::store::Entry;
use super::{policy, Cache, Fwd, Miss};
use crate::balance::Pool;
use crate::classify::{classify, Context};
use crate::clock::now_ms;
use crate::conn::ConnInfo;
use crate::forwarded::Forwarded;
use crate::request_body::UpBody;
use crate::response_body::ResponseBody;
use crate::upstream::{self, Sent};

/// Where a background request goes: the route's pool, on behalf of the client connection
/// that found the stale copy.
pub struct Refresher<'a> {
    pub pool: &'a Arc<Pool>,
    pub conn: &'a Arc<ConnInfo>,
    /// Turns the client's headers into what a backend gets (hop-by-hop fields out, the
    /// request ID in) and gives the X-Forwarded-* fields to send with them: the lookup sees
    /// the headers before that rewrite.
    pub prepare: &'a (dyn Fn(&mut HeaderMap) -> Forwarded + Sync),
}

/// Longest a background refresh may take, body included, beyond the response timeout.
const BODY_GRACE: Duration = Duration::from_secs(30);

pub(super) fn spawn(
    cache: Arc<Cache>,
    r: &Refresher<'_>,
    uri: Uri,
    mut headers: HeaderMap,
    primary: String,
    (key, entry): (String, Arc<Entry>),
    leader: Leader,
) {
    let fwd = (r.prepare)(&mut headers);
    let pool = Arc::clone(r.pool);
    let conn = Arc::clone(r.conn);
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        let limit = pool.dial.timeouts.response + BODY_GRACE;
        let _ = tokio::time::timeout(limit, async move {
            headers.remove(header::IF_NONE_MATCH);
            headers.remove(header::IF_MODIFIED_SINCE);
            let revalidating = match policy::validators(&entry.headers) {
                Some((etag, lm)) => {
                    if let Some(v) = etag {
                        headers.insert(header::IF_NONE_MATCH, v);
                    }
                    if let Some(v) = lm {
                        headers.insert(header::IF_MODIFIED_SINCE, v);
                    }
                    true
                }
                None => false,
            };
            let miss = Miss {
                max_object: cache.sizes.1,
                cache,
                why: Fwd::Stale,
                primary: Some(primary),
                invalidate: None,
                stale: Some((key, entry)),
                revalidating,
                leader: Some(leader),
                method: Method::GET,
                uri: uri.clone(),
                asked_headers: headers.clone(),
                head: false,
                stale_if_error: Duration::ZERO,
            };
            let now = now_ms();
            let Ok(pick) = pool.pick(now, &[]) else {
                return;
            };
            let backend = &pool.members[pick.index].backend;
            let Some(mut guard) = backend.start(&pool.breaker, now, pick.breaker_overridden) else {
                return;
            };
            let mut req = Request::new(UpBody::Empty);
            *req.method_mut() = Method::GET;
            *req.uri_mut() = uri;
            *req.version_mut() = Version::HTTP_11;
            *req.headers_mut() = headers;
            let sent_at = Instant::now();
            let result = upstream::send(backend, &pool.dial, req, Some(&fwd)).await;
            let verdict = classify(
                &result,
                &Context {
                    replayable: false,
                    free_replay_left: false,
                    upgrade: false,
                    policy: &pool.breaker,
                },
            );
            let status = result.as_ref().ok().map(|s| s.response.status().as_u16());
            guard.record(verdict.outcome, status, sent_at.elapsed(), &pool.breaker);
            let Ok(Sent { response, .. }) = result else {
                return;
            };
            if response.status().is_server_error() {
                return;
            }
            let resp = response.map(|b| ResponseBody::upstream(b, guard, None, conn));
            let mut body = miss.finish(resp).into_body();
            // Nobody reads this but the tee: drain it so that it stores on the last frame.
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    break;
                }
            }
        })
        .await;
    });
}
