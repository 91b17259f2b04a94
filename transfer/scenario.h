// File: transfer/scenario.h
//
// A whole transfer in one value, for tools and tests: a model, the sharding of the
// context and generation instances and one request; PlanScenario lays out every
// rank's KV cache in the standard layout, builds each side's slice (SEMANTICS.md
// section 4, the generation side with its cached prefix), pairs the blocks
// (section 5) and plans, for every (context rank, generation rank) pair that
// overlaps, the fragments before and after coalescing. This is the entry point of
// `kvplan fragments`: the tool only has to turn JSON into a Scenario and the
// ScenarioPlan back into JSON.
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
//   absl::StatusOr<ScenarioPlan> plan = PlanScenario(s);
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

// The model as both instances hold it.
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
  int64_t num_slots = 0;  // 0: just enough for the identity tables
};

// One request as both sides hold it.
struct ScenarioRequest {
  int64_t request_id = 0;
  int64_t prompt_len = 0;
  // Tokens the generation side already holds (SEMANTICS.md section 3, floored to a
  // block); the context side holds none.
  int64_t generation_cached_tokens = 0;
  // Positional block tables per attention group (entry b holds tokens
  // [b * tpb, (b + 1) * tpb)), the same on every rank of an instance; an empty
  // vector means the identity table 0, 1, ..., cdiv(prompt_len, tpb) - 1.
  std::vector<BlockList> context_tables;
  std::vector<BlockList> generation_tables;
  // The request's DP rank on each side (used with attention_dp only).
  int64_t context_dp_rank = 0;
  int64_t generation_dp_rank = 0;
  // The request's state slot on each side; state moves only when both are set.
  std::optional<int64_t> context_state_slot;
  std::optional<int64_t> generation_state_slot;
};

struct Scenario {
  ModelSpec model;
  InstanceSpec context;
  InstanceSpec generation;
  ScenarioRequest request;
};

// The plan of one overlapping (context rank, generation rank) pair.
struct RankPairPlan {
  int64_t context_rank = 0;  // pp_rank * tp_size + tp_rank
  int64_t generation_rank = 0;
  bool writes = false;                  // false: a replica's empty write, still reported
  std::vector<MapperKind> group_kinds;  // per attention group
  FragmentPlan plan;
};

struct ScenarioPlan {
  std::vector<RankPageTable> context_tables;     // per context rank
  std::vector<RankPageTable> generation_tables;  // per generation rank
  std::vector<RankPairPlan> pairs;               // overlapping pairs, rank order
  int64_t fragments_before_coalescing = 0;
  int64_t fragments_after_coalescing = 0;
  uint64_t total_bytes = 0;
};

// Plans the whole scenario. Errors: those of BuildStandardPageTable,
// PairSliceBlocks, FragmentPlanner and ComputePeerOverlap, with the rank pair
// named; InvalidArgument for a table shorter than the prompt's blocks or with a
// negative id where a block is needed.
ABSL_MUST_USE_RESULT absl::StatusOr<ScenarioPlan> PlanScenario(const Scenario& scenario);

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_SCENARIO_H_
