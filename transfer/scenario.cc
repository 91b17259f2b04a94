#include "transfer/scenario.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "transfer/fragments.h"
#include "transfer/internal/layer_coverage.h"
#include "transfer/page_table.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

absl::Status CheckModel(const ModelSpec& model) {
  if (model.num_layers <= 0 || model.num_kv_heads <= 0 || model.head_size <= 0 ||
      model.element_bytes <= 0 || model.tokens_per_block <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model sizes must be positive: num_layers=", model.num_layers,
                     " num_kv_heads=", model.num_kv_heads, " head_size=", model.head_size,
                     " element_bytes=", model.element_bytes,
                     " tokens_per_block=", model.tokens_per_block));
  }
  const std::vector<int64_t>& state = model.state_layer_ids;
  for (size_t i = 0; i < state.size(); ++i) {
    if (state[i] < 0 || state[i] >= model.num_layers ||
        (i > 0 && state[i] <= state[i - 1]) || model.state_bytes_per_layer == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "state layer ids must increase inside the model, with nonzero state: index=", i,
          " layer=", state[i], " num_layers=", model.num_layers,
          " state_bytes_per_layer=", model.state_bytes_per_layer));
    }
  }
  std::vector<absl::Span<const int64_t>> groups;
  for (size_t g = 0; g < model.groups.size(); ++g) {
    const std::vector<int64_t>& ids = model.groups[g].global_layer_ids;
    if (ids.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("group holds no layer: group=", g));
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] < 0 || ids[i] >= model.num_layers || (i > 0 && ids[i] <= ids[i - 1])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "group layer ids must increase inside the model: group=", g, " index=", i,
            " layer=", ids[i], " num_layers=", model.num_layers));
      }
    }
    groups.push_back(ids);
  }
  return transfer_internal::CheckLayerCoverage(0, model.num_layers, groups, state);
}

// Every list of a slice is a list of slot ids: one per model group, none negative.
absl::Status CheckSlice(const ModelSpec& model, const KVSlice& slice, const char* side,
                        int64_t request_id) {
  const std::vector<BlockList>& lists = slice.block_ids_per_layer_group;
  if (lists.size() != model.groups.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(side, " slice needs one block list per group: request=", request_id,
                     " lists=", lists.size(), " groups=", model.groups.size()));
  }
  for (size_t g = 0; g < lists.size(); ++g) {
    for (size_t i = 0; i < lists[g].size(); ++i) {
      if (lists[g][i] < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(side, " slice holds a negative block id: request=", request_id,
                         " group=", g, " index=", i, " block=", lists[g][i]));
      }
    }
  }
  return absl::OkStatus();
}

// Just enough slots for every id the instance's slice names (CheckSlice has
// rejected negative ids) and its state slot. An id of 2^63-1 leaves no count.
absl::StatusOr<int64_t> SlotsFor(const InstanceSpec& instance, const KVSlice& slice,
                                 std::optional<int64_t> state_slot, const char* side,
                                 int64_t request_id) {
  if (instance.num_slots > 0) return instance.num_slots;
  constexpr int64_t kLargest = std::numeric_limits<int64_t>::max();
  if (state_slot && *state_slot == kLargest) {
    return absl::OutOfRangeError(
        absl::StrCat(side, " state slot leaves no default slot count: request=", request_id,
                     " state_slot=", *state_slot));
  }
  int64_t slots = 1;
  if (state_slot) slots = std::max(slots, *state_slot + 1);
  const std::vector<BlockList>& lists = slice.block_ids_per_layer_group;
  for (size_t g = 0; g < lists.size(); ++g) {
    for (size_t i = 0; i < lists[g].size(); ++i) {
      const int64_t id = lists[g][i];
      if (id == kLargest) {
        return absl::OutOfRangeError(
            absl::StrCat(side, " block id leaves no default slot count: request=",
                         request_id, " group=", g, " index=", i, " block=", id));
      }
      slots = std::max(slots, id + 1);
    }
  }
  return slots;
}

// Bounds are checked in saturating arithmetic: past int64 is as over as any.
int64_t SaturatingMul(int64_t a, int64_t b) {
  int64_t product = 0;
  return __builtin_mul_overflow(a, b, &product) ? std::numeric_limits<int64_t>::max()
                                                : product;
}
int64_t SaturatingAdd(int64_t a, int64_t b) {
  int64_t sum = 0;
  return __builtin_add_overflow(a, b, &sum) ? std::numeric_limits<int64_t>::max() : sum;
}

int64_t Ranks(const Topology& topology) { return topology.tp_size * topology.pp_size; }

// The layout entries of one instance's page tables (ScenarioLimits), before they
// are built: each rank one per group and PP stage, each layer (and state layer)
// once per TP rank. REQUIRES: a valid topology.
int64_t InstanceEntries(const ModelSpec& model, const Topology& topology) {
  const int64_t per_rank = SaturatingAdd(static_cast<int64_t>(model.groups.size()),
                                         topology.pp_size);
  const int64_t layers =
      SaturatingAdd(model.num_layers, static_cast<int64_t>(model.state_layer_ids.size()));
  return SaturatingAdd(SaturatingMul(Ranks(topology), per_rank),
                       SaturatingMul(topology.tp_size, layers));
}

// The same count for one built table: what planning a rank pair reads.
int64_t TableEntries(const RankPageTable& table) {
  int64_t entries = static_cast<int64_t>(table.attention_groups.size() +
                                         table.topology.layers_per_pp_rank.size());
  for (const AttentionGroup& group : table.attention_groups) {
    entries += static_cast<int64_t>(group.global_layer_ids.size());
  }
  for (const StateGroup& group : table.state_groups) {
    entries += static_cast<int64_t>(group.global_layer_ids.size());
  }
  return entries;
}

// Checks both instances' sizes against `limits` before any table is built.
absl::Status CheckInstanceBounds(const Scenario& scenario) {
  const ScenarioLimits& limits = scenario.limits;
  for (const Topology* t : {&scenario.context.topology, &scenario.generation.topology}) {
    Topology first_rank = *t;
    first_rank.tp_rank = 0;
    first_rank.pp_rank = 0;
    if (absl::Status s = ValidateTopology(first_rank); !s.ok()) return s;
  }
  const Topology& c = scenario.context.topology;
  const Topology& g = scenario.generation.topology;
  const int64_t entries = SaturatingAdd(InstanceEntries(scenario.model, c),
                                        InstanceEntries(scenario.model, g));
  if (entries > limits.max_layout_entries) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "scenario page tables exceed the layout bound: layout_entries=", entries,
        " max_layout_entries=", limits.max_layout_entries, " context_ranks=", Ranks(c),
        " generation_ranks=", Ranks(g), " groups=", scenario.model.groups.size(),
        " num_layers=", scenario.model.num_layers));
  }
  const int64_t rank_pairs = Ranks(c) * Ranks(g);  // each <= kMaxInstanceRanks
  if (rank_pairs > limits.max_rank_pairs_examined) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "scenario examines too many rank pairs: rank_pairs=", rank_pairs,
        " max_rank_pairs_examined=", limits.max_rank_pairs_examined,
        " context_ranks=", Ranks(c), " generation_ranks=", Ranks(g)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<RankPageTable>> BuildInstance(const ModelSpec& model,
                                                         const InstanceSpec& instance,
                                                         int64_t num_slots) {
  std::vector<RankPageTable> tables;
  Topology rank = instance.topology;
  for (int64_t pp = 0; pp < rank.pp_size; ++pp) {
    for (int64_t tp = 0; tp < rank.tp_size; ++tp) {
      rank.pp_rank = pp;
      rank.tp_rank = tp;
      // Any base works: plans are pool-relative. A nonzero one catches code that
      // confuses offsets with addresses.
      absl::StatusOr<RankPageTable> table =
          BuildStandardPageTable(model, rank, num_slots, uint64_t{1} << 40);
      if (!table.ok()) return table.status();
      tables.push_back(*std::move(table));
    }
  }
  return tables;
}

}  // namespace

std::vector<int64_t> AllLayers(int64_t num_layers) {
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < num_layers; ++i) ids.push_back(i);
  return ids;
}

absl::StatusOr<RankPageTable> BuildStandardPageTable(const ModelSpec& model,
                                                     const Topology& topology,
                                                     int64_t num_slots,
                                                     uint64_t base_address) {
  if (absl::Status s = CheckModel(model); !s.ok()) return s;
  if (absl::Status s = ValidateTopology(topology); !s.ok()) return s;
  if (TotalLayers(topology) != model.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pp layer split disagrees with the model: num_layers=", model.num_layers,
        " split_layers=", TotalLayers(topology)));
  }
  if (num_slots <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_slots must be positive: num_slots=", num_slots));
  }
  absl::StatusOr<HeadShard> shard =
      TpHeadShard(topology, HeadModel{model.num_kv_heads, model.is_mla});
  if (!shard.ok()) return shard.status();
  RankPageTable table;
  table.tokens_per_block = model.tokens_per_block;
  table.head_size = model.head_size;
  table.element_bytes = model.element_bytes;
  table.num_kv_heads = model.num_kv_heads;
  table.is_mla = model.is_mla;
  table.topology = topology;
  const Span span = PpLayerSpan(topology);
  // Sizes come from the caller's model: check every product and sum.
  bool overflow = false;
  auto mul = [&overflow](uint64_t a, uint64_t b) {
    uint64_t product = 0;
    overflow |= __builtin_mul_overflow(a, b, &product);
    return product;
  };
  const uint64_t buffer_bytes =
      mul(mul(mul(shard->heads.size(), model.tokens_per_block), model.head_size),
          model.element_bytes);
  const uint64_t buffers_per_layer = model.is_mla ? 1 : 2;
  uint64_t cursor = base_address;
  for (const GroupSpec& spec : model.groups) {
    AttentionGroup group;
    group.window = spec.window;
    group.kv_heads_per_rank = shard->heads.size();
    group.view.pool_index = static_cast<int64_t>(table.pools.size());
    for (int64_t id : spec.global_layer_ids) {
      if (id < span.first || id >= span.end) continue;
      const uint64_t k =
          mul(mul(group.global_layer_ids.size(), buffers_per_layer), buffer_bytes);
      group.global_layer_ids.push_back(id);
      group.view.layers.push_back(LayerBuffers{k, k + buffer_bytes});
    }
    const uint64_t slot_bytes = std::max<uint64_t>(
        1, mul(mul(group.global_layer_ids.size(), buffers_per_layer), buffer_bytes));
    table.pools.push_back(Pool{cursor, slot_bytes, num_slots, PoolRole::kKVCache});
    overflow |= __builtin_add_overflow(cursor, mul(slot_bytes, num_slots), &cursor);
    table.attention_groups.push_back(std::move(group));
  }
  StateGroup state;
  for (int64_t id : model.state_layer_ids) {
    if (id < span.first || id >= span.end) continue;
    state.layers.push_back(
        StateBuffer{mul(state.global_layer_ids.size(), model.state_bytes_per_layer),
                    model.state_bytes_per_layer});
    state.global_layer_ids.push_back(id);
  }
  if (!state.global_layer_ids.empty()) {
    const uint64_t slot_bytes =
        mul(state.global_layer_ids.size(), model.state_bytes_per_layer);
    state.pool_index = static_cast<int64_t>(table.pools.size());
    table.pools.push_back(Pool{cursor, slot_bytes, num_slots, PoolRole::kMambaState});
    overflow |= __builtin_add_overflow(cursor, mul(slot_bytes, num_slots), &cursor);
    table.state_groups.push_back(std::move(state));
  }
  if (overflow) {
    return absl::InvalidArgumentError(absl::StrCat(
        "standard layout does not fit 64-bit addresses: num_layers=", model.num_layers,
        " num_kv_heads=", model.num_kv_heads, " head_size=", model.head_size,
        " num_slots=", num_slots, " base=", base_address));
  }
  if (absl::Status s = ValidatePageTable(table); !s.ok()) return s;
  return table;
}

absl::StatusOr<ScenarioPlan> PlanScenario(const Scenario& scenario,
                                          const KVSlice& context_slice,
                                          const KVSlice& generation_slice) {
  const ModelSpec& model = scenario.model;
  const ScenarioRequest& request = scenario.request;
  if (absl::Status s = CheckModel(model); !s.ok()) return s;
  if (request.prompt_len < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt length must not be negative: prompt_len=", request.prompt_len));
  }
  if (absl::Status s = CheckSlice(model, context_slice, "context", request.request_id);
      !s.ok()) {
    return s;
  }
  if (absl::Status s =
          CheckSlice(model, generation_slice, "generation", request.request_id);
      !s.ok()) {
    return s;
  }
  PairingOptions options;
  options.tokens_per_block = model.tokens_per_block;
  options.prompt_len = request.prompt_len;
  options.request_id = request.request_id;
  for (const GroupSpec& group : model.groups) options.windows.push_back(group.window);
  absl::StatusOr<std::vector<GroupPairing>> pairings =
      PairSliceBlocks(context_slice, generation_slice, options);
  if (!pairings.ok()) return pairings.status();

  if (absl::Status s = CheckInstanceBounds(scenario); !s.ok()) return s;
  const ScenarioLimits& limits = scenario.limits;
  if (scenario.max_fragments_listed && *scenario.max_fragments_listed < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_fragments_listed must not be negative: max_fragments_listed=",
                     *scenario.max_fragments_listed));
  }

  ScenarioPlan result;
  absl::StatusOr<int64_t> context_slots =
      SlotsFor(scenario.context, context_slice, request.context_state_slot, "context",
               request.request_id);
  if (!context_slots.ok()) return context_slots.status();
  absl::StatusOr<int64_t> generation_slots =
      SlotsFor(scenario.generation, generation_slice, request.generation_state_slot,
               "generation", request.request_id);
  if (!generation_slots.ok()) return generation_slots.status();
  absl::StatusOr<std::vector<RankPageTable>> context_tables =
      BuildInstance(model, scenario.context, *context_slots);
  if (!context_tables.ok()) return context_tables.status();
  absl::StatusOr<std::vector<RankPageTable>> generation_tables =
      BuildInstance(model, scenario.generation, *generation_slots);
  if (!generation_tables.ok()) return generation_tables.status();
  result.context_tables = *std::move(context_tables);
  result.generation_tables = *std::move(generation_tables);

  const HeadModel heads{model.num_kv_heads, model.is_mla};
  const DpRanks dp{request.context_dp_rank, request.generation_dp_rank};
  PlanContext context;
  context.request_id = request.request_id;
  context.src_state_slot = request.context_state_slot;
  context.dst_state_slot = request.generation_state_slot;
  // What the tables took; each planned pair adds what its planner reads.
  int64_t entries = 0;
  for (const auto* tables : {&result.context_tables, &result.generation_tables}) {
    for (const RankPageTable& table : *tables) entries += TableEntries(table);
  }
  int64_t fragments_held = 0;
  for (size_t c = 0; c < result.context_tables.size(); ++c) {
    const RankPageTable& sender = result.context_tables[c];
    absl::StatusOr<std::vector<PeerLink>> links = ComputePeerOverlap(
        sender.topology, scenario.generation.topology, heads, Direction::kSend, dp);
    if (!links.ok()) return links.status();
    for (const PeerLink& link : *links) {
      const RankPageTable& receiver = result.generation_tables[link.peer_rank];
      if (static_cast<int64_t>(result.pairs.size()) >= limits.max_rank_pairs_planned) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "scenario plans too many rank pairs: max_rank_pairs_planned=",
            limits.max_rank_pairs_planned, " context_rank=", c,
            " generation_rank=", link.peer_rank));
      }
      entries = SaturatingAdd(entries, TableEntries(sender) + TableEntries(receiver));
      if (entries > limits.max_layout_entries) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "scenario rank pairs exceed the layout bound: layout_entries=", entries,
            " max_layout_entries=", limits.max_layout_entries,
            " pairs_planned=", result.pairs.size(), " context_rank=", c,
            " generation_rank=", link.peer_rank));
      }
      absl::StatusOr<FragmentPlanner> planner = FragmentPlanner::Create(sender, receiver);
      if (!planner.ok()) {
        return absl::Status(planner.status().code(),
                            absl::StrCat(planner.status().message(), " context_rank=", c,
                                         " generation_rank=", link.peer_rank));
      }
      RankPairPlan pair;
      pair.context_rank = static_cast<int64_t>(c);
      pair.generation_rank = link.peer_rank;
      pair.writes = planner->writes();
      for (size_t g = 0; g < model.groups.size(); ++g) {
        pair.group_kinds.push_back(planner->group_kind(g));
      }
      // List what was asked for, but at most one past what the bound leaves: an
      // over-long list is seen, and refused, holding no more than the bound.
      const int64_t room = limits.max_fragments_held - fragments_held;
      const int64_t wanted =
          scenario.max_fragments_listed.value_or(std::numeric_limits<int64_t>::max());
      absl::StatusOr<PlanCounts> counts = planner->Count(
          *pairings, context, static_cast<size_t>(std::min(wanted, SaturatingAdd(room, 1))),
          &pair.plan.fragments);
      if (!counts.ok()) {
        return absl::Status(counts.status().code(),
                            absl::StrCat(counts.status().message(), " context_rank=", c,
                                         " generation_rank=", link.peer_rank));
      }
      const int64_t listed = std::min(wanted, counts->fragments_after_coalescing);
      if (listed > room) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "scenario plan would hold too many fragments: fragments_held=",
            SaturatingAdd(fragments_held, listed),
            " max_fragments_held=", limits.max_fragments_held, " context_rank=", c,
            " generation_rank=", link.peer_rank,
            " (list fewer per pair with max_fragments_listed)"));
      }
      fragments_held += listed;
      pair.plan.fragments_before_coalescing = counts->fragments_before_coalescing;
      pair.plan.total_bytes = counts->total_bytes;
      pair.fragments_after_coalescing = counts->fragments_after_coalescing;
      if (__builtin_add_overflow(result.fragments_before_coalescing,
                                 counts->fragments_before_coalescing,
                                 &result.fragments_before_coalescing) ||
          __builtin_add_overflow(result.fragments_after_coalescing,
                                 counts->fragments_after_coalescing,
                                 &result.fragments_after_coalescing) ||
          __builtin_add_overflow(result.total_bytes, counts->total_bytes,
                                 &result.total_bytes)) {
        return absl::OutOfRangeError(absl::StrCat(
            "scenario totals overflow 64 bits: request=", request.request_id,
            " context_rank=", c, " generation_rank=", link.peer_rank,
            " total_bytes=", result.total_bytes, " pair_bytes=", counts->total_bytes));
      }
      result.pairs.push_back(std::move(pair));
    }
  }
  return result;
}

}  // namespace kvx::transfer
