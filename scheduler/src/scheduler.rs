//! The scheduler state machine: the fleet as the gateway sees it, fed with events (instance
//! added, health changed, prefill done, decode done, KV blocks stored, engine metrics) and asked
//! for decisions. Time comes in as an argument (`now`, any fixed epoch), never from a clock.
//!
//! Every decision books its load on the chosen instances at once, so a burst of requests sees
//! each other; the caller reports `prefill_done` and `decode_done` by ticket (`decode_done` alone
//! closes both legs, e.g. on failure).

use crate::blocks::BlockHash;
use crate::candidate::{Candidate, Pull};
use crate::config::SchedulerConfig;
use crate::copies;
use crate::cost::Ewma;
use crate::fleet::{Fleet, Instance};
use crate::index::PrefixIndex;
use crate::load::{EngineReport, InstanceLoad};
use crate::policy::{PickCtx, Policy};
use crate::predict::{Holder, Predictor};
use crate::prompts::PromptStats;
use crate::steps::StepQueue;
use crate::types::{InstanceId, Role, Ticket};
// Defined in `types` so policies and predictions need not import the scheduler; re-exported for
// callers that name them by their old path (`pdgate_scheduler::scheduler::Rejection`).
pub use crate::types::{Rejection, RequestKey, SloBreach};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub ticket: Ticket,
    /// `None`: the decode instance prefills locally (no KV transfer).
    pub prefill: Option<InstanceId>,
    pub decode: InstanceId,
    /// Leading prompt blocks the instance that prefills already caches.
    pub cached_blocks: u32,
    /// Blocks `[cached_blocks, pull.upto_blocks)` the instance that prefills should pull from
    /// another instance before computing the rest; if the pull fails it computes them.
    pub pull: Option<Pull>,
    pub predicted_ttft_ms: f64,
    pub predicted_tbt_ms: f64,
    /// Admitted although predicted past the TTFT SLO: best effort under `slo` (late even
    /// alone), or any late request under a policy that does not admit against the SLO.
    pub late: bool,
    /// The side whose engine marks its copy of the handed-off prompt to be evicted first
    /// (`reuse.one_copy`); `None` when both keep it, or nothing is handed off.
    pub evict_first: Option<Role>,
}

/// What the gateway measured once a prefill leg finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    pub prefill_ms: f64,
    pub transfer_ms: f64,
    pub kv_bytes: u64,
    /// The planned pull as the engine made it: bytes it moved and how long it took (0 when
    /// there was none, or it failed); corrects that holder-puller pair's bandwidth.
    #[serde(default)]
    pub pulled_bytes: u64,
    #[serde(default)]
    pub pull_ms: f64,
}

/// How an instance's cache is sized, so the index mirrors it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceSpec {
    /// KV blocks the engine's cache holds; 0 means unknown (the index default applies).
    pub kv_capacity_blocks: u64,
    /// The engine takes the mark that evicts its copy of a handed-off prompt first (the
    /// reference engine on the native protocol); one copy per handoff needs both of a pair to.
    pub marks_copies: bool,
}

/// What one decision booked, as another gateway replica books it too (booking sync): the load
/// on the chosen pair, with the predicted decode end relative to the booking so replicas need
/// no shared clock. Instance ids must mean the same instances on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Booking {
    /// `None`: the decode instance prefills locally.
    pub prefill: Option<InstanceId>,
    pub decode: InstanceId,
    pub uncached_tokens: u64,
    pub decode_tokens: u64,
    pub decode_blocks: u64,
    pub predicted_prefill_ms: f64,
    pub compute_ms: f64,
    /// Predicted end of the decode, ms after the booking.
    pub decode_end_ms: f64,
    /// The pull the decision planned: the other replicas book it on the holder's link too, so
    /// they do not plan pulls into a link it already fills.
    #[serde(default)]
    pub pull: Option<Pull>,
    /// Whose copy of the prompt is evicted first, so the other replicas' indexes expect it only
    /// on the side that keeps it.
    #[serde(default)]
    pub evict_first: Option<Role>,
}

#[derive(Debug, Clone, Copy)]
struct Booked {
    prefill: Option<InstanceId>,
    decode: InstanceId,
    uncached_tokens: u64,
    decode_tokens: u64,
    decode_blocks: u64,
    predicted_prefill_ms: f64,
    compute_ms: f64,
    decode_end: Duration,
    prefill_open: bool,
    pull: Option<Pull>,
    evict_first: Option<Role>,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    instances: Fleet,
    policy: Box<dyn Policy>,
    index: PrefixIndex,
    booked: HashMap<Ticket, Booked>,
    bandwidth: Ewma,
    /// Measured pull bandwidth per (holder, puller); pairs not yet measured use `pulls_seen`.
    pull_bandwidth: HashMap<(InstanceId, InstanceId), Ewma>,
    /// Every pull measured, whatever its pair; until the first, the handoff `bandwidth`. A
    /// pull (an export round trip, then reads) is slower than a handoff streaming the same
    /// bytes, and a fleet of n instances has n² pairs to learn: an unmeasured pair is priced
    /// at what pulls have cost, not what handoffs have.
    pulls_seen: Option<Ewma>,
    /// How much this fleet's prompts are reused, and how large they are.
    prompts: PromptStats,
    next_id: u32,
    next_ticket: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            policy: cfg.policy.build(&cfg),
            index: PrefixIndex::new(&cfg.index),
            bandwidth: Ewma::new(cfg.cost.prior_bytes_per_ms(), cfg.cost.ewma_alpha),
            prompts: PromptStats::default(),
            instances: Fleet::default(),
            booked: HashMap::new(),
            pull_bandwidth: HashMap::new(),
            pulls_seen: None,
            next_id: 0,
            next_ticket: 0,
            cfg,
        }
    }

    /// Numbers this scheduler's instances from `first` on, so that several schedulers (one per
    /// served model) hand out ids that never collide while their ranges do not overlap.
    pub fn with_first_id(mut self, first: u32) -> Self {
        self.next_id = first;
        self
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// Adds an instance, healthy until told otherwise.
    pub fn add_instance(&mut self, role: Role, spec: InstanceSpec) -> InstanceId {
        let id = InstanceId(self.next_id);
        self.next_id += 1;
        let capacity = if spec.kv_capacity_blocks == 0 {
            self.cfg.index.default_capacity_blocks
        } else {
            spec.kv_capacity_blocks
        };
        self.index.add_instance(id, Some(capacity));
        self.instances.insert(
            id,
            Instance {
                role,
                healthy: true,
                capacity_blocks: capacity,
                marks_copies: spec.marks_copies,
                load: InstanceLoad::default(),
                speed: Ewma::new(1.0, self.cfg.cost.ewma_alpha),
                busy_until: Duration::ZERO,
                prefills: StepQueue::default(),
                egress_until: Duration::ZERO,
                decode_ends: BTreeSet::new(),
            },
        );
        id
    }

    pub fn remove_instance(&mut self, id: InstanceId) {
        self.instances.remove(id);
        self.index.remove_instance(id);
        self.pull_bandwidth
            .retain(|(from, to), _| *from != id && *to != id);
    }

    pub fn set_healthy(&mut self, id: InstanceId, healthy: bool) {
        self.instances.update(id, |i| i.healthy = healthy);
    }

    pub fn is_healthy(&self, id: InstanceId) -> bool {
        self.instances.get(id).is_some_and(|i| i.healthy)
    }

    pub fn load(&self, id: InstanceId) -> Option<InstanceLoad> {
        self.instances.get(id).map(|i| i.load)
    }

    /// Healthy instance count per role: `(prefill, decode)`.
    /// The KV cache size, in blocks, the scheduler assumes for instance `id`.
    pub fn capacity_blocks(&self, id: InstanceId) -> Option<u64> {
        self.instances.get(id).map(|i| i.capacity_blocks)
    }

    pub fn healthy_counts(&self) -> (usize, usize) {
        (
            self.instances.healthy_count(Role::Prefill),
            self.instances.healthy_count(Role::Decode),
        )
    }

    /// Bytes the prefix index occupies (estimate).
    pub fn index_bytes(&self) -> u64 {
        self.index.memory_bytes()
    }

    /// Prefix-index entries (precise and approximate) held for `id`.
    pub fn index_blocks_of(&self, id: InstanceId) -> u64 {
        self.index.blocks_of(id)
    }

    /// Requests booked and not yet reported done.
    pub fn in_flight(&self) -> usize {
        self.booked.len()
    }

    /// Load the engine reported about itself; a known cache size also resizes the index.
    pub fn observe_engine(
        &mut self,
        id: InstanceId,
        report: EngineReport,
        kv_capacity_blocks: Option<u64>,
    ) {
        self.observe_engine_tiers(id, report, kv_capacity_blocks, 0);
    }

    /// As [`Self::observe_engine`], for an engine that also keeps `host_blocks` in a host-memory
    /// tier under its prefix cache: its KV pool is the GPU's, while the index remembers what
    /// both tiers hold (a prefix offloaded to host memory is still served without compute).
    pub fn observe_engine_tiers(
        &mut self,
        id: InstanceId,
        report: EngineReport,
        gpu_blocks: Option<u64>,
        host_blocks: u64,
    ) {
        let cap = gpu_blocks.filter(|c| *c > 0);
        self.instances.update(id, |i| {
            i.load.engine = Some(report);
            if let Some(cap) = cap {
                i.capacity_blocks = cap;
            }
            let used = (report.kv_usage.clamp(0.0, 1.0) * i.capacity_blocks as f64).ceil() as u64;
            i.load.foreign_blocks = used.saturating_sub(i.load.decode_blocks);
        });
        if let Some(cap) = cap {
            self.index.set_capacity(id, cap.saturating_add(host_blocks));
        }
    }

    /// Precise KV events from an engine.
    pub fn blocks_stored(&mut self, id: InstanceId, blocks: &[BlockHash], now: Duration) {
        self.index.stored(id, blocks, now);
    }

    pub fn blocks_removed(&mut self, id: InstanceId, blocks: &[BlockHash]) {
        self.index.removed(id, blocks);
    }

    pub fn blocks_cleared(&mut self, id: InstanceId) {
        self.index.clear(id);
    }

    pub fn schedule(&mut self, key: &RequestKey, now: Duration) -> Result<Decision, Rejection> {
        self.schedule_avoiding(key, now, &[])
    }

    /// Picks a pair among healthy instances not in `avoid` (e.g. a prefill that just failed) and
    /// books the request on it.
    pub fn schedule_avoiding(
        &mut self,
        key: &RequestKey,
        now: Duration,
        avoid: &[InstanceId],
    ) -> Result<Decision, Rejection> {
        self.schedule_after_wait(key, now, avoid, Duration::ZERO)
    }

    /// As [`Self::schedule_avoiding`], for a request that has already waited `waited` for a
    /// decode with KV room (`slo.room_wait_ms`): admission counts the wait into its TTFT.
    pub fn schedule_after_wait(
        &mut self,
        key: &RequestKey,
        now: Duration,
        avoid: &[InstanceId],
        waited: Duration,
    ) -> Result<Decision, Rejection> {
        let matches = self.index.match_all(&key.blocks, now);
        // Once per request: a request asking again while it waits for room is not another
        // sample of how much prompts are reused.
        if waited.is_zero() {
            let best = matches.iter().map(|(_, n)| *n).max().unwrap_or(0);
            let near_whole = self.cfg.disagg.local_prefill_min_hit;
            self.prompts.sample(key.blocks.len(), best, near_whole);
        }
        let shortlist = self.cfg.policy.shortlists();
        let mut prefill = self.candidates(Role::Prefill, avoid, &matches, shortlist, now);
        let mut decode = self.candidates(Role::Decode, avoid, &matches, shortlist, now);
        if prefill.is_empty() {
            return Err(Rejection::NoHealthy(Role::Prefill));
        }
        if decode.is_empty() {
            return Err(Rejection::NoHealthy(Role::Decode));
        }
        let instances = &self.instances;
        let ends_before = |id: InstanceId, at: Duration| -> u32 {
            instances
                .get(id)
                .map_or(0, |i| i.decode_ends.range(..(at, Ticket(0))).count() as u32)
        };
        let predict = Predictor {
            cfg: &self.cfg,
            bytes_per_ms: self.bandwidth.get(),
            now,
            ends_before: &ends_before,
        };
        if self.cfg.reuse.pull {
            let holders = self.holders(&matches, avoid, now);
            let pair = |from: InstanceId, to: InstanceId| self.pair_bandwidth(from, to);
            for c in prefill.iter_mut().chain(decode.iter_mut()) {
                c.pull = predict.best_pull(key, c, &holders, &pair);
            }
        }
        let choice = self.policy.pick(&PickCtx {
            key,
            prefill: &prefill,
            decode: &decode,
            predict: &predict,
            waited_ms: waited.as_secs_f64() * 1e3,
            reuse: self.prompts.reuse(),
        })?;
        let (Some(p), Some(d)) = (
            prefill.iter().find(|c| c.id == choice.prefill),
            decode.iter().find(|c| c.id == choice.decode),
        ) else {
            return Err(Rejection::NoHealthy(Role::Prefill));
        };
        let local = predict.prefills_locally(key, d);
        let (runner, transfer) = if local {
            (d, 0.0)
        } else {
            (p, predict.transfer_ms(key))
        };
        let prefill_ms = predict.prefill_ms(key, runner);
        let ttft = prefill_ms + transfer;
        let at = now + Duration::from_secs_f64(ttft.max(0.0) / 1000.0);
        let tbt = predict.tbt_ms(key, d, at);
        let booked = Booked {
            prefill: (!local).then_some(p.id),
            decode: d.id,
            uncached_tokens: predict.uncached_tokens(key, runner),
            decode_tokens: predict.expected_context(key),
            decode_blocks: predict.decode_blocks(key),
            predicted_prefill_ms: prefill_ms,
            compute_ms: predict.compute_ms(key, runner),
            decode_end: at + Duration::from_secs_f64(tbt * f64::from(key.max_tokens) / 1000.0),
            prefill_open: true,
            pull: runner.pull,
            evict_first: (!local).then(|| self.evict_first(key, p, d)).flatten(),
        };
        let decision = Decision {
            ticket: Ticket(self.next_ticket),
            prefill: booked.prefill,
            decode: d.id,
            cached_blocks: runner.matched_blocks,
            pull: runner.pull,
            predicted_ttft_ms: ttft,
            predicted_tbt_ms: tbt,
            late: ttft > self.cfg.slo.ttft_ms,
            evict_first: booked.evict_first,
        };
        let runner_id = runner.id;
        self.next_ticket += 1;
        self.book(decision.ticket, booked, runner_id, now);
        if let Some(pull) = decision.pull {
            self.book_pull(pull, runner_id, now);
        }
        self.record_copies(&key.blocks, booked.prefill, d.id, decision.evict_first, now);
        Ok(decision)
    }

    /// Which engine of a handoff from `p` to `d` marks its copy of the prompt evicted first
    /// (`copies.rs`): none unless both take the mark and the fleet's typical prompt is known.
    fn evict_first(&self, key: &RequestKey, p: &Candidate, d: &Candidate) -> Option<Role> {
        let marks = |id| self.instances.get(id).is_some_and(|i| i.marks_copies);
        if !marks(p.id) || !marks(d.id) {
            return None;
        }
        let fleet = copies::FleetView {
            prefill_share: self.instances.cache_share(Role::Prefill),
            typical_prompt_blocks: self.prompts.typical_blocks()?,
            near_whole_reuse: self.prompts.near_whole(),
        };
        copies::evict_first(&self.cfg, key, p, d, fleet)
    }

    /// What `ticket` booked, for the other replicas (`now`: the booking's time).
    pub fn booking(&self, ticket: Ticket, now: Duration) -> Option<Booking> {
        let b = self.booked.get(&ticket)?;
        Some(Booking {
            prefill: b.prefill,
            decode: b.decode,
            uncached_tokens: b.uncached_tokens,
            decode_tokens: b.decode_tokens,
            decode_blocks: b.decode_blocks,
            predicted_prefill_ms: b.predicted_prefill_ms,
            compute_ms: b.compute_ms,
            decode_end_ms: b.decode_end.saturating_sub(now).as_secs_f64() * 1e3,
            pull: b.pull,
            evict_first: b.evict_first,
        })
    }

    /// Books load another replica routed (booking sync), as if this replica had decided it:
    /// the pair's load, its pull on the holder's link and the routed prefix (`blocks`) in the
    /// index. Returns the local ticket that its `prefill_done`/`decode_done` must name.
    pub fn book_synced(&mut self, b: &Booking, blocks: &[BlockHash], now: Duration) -> Ticket {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let booked = Booked {
            prefill: b.prefill,
            decode: b.decode,
            uncached_tokens: b.uncached_tokens,
            decode_tokens: b.decode_tokens,
            decode_blocks: b.decode_blocks,
            predicted_prefill_ms: b.predicted_prefill_ms,
            compute_ms: b.compute_ms,
            decode_end: now + Duration::from_secs_f64(b.decode_end_ms.max(0.0) / 1e3),
            prefill_open: true,
            pull: b.pull,
            evict_first: b.evict_first,
        };
        let runner = b.prefill.unwrap_or(b.decode);
        self.book(ticket, booked, runner, now);
        if let Some(pull) = b.pull {
            self.book_pull(pull, runner, now);
        }
        self.record_copies(blocks, b.prefill, b.decode, b.evict_first, now);
        ticket
    }

    /// The routed prompt will be cached where it runs; a copy marked evicted first is recorded
    /// as the first the index's capacity cap drops, as the engine drops it first.
    fn record_copies(
        &mut self,
        blocks: &[BlockHash],
        prefill: Option<InstanceId>,
        decode: InstanceId,
        evict_first: Option<Role>,
        now: Duration,
    ) {
        let sides = prefill
            .map(|p| (p, Role::Prefill))
            .into_iter()
            .chain([(decode, Role::Decode)]);
        for (id, role) in sides {
            if evict_first == Some(role) {
                self.index.record_evict_first(id, blocks, now);
            } else {
                self.index.record(id, blocks, now);
            }
        }
    }

    fn book(&mut self, ticket: Ticket, b: Booked, runner: InstanceId, now: Duration) {
        let budget = self.cfg.cost.max_batched_tokens;
        self.instances.update(runner, |i| {
            i.load.in_flight += 1;
            i.load.prefill_tokens += b.uncached_tokens;
            // `compute_ms` is what the prefill adds to the queue, joining its last step or not.
            i.busy_until =
                i.busy_until.max(now) + Duration::from_secs_f64(b.compute_ms.max(0.0) / 1e3);
            i.prefills.push(ticket, b.uncached_tokens, budget);
        });
        self.instances.update(b.decode, |i| {
            if b.prefill.is_some() {
                i.load.in_flight += 1;
            }
            i.load.decode_seqs += 1;
            i.load.decode_tokens += b.decode_tokens;
            i.load.decode_blocks += b.decode_blocks;
            i.decode_ends.insert((b.decode_end, ticket));
        });
        self.booked.insert(ticket, b);
    }

    /// A pull occupies the holder's outgoing link for its bytes at the pair's bandwidth, so the
    /// next pull from the same holder waits behind it: that is the load a pull puts on a holder.
    fn book_pull(&mut self, pull: Pull, to: InstanceId, now: Duration) {
        let bw = self.pair_bandwidth(pull.from, to);
        self.instances.update(pull.from, |i| {
            i.egress_until =
                i.egress_until.max(now) + Duration::from_secs_f64(pull.bytes as f64 / bw / 1e3);
        });
    }

    /// Bytes per ms a pull from `from` to `to` is expected to move.
    pub fn pair_bandwidth(&self, from: InstanceId, to: InstanceId) -> f64 {
        self.pull_bandwidth
            .get(&(from, to))
            .map_or_else(|| self.pull_prior(), Ewma::get)
            .max(1.0)
    }

    fn pull_prior(&self) -> f64 {
        self.pulls_seen
            .as_ref()
            .map_or(self.bandwidth.get(), Ewma::get)
    }

    /// A pull from `from` to `to` moved `bytes` in `ms`: corrects that pair's bandwidth, and
    /// the fleet's, which prices pairs not measured yet.
    pub fn pull_observed(&mut self, from: InstanceId, to: InstanceId, bytes: u64, ms: f64) {
        if bytes == 0 || ms <= 0.0 || !ms.is_finite() {
            return;
        }
        let sample = bytes as f64 / ms;
        let prior = self.pull_prior();
        let alpha = self.cfg.cost.ewma_alpha;
        match &mut self.pulls_seen {
            Some(all) => all.update(sample),
            None => self.pulls_seen = Some(Ewma::new(sample, alpha)),
        }
        self.pull_bandwidth
            .entry((from, to))
            .or_insert_with(|| Ewma::new(prior, alpha))
            .update(sample);
    }

    /// Healthy, non-avoided instances that cache a prefix of the request, decodes included: a
    /// decode keeps the KV it receives in its prefix cache (vLLM does, so does the reference
    /// engine), and a pull reads a prefix's blocks once, a small share of the memory bandwidth
    /// its decode steps use.
    fn holders(
        &self,
        matches: &[(InstanceId, u32)],
        avoid: &[InstanceId],
        now: Duration,
    ) -> Vec<Holder> {
        matches
            .iter()
            .filter(|(id, _)| !avoid.contains(id))
            .filter_map(|&(id, matched_blocks)| {
                let i = self.instances.get(id).filter(|i| i.healthy)?;
                Some(Holder {
                    id,
                    matched_blocks,
                    egress_wait_ms: i.egress_until.saturating_sub(now).as_secs_f64() * 1e3,
                })
            })
            .collect()
    }

    /// How much longer than `waited` a request could wait and still make its TTFT SLO on the
    /// prefill predicted fastest for it now: what a wait for KV room may take. Books nothing.
    pub fn ttft_slack_ms(&self, key: &RequestKey, now: Duration, waited: Duration) -> f64 {
        let matches = self.index.match_all(&key.blocks, now);
        let shortlist = self.cfg.policy.shortlists();
        let prefill = self.candidates(Role::Prefill, &[], &matches, shortlist, now);
        let no_ends = |_: InstanceId, _: Duration| 0;
        let predict = Predictor {
            cfg: &self.cfg,
            bytes_per_ms: self.bandwidth.get(),
            now,
            ends_before: &no_ends,
        };
        let best = prefill
            .iter()
            .map(|c| predict.ttft_ms(key, c))
            .fold(f64::INFINITY, f64::min);
        self.cfg.slo.ttft_ms - waited.as_secs_f64() * 1e3 - best
    }

    /// The prefill leg ended (and, disaggregated, its KV landed); `observed` corrects the model.
    pub fn prefill_done(&mut self, ticket: Ticket, now: Duration, observed: Option<Observed>) {
        let Some(b) = self.booked.get_mut(&ticket) else {
            return;
        };
        if !std::mem::take(&mut b.prefill_open) {
            return;
        }
        let b = *b;
        let runner = b.prefill.unwrap_or(b.decode);
        let cost = &self.cfg.cost;
        self.instances.update(runner, |i| {
            i.load.prefill_tokens = i.load.prefill_tokens.saturating_sub(b.uncached_tokens);
            i.prefills.remove(ticket, cost.max_batched_tokens);
            // A prefill just ended, so the next step just started: what is left is the whole
            // of the remaining booked work, from now.
            let left_ms = i.prefills.ms(cost) * i.speed.get();
            i.busy_until = now + Duration::from_secs_f64(left_ms.max(0.0) / 1e3);
            if b.prefill.is_some() {
                i.load.in_flight = i.load.in_flight.saturating_sub(1);
            }
            if let Some(o) = observed.filter(|o| o.prefill_ms > 0.0 && b.predicted_prefill_ms > 1.0)
            {
                i.speed
                    .update((o.prefill_ms / b.predicted_prefill_ms).clamp(0.25, 4.0));
            }
        });
        if let Some(o) = observed.filter(|o| o.transfer_ms > 0.0 && o.kv_bytes > 0) {
            self.bandwidth.update(o.kv_bytes as f64 / o.transfer_ms);
        }
        if let (Some(p), Some(o)) = (b.pull, observed) {
            self.pull_observed(p.from, runner, o.pulled_bytes, o.pull_ms);
        }
    }

    /// The request ended (finished, failed or abandoned): releases everything it booked.
    pub fn decode_done(&mut self, ticket: Ticket, now: Duration) {
        self.prefill_done(ticket, now, None);
        let Some(b) = self.booked.remove(&ticket) else {
            return;
        };
        self.instances.update(b.decode, |i| {
            i.load.in_flight = i.load.in_flight.saturating_sub(1);
            i.load.decode_seqs = i.load.decode_seqs.saturating_sub(1);
            i.load.decode_tokens = i.load.decode_tokens.saturating_sub(b.decode_tokens);
            i.load.decode_blocks = i.load.decode_blocks.saturating_sub(b.decode_blocks);
            i.decode_ends.remove(&(b.decode_end, ticket));
        });
    }

    /// Healthy, non-avoided instances of `role` as policies see them, in id order. With a
    /// shortlist (large fleets, policies whose best choice is always a cache holder or among the
    /// least loaded) only those are built, so a decision does not grow with the fleet.
    fn candidates(
        &self,
        role: Role,
        avoid: &[InstanceId],
        matches: &[(InstanceId, u32)],
        shortlist: bool,
        now: Duration,
    ) -> Vec<Candidate> {
        let usable = |id: InstanceId| {
            self.instances
                .get(id)
                .is_some_and(|i| i.role == role && i.healthy)
                && !avoid.contains(&id)
        };
        let mut ids: Vec<InstanceId> =
            if shortlist && self.instances.healthy_count(role) > SHORTLIST_LEAST_LOADED {
                let mut ids: Vec<InstanceId> = matches
                    .iter()
                    .map(|(id, _)| *id)
                    .filter(|id| usable(*id))
                    .collect();
                ids.extend(
                    self.instances
                        .least_loaded(role)
                        .filter(|id| !avoid.contains(id))
                        .take(SHORTLIST_LEAST_LOADED),
                );
                ids.sort_unstable();
                ids.dedup();
                ids
            } else {
                self.instances
                    .all()
                    .map(|(id, _)| id)
                    .filter(|id| usable(*id))
                    .collect()
            };
        ids.retain(|id| usable(*id));
        ids.into_iter()
            .filter_map(|id| {
                let i = self.instances.get(id)?;
                Some(Candidate {
                    id,
                    load: i.load,
                    matched_blocks: matches
                        .iter()
                        .find(|(m, _)| *m == id)
                        .map_or(0, |(_, n)| *n),
                    cached_blocks: self.index.blocks_of(id),
                    capacity_blocks: i.capacity_blocks,
                    speed: i.speed.get(),
                    queue_ms: i.busy_until.saturating_sub(now).as_secs_f64() * 1e3,
                    joinable_tokens: i.prefills.joinable(self.cfg.cost.max_batched_tokens),
                    pull: None,
                })
            })
            .collect()
    }
}

/// Least-loaded instances per role a shortlist includes besides the cache holders.
const SHORTLIST_LEAST_LOADED: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyKind;

    fn key(tokens: u32, blocks: &[u64]) -> RequestKey {
        RequestKey {
            prompt_tokens: tokens,
            max_tokens: 16,
            blocks: blocks.iter().copied().map(BlockHash).collect(),
        }
    }

    fn sched(policy: PolicyKind) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            policy,
            ..SchedulerConfig::default()
        })
    }

    const NOW: Duration = Duration::from_secs(10);

    /// `slo` with pulls on, every prompt prefilled on a prefill instance (never locally on a
    /// decode), so the pull plans are what the tests see.
    fn pulling() -> Scheduler {
        let mut cfg = SchedulerConfig::default();
        cfg.reuse.pull = true;
        cfg.disagg.local_prefill_min_hit = 2.0;
        Scheduler::new(cfg)
    }

    /// A roomy fleet marks one copy of each handoff once it has seen a hundred prompts: with
    /// pulls either side keeps a share; without them, where no prompt is cached almost whole
    /// (no turn would prefill locally on a decode), always the prefill.
    #[test]
    fn one_copy_marks_a_side_once_the_fleet_knows_its_typical_prompt() {
        let mut cfg = SchedulerConfig::default();
        cfg.reuse.pull = true;
        cfg.disagg.local_prefill_min_hit = 2.0; // hand every prompt over
        let roomy = InstanceSpec {
            kv_capacity_blocks: 1 << 20,
            marks_copies: true,
        };
        let mut s = Scheduler::new(cfg.clone());
        s.add_instance(Role::Prefill, roomy);
        s.add_instance(Role::Decode, roomy);
        let prompt = |i: u64| key(64 * 16, &(0..64).map(|b| i * 1_000 + b).collect::<Vec<_>>());
        let mut sides = [0; 2];
        for i in 0..400 {
            let dec = s.schedule(&prompt(i), NOW).expect("pair");
            s.prefill_done(dec.ticket, NOW, None);
            s.decode_done(dec.ticket, NOW);
            match (i < 99, dec.evict_first) {
                (true, None) => {}
                (false, Some(Role::Prefill)) => sides[0] += 1,
                (false, Some(Role::Decode)) => sides[1] += 1,
                (early, got) => panic!("request {i} (early: {early}): {got:?}"),
            }
        }
        assert!(
            sides.iter().all(|&n| n > 100),
            "both sides keep a share: {sides:?}"
        );
        // An engine that does not take the mark (a real vLLM, say) keeps its copy: its pairs
        // are never named.
        let mut s = Scheduler::new(cfg.clone());
        s.add_instance(Role::Prefill, roomy);
        let plain = InstanceSpec {
            marks_copies: false,
            ..roomy
        };
        s.add_instance(Role::Decode, plain);
        for i in 0..150 {
            let dec = s.schedule(&prompt(i), NOW).expect("pair");
            assert_eq!(dec.evict_first, None, "request {i}");
            s.prefill_done(dec.ticket, NOW, None);
            s.decode_done(dec.ticket, NOW);
        }
        let mut no_pulls = cfg.clone();
        no_pulls.reuse.pull = false;
        let mut s = Scheduler::new(no_pulls);
        s.add_instance(Role::Prefill, roomy);
        s.add_instance(Role::Decode, roomy);
        for i in 0..200 {
            let dec = s.schedule(&prompt(i), NOW).expect("pair");
            let want = (i >= 99).then_some(Role::Decode);
            assert_eq!(dec.evict_first, want, "request {i}: the prefill keeps it");
            s.prefill_done(dec.ticket, NOW, None);
            s.decode_done(dec.ticket, NOW);
        }
        // Caches that hold fewer than `one_copy_min_prompts` typical prompts keep both.
        let tight = InstanceSpec {
            kv_capacity_blocks: 64 * u64::from(cfg.reuse.one_copy_min_prompts) - 1,
            marks_copies: true,
        };
        let mut s = Scheduler::new(cfg);
        s.add_instance(Role::Prefill, tight);
        s.add_instance(Role::Decode, tight);
        for i in 0..200 {
            let dec = s.schedule(&prompt(i), NOW).expect("pair");
            assert_eq!(dec.evict_first, None);
            s.prefill_done(dec.ticket, NOW, None);
            s.decode_done(dec.ticket, NOW);
        }
    }

    #[test]
    fn books_and_releases_load_on_both_legs() {
        let mut s = sched(PolicyKind::LeastLoad);
        let p = s.add_instance(Role::Prefill, InstanceSpec::default());
        let d = s.add_instance(Role::Decode, InstanceSpec::default());
        let dec = s.schedule(&key(40, &[1, 2]), NOW).expect("pair");
        assert_eq!((dec.prefill, dec.decode), (Some(p), d));
        let pl = s.load(p).unwrap();
        assert_eq!((pl.in_flight, pl.prefill_tokens), (1, 40));
        let dl = s.load(d).unwrap();
        assert_eq!(
            (
                dl.in_flight,
                dl.decode_seqs,
                dl.decode_tokens,
                dl.decode_blocks
            ),
            (1, 1, 56, 4)
        );
        s.prefill_done(dec.ticket, NOW, None);
        assert_eq!(s.load(p).unwrap().prefill_tokens, 0);
        s.prefill_done(dec.ticket, NOW, None); // idempotent
        s.decode_done(dec.ticket, NOW);
        s.decode_done(dec.ticket, NOW);
        assert_eq!(s.load(p), Some(InstanceLoad::default()));
        assert_eq!(s.load(d), Some(InstanceLoad::default()));
        assert_eq!(s.in_flight(), 0);
    }

    /// Small prefills queued together run as one engine step, so the TTFT predicted for the
    /// last of sixteen is about two steps (the running one, then the rest batched), not sixteen
    /// prefills one after another; and the prediction falls back as the queue drains.
    #[test]
    fn queued_small_prefills_are_predicted_batched() {
        let mut cfg = SchedulerConfig::default();
        cfg.disagg.local_prefill_max_tokens = 0;
        cfg.slo.admission = false;
        let cost = cfg.cost.clone();
        let mut s = Scheduler::new(cfg);
        s.add_instance(Role::Prefill, InstanceSpec::default());
        s.add_instance(Role::Decode, InstanceSpec::default());
        let decisions: Vec<_> = (0..16u64)
            .map(|i| {
                s.schedule(&key(512, &[i * 100, i * 100 + 1]), NOW)
                    .expect("pair")
            })
            .collect();
        let transfer = decisions[0].predicted_ttft_ms - cost.prefill_ms(512);
        let last = decisions[15].predicted_ttft_ms - transfer;
        let batched = cost.prefill_ms(512) + cost.prefill_ms(15 * 512);
        assert!((last - batched).abs() < 1e-3, "{last} vs {batched}");
        assert!(last < 16.0 * cost.prefill_ms(512) * 0.6);
        // The first step ends: the other fifteen run as the next step, from now.
        let later = NOW + Duration::from_millis(30);
        s.prefill_done(decisions[0].ticket, later, None);
        let next = s.schedule(&key(512, &[9000, 9001]), later).expect("pair");
        let want = cost.prefill_ms(15 * 512) + cost.prefill_ms(512);
        assert!((next.predicted_ttft_ms - transfer - want).abs() < 1e-3);
    }

    /// Best effort for a prompt late even alone starts only once the fleet shows its prompts
    /// are reused: on a fresh fleet it is refused; after a run of prompts that find their
    /// blocks cached, a new long one is served.
    #[test]
    fn best_effort_waits_for_the_fleet_to_show_reuse() {
        let mut cfg = SchedulerConfig::default();
        cfg.slo.ttft_ms = 60.0; // a 4k-token prefill takes ~85 ms alone
        let mut s = Scheduler::new(cfg);
        s.add_instance(Role::Prefill, InstanceSpec::default());
        s.add_instance(Role::Decode, InstanceSpec::default());
        let long = |first: u64| key(4096, &(first..first + 256).collect::<Vec<_>>());
        let refused = s
            .schedule(&long(1_000), NOW)
            .expect_err("no reuse seen yet");
        assert_eq!(refused.label(), "slo_ttft");
        for _ in 0..150 {
            let d = s.schedule(&key(64, &[7, 8, 9, 10]), NOW).expect("short");
            s.decode_done(d.ticket, NOW);
        }
        let served = s.schedule(&long(2_000), NOW).expect("best effort");
        assert!(served.late && served.predicted_ttft_ms > 60.0);
    }

    #[test]
    fn removing_an_instance_frees_its_index_entries_and_load() {
        let mut s = sched(PolicyKind::LeastLoad);
        let p = s.add_instance(Role::Prefill, InstanceSpec::default());
        let d = s.add_instance(Role::Decode, InstanceSpec::default());
        let d2 = s.add_instance(Role::Decode, InstanceSpec::default());
        let blocks: Vec<BlockHash> = (0..1000).map(BlockHash).collect();
        s.blocks_stored(d, &blocks, NOW);
        s.blocks_stored(d2, &blocks[..10], NOW);
        let before = s.index_bytes();
        let dec = s.schedule(&key(40, &[5000, 5001]), NOW).expect("pair");
        assert!(s.index_bytes() > before, "routing recorded blocks");
        s.remove_instance(dec.decode);
        s.remove_instance(p);
        let left = s.index_bytes();
        let kept = if dec.decode == d { 10 } else { 1000 };
        assert_eq!(
            left,
            kept * crate::index::BYTES_PER_ENTRY,
            "only the survivor's entries"
        );
        assert_eq!(s.load(dec.decode), None);
        assert_eq!(s.healthy_counts(), (0, 1));
        // The request in flight on the removed pair ends without touching the survivor.
        s.decode_done(dec.ticket, NOW);
        assert_eq!(s.in_flight(), 0);
        let survivor = if dec.decode == d { d2 } else { d };
        assert_eq!(s.load(survivor), Some(InstanceLoad::default()));
    }

    #[test]
    fn a_host_tier_widens_the_index_but_not_the_kv_pool() {
        let mut s = sched(PolicyKind::LeastLoad);
        let p = s.add_instance(Role::Prefill, InstanceSpec::default());
        let report = EngineReport {
            waiting: 0,
            running: 0,
            kv_usage: 0.0,
        };
        let blocks: Vec<BlockHash> = (0..100).map(BlockHash).collect();
        s.blocks_stored(p, &blocks, NOW);
        s.observe_engine_tiers(p, report, Some(40), 50);
        assert_eq!(
            s.index_blocks_of(p),
            90,
            "GPU and host tiers both remembered"
        );
        assert_eq!(s.capacity_blocks(p), Some(40), "the pool is the GPU's");
        s.observe_engine(p, report, Some(40));
        assert_eq!(s.index_blocks_of(p), 40, "without the tier, the GPU's size");
    }

    #[test]
    fn routing_decisions_feed_the_index() {
        let mut s = sched(PolicyKind::CacheAware);
        let p0 = s.add_instance(Role::Prefill, InstanceSpec::default());
        let p1 = s.add_instance(Role::Prefill, InstanceSpec::default());
        s.add_instance(Role::Decode, InstanceSpec::default());
        let first = s.schedule(&key(64, &[1, 2, 3, 4]), NOW).expect("pair");
        let again = s.schedule(&key(80, &[1, 2, 3, 4, 5]), NOW).expect("pair");
        assert_eq!(
            first.prefill, again.prefill,
            "the second request follows its cached prefix"
        );
        assert_eq!(again.cached_blocks, 4);
        assert!([Some(p0), Some(p1)].contains(&first.prefill));
        assert!(s.index_bytes() > 0);
    }

    #[test]
    fn unhealthy_and_avoided_instances_are_never_chosen() {
        let mut s = sched(PolicyKind::RoundRobin);
        let p0 = s.add_instance(Role::Prefill, InstanceSpec::default());
        let p1 = s.add_instance(Role::Prefill, InstanceSpec::default());
        let d0 = s.add_instance(Role::Decode, InstanceSpec::default());
        s.set_healthy(p0, false);
        for _ in 0..5 {
            assert_eq!(
                s.schedule(&key(1, &[]), NOW).expect("pair").prefill,
                Some(p1)
            );
        }
        assert_eq!(
            s.schedule_avoiding(&key(1, &[]), NOW, &[p1]),
            Err(Rejection::NoHealthy(Role::Prefill))
        );
        s.set_healthy(d0, false);
        s.set_healthy(p0, true);
        assert_eq!(
            s.schedule(&key(1, &[]), NOW),
            Err(Rejection::NoHealthy(Role::Decode))
        );
        assert_eq!(s.healthy_counts(), (2, 0));
    }

    #[test]
    fn conditional_disaggregation_prefills_on_decode() {
        let mut cfg = SchedulerConfig {
            policy: PolicyKind::LeastLoad,
            ..SchedulerConfig::default()
        };
        cfg.disagg.local_prefill_max_tokens = 32;
        let mut s = Scheduler::new(cfg);
        let p = s.add_instance(Role::Prefill, InstanceSpec::default());
        let d = s.add_instance(Role::Decode, InstanceSpec::default());
        let short = s.schedule(&key(20, &[1]), NOW).expect("pair");
        assert_eq!(short.prefill, None, "20 uncached tokens: no handoff");
        assert_eq!(
            s.load(d).unwrap().prefill_tokens,
            20,
            "decode does the prefill work"
        );
        let long = s.schedule(&key(400, &[7; 25]), NOW).expect("pair");
        assert_eq!(long.prefill, Some(p));
        // Decode now holds blocks 1..: a follow-up mostly cached there stays local.
        s.blocks_stored(d, &(100..125).map(BlockHash).collect::<Vec<_>>(), NOW);
        let follow = s
            .schedule(&key(410, &(100..125).collect::<Vec<_>>()), NOW)
            .expect("pair");
        assert_eq!((follow.prefill, follow.cached_blocks), (None, 25));
    }

    #[test]
    fn measured_prefill_speed_and_bandwidth_correct_the_prior() {
        let mut s = sched(PolicyKind::Slo);
        s.add_instance(Role::Prefill, InstanceSpec::default());
        s.add_instance(Role::Decode, InstanceSpec::default());
        let k = key(2048, &[]);
        let first = s.schedule(&k, NOW).expect("pair");
        for _ in 0..30 {
            let d = s.schedule(&k, NOW).expect("pair");
            // Twice as slow as modelled, and transfers at 0.5 GB/s.
            s.prefill_done(
                d.ticket,
                NOW,
                Some(Observed {
                    prefill_ms: 2.0 * 58.0,
                    transfer_ms: 2048.0 * 8192.0 / 0.5e6,
                    kv_bytes: 2048 * 8192,
                    ..Observed::default()
                }),
            );
            s.decode_done(d.ticket, NOW);
        }
        s.decode_done(first.ticket, NOW);
        let later = s.schedule(&k, NOW).expect("pair");
        assert!(
            later.predicted_ttft_ms > 1.5 * first.predicted_ttft_ms,
            "{} vs {}",
            later.predicted_ttft_ms,
            first.predicted_ttft_ms
        );
    }

    #[test]
    fn a_queued_holder_is_pulled_from_and_its_link_carries_the_load() {
        let mut s = pulling();
        let hot = s.add_instance(Role::Prefill, InstanceSpec::default());
        let cold = s.add_instance(Role::Prefill, InstanceSpec::default());
        s.add_instance(Role::Decode, InstanceSpec::default());
        let prefix: Vec<u64> = (1..=500).collect();
        s.blocks_stored(
            hot,
            &prefix.iter().copied().map(BlockHash).collect::<Vec<_>>(),
            NOW,
        );
        // 8,192-token prompts sharing a 500-block prefix cached on `hot` only; each books a
        // 192-token prefill there until its queue outweighs a 35 ms pull.
        let mut pulled = Vec::new();
        for r in 0..40u64 {
            let mut blocks = prefix.clone();
            blocks.extend((0..12).map(|i| 10_000 + 100 * r + i));
            let d = s.schedule(&key(8192, &blocks), NOW).expect("admitted");
            if let Some(p) = d.pull {
                assert_eq!((d.prefill, p.from, p.upto_blocks), (Some(cold), hot, 500));
                assert_eq!(d.cached_blocks, 0, "cold held nothing before");
                pulled.push(d.predicted_ttft_ms);
            }
        }
        assert!(!pulled.is_empty(), "the hot queue makes a pull pay");
        // Each pull books 65.5 MB on hot's link at 2 GB/s: the next one waits behind it.
        assert!(pulled.windows(2).all(|w| w[1] >= w[0]), "{pulled:?}");
        // Pulls off: the same state recomputes instead.
        s.cfg.reuse.pull = false;
        let d = s
            .schedule(&key(8192, &(1..=512).collect::<Vec<_>>()), NOW)
            .expect("admitted");
        assert_eq!(d.pull, None);
    }

    #[test]
    fn a_decode_that_caches_the_prefix_is_a_pull_source() {
        let mut s = pulling();
        let p = s.add_instance(Role::Prefill, InstanceSpec::default());
        let d = s.add_instance(Role::Decode, InstanceSpec::default());
        // The decode kept an earlier turn's 500 blocks (KV it received); the prefill has none.
        let history: Vec<u64> = (1..=500).collect();
        let stored: Vec<BlockHash> = history.iter().copied().map(BlockHash).collect();
        s.blocks_stored(d, &stored, NOW);
        let mut turn = history.clone();
        turn.extend(600..612);
        let dec = s.schedule(&key(8192, &turn), NOW).expect("admitted");
        assert_eq!(dec.prefill, Some(p));
        let pull = dec.pull.expect("35 ms of pull beats ~170 ms of recompute");
        assert_eq!((pull.from, pull.upto_blocks), (d, 500));
        s.set_healthy(d, false);
        s.add_instance(Role::Decode, InstanceSpec::default());
        let dec = s.schedule(&key(8192, &turn), NOW).expect("admitted");
        assert_eq!(dec.pull, None, "an unhealthy holder is not pulled from");
    }

    #[test]
    fn a_pair_never_measured_is_priced_at_what_pulls_have_cost() {
        let mut s = sched(PolicyKind::Slo);
        let a = s.add_instance(Role::Prefill, InstanceSpec::default());
        let b = s.add_instance(Role::Prefill, InstanceSpec::default());
        let c = s.add_instance(Role::Decode, InstanceSpec::default());
        let handoff = s.pair_bandwidth(a, b);
        assert!((handoff - s.cfg.cost.prior_bytes_per_ms()).abs() < 1e-6);
        // One pull a→b moved 32 MB in 64 ms: 0.5 GB/s, a quarter of the handoff prior.
        s.pull_observed(a, b, 32_000_000, 64.0);
        assert!(
            (s.pair_bandwidth(c, b) - 500_000.0).abs() < 1e-6,
            "c→b: the fleet's pulls"
        );
        // The measured pair moved a fifth of the way from its prior (the handoff) to the sample.
        let ab = s.pair_bandwidth(a, b);
        assert!(
            (ab - (0.8 * handoff + 0.2 * 500_000.0)).abs() < 1e-3,
            "{ab}"
        );
        // A pair first measured now starts from the fleet's figure, not the handoff's.
        s.pull_observed(c, a, 32_000_000, 64.0);
        assert!((s.pair_bandwidth(c, a) - 500_000.0).abs() < 1e-6);
    }

    #[test]
    fn kv_freed_since_the_engines_last_report_is_free_at_once() {
        let mut s = sched(PolicyKind::Slo);
        s.add_instance(Role::Prefill, InstanceSpec::default());
        let d = s.add_instance(Role::Decode, InstanceSpec::default());
        let report = |kv_usage| EngineReport {
            waiting: 0,
            running: 1,
            kv_usage,
        };
        // A 1,000-block pool; one request books 64 blocks (1,000 prompt + 16 output tokens).
        let first = s.schedule(&key(1000, &[1]), NOW).expect("admitted");
        s.observe_engine(d, report(1.0), Some(1000));
        assert_eq!(
            s.load(d).map(|l| l.foreign_blocks),
            Some(936),
            "the engine uses 936 blocks the gateway did not book"
        );
        assert_eq!(
            s.schedule(&key(1000, &[2]), NOW).map(|_| ()),
            Err(Rejection::KvFull)
        );
        // The engine's own work shrinks to 10 blocks while ours still runs, then ours ends:
        // the next report is not needed to use its 63 blocks again.
        s.observe_engine(d, report(0.0735), Some(1000));
        assert_eq!(s.load(d).map(|l| l.foreign_blocks), Some(10));
        s.decode_done(first.ticket, NOW);
        let big = 990 * 16 - 16; // with its output, fills the 990 blocks left exactly
        assert!(s.schedule(&key(big, &[3]), NOW).is_ok());
    }

    #[test]
    fn a_conversation_stays_on_the_decode_that_holds_its_history_while_its_cache_is_full() {
        let mut cfg = SchedulerConfig::default();
        cfg.disagg.local_prefill_min_hit = 2.0; // hand every prompt over, to see the decode pick
        let mut s = Scheduler::new(cfg);
        s.add_instance(Role::Prefill, InstanceSpec::default());
        let spec = InstanceSpec {
            kv_capacity_blocks: 4096,
            ..InstanceSpec::default()
        };
        let home = s.add_instance(Role::Decode, spec);
        let other = s.add_instance(Role::Decode, spec);
        let fill = |s: &mut Scheduler, id: InstanceId, base: u64| {
            let blocks: Vec<BlockHash> = (base..base + 4096).map(BlockHash).collect();
            s.blocks_stored(id, &blocks, NOW);
        };
        fill(&mut s, other, 1_000_000);
        fill(&mut s, home, 2_000_000);
        let history: Vec<u64> = (1..=600).collect();
        let stored: Vec<BlockHash> = history.iter().copied().map(BlockHash).collect();
        s.blocks_stored(home, &stored, NOW);
        // `home` decodes one more sequence, so its step is slower (by ~0.2 ms a token).
        let busy = s
            .schedule(&key(10_000, &[9_000_000]), NOW)
            .expect("admitted");
        let busy_on = busy.decode;
        assert_eq!(busy_on, home, "a tie goes to the lower id");
        let mut turn = history.clone();
        turn.extend(700..740);
        let dec = s.schedule(&key(10_240, &turn), NOW).expect("admitted");
        assert_eq!(
            dec.decode, home,
            "the copy to a full cache costs more than the step"
        );
        // With room in both caches, nothing is evicted by the copy: the faster step wins.
        s.decode_done(dec.ticket, NOW);
        s.blocks_cleared(other);
        s.blocks_cleared(home);
        s.blocks_stored(home, &stored, NOW);
        let dec = s.schedule(&key(10_240, &turn), NOW).expect("admitted");
        assert_ne!(dec.decode, busy_on, "the less loaded decode");
    }

    #[test]
    fn slo_rejection_has_a_label_and_retry_after() {
        let mut cfg = SchedulerConfig::default();
        cfg.slo.ttft_ms = 10.0;
        // Late even alone: refused only because best effort is off.
        cfg.slo.best_effort_share = 0.0;
        let mut s = Scheduler::new(cfg);
        s.add_instance(Role::Prefill, InstanceSpec::default());
        s.add_instance(Role::Decode, InstanceSpec::default());
        let r = s
            .schedule(&key(8000, &[]), NOW)
            .expect_err("too slow for a 10 ms SLO");
        assert_eq!(r.label(), "slo_ttft");
        assert!(r.retry_after_secs() >= 1);
        assert_eq!(s.in_flight(), 0, "a rejection books nothing");
    }

    #[test]
    fn a_synced_booking_books_its_pull_on_the_holders_link() {
        let mut cfg = SchedulerConfig::default();
        cfg.reuse.pull = true;
        cfg.disagg.local_prefill_min_hit = 2.0;
        let (mut a, mut b) = (Scheduler::new(cfg.clone()), Scheduler::new(cfg));
        let prefix: Vec<u64> = (1..=500).collect();
        let cached: Vec<BlockHash> = prefix.iter().copied().map(BlockHash).collect();
        for s in [&mut a, &mut b] {
            for role in [Role::Prefill, Role::Prefill, Role::Decode] {
                s.add_instance(role, InstanceSpec::default());
            }
            s.blocks_stored(InstanceId(0), &cached, NOW);
        }
        let prompt = |r: u64| {
            let mut blocks = prefix.clone();
            blocks.extend((0..12).map(|i| 10_000 + 100 * r + i));
            key(8192, &blocks)
        };
        // Replica `a` routes until it plans a pull; `b` books everything `a` booked.
        let mut pulls = 0;
        for r in 0..40u64 {
            let k = prompt(r);
            let d = a.schedule(&k, NOW).expect("admitted");
            let booking = a.booking(d.ticket, NOW).expect("booked");
            assert_eq!(booking.pull, d.pull);
            b.book_synced(&booking, &k.blocks, NOW);
            pulls += usize::from(d.pull.is_some());
            if pulls == 1 {
                break;
            }
        }
        assert_eq!(pulls, 1, "the hot queue makes a pull pay");
        // Both see the holder's link busy until the same moment.
        let egress = |s: &Scheduler| s.instances.get(InstanceId(0)).map(|i| i.egress_until);
        assert!(egress(&a) > Some(NOW));
        assert_eq!(egress(&a), egress(&b));
    }

    #[test]
    fn a_synced_booking_loads_the_pair_as_the_original_did() {
        let mut a = sched(PolicyKind::Slo);
        let mut b = sched(PolicyKind::Slo);
        for s in [&mut a, &mut b] {
            for role in [Role::Prefill, Role::Prefill, Role::Decode] {
                s.add_instance(role, InstanceSpec::default());
            }
        }
        let k = key(2048, &(1..=128).collect::<Vec<_>>());
        let dec = a.schedule(&k, NOW).expect("pair");
        let booking = a.booking(dec.ticket, NOW).expect("booked");
        let local = b.book_synced(&booking, &k.blocks, NOW);
        for id in (0..3).map(InstanceId) {
            assert_eq!(a.load(id), b.load(id), "{id}");
        }
        // Both now route the same prefix to the same place, and predict the same queue.
        let (da, db) = (
            a.schedule(&k, NOW).expect("pair"),
            b.schedule(&k, NOW).expect("pair"),
        );
        assert_eq!((da.prefill, da.decode), (db.prefill, db.decode));
        assert_eq!(da.predicted_ttft_ms, db.predicted_ttft_ms);
        b.decode_done(db.ticket, NOW);
        b.decode_done(local, NOW);
        assert_eq!(b.in_flight(), 0);
        for id in (0..3).map(InstanceId) {
            assert_eq!(b.load(id), Some(InstanceLoad::default()), "released");
        }
    }

    #[test]
    fn no_herding_on_a_hot_shared_prefix() {
        let mut s = sched(PolicyKind::Slo);
        let ps: Vec<_> = (0..4)
            .map(|_| s.add_instance(Role::Prefill, InstanceSpec::default()))
            .collect();
        for _ in 0..4 {
            s.add_instance(Role::Decode, InstanceSpec::default());
        }
        // 64 requests sharing a 2048-token system prompt, each with its own 512-token tail,
        // arriving together (none finishes): the hot instance's queue must push work elsewhere.
        let mut counts = HashMap::new();
        for r in 0..64u64 {
            let mut blocks: Vec<u64> = (1..=128).collect();
            blocks.extend((0..32).map(|i| 10_000 + r * 100 + i));
            if let Ok(d) = s.schedule(&key(2560, &blocks), NOW) {
                *counts.entry(d.prefill).or_insert(0) += 1;
            }
        }
        let max = counts.values().copied().max().unwrap_or(0);
        let total: i32 = counts.values().sum();
        assert!(total >= 16, "most requests admitted: {counts:?}");
        assert!(counts.len() == ps.len(), "every instance used: {counts:?}");
        assert!(
            max as f64 <= 0.5 * total as f64,
            "no instance takes more than half: {counts:?}"
        );
    }
}
