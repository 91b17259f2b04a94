// File: transfer/scenario.h
//
// A whole transfer in one value, for tools and tests: a model, the sharding of the
// context and generation instances and one request; PlanScenario takes both
// sides' already-built slices (SEMANTICS.md section 4 is cache_reuse::BuildSlice's
// job, above this package), lays out every rank's KV cache in the standard layout,
// pairs the blocks (section 5) and plans, for every (context rank, generation rank)
// pair that overlaps, the fragments before and after coalescing. This is the entry
// point of `kvplan fragments`: the tool builds the slices through the reuse
// adapters, turns JSON into a Scenario and the ScenarioPlan back into JSON.
//
// Standard layout: one pool per attention group; a slot holds the group's local
// layers in order, each as K then V (MLA: the latent only), each buffer
// [head][token-in-block][dim]. A group with no layer on a rank gets a one-byte
// placeholder slot. State layers, when the rank holds any, get one more pool
// (role kMambaState) whose slot holds each local state layer's bytes in order.
//
// Example: Llama-70B-like, TP4 context to TP8 generation, 8k-token prompt.
//
//   Scenario s;
//   s.model.num_layers = 80;
//   s.model.num_kv_heads = 8;
//   s.model.head_size = 128;
//   s.model.element_bytes = 2;
//   s.model.tokens_per_block = 32;
//   s.model.groups = {GroupSpec{std::nullopt, AllLayers(80)}};
//   s.context.topology = MakeTopology(4, {80});
//   s.generation.topology = MakeTopology(8, {80});
//   s.request.prompt_len = 8192;
//   KVSlice slice;  // both sides: blocks 0..255 of the 8192-token prompt
//   slice.token_range = TokenRange::Create(0, 8192).value();
//   slice.block_ids_per_layer_group = {AllLayers(256)};  // ids 0, 1, ..., 255
//   slice.is_last_slice = true;
//   absl::StatusOr<ScenarioPlan> plan = PlanScenario(s, slice, slice);
//   // plan->pairs: 8 pairs (each context rank writes two generation ranks).
//
// Thread safety: pure functions over plain values.

#ifndef KVX_TRANSFER_SCENARIO_H_
#define KVX_TRANSFER_SCENARIO_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/status/statusor.h"
#include "transfer/fragments.h"
#include "transfer/page_table.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::transfer {

// One attention layer group of the model.
struct GroupSpec {
  std::optional<int64_t> window;          // tokens; nullopt for full attention
  std::vector<int64_t> global_layer_ids;  // strictly increasing
};

// The model as both instances hold it. Every layer is in exactly one group, except
// state layers, which may be in none; no group is empty.
struct ModelSpec {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t head_size = 0;
  int64_t element_bytes = 0;
  int64_t tokens_per_block = 0;
  bool is_mla = false;
  std::vector<GroupSpec> groups;
  // Mamba-style layers with per-request state (strictly increasing) and the state
  // bytes of one layer on one rank. Planned only between alike-sharded instances
  // (FragmentPlanner: equal TP sizes, or attention DP on both).
  std::vector<int64_t> state_layer_ids;
  uint64_t state_bytes_per_layer = 0;
};

// {0, 1, ..., num_layers - 1}.
std::vector<int64_t> AllLayers(int64_t num_layers);

// The standard-layout page table of the rank at `topology`'s tp/pp position, with
// `num_slots` slots per pool and pools placed back to back from `base_address`.
// Errors: InvalidArgument for a malformed model or topology (the layer counts
// disagree, a group's ids are not increasing in [0, num_layers)), and whatever
// ValidatePageTable finds in the result.
ABSL_MUST_USE_RESULT absl::StatusOr<RankPageTable> BuildStandardPageTable(
    const ModelSpec& model, const Topology& topology, int64_t num_slots,
    uint64_t base_address);

// One instance: its sharding (tp_rank/pp_rank ignored) and slots per pool.
struct InstanceSpec {
  Topology topology;
  // Slots per pool; 0: just enough for the largest block id of the instance's
  // slice (and its state slot), at least 1.
  int64_t num_slots = 0;
};

// One request as both sides hold it. Its block lists are the slices given to
// PlanScenario, the same on every rank of an instance.
struct ScenarioRequest {
  int64_t request_id = 0;
  int64_t prompt_len = 0;
  // The request's DP rank on each side (used with attention_dp only).
  int64_t context_dp_rank = 0;
  int64_t generation_dp_rank = 0;
  // The request's state slot on each side; state moves only when both are set.
  std::optional<int64_t> context_state_slot;
  std::optional<int64_t> generation_state_slot;
};

// What one PlanScenario call may build, checked before it builds it: a scenario
// past a bound is refused with ResourceExhausted naming the bound and the numbers,
// never half-built in memory. The defaults hold one call to a few hundred MiB and
// about a second, far past any deployment (TP8 x PP8 to TP8 x PP8 of an 80-layer
// model is about 20k layout entries and 8k rank pairs).
struct ScenarioLimits {
  // Page-table entries: each rank of either instance counts one per model group
  // and PP stage and one per layer (and state layer) it holds; each planned rank
  // pair counts again the entries of both its ranks' tables (what its planner reads).
  int64_t max_layout_entries = int64_t{1} << 21;
  // context ranks x generation ranks, each pair examined for overlap.
  int64_t max_rank_pairs_examined = int64_t{1} << 22;
  // Overlapping rank pairs planned, each a RankPairPlan.
  int64_t max_rank_pairs_planned = int64_t{1} << 20;
  // Fragments held in the RankPairPlan lists, over all pairs (40 bytes each).
  int64_t max_fragments_held = int64_t{1} << 22;
};

struct Scenario {
  ModelSpec model;
  InstanceSpec context;
  InstanceSpec generation;
  ScenarioRequest request;
  // Fragments each rank pair keeps in RankPairPlan::plan.fragments: the first ones of
  // its plan; the counts and bytes always cover the whole plan, computed without
  // building the rest (FragmentPlanner::Count). nullopt: every fragment. 0: counts only.
  std::optional<int64_t> max_fragments_listed;
  ScenarioLimits limits;
};

// The plan of one overlapping (context rank, generation rank) pair.
struct RankPairPlan {
  int64_t context_rank = 0;  // pp_rank * tp_size + tp_rank
  int64_t generation_rank = 0;
  bool writes = false;                  // false: a replica's empty write, still reported
  std::vector<MapperKind> group_kinds;  // per attention group
  // plan.fragments: every fragment, or the first Scenario::max_fragments_listed;
  // plan.fragments_before_coalescing and plan.total_bytes cover the whole plan.
  FragmentPlan plan;
  int64_t fragments_after_coalescing = 0;  // of the whole plan, listed or not
};

struct ScenarioPlan {
  std::vector<RankPageTable> context_tables;     // per context rank
  std::vector<RankPageTable> generation_tables;  // per generation rank
  std::vector<RankPairPlan> pairs;               // overlapping pairs, rank order
  int64_t fragments_before_coalescing = 0;
  int64_t fragments_after_coalescing = 0;
  uint64_t total_bytes = 0;
};

// Plans the whole scenario for one slice: `context_slice` is what the context
// side sends, `generation_slice` the generation side's request data (its suffix
// lists, shorter by its cached prefix), both with one list per model group, as
// cache_reuse::BuildSlice builds them (SEMANTICS.md section 4).
// Errors: InvalidArgument for a malformed model (a layer in no group or two), a
// slice whose group count differs from the model's or that holds a negative block
// id (naming side, group and index); ResourceExhausted for a scenario past one of
// scenario.limits; OutOfRange for a block id of 2^63-1 with a default slot count
// and for totals past 64 bits; those of BuildStandardPageTable, PairSliceBlocks,
// FragmentPlanner and ComputePeerOverlap, with the rank pair named (a block id past
// an explicit num_slots is OutOfRange).
ABSL_MUST_USE_RESULT absl::StatusOr<ScenarioPlan> PlanScenario(
    const Scenario& scenario, const KVSlice& context_slice,
    const KVSlice& generation_slice);

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_SCENARIO_H_
