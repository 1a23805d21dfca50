//! The modelled fleet in virtual time: the real `pdgate_scheduler::Scheduler` makes every
//! decision, modelled engines (`engine.rs`) do the work, and this module plays the gateway's part
//! of the native PD protocol — reserve KV on decode, pull the prefix blocks the scheduler planned
//! to pull from another instance's cache (at the same bandwidth, queued behind the holder's other
//! pulls; blocks the holder no longer caches are recomputed), prefill (or local prefill on decode
//! when the scheduler says so), move every KV block at the modelled bandwidth, then decode — reporting
//! `prefill_done`/`decode_done` and scraped engine load to the scheduler exactly where the
//! gateway does.
//!
//! It must stay deterministic (same trace, spec and policy ⇒ same records) and never read a
//! clock: time is the event queue's.

use super::engine::{Job, SimEngine};
use super::events::{Event, EventQueue};
use super::gateways::{GatewaySpec, Gateways};
use crate::metrics::{RequestError, RequestRecord};
use crate::report::types::InstanceLoad;
use crate::synth::engine_blocks;
use crate::trace::types::Trace;
use pdgate_engine_sim::EngineConfig;
use pdgate_scheduler::{
    BlockHash, EngineReport, InstanceId, Leaving, Observed, PolicyKind, RequestKey, Role, RoomLine,
    SchedulerConfig, Ticket,
};
use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub prefill: usize,
    pub decode: usize,
    /// Every engine's config; `timing.time_scale` scales modelled step times (1 = real GPU time).
    pub engine: EngineConfig,
    /// Prefix-cache blocks of a decode engine (the reference engine uses a quarter of
    /// `kv_blocks`, see engine-sim `server.rs`).
    pub decode_cache_blocks: usize,
    /// KV transfer bandwidth, GB/s.
    pub kv_gbps: f64,
    /// Fixed cost per leg (HTTP round trip in the gateway), ms, added to TTFT.
    pub overhead_ms: f64,
    /// Fixed cost of one pull of cached blocks between engines (lease, request, verify), ms.
    pub pull_overhead_ms: f64,
    /// How often the gateway scrapes engine metrics into the scheduler, ms (0 = never); each
    /// replica scrapes on its own timer, the timers spread evenly over the interval.
    pub metrics_interval_ms: f64,
    /// Gateway replicas and what reaches them from the engines.
    pub gateways: GatewaySpec,
    /// The scheduler's config; the policy is set per run.
    pub scheduler: SchedulerConfig,
}

impl FleetSpec {
    pub fn new(prefill: usize, decode: usize) -> Self {
        let engine = EngineConfig::default();
        Self {
            prefill,
            decode,
            // A decode engine's prefix cache is as large as its pool, as in the reference engine.
            decode_cache_blocks: engine.kv_blocks,
            engine,
            kv_gbps: 2.0,
            overhead_ms: 0.0,
            pull_overhead_ms: 2.0,
            metrics_interval_ms: 500.0,
            gateways: GatewaySpec::default(),
            scheduler: SchedulerConfig::default(),
        }
    }
}

/// Due times: fixed (open loop) or "when a slot frees" (closed loop).
#[derive(Debug, Clone)]
pub enum Arrivals {
    At(Vec<f64>),
    Closed(usize),
}

#[derive(Debug)]
pub struct SimResult {
    pub records: Vec<RequestRecord>,
    pub instances: Vec<InstanceLoad>,
    /// Prompt tokens served from a cache (local hits and pulls) over prompt tokens.
    pub cache_hit_rate: Option<f64>,
    /// The part of `cache_hit_rate` that was pulled from another instance.
    pub pulled_hit_rate: Option<f64>,
    pub pulls: u64,
    pub pull_misses: u64,
    /// Prompt blocks served from the engines' host tiers (counted in `cache_hit_rate`).
    pub host_hit_blocks: u64,
    /// Prompt tokens some engine cached when the prefill was sized, over prompt tokens: the
    /// most any placement and pull could have served from the caches as they were.
    pub reachable_hit_rate: Option<f64>,
    pub events: u64,
}

#[derive(Debug, Default)]
struct ReqState {
    /// The gateway replica that routed it (its ticket is that replica's).
    replica: usize,
    ticket: Option<Ticket>,
    prefill: Option<usize>,
    decode: usize,
    /// The side whose copy of the prompt is evicted first once handed off.
    evict_first: Option<Role>,
    blocks: Vec<BlockHash>,
    reserved: usize,
    prefill_submit_ms: f64,
    prefill_ms: f64,
    transfer_ms: f64,
    kv_bytes: u64,
    /// Runner engine and prompt length, kept while a pull is in flight.
    runner: usize,
    pull: Option<PullInFlight>,
    last_token_ms: f64,
    tokens: u32,
    /// In its replica's line of requests waiting for KV room.
    queued: bool,
    /// When its TTFT slack runs out, set as it joins a line: its wait for room ends then if
    /// that comes before `room_wait_ms`.
    room_until: f64,
    rec: RequestRecord,
}

/// One gateway replica's line of new requests waiting for KV room, as the gateway keeps it
/// (`proxy/src/room_line.rs`): first come first served, only the head asks again.
struct Line {
    book: RoomLine,
    queue: VecDeque<usize>,
}

#[derive(Debug, Clone, Copy)]
struct PullInFlight {
    holder: usize,
    upto_blocks: usize,
    bytes: u64,
    ms: f64,
}

struct Sim<'a> {
    trace: &'a Trace,
    spec: &'a FleetSpec,
    gw: Gateways,
    engines: Vec<SimEngine>,
    ids: Vec<InstanceId>,
    reqs: Vec<ReqState>,
    lines: Vec<Line>,
    q: EventQueue,
    next_closed: usize,
    closed: bool,
    open: usize,
    /// Prompt tokens that were, when their prefill was sized, in the longest prefix any engine
    /// cached: what the fleet held that any placement or pull could have served.
    reachable_tokens: u64,
}

pub fn simulate(
    trace: &Trace,
    arrivals: &Arrivals,
    spec: &FleetSpec,
    policy: PolicyKind,
) -> SimResult {
    let mut gw = Gateways::new(
        &spec.gateways,
        &SchedulerConfig {
            policy,
            block_size: spec.engine.block_size,
            kv_bytes_per_token: spec.engine.kv_bytes_per_token,
            ..spec.scheduler.clone()
        },
    );
    let mut engines = Vec::new();
    let mut ids = Vec::new();
    for role in std::iter::repeat_n(Role::Prefill, spec.prefill)
        .chain(std::iter::repeat_n(Role::Decode, spec.decode))
    {
        let cfg = EngineConfig {
            role,
            ..spec.engine.clone()
        };
        let cache = if role == Role::Prefill {
            cfg.kv_blocks
        } else {
            spec.decode_cache_blocks
        };
        ids.push(gw.add_instance(role));
        engines.push(SimEngine::new(cfg, cache));
    }
    let n = trace.requests.len();
    let lines = (0..gw.len())
        .map(|_| Line {
            book: RoomLine::new(&spec.scheduler.slo),
            queue: VecDeque::new(),
        })
        .collect();
    let mut sim = Sim {
        trace,
        spec,
        lines,
        gw,
        engines,
        ids,
        reqs: (0..n).map(|_| ReqState::default()).collect(),
        q: EventQueue::default(),
        next_closed: 0,
        closed: matches!(arrivals, Arrivals::Closed(_)),
        open: n,
        reachable_tokens: 0,
    };
    match arrivals {
        Arrivals::At(times) => {
            for (i, t) in times.iter().enumerate().take(n) {
                sim.q.push(*t, Event::Arrival(i));
            }
            sim.open = times.len().min(n);
        }
        Arrivals::Closed(c) => {
            for _ in 0..(*c).min(n) {
                sim.q.push(0.0, Event::Arrival(sim.next_closed));
                sim.next_closed += 1;
            }
        }
    }
    if spec.metrics_interval_ms > 0.0 {
        let n = sim.gw.len();
        for r in 0..n {
            sim.q.push(
                spec.metrics_interval_ms * r as f64 / n as f64,
                Event::Scrape(r),
            );
        }
    }
    let mut events = 0u64;
    while let Some((now, ev)) = sim.q.pop() {
        events += 1;
        match ev {
            Event::Arrival(r) => sim.arrive(r, now),
            Event::Admit(r) => sim.admit(r, now),
            Event::Kick(e) => sim.kick(e, now),
            Event::StepEnd(e) => sim.step_end(e, now),
            Event::TransferDone(r) => sim.transfer_done(r, now),
            Event::PullDone(r) => sim.pull_done(r, now),
            Event::HostCopied(r, uncached) => sim.host_copied(r, uncached, now),
            Event::Scrape(g) => {
                sim.scrape(g);
                // Keep scraping only while requests remain, so the queue drains.
                if sim.open > 0 {
                    sim.q.push(now + spec.metrics_interval_ms, Event::Scrape(g));
                }
            }
            Event::KvEvents => sim.gw.deliver_kv(now),
            Event::SyncDelivered => sim.gw.deliver_sync(now),
        }
    }
    sim.finish(events)
}

impl Sim<'_> {
    fn engine_of(&self, id: InstanceId) -> usize {
        self.ids.iter().position(|x| *x == id).unwrap_or(0)
    }

    fn fail(&mut self, r: usize, now: f64, status: u16, kind: &str, message: String) {
        let s = &mut self.reqs[r];
        s.rec.error = Some(RequestError {
            status: Some(status),
            kind: kind.into(),
            message,
        });
        // When the refusal came, as the replayer records it (latency aggregates skip errors).
        s.rec.e2el_ms = Some(now - s.rec.sent_ms);
        if let Some(t) = s.ticket.take() {
            self.gw.decode_done(s.replica, t, now, &mut self.q);
        }
        let (d, reserved) = (s.decode, std::mem::take(&mut s.reserved));
        self.engines[d].pool_free += reserved;
        self.done(now);
    }

    fn done(&mut self, now: f64) {
        self.open = self.open.saturating_sub(1);
        if self.closed && self.next_closed < self.trace.requests.len() {
            self.q.push(now, Event::Arrival(self.next_closed));
            self.next_closed += 1;
        }
    }

    fn arrive(&mut self, r: usize, now: f64) {
        let req = &self.trace.requests[r];
        let replica = self.gw.deal();
        let s = &mut self.reqs[r];
        s.replica = replica;
        s.rec = RequestRecord {
            index: req.index,
            scheduled_ms: now,
            sent_ms: now,
            input_tokens: req.input_tokens,
            ..RequestRecord::default()
        };
        self.admit(r, now);
    }

    /// Schedules `r` as the gateway does: a `kv_full` answer is asked again every
    /// `ROOM_POLL_MS` until the request has waited `room_wait_ms`.
    fn admit(&mut self, r: usize, now: f64) {
        let req = &self.trace.requests[r];
        let bs = self.spec.engine.block_size;
        let prompt = req.input_tokens as usize;
        let key = RequestKey {
            prompt_tokens: req.input_tokens,
            max_tokens: req.output_tokens,
            blocks: engine_blocks(req, bs),
        };
        let (replica, waited) = (self.reqs[r].replica, now - self.reqs[r].rec.sent_ms);
        let queued = self.reqs[r].queued;
        let d = match self.gw.schedule(replica, &key, now, waited, &mut self.q) {
            Ok(d) => {
                if queued {
                    self.leave_line(replica, now, Leaving::Served);
                }
                d
            }
            Err(pdgate_scheduler::Rejection::KvFull) if !queued => {
                return self.join_line(r, &key, now);
            }
            Err(pdgate_scheduler::Rejection::KvFull) if now < self.room_deadline(r) => {
                self.poll_room(r, now);
                return;
            }
            Err(rej) => {
                if queued {
                    self.leave_line(replica, now, Leaving::GaveUp);
                }
                let status = if matches!(rej, pdgate_scheduler::Rejection::NoHealthy(_)) {
                    503
                } else {
                    429
                };
                return self.fail(r, now, status, rej.label(), rej.to_string());
            }
        };
        let decode = self.engine_of(d.decode);
        let prefill = d.prefill.map(|p| self.engine_of(p));
        {
            let s = &mut self.reqs[r];
            s.ticket = Some(d.ticket);
            s.decode = decode;
            s.prefill = prefill;
            s.evict_first = d.evict_first;
            s.rec.instance = Some(match prefill {
                Some(p) => format!("p{p}>d{}", decode - self.spec.prefill),
                None => format!("local>d{}", decode - self.spec.prefill),
            });
        }
        if prefill.is_some() {
            // The gateway reserves every block of the prompt (a partial last one too) on decode.
            let need = prompt.div_ceil(bs.max(1));
            if self.engines[decode].pool_free < need {
                let free = self.engines[decode].pool_free;
                return self.fail(
                    r,
                    now,
                    503,
                    "kv_pool_full",
                    format!("needs {need} blocks, {free} free"),
                );
            }
            self.engines[decode].pool_free -= need;
            self.reqs[r].reserved = need;
        }
        let runner = prefill.unwrap_or(decode);
        self.reqs[r].runner = runner;
        self.reqs[r].blocks = key.blocks;
        // The prefill leg, as the gateway times it, includes the pull the engine makes first.
        self.reqs[r].prefill_submit_ms = now;
        if let Some(p) = d.pull {
            let holder = self.engine_of(p.from);
            if let Some(pull) = self.start_pull(r, runner, holder, p.upto_blocks as usize, now) {
                // The prefill takes its place in the queue now; the pull runs while it waits.
                if !self.submit(r, Job::PendingPrefill { req: r }, now) {
                    return;
                }
                self.reqs[r].pull = Some(pull);
                self.q.push(now + pull.ms, Event::PullDone(r));
                return;
            }
        }
        self.start_prefill(r, now);
    }

    /// Leases the blocks the holder still caches of `[runner's match, upto)` and books their
    /// bytes on its outgoing link; `None` (recompute) when it holds nothing the runner lacks.
    fn start_pull(
        &mut self,
        r: usize,
        runner: usize,
        holder: usize,
        upto: usize,
        now: f64,
    ) -> Option<PullInFlight> {
        let blocks = &self.reqs[r].blocks;
        let upto = upto.min(blocks.len());
        let local = self.engines[runner].cache.match_prefix(&blocks[..upto]);
        let held = self.engines[holder].cache.match_prefix(&blocks[..upto]);
        if held <= local || holder == runner {
            self.engines[runner].pull_misses += 1;
            return None;
        }
        let bs = self.spec.engine.block_size.max(1);
        let bytes = ((held - local) * bs) as u64 * self.spec.engine.kv_bytes_per_token;
        let wire_ms = bytes as f64 / (self.spec.kv_gbps.max(1e-9) * 1e6);
        let h = &mut self.engines[holder];
        let start = h.egress_free_ms.max(now);
        h.egress_free_ms = start + wire_ms;
        Some(PullInFlight {
            holder,
            upto_blocks: held,
            bytes,
            ms: start + wire_ms + self.spec.pull_overhead_ms - now,
        })
    }

    fn pull_done(&mut self, r: usize, now: f64) {
        let s = &mut self.reqs[r];
        let (runner, Some(p)) = (s.runner, s.pull.take()) else {
            return;
        };
        let replica = s.replica;
        let blocks = &s.blocks[..p.upto_blocks.min(s.blocks.len())];
        let local = self.engines[runner].cache.match_prefix(blocks);
        // The pulled blocks enter the runner's cache like computed ones, so its KV events
        // announce them (and what they evicted) to every replica.
        let change = self.engines[runner].cache.insert(blocks);
        self.gw.publish_kv(
            self.ids[runner],
            blocks.to_vec(),
            change.evicted,
            now,
            &mut self.q,
        );
        let bs = self.spec.engine.block_size.max(1);
        let prompt = self.trace.requests[r].input_tokens as u64;
        let e = &mut self.engines[runner];
        e.pulls += 1;
        e.pulled_tokens += (((p.upto_blocks - local.min(p.upto_blocks)) * bs) as u64).min(prompt);
        // Only the replica that planned the pull sees how long it took.
        self.gw
            .replica(replica)
            .pull_observed(self.ids[p.holder], self.ids[runner], p.bytes, p.ms);
        let (uncached, host) = self.prefill_size(r);
        self.after_host_copy(r, uncached, host, now);
    }

    /// The engine's prefix lookup for `r` on its runner: uncached prompt tokens, counted, and
    /// the hit blocks in the host tier.
    fn prefill_size(&mut self, r: usize) -> (usize, usize) {
        let runner = self.reqs[r].runner;
        let prompt = self.trace.requests[r].input_tokens as usize;
        let (uncached, host) = self.engines[runner].lookup_tiers(prompt, &self.reqs[r].blocks);
        let bs = self.spec.engine.block_size.max(1);
        let elsewhere = self
            .engines
            .iter()
            .map(|e| e.cache.peek_prefix(&self.reqs[r].blocks));
        let held = elsewhere.max().unwrap_or(0).saturating_mul(bs);
        self.reachable_tokens += held.clamp(prompt - uncached, prompt) as u64;
        self.engines[runner].prompt_tokens += prompt as u64;
        self.reqs[r].rec.cached_tokens = Some((prompt - uncached) as u32);
        (uncached, host)
    }

    /// Host-tier hits are copied back to the GPU before the prefill runs (the engine's
    /// `load_from_host`); without any, it runs now.
    fn after_host_copy(&mut self, r: usize, uncached: usize, host: usize, now: f64) {
        let cfg = &self.engines[self.reqs[r].runner].cfg;
        let copy_ms = cfg.timing.scaled(cfg.host_copy_ms(host)).as_secs_f64() * 1e3;
        match copy_ms > 0.0 {
            true => self.q.push(now + copy_ms, Event::HostCopied(r, uncached)),
            false => self.host_copied(r, uncached, now),
        }
    }

    /// Sizes `r`'s prefill where it waits (its pull took its place), or queues it now.
    fn host_copied(&mut self, r: usize, uncached: usize, now: f64) {
        let runner = self.reqs[r].runner;
        if self.engines[runner].resolve_pending(r, uncached) {
            self.q.push(now, Event::Kick(runner));
            return;
        }
        self.submit_prefill(r, uncached, now);
    }

    fn start_prefill(&mut self, r: usize, now: f64) {
        let (uncached, host) = self.prefill_size(r);
        self.after_host_copy(r, uncached, host, now);
    }

    fn submit_prefill(&mut self, r: usize, uncached: usize, now: f64) {
        if self.submit(r, Job::Prefill { req: r, uncached }, now) {
            self.q.push(now, Event::Kick(self.reqs[r].runner));
        }
    }

    /// Queues `job` on `r`'s runner; a full queue fails the request, as the engine's 503 does.
    fn submit(&mut self, r: usize, job: Job, now: f64) -> bool {
        if self.engines[self.reqs[r].runner].submit(job).is_ok() {
            return true;
        }
        self.fail(
            r,
            now,
            503,
            "engine_overloaded",
            "engine queue is full".into(),
        );
        false
    }

    fn kick(&mut self, e: usize, now: f64) {
        if let Some(ms) = self.engines[e].start_step() {
            let step = self.engines[e].cfg.timing.scaled(ms).as_secs_f64() * 1e3;
            self.q.push(now + step, Event::StepEnd(e));
        }
    }

    fn step_end(&mut self, e: usize, now: f64) {
        let out = self.engines[e].end_step();
        for r in out.prefills_done {
            let blocks = std::mem::take(&mut self.reqs[r].blocks);
            let evicted = self.engines[e].cache.insert(&blocks).evicted;
            if self.reqs[r].prefill.is_some() {
                // The decode keeps the KV it receives (`transfer_done`).
                self.reqs[r].blocks.clone_from(&blocks);
            }
            self.gw
                .publish_kv(self.ids[e], blocks, evicted, now, &mut self.q);
            let s = &mut self.reqs[r];
            s.prefill_ms = now - s.prefill_submit_ms;
            if s.prefill.is_some() {
                let bs = self.spec.engine.block_size.max(1);
                let prompt = self.trace.requests[r].input_tokens as usize;
                s.kv_bytes =
                    (prompt.div_ceil(bs) * bs) as u64 * self.spec.engine.kv_bytes_per_token;
                s.transfer_ms = s.kv_bytes as f64 / (self.spec.kv_gbps.max(1e-9) * 1e6);
                self.q.push(now + s.transfer_ms, Event::TransferDone(r));
            } else {
                if let Some(t) = s.ticket {
                    self.gw.prefill_done(s.replica, t, now, None, &mut self.q);
                }
                self.first_token(r, now + self.spec.overhead_ms);
            }
        }
        for (r, last) in out.tokens {
            let s = &mut self.reqs[r];
            s.rec.itl_ms.push(now - s.last_token_ms);
            s.last_token_ms = now;
            s.tokens += 1;
            if last {
                self.complete(r, now);
            }
        }
        self.q.push(now, Event::Kick(e));
    }

    /// When `r`'s wait for room runs out. Polls land on it exactly and compare against it, so
    /// the last poll is the deadline itself: a poll computed from the time left could round to
    /// no time at all and ask again at the same instant forever.
    fn room_deadline(&self, r: usize) -> f64 {
        let wait = self.reqs[r].rec.sent_ms + self.spec.scheduler.slo.room_wait_ms;
        match self.reqs[r].room_until {
            until if until > 0.0 => wait.min(until),
            _ => wait,
        }
    }

    /// Asks again for `r` (the head of its line) after a poll, within its wait.
    fn poll_room(&mut self, r: usize, now: f64) {
        let at = (now + pdgate_scheduler::ROOM_POLL_MS as f64).min(self.room_deadline(r));
        self.q.push(at.max(now), Event::Admit(r));
    }

    /// `r` joins its replica's line (the head asks again after a poll), or is refused now.
    fn join_line(&mut self, r: usize, key: &RequestKey, now: f64) {
        let replica = self.reqs[r].replica;
        let waited = now - self.reqs[r].rec.sent_ms;
        let slack = self.gw.ttft_slack_ms(replica, key, now, waited);
        self.reqs[r].room_until = now + slack.max(0.0);
        let line = &mut self.lines[replica];
        if !line.book.try_join(now, slack) {
            return self.refuse_kv_full(r, now);
        }
        line.queue.push_back(r);
        self.reqs[r].queued = true;
        if line.queue.len() == 1 {
            self.poll_room(r, now);
        }
    }

    /// The head of `replica`'s line leaves it; the next waiter whose wait has not run out
    /// becomes the head and asks at once (those whose wait ran out behind it are refused).
    fn leave_line(&mut self, replica: usize, now: f64, how: Leaving) {
        let line = &mut self.lines[replica];
        if let Some(head) = line.queue.pop_front() {
            self.reqs[head].queued = false;
        }
        line.book.leave(now, how);
        while let Some(&next) = self.lines[replica].queue.front() {
            if now < self.room_deadline(next) {
                self.q.push(now, Event::Admit(next));
                break;
            }
            self.lines[replica].queue.pop_front();
            self.lines[replica].book.leave(now, Leaving::Behind);
            self.reqs[next].queued = false;
            self.refuse_kv_full(next, now);
        }
    }

    /// The gateway's 429 `kv_full` for `r`.
    fn refuse_kv_full(&mut self, r: usize, now: f64) {
        let full = pdgate_scheduler::Rejection::KvFull;
        self.fail(r, now, 429, full.label(), full.to_string());
    }

    fn transfer_done(&mut self, r: usize, now: f64) {
        // The received KV enters the decode's prefix cache, as in vLLM: a later turn that goes
        // to this decode finds its prefix there.
        let (d, blocks) = (
            self.reqs[r].decode,
            std::mem::take(&mut self.reqs[r].blocks),
        );
        let evicted = self.engines[d].cache.insert(&blocks).evicted;
        // One copy per handoff: the side the decision named marks its copy evicted first.
        match self.reqs[r].evict_first {
            Some(Role::Prefill) => {
                if let Some(p) = self.reqs[r].prefill {
                    let _ = self.engines[p].cache.demote(&blocks);
                }
            }
            Some(Role::Decode) => {
                let _ = self.engines[d].cache.demote(&blocks);
            }
            None => {}
        }
        self.gw
            .publish_kv(self.ids[d], blocks, evicted, now, &mut self.q);
        let s = &self.reqs[r];
        if let Some(t) = s.ticket {
            let o = Observed {
                prefill_ms: s.prefill_ms,
                transfer_ms: s.transfer_ms,
                kv_bytes: s.kv_bytes,
                // The pull was observed when it landed (`pull_done`), by the replica that planned it.
                ..Observed::default()
            };
            self.gw
                .prefill_done(s.replica, t, now, Some(o), &mut self.q);
        }
        // Two legs (prefill, then decode) each pay the gateway's per-leg overhead.
        self.first_token(r, now + 2.0 * self.spec.overhead_ms);
    }

    fn first_token(&mut self, r: usize, now: f64) {
        let output = self.trace.requests[r].output_tokens;
        let prompt = self.trace.requests[r].input_tokens as usize;
        let s = &mut self.reqs[r];
        s.rec.ttft_ms = Some(now - s.rec.sent_ms);
        s.last_token_ms = now;
        s.tokens = 1;
        let d = s.decode;
        if output <= 1 {
            return self.complete(r, now);
        }
        let job = Job::Decode {
            req: r,
            context: prompt,
            steps: output - 1,
        };
        if self.engines[d].submit(job).is_err() {
            return self.fail(
                r,
                now,
                503,
                "engine_overloaded",
                "engine queue is full".into(),
            );
        }
        self.q.push(now, Event::Kick(d));
    }

    fn complete(&mut self, r: usize, now: f64) {
        let s = &mut self.reqs[r];
        s.rec.e2el_ms = Some(now - s.rec.sent_ms);
        s.rec.output_tokens = s.tokens;
        let (d, reserved) = (s.decode, std::mem::take(&mut s.reserved));
        if let Some(t) = s.ticket.take() {
            self.gw.decode_done(s.replica, t, now, &mut self.q);
        }
        self.engines[d].pool_free += reserved;
        self.engines[d].requests += 1;
        self.done(now);
    }

    /// What gateway replica `g`'s metrics scraper reads from each engine.
    fn scrape(&mut self, g: usize) {
        for (i, e) in self.engines.iter().enumerate() {
            let decode = e.cfg.role == Role::Decode;
            let total = e.cfg.kv_blocks;
            let usage = if decode && total > 0 {
                1.0 - e.pool_free as f64 / total as f64
            } else {
                0.0
            };
            let report = EngineReport {
                waiting: e.waiting() as u32,
                running: e.running() as u32,
                kv_usage: usage,
            };
            // Every engine reports its pool size (`num_gpu_blocks`), as vLLM and the reference
            // engine do, so each replica's index mirrors a prefill's cache size too.
            self.gw.replica(g).observe_engine_tiers(
                self.ids[i],
                report,
                Some(total as u64),
                e.cfg.host_cache_blocks as u64,
            );
        }
    }

    fn finish(self, events: u64) -> SimResult {
        let (hits, queries) = self.engines.iter().fold((0u64, 0u64), |(h, q), e| {
            (h + e.prefix_hits_tokens, q + e.prefix_queries_tokens)
        });
        let pulled: u64 = self.engines.iter().map(|e| e.pulled_tokens).sum();
        let pulls = self.engines.iter().map(|e| e.pulls).sum();
        let pull_misses = self.engines.iter().map(|e| e.pull_misses).sum();
        let host_hit_blocks = self.engines.iter().map(|e| e.host_hit_blocks).sum();
        let reachable = self.reachable_tokens;
        let instances = self
            .engines
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let (role, n) = if i < self.spec.prefill {
                    ("prefill", i)
                } else {
                    ("decode", i - self.spec.prefill)
                };
                InstanceLoad {
                    id: format!("{}{n}", &role[..1]),
                    role: role.into(),
                    requests: e.requests,
                    prompt_tokens: e.prompt_tokens,
                    generated_tokens: e.generated_tokens,
                    cache_hit_rate: (e.prefix_queries_tokens > 0)
                        .then(|| e.prefix_hits_tokens as f64 / e.prefix_queries_tokens as f64),
                }
            })
            .collect();
        SimResult {
            records: self.reqs.into_iter().map(|s| s.rec).collect(),
            instances,
            cache_hit_rate: (queries > 0).then(|| hits as f64 / queries as f64),
            pulled_hit_rate: (queries > 0).then(|| pulled as f64 / queries as f64),
            reachable_hit_rate: (queries > 0).then(|| reachable as f64 / queries as f64),
            pulls,
            pull_misses,
            host_hit_blocks,
            events,
        }
    }
}
