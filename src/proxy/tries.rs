//! What a request's failed attempts add up to: which backends it may not
//! use again, whether a failure is the key's or follows the request (a
//! poison request), and when to give up.

use std::time::Duration;

use actix_web::web;
use sidecar_actors::worker::Worker;
use sidecar_actors::{
    Acquire, AcquireError, BackendId, Lease, Outcome, PendingStrike, Prefetch, Ticket,
};
use tokio::time::Instant;

use super::attempt::{snippet, FailKind, Failed, BAD_ANSWER};
use super::prepare::Prepared;
use super::ProxyState;
use crate::ops::metrics::Metrics;
use crate::web::error::ApiError;

/// Attempts of any kind (429s included) one request may make.
pub(crate) const MAX_TOTAL_ATTEMPTS: u32 = 16;

/// Leases one request may get back unsent (the backend closed, or the
/// shared window was full). Each one leaves the backend's view saying so,
/// so the loop progresses and the request's deadline ends it; this is only
/// a safety net.
pub(crate) const MAX_UNSENT: u32 = 256;

/// What the request's failed attempts add up to, and what to do next.
/// Borrows the shared metrics and logger: cloning them per request was two
/// atomic counts on cache lines every worker writes.
pub(crate) struct Tries<'a> {
    /// Backends this request may not use again (they failed it).
    pub(crate) exclude: Vec<BackendId>,
    failures: u32,
    max_failures: u32,
    total: u32,
    unsent: u32,
    /// Backends that answered this request 429, once each.
    limited: Vec<BackendId>,
    last: Option<ApiError>,
    /// 5xx failures whose blame waits: a second backend answering the same
    /// status shows the failure follows the request (a poison request).
    strikes: Vec<(PendingStrike, u16)>,
    /// Only one key can serve this request (it holds the object named):
    /// a 5xx cannot be told the key's from the request's, so it is the
    /// client's answer and no strike.
    pub(crate) pinned: bool,
    metrics: &'a Metrics,
    log: &'a slog::Logger,
}

impl<'a> Tries<'a> {
    pub(crate) fn new(max_failures: u32, metrics: &'a Metrics, log: &'a slog::Logger) -> Self {
        Self {
            exclude: Vec::new(),
            failures: 0,
            max_failures,
            total: 0,
            unsent: 0,
            limited: Vec::new(),
            last: None,
            strikes: Vec::new(),
            pinned: false,
            metrics,
            log,
        }
    }

    /// The lease, or the error the request ends with.
    pub(crate) fn leased(
        &mut self,
        acquired: Result<Lease, AcquireError>,
        p: &Prepared,
    ) -> Result<Lease, ApiError> {
        match acquired {
            Ok(lease) => {
                self.total += 1;
                Ok(lease)
            }
            // Pinned: the key holding the object is what is missing.
            Err(AcquireError::UnknownModel) if p.pin.is_some() => Err(ApiError::HolderUnavailable(
                p.object.clone().unwrap_or_default(),
            )),
            Err(AcquireError::UnknownModel) => Err(ApiError::ModelNotFound(p.model.to_string())),
            // After a real failure, that failure says more than "nothing left".
            Err(e) => Err(self.last.take().unwrap_or(ApiError::Acquire(e))),
        }
    }

    fn count_error(&self, lease: &Lease, code: &str) {
        self.metrics
            .upstream_errors
            .with_label_values(&[&*lease.name, code])
            .inc();
    }

    /// Reports a failed attempt to its backend; `Err` when the request must
    /// give up rather than try again.
    pub(crate) async fn failed(&mut self, f: Failed) -> Result<(), ApiError> {
        let Failed {
            lease,
            report,
            kind,
        } = f;
        let out_of_tries = |me: &Self| me.total >= MAX_TOTAL_ATTEMPTS;
        slog::trace!(self.log, "attempt failed";
            "backend" => lease.name.to_string(), "outcome" => report.outcome.label(), "attempt" => self.total);
        match kind {
            FailKind::NotSent => {
                // The backend closed since the grant; its fresh view is with
                // the supervisor before the next Acquire. Not an attempt.
                lease.settle(report).await;
                self.total = self.total.saturating_sub(1);
                self.unsent += 1;
                if self.unsent >= MAX_UNSENT {
                    return Err(self.last.take().unwrap_or(ApiError::Acquire(
                        AcquireError::Unavailable {
                            retry_after: Duration::from_secs(1),
                        },
                    )));
                }
                return Ok(());
            }
            FailKind::RateLimited => {
                self.count_error(&lease, "429");
                self.metrics
                    .cooldowns
                    .with_label_values(&[&lease.name])
                    .inc();
                // Once it has cooled it may serve this request; a second
                // 429 (its emergency probe failed too) and the request looks
                // elsewhere or gets 503, instead of probing a key that keeps
                // refusing once per Retry-After until its deadline.
                if self.limited.contains(&lease.backend) {
                    self.exclude.push(lease.backend);
                } else {
                    self.limited.push(lease.backend);
                }
                lease.settle(report).await;
            }
            FailKind::ServerError {
                status,
                body,
                content_type,
            } => {
                self.count_error(&lease, &status.to_string());
                let (backend, name) = (lease.backend, lease.name.clone());
                let strike = lease.settle_deferred(report).await;
                let follows = self.pinned
                    || self
                        .strikes
                        .iter()
                        .any(|(s, st)| *st == status && s.backend != backend);
                if follows {
                    // The same failure on two keys is the request's: stop,
                    // answer the upstream's error, and blame no key for it.
                    strike.absolve();
                    for (s, _) in self
                        .strikes
                        .drain(..)
                        .filter(|(_, st)| *st == status)
                        .collect::<Vec<_>>()
                    {
                        s.absolve();
                    }
                    if status == BAD_ANSWER {
                        return Err(ApiError::Upstream {
                            message: "every backend tried answered with a body that is not JSON"
                                .into(),
                            timeout: false,
                        });
                    }
                    return Err(ApiError::UpstreamAnswer {
                        status,
                        body,
                        content_type,
                    });
                }
                self.strikes.push((strike, status));
                self.exclude.push(backend);
                self.failures += 1;
                self.last = Some(ApiError::Upstream {
                    message: if status == BAD_ANSWER {
                        format!("backend {name}: upstream answered with a body that is not JSON")
                    } else {
                        format!("backend {name}: upstream {status}{}", snippet(&body))
                    },
                    timeout: false,
                });
            }
            FailKind::Key { message, timeout } => {
                let code = match &report.outcome {
                    Outcome::AuthFailed { status } => status.to_string(),
                    other => other.label().to_string(),
                };
                self.count_error(&lease, &code);
                self.exclude.push(lease.backend);
                self.failures += 1;
                self.last = Some(ApiError::Upstream { message, timeout });
                lease.settle(report).await;
            }
        }
        if self.failures >= self.max_failures || out_of_tries(self) {
            return Err(self
                .last
                .take()
                .unwrap_or_else(|| ApiError::Internal("no attempt was made".into())));
        }
        Ok(())
    }
}

/// Times a request waits in line for the spares of an ask in flight before
/// it asks the supervisor itself (each wait ends when that ask comes back).
const SPARE_WAITS: u32 = 2;

/// A spare lease of this worker's: one it holds, or one an ask in flight
/// brings back (requests arriving together share one round trip to the
/// supervisor instead of making one each).
async fn spare(w: &Worker, p: &Prepared, deadline: Instant) -> Option<Lease> {
    if let Some(lease) = w.spares.take(&p.model, Instant::now()) {
        return Some(lease);
    }
    for _ in 0..SPARE_WAITS {
        let rx = w.spares.wait(&p.model)?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(lease)) => return Some(lease),
            // The ask came back without one for this request.
            Ok(Err(_)) => {}
            Err(_) => return None,
        }
        if let Some(lease) = w.spares.take_again(&p.model, Instant::now()) {
            return Some(lease);
        }
    }
    None
}

/// A lease for the request's next attempt: one of the worker's spares when
/// it holds one for this model (a first attempt, not pinned), else the
/// supervisor's, with spares for the worker's next requests when it is busy.
pub(crate) async fn acquire(
    state: &ProxyState,
    worker: Option<&web::Data<Worker>>,
    p: &Prepared,
    exclude: &[BackendId],
    deadline: Instant,
) -> Result<Lease, AcquireError> {
    let worker = worker.filter(|_| exclude.is_empty() && p.pin.is_none());
    if let Some(w) = worker {
        if let Some(lease) = spare(w, p, deadline).await {
            state.metrics.spare_leases.inc();
            return Ok(lease);
        }
    }
    let ask = worker.map(|w| w.spares.ask(&p.model));
    let ticket = state
        .supervisor
        .send(Acquire {
            model: p.model.clone(),
            priority: p.priority,
            exclude: exclude.to_vec(),
            est_tokens: p.est_tokens,
            deadline: Some(deadline),
            pin: p.pin.clone(),
            spares: ask.as_ref().map_or(0, |a| a.n),
        })
        .await
        .map_err(|_| AcquireError::SupervisorGone)??;
    match ticket {
        Ticket::Ready(lease, more) => {
            if let Some(w) = worker {
                hold(w, more);
            }
            Ok(lease)
        }
        Ticket::Queued(rx) => {
            // A queued answer brings no spares.
            drop(ask);
            // The supervisor answers every waiter by its deadline; the slack
            // only guards against a supervisor that stopped answering.
            let guard = deadline + Duration::from_secs(5);
            match tokio::time::timeout_at(guard, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(AcquireError::SupervisorGone),
                Err(_) => Err(AcquireError::QueueTimeout {
                    retry_after: Duration::from_secs(1),
                }),
            }
        }
    }
}

/// Keeps the spares the supervisor lent this worker, and gives back those
/// still unsent once their deadline passes (a worker gone quiet holds
/// nothing past it).
fn hold(w: &web::Data<Worker>, leases: Vec<Lease>) {
    let Some(until) = leases.iter().filter_map(Lease::held_until).max() else {
        return;
    };
    w.spares.keep(leases);
    let w = w.clone();
    actix_web::rt::spawn(async move {
        tokio::time::sleep_until(until).await;
        w.spares.expire(Instant::now());
    });
}

/// A quiet worker fetches a spare for its next request once this one is
/// answered (see `Spares::prefetch`): the round trip to the supervisor
/// happens off the request's path. Called as the handler returns its
/// answer, the task runs after the dispatcher has written it (for a
/// stream: its head and first event), so the supervisor's wake-up and its
/// reply's do not land between the upstream's first byte and the
/// client's. The check runs here so that a busy worker spawns nothing; the
/// task checks again, as other requests may have run before it.
pub(crate) fn fetch_next(state: &ProxyState, w: &web::Data<Worker>, p: &Prepared) {
    if !w.spares.wants_fetch(&p.model, Instant::now()) {
        return;
    }
    let (w, supervisor) = (w.clone(), state.supervisor.clone());
    let (model, est_tokens) = (p.model.clone(), p.est_tokens);
    actix_web::rt::spawn(async move {
        let Some(ask) = w.spares.prefetch(&model, Instant::now()) else {
            return;
        };
        let spares = ask.n;
        let lent = supervisor
            .send(Prefetch {
                model: model.clone(),
                est_tokens,
                spares,
            })
            .await
            .unwrap_or_default();
        if lent.is_empty() {
            w.spares.none_lent(Instant::now());
        }
        hold(&w, lent);
        drop(ask);
    });
}
