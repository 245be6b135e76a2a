//! One actor per upstream key. It owns the key's state machine (rolling
//! window, cooldown, retreat, health, key checks, what the provider said)
//! and pushes a [`BackendView`] to the supervisor after every change. The
//! machine itself is clock-free ([`machine`]); this actor adds the clock,
//! timers, probes, logs and persistence.

mod actor;
mod handlers;
pub mod machine;
mod shared;

pub mod messages;
use std::sync::Arc;

use actix::prelude::*;
use slog::{info, warn, Logger};
use tokio::time::Instant;

use crate::db::backends::PersistedState;
use crate::db::now_ms;
use crate::db::usage::CooldownRecord;
use crate::messages::{BackendUpdate, BackendView};
use crate::probe::Prober;
use crate::rate_state::{Cluster, RateState};
use crate::spec::{BackendSpec, Tuning};
use crate::store::{DbExecutor, RecordCooldown, SaveState};

pub use machine::{Changes, CooldownEnd, KeyMachine, ProbeKind};

pub struct BackendActor {
    pub(crate) machine: KeyMachine,
    log: Logger,
    supervisor: Recipient<BackendUpdate>,
    prober: Arc<dyn Prober>,
    /// The earliest timer already set to push a fresh view.
    wake_at: Option<Instant>,
    /// Removed from the pool: serve the leases still out, arm no timers, and
    /// let the actor end when the last address is dropped.
    retired: bool,
    /// Where state that must survive a restart goes (off the request path).
    store: Option<Addr<DbExecutor>>,
    persisted: Option<PersistedState>,
    /// Where the grant log is saved or the rate state shared.
    rate: Option<RateState>,
    /// This key's name in the shared state (Redis).
    key_id: String,
    /// The grant log version last saved (embedded).
    saved_version: Option<u64>,
    /// A look at the shared state is on its way.
    peeking: bool,
    /// Grants are on their way into the shared window after an outage.
    syncing: bool,
}

/// Wall-clock milliseconds of a future instant, as the database keeps it.
fn wall_ms(at: Instant, now: Instant) -> i64 {
    let ahead = at.saturating_duration_since(now).as_millis();
    now_ms().saturating_add(i64::try_from(ahead).unwrap_or(i64::MAX))
}

impl BackendActor {
    pub fn new(
        spec: Arc<BackendSpec>,
        tuning: Arc<Tuning>,
        supervisor: Recipient<BackendUpdate>,
        prober: Arc<dyn Prober>,
        store: Option<Addr<DbExecutor>>,
        rate: Option<RateState>,
        log: Logger,
    ) -> Self {
        let log = log.new(slog::o!("backend" => spec.name.to_string()));
        let key_id = Cluster::key_id(&spec);
        let now = Instant::now();
        let mut machine = KeyMachine::new(spec, tuning, now);
        if let Some(c) = rate.as_ref().and_then(RateState::cluster) {
            machine.keep_shared_log();
            machine.set_replicas(c.status().counted(), now);
            if c.status().degraded() {
                machine.set_degraded(Some(c.status().counted()), now + c.fill_delay(), now);
            }
        }
        Self {
            machine,
            log,
            supervisor,
            prober,
            wake_at: None,
            retired: false,
            store,
            persisted: None,
            rate,
            key_id,
            saved_version: None,
            peeking: false,
            syncing: false,
        }
    }

    pub(crate) fn key_id(&self) -> &str {
        &self.key_id
    }

    pub(crate) fn view(&mut self, now: Instant) -> BackendView {
        self.machine.view(now)
    }

    /// Logs, records, persists and shares what a local input changed, then
    /// pushes the new view and arms the timer for the next change by time.
    pub(crate) fn apply(&mut self, ch: Changes, ctx: &mut Context<Self>) {
        self.apply_with(ch, None, ctx);
    }

    /// The same, for the outcome of a lease with its shared grant time.
    pub(crate) fn apply_with(
        &mut self,
        ch: Changes,
        probe: Option<(i64, bool)>,
        ctx: &mut Context<Self>,
    ) {
        self.report(&ch);
        self.share(&ch, probe, ctx);
        self.publish(ctx);
    }

    /// Like `apply`, for a change the shared state itself caused.
    pub(crate) fn apply_local(&mut self, ch: Changes, ctx: &mut Context<Self>) {
        self.report(&ch);
        self.publish(ctx);
    }

    pub(crate) fn report(&mut self, ch: &Changes) {
        let id = self.machine.spec().id;
        let now = Instant::now();
        if let Some(c) = ch.cooldown_started {
            info!(self.log, "cooldown started";
                "consecutive_429" => c.streak,
                "seconds" => c.pause.as_secs_f64(),
                "retry_after" => c.retry_after.map(|d| d.as_secs_f64()),
                "emergency_probe" => c.emergency);
            if let Some(store) = &self.store {
                store.do_send(RecordCooldown(CooldownRecord::Started {
                    backend_id: id,
                    at_ms: now_ms(),
                    until_ms: wall_ms(c.until, now),
                    consecutive_429: c.streak,
                    retry_after_ms: c
                        .retry_after
                        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                    reason: if c.emergency {
                        "emergency probe got 429".into()
                    } else {
                        "upstream 429".into()
                    },
                }));
            }
        }
        if let Some(end) = ch.cooldown_ended {
            match end {
                CooldownEnd::Early => {
                    info!(self.log, "emergency probe succeeded; cooldown ended early")
                }
                CooldownEnd::Reset => info!(self.log, "cooldown reset by the operator"),
                CooldownEnd::Expired => {}
            }
            if let Some(store) = &self.store {
                store.do_send(RecordCooldown(CooldownRecord::Ended {
                    backend_id: id,
                    at_ms: now_ms(),
                }));
            }
        }
        match ch.health_flipped {
            Some(false) => warn!(self.log, "backend marked down";
                "last_error" => self.machine.last_error().map(str::to_string)),
            Some(true) => info!(self.log, "backend healthy again"),
            None => {}
        }
        if ch.key_rejected {
            warn!(self.log, "backend key rejected; out of rotation until a re-test accepts it";
                "last_error" => self.machine.last_error().map(str::to_string));
        }
        if ch.key_restored {
            info!(self.log, "backend key accepted again; back in rotation");
        }
        if let Some(rpm) = ch.effective_rpm {
            info!(self.log, "effective limit changed"; "effective_rpm" => rpm,
                "configured_rpm" => self.machine.spec().rpm_limit);
        }
    }

    /// Pushes the current view and arranges a wake-up for when the state
    /// changes by time alone (a cooldown's end).
    pub(crate) fn publish(&mut self, ctx: &mut Context<Self>) {
        if self.retired {
            return;
        }
        let now = Instant::now();
        let ch = self.machine.time_passed(now);
        if ch != Changes::default() {
            self.report(&ch);
        }
        self.persist(now);
        let view = self.machine.view(now);
        self.supervisor.do_send(BackendUpdate(view));
        if let Some(at) = self.machine.next_timer(now) {
            self.wake_at_time(at, ctx);
        }
    }

    /// Sends the state that must survive a restart, when it changed.
    fn persist(&mut self, now: Instant) {
        let Some(store) = &self.store else { return };
        let m = &self.machine;
        let deadlines = m.cooldown_deadlines(now);
        let state = PersistedState {
            backend_id: m.spec().id,
            status: m.health_label(),
            cooldown_until_ms: deadlines.map(|(u, _)| wall_ms(u, now)),
            upstream_until_ms: deadlines.map(|(_, u)| wall_ms(u, now)),
            consecutive_429: m.streak(),
            consecutive_failures: m.failures(),
            effective_rpm: m.learned_rpm(),
            latency_ms: None,
            last_error: m.last_error().map(str::to_string),
        };
        let same = self.persisted.as_ref().is_some_and(|p| {
            // Deadlines move by clock rounding; a few ms is no change.
            let close = |a: Option<i64>, b: Option<i64>| match (a, b) {
                (Some(x), Some(y)) => (x - y).abs() < 50,
                (None, None) => true,
                _ => false,
            };
            p.status == state.status
                && close(p.cooldown_until_ms, state.cooldown_until_ms)
                && close(p.upstream_until_ms, state.upstream_until_ms)
                && p.consecutive_429 == state.consecutive_429
                && p.consecutive_failures == state.consecutive_failures
                && p.effective_rpm == state.effective_rpm
                && p.last_error == state.last_error
        });
        if !same {
            let mut sent = state.clone();
            sent.latency_ms = m.latency_ms();
            store.do_send(SaveState(sent));
            self.persisted = Some(state);
        }
    }

    fn wake_at_time(&mut self, at: Instant, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let at = at.max(now);
        if matches!(self.wake_at, Some(w) if w <= at && w > now) {
            return;
        }
        self.wake_at = Some(at);
        ctx.run_later(at - now, move |act, ctx| {
            if act.wake_at == Some(at) {
                act.wake_at = None;
            }
            act.publish(ctx);
        });
    }
}
