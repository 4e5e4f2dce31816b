//! The response cache (RFC 9111, as a shared cache), for routes with `cache = true`.
//!
//! `proxy::forward` calls it twice: `lookup` before the attempt loop (a hit is answered from
//! memory; a miss may wait for another request's flight, and is told what to revalidate),
//! and `Miss::finish` on the backend's response (store it through a tee, refresh a stale copy
//! on a 304, or serve the stale copy on a 5xx); `proxy::handle` asks `Fallback` for the stale
//! copy when every attempt failed. The balancer's own answers never reach the cache.
//!
//! The `Cache` lives outside the snapshot like an `Arc<Backend>`: `Snapshot::build` hands the
//! previous one on unless `[cache]`'s sizes changed. Files: `key` (what a request is looked
//! up by), `policy` (what may be stored and served), `store` (bounded memory), `collapse`
//! (one backend request per cold key), `tee` (storing while streaming), `refresh`
//! (stale-while-revalidate's background request), `stats` (counters).

mod collapse;
mod key;
mod policy;
mod refresh;
mod stats;
mod store;
mod tee;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Uri};
use http_cache_semantics::{AfterResponse, BeforeRequest, CachePolicy};

use crate::accesslog::LogEntry;
use crate::answer::ProxyError;
use crate::config::CacheConfig;
use crate::response_body::ResponseBody;

pub use refresh::Refresher;
pub use stats::Stats;

use collapse::{Flights, Join, Leader};
use policy::{Asked, NotStored, Wants};
use store::{Entry, Store, Stored, VaryIndex};

pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The one response cache; shared by every caching route and carried across reloads.
pub struct Cache {
    store: Store,
    flights: Arc<Flights>,
    pub stats: Arc<Stats>,
    /// The sizes it was built with: a reload with other sizes builds a new one.
    sizes: (u64, u64),
    /// For Vary indexes: a new index never revives the variants of a dropped one.
    generation: AtomicU64,
}

impl Cache {
    /// The cache for a snapshot with `cfg`: `prev` when its sizes still hold, else a new one
    /// (counters carried on), or none without `[cache]`.
    pub fn carry(cfg: Option<&CacheConfig>, prev: Option<&Arc<Cache>>) -> Option<Arc<Cache>> {
        let cfg = cfg?;
        let sizes = (cfg.max_size, cfg.max_object_size);
        match prev {
            Some(p) if p.sizes == sizes => Some(Arc::clone(p)),
            Some(p) => Some(Arc::new(Cache::new(cfg, Arc::clone(&p.stats)))),
            None => Some(Arc::new(Cache::new(cfg, Arc::default()))),
        }
    }

    fn new(cfg: &CacheConfig, stats: Arc<Stats>) -> Cache {
        Cache {
            store: Store::new(cfg, Arc::clone(&stats.evictions)),
            flights: Arc::default(),
            stats,
            sizes: (cfg.max_size, cfg.max_object_size),
            generation: AtomicU64::new(1),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.store.bytes()
    }

    pub fn entries(&self) -> usize {
        self.store.entries()
    }

    pub fn max_size(&self) -> u64 {
        self.store.capacity()
    }

    /// `POST /cache/purge`: drops every response whose target starts with `prefix` (on
    /// `host` only, if given); the number dropped.
    pub fn purge(&self, host: Option<&str>, prefix: &str) -> usize {
        self.store.purge(host, prefix)
    }

    /// The stored response `req` would be answered with, and the key it is stored under.
    fn find(&self, primary: &str, req: &HeaderMap) -> Found {
        match self.store.get(primary) {
            None => Found::Nothing,
            Some(Stored::Response(e)) => Found::Entry(None, e),
            Some(Stored::Vary(index)) => {
                let k = key::variant(primary, index.generation, &index.names, req);
                match self.store.get(&k) {
                    Some(Stored::Response(e)) => Found::Entry(Some(k), e),
                    _ => Found::VaryMiss,
                }
            }
        }
    }

    /// RFC 9111 §4.4: a successful unsafe request invalidates the target (and the same-host
    /// `Location` and `Content-Location` of its answer).
    fn invalidate(&self, primary: &str) {
        self.store.remove(primary);
    }
}

enum Found {
    Nothing,
    VaryMiss,
    /// The variant's key for a response with Vary (`None`: the plain key): a hit never
    /// copies the key.
    Entry(Option<String>, Arc<Entry>),
}

/// The request as the cache sees it, after the proxy's rewrite (so `Host` is the authority).
pub struct Asking<'a> {
    pub method: &'a Method,
    /// What the backend is asked for: normalised path and query.
    pub uri: &'a Uri,
    /// The headers going upstream; a revalidation swaps in its own conditionals.
    pub headers: &'a mut HeaderMap,
    /// Bodiless and not an upgrade: only those are looked up.
    pub plain: bool,
    /// How long a miss waits for another request's flight: the pool's response timeout.
    pub wait: Duration,
}

pub enum Step {
    Serve(Hit),
    // Boxed: a hit should not carry a miss's size.
    Fetch(Box<Miss>),
}

/// Why a request went forward: `fwd` of `Cache-Status` (RFC 9211 §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fwd {
    Bypass,
    Method,
    UriMiss,
    VaryMiss,
    /// The client's `Cache-Control` did not let a fresh response be used.
    Request,
    Stale,
}

impl Fwd {
    fn as_str(self) -> &'static str {
        match self {
            Fwd::Bypass => "bypass",
            Fwd::Method => "method",
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Request => "request",
            Fwd::Stale => "stale",
        }
    }
}

/// Looks `req` up. A fresh match is a `Hit`; anything else goes forward as a `Miss`, which
/// may first wait for another request's flight for the same key.
pub async fn lookup(
    cache: &Arc<Cache>,
    cfg: &CacheConfig,
    req: Asking<'_>,
    refresher: &Refresher<'_>,
) -> Step {
    let method = req.method;
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let host = req
        .headers
        .get(header::HOST)
        .map_or(&b""[..], |h| h.as_bytes());
    let primary = key::primary(host, target);
    let get_or_head = *method == Method::GET || *method == Method::HEAD;
    if !get_or_head || !req.plain {
        cache.stats.bypass.fetch_add(1, Relaxed);
        let unsafe_method =
            [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method);
        return Step::Fetch(Box::new(Miss::bypass(
            cache,
            if get_or_head {
                Fwd::Bypass
            } else {
                Fwd::Method
            },
            unsafe_method.then_some(primary),
        )));
    }
    let wants = Wants::of(req.headers);
    if wants.no_store {
        cache.stats.bypass.fetch_add(1, Relaxed);
        return Step::Fetch(Box::new(Miss::bypass(cache, Fwd::Bypass, None)));
    }
    let head = *method == Method::HEAD;
    let mut leader = None;
    let mut waited = false;
    loop {
        let now = SystemTime::now();
        let (why, stale) = match cache.find(&primary, req.headers) {
            Found::Nothing => (Fwd::UriMiss, None),
            Found::VaryMiss => (Fwd::VaryMiss, None),
            Found::Entry(variant, e) => {
                let k = || variant.clone().unwrap_or_else(|| primary.clone());
                let fresh = if wants.plain {
                    e.stale_by(now).is_none()
                } else {
                    let asked = Asked {
                        method,
                        uri: req.uri,
                        headers: req.headers,
                    };
                    matches!(
                        e.policy.before_request(&asked, now),
                        BeforeRequest::Fresh(_)
                    )
                };
                if fresh {
                    cache.stats.hits.fetch_add(1, Relaxed);
                    let detail = if waited {
                        "balancer; hit; detail=collapsed"
                    } else {
                        "balancer; hit"
                    };
                    return Step::Serve(Hit::new(e, req.headers, head, detail, "hit", now));
                }
                let stale_by = e.stale_by(now);
                let swr = e.directives.stale_while_revalidate;
                if let (true, Some(by), Some(window)) = (wants.plain, stale_by, swr) {
                    if by <= window {
                        if let Some(l) = cache.flights.lead(&primary) {
                            refresh::spawn(
                                Arc::clone(cache),
                                refresher,
                                req.uri.clone(),
                                req.headers.clone(),
                                primary.clone(),
                                (k(), Arc::clone(&e)),
                                l,
                            );
                        }
                        cache.stats.stale_while_revalidate.fetch_add(1, Relaxed);
                        return Step::Serve(Hit::new(
                            e,
                            req.headers,
                            head,
                            "balancer; hit; detail=stale-while-revalidate",
                            "stale",
                            now,
                        ));
                    }
                }
                let why = if stale_by.is_some() {
                    Fwd::Stale
                } else {
                    Fwd::Request
                };
                (why, Some((k(), e)))
            }
        };
        // Collapse GETs of one key; a range request or HEAD goes on its own (neither is
        // stored), as does a request that already waited once.
        if !head && !waited && leader.is_none() && !req.headers.contains_key(header::RANGE) {
            match cache.flights.join(&primary) {
                Join::Leader(l) => leader = Some(l),
                Join::Wait(rx) => {
                    collapse::wait(rx, req.wait).await;
                    waited = true;
                    continue;
                }
            }
        }
        cache.stats.misses.fetch_add(1, Relaxed);
        let asked_headers = req.headers.clone();
        let mut revalidating = false;
        // A stored copy with a validator is revalidated with the cache's conditionals in place
        // of the client's (whose own are answered from the result). Only a GET revalidates:
        // the 304 then stands for the stored GET response. Without a stored copy the client's
        // conditionals go through, so that an origin's 304 still saves the transfer.
        let validators = stale
            .as_ref()
            .filter(|_| !head)
            .and_then(|(_, e)| policy::validators(&e.headers));
        if let Some((etag, lm)) = validators {
            req.headers.remove(header::IF_NONE_MATCH);
            req.headers.remove(header::IF_MODIFIED_SINCE);
            if let Some(v) = etag {
                req.headers.insert(header::IF_NONE_MATCH, v);
            }
            if let Some(v) = lm {
                req.headers.insert(header::IF_MODIFIED_SINCE, v);
            }
            revalidating = true;
        }
        return Step::Fetch(Box::new(Miss {
            cache: Arc::clone(cache),
            why,
            primary: Some(primary),
            invalidate: None,
            stale,
            revalidating,
            leader,
            method: method.clone(),
            uri: req.uri.clone(),
            asked_headers,
            head,
            max_object: cache.sizes.1,
            stale_if_error: cfg.stale_if_error,
        }));
    }
}

/// A stored response to send.
pub struct Hit {
    entry: Arc<Entry>,
    head: bool,
    /// The client's conditional matched: a 304.
    not_modified: bool,
    status_header: &'static str,
    word: &'static str,
    now: SystemTime,
}

impl Hit {
    fn new(
        entry: Arc<Entry>,
        req: &HeaderMap,
        head: bool,
        status_header: &'static str,
        word: &'static str,
        now: SystemTime,
    ) -> Hit {
        Hit {
            not_modified: policy::not_modified(req, &entry.headers),
            entry,
            head,
            status_header,
            word,
            now,
        }
    }

    /// The response, completing the log entry. The body is the stored `Bytes` (a reference
    /// count) and the headers one clone of the stored map.
    pub fn respond(self, log: Option<Box<LogEntry>>) -> Response<ResponseBody> {
        serve(
            &self.entry,
            self.head,
            self.not_modified,
            HeaderValue::from_static(self.status_header),
            self.word,
            self.now,
            log,
        )
    }
}

fn serve(
    e: &Entry,
    head: bool,
    not_modified: bool,
    cache_status: HeaderValue,
    word: &'static str,
    now: SystemTime,
    mut log: Option<Box<LogEntry>>,
) -> Response<ResponseBody> {
    let mut headers = e.headers.clone();
    headers.insert(header::AGE, HeaderValue::from(e.policy.age(now).as_secs()));
    headers.insert(CACHE_STATUS.clone(), cache_status);
    let (status, body) = if not_modified {
        headers.remove(header::CONTENT_LENGTH);
        (StatusCode::NOT_MODIFIED, None)
    } else if head {
        (e.status, None)
    } else {
        (e.status, Some(e.body.clone()))
    };
    if let Some(l) = log.as_deref_mut() {
        l.status = status.as_u16();
        l.cache = Some(word);
    }
    let mut r = Response::new(ResponseBody::bytes(body, log));
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

/// A request on its way to a backend, and what to do with the answer.
pub struct Miss {
    cache: Arc<Cache>,
    why: Fwd,
    /// `None`: nothing of the answer is stored.
    primary: Option<String>,
    /// An unsafe method's target, dropped on a 2xx or 3xx.
    invalidate: Option<String>,
    /// The stored response this request revalidates (or, forced by the client, bypassed),
    /// and its key: refreshed by a 304, served on failure within stale-if-error.
    stale: Option<(String, Arc<Entry>)>,
    revalidating: bool,
    leader: Option<Leader>,
    method: Method,
    uri: Uri,
    /// The client's headers as they came (before the cache's conditionals).
    asked_headers: HeaderMap,
    head: bool,
    max_object: u64,
    stale_if_error: Duration,
}

impl Miss {
    fn bypass(cache: &Arc<Cache>, why: Fwd, invalidate: Option<String>) -> Miss {
        Miss {
            cache: Arc::clone(cache),
            why,
            primary: None,
            invalidate,
            stale: None,
            revalidating: false,
            leader: None,
            method: Method::GET,
            uri: Uri::default(),
            asked_headers: HeaderMap::new(),
            head: false,
            max_object: 0,
            stale_if_error: Duration::ZERO,
        }
    }

    /// The stale copy to answer with if the backends fail, when stale-if-error allows it.
    pub fn fallback(&self) -> Option<Fallback> {
        let (_, e) = self.stale.as_ref()?;
        let window = match e.directives.stale_if_error {
            Some(w) => w,
            // RFC 9111 §4.2.4: must-revalidate (and its kin) forbid serving stale, unless the
            // response itself allowed it on error.
            None if e.directives.revalidate => return None,
            None => self.stale_if_error,
        };
        Some(Fallback {
            cache: Arc::clone(&self.cache),
            entry: Arc::clone(e),
            window,
            head: self.head,
            not_modified: policy::not_modified(&self.asked_headers, &e.headers),
        })
    }

    /// The store step, on the backend's response as the proxy would relay it.
    pub fn finish(mut self, mut resp: Response<ResponseBody>) -> Response<ResponseBody> {
        let status = resp.status();
        let now = SystemTime::now();
        if let Some(target) = self.invalidate.take() {
            if status.is_success() || status.is_redirection() {
                self.cache.invalidate(&target);
                for h in [header::LOCATION, header::CONTENT_LOCATION] {
                    if let Some(k) = resp
                        .headers()
                        .get(h)
                        .and_then(|v| key::same_host(&target, v.as_bytes()))
                    {
                        self.cache.invalidate(&k);
                    }
                }
            }
        }
        let Some(primary) = self.primary.take() else {
            return mark(
                resp,
                &format!("balancer; fwd={}", self.why.as_str()),
                "bypass",
            );
        };
        if status == StatusCode::NOT_MODIFIED && self.revalidating {
            if let Some(r) = self.refreshed(&mut resp, now) {
                return r;
            }
        }
        if status.is_server_error() {
            if let Some(f) = self.fallback().filter(|f| f.applies(now)) {
                let log = resp.body_mut().take_log();
                drop(resp);
                return f.respond(log);
            }
        }
        let fwd = match self.why {
            Fwd::Stale | Fwd::Request if self.revalidating => format!(
                "balancer; fwd={}; fwd-status={}",
                self.why.as_str(),
                status.as_u16()
            ),
            w => format!("balancer; fwd={}", w.as_str()),
        };
        if self.head {
            return mark(resp, &fwd, "miss");
        }
        let asked = Asked {
            method: &self.method,
            uri: &self.uri,
            headers: &self.asked_headers,
        };
        let length = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let (parts, body) = resp.into_parts();
        let policy_request = policy_request(&self.asked_headers, &parts.headers);
        let stored_parts = {
            let mut p = http::Response::new(()).into_parts().0;
            p.status = parts.status;
            p.headers = store::own(&parts.headers);
            p.headers.remove(&CACHE_STATUS);
            policy::clamp_age(&mut p.headers);
            p
        };
        let policy_asked = Asked {
            method: &self.method,
            uri: &self.uri,
            headers: &policy_request,
        };
        // The policy sees the backend's Age (time spent in caches before us); what is served
        // gets ours instead.
        let policy = CachePolicy::new_options(&policy_asked, &stored_parts, now, policy::options());
        let mut stored_parts = stored_parts;
        stored_parts.headers.remove(header::AGE);
        let verdict = policy::storable(
            &asked,
            parts.status,
            &parts.headers,
            &policy,
            length,
            self.max_object,
        );
        let resp = Response::from_parts(parts, body);
        if let Err(why) = verdict {
            // The stored copy is superseded by a new answer that may not be stored; a failure
            // (5xx) or a too-large body replaces nothing.
            if let Some((k, _)) = &self.stale {
                let superseded = why != NotStored::TooLarge
                    && status != StatusCode::NOT_MODIFIED
                    && !status.is_server_error();
                if superseded {
                    self.cache.store.remove(k);
                }
            }
            return mark(resp, &format!("{fwd}; detail={}", why.as_str()), "miss");
        }
        let key = match vary_names(&stored_parts.headers) {
            None => primary.clone(),
            Some(names) => {
                let index = match self.cache.store.get(&primary) {
                    Some(Stored::Vary(i)) if *i.names == *names => i,
                    _ => {
                        let i = Arc::new(VaryIndex {
                            names: names.into(),
                            generation: self.cache.generation.fetch_add(1, Relaxed),
                        });
                        self.cache
                            .store
                            .insert(primary.clone(), Stored::Vary(Arc::clone(&i)));
                        i
                    }
                };
                key::variant(
                    &primary,
                    index.generation,
                    &index.names,
                    &self.asked_headers,
                )
            }
        };
        let commit = Commit {
            cache: Arc::clone(&self.cache),
            key,
            status: stored_parts.status,
            headers: stored_parts.headers,
            policy,
            policy_request,
            now,
            _leader: self.leader.take(),
        };
        let mut resp = mark(resp, &format!("{fwd}; stored"), "miss");
        let max = self.max_object;
        resp = resp.map(|b| ResponseBody::wrap(tee::Tee::new(b, max, length, commit)));
        resp
    }

    /// A 304 to our revalidation: the stored copy, fresh again, with the 304's headers.
    fn refreshed(
        &mut self,
        resp: &mut Response<ResponseBody>,
        now: SystemTime,
    ) -> Option<Response<ResponseBody>> {
        let (k, old) = self.stale.as_ref()?;
        let asked = Asked {
            method: &self.method,
            uri: &self.uri,
            headers: &policy_request(&self.asked_headers, &old.headers),
        };
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = resp.status();
        parts.headers = store::own(resp.headers());
        policy::clamp_age(&mut parts.headers);
        let AfterResponse::NotModified(policy, merged) =
            old.policy.after_response(&asked, &parts, now)
        else {
            return None;
        };
        let mut headers = merged.headers;
        headers.remove(header::AGE);
        headers.remove(&CACHE_STATUS);
        let entry = Arc::new(Entry::new(
            old.status,
            headers,
            old.body.clone(),
            policy,
            asked.headers,
            now,
        ));
        self.cache
            .store
            .insert(k.clone(), Stored::Response(Arc::clone(&entry)));
        self.cache.stats.revalidated.fetch_add(1, Relaxed);
        let log = resp.body_mut().take_log();
        let not_modified = policy::not_modified(&self.asked_headers, &entry.headers);
        // The 304 has no body: dropping it hands its connection back to the pool.
        Some(serve(
            &entry,
            self.head,
            not_modified,
            HeaderValue::from_static(if self.why == Fwd::Request {
                "balancer; fwd=request; fwd-status=304"
            } else {
                "balancer; fwd=stale; fwd-status=304"
            }),
            "revalidated",
            now,
            log,
        ))
    }
}

/// Adds `Cache-Status` and the log's `cache` word to a relayed response.
fn mark(
    mut resp: Response<ResponseBody>,
    status: &str,
    word: &'static str,
) -> Response<ResponseBody> {
    if let Ok(v) = HeaderValue::from_str(status) {
        resp.headers_mut().insert(CACHE_STATUS.clone(), v);
    }
    if let Some(l) = resp.body_mut().log_mut() {
        l.cache = Some(word);
    }
    resp
}

/// The request headers a stored policy keeps: what RFC 9111 consults later (`Host`,
/// `Authorization`, the request's `Cache-Control`/`Pragma`) and those named in `Vary`.
fn policy_request(req: &HeaderMap, res: &HeaderMap) -> HeaderMap {
    let mut keep = HeaderMap::new();
    let mut copy = |n: &HeaderName| {
        for v in req.get_all(n) {
            keep.append(n.clone(), v.clone());
        }
    };
    for n in [
        header::HOST,
        header::AUTHORIZATION,
        header::CACHE_CONTROL,
        header::PRAGMA,
    ] {
        copy(&n);
    }
    for n in vary_names(res).unwrap_or_default() {
        copy(&n);
    }
    store::own(&keep)
}

/// The header names in `Vary`, lower-cased; `None` without one.
fn vary_names(h: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names: Vec<HeaderName> = h
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    (!names.is_empty()).then_some(names)
}

/// What to store once the tee has the whole body; holds the flight until then.
pub(crate) struct Commit {
    cache: Arc<Cache>,
    key: String,
    status: StatusCode,
    headers: HeaderMap,
    policy: CachePolicy,
    policy_request: HeaderMap,
    now: SystemTime,
    _leader: Option<Leader>,
}

impl Commit {
    fn store(self, body: Bytes) {
        let mut headers = self.headers;
        // A body that came chunked: a HEAD answered from this copy still says its length.
        if !headers.contains_key(header::CONTENT_LENGTH) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let entry = Entry::new(
            self.status,
            headers,
            body,
            self.policy,
            &self.policy_request,
            self.now,
        );
        if self
            .cache
            .store
            .insert(self.key, Stored::Response(Arc::new(entry)))
        {
            self.cache.stats.stores.fetch_add(1, Relaxed);
        }
        // `_leader` drops last: waiters look up after the insert.
    }
}

/// The stale copy that answers when every attempt failed.
pub struct Fallback {
    cache: Arc<Cache>,
    entry: Arc<Entry>,
    window: Duration,
    head: bool,
    not_modified: bool,
}

impl Fallback {
    /// Whether `e` is the backends failing (not the client, not a bad request).
    pub fn covers(&self, e: &ProxyError) -> bool {
        matches!(e, ProxyError::Upstream { .. } | ProxyError::NoBackend(_))
            && self.applies(SystemTime::now())
    }

    fn applies(&self, now: SystemTime) -> bool {
        self.entry.stale_by(now).is_none_or(|by| by <= self.window)
    }

    pub fn respond(self, log: Option<Box<LogEntry>>) -> Response<ResponseBody> {
        self.cache.stats.stale_if_error.fetch_add(1, Relaxed);
        let mut log = log;
        if let Some(l) = log.as_deref_mut() {
            l.reason = None;
        }
        serve(
            &self.entry,
            self.head,
            self.not_modified,
            HeaderValue::from_static("balancer; hit; detail=stale-if-error"),
            "stale",
            SystemTime::now(),
            log,
        )
    }
}
