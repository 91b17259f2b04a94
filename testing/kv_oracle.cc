#include "testing/kv_oracle.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cache_reuse/adapter.h"
#include "cache_reuse/v1_adapter.h"
#include "testing/fake_cache_managers.h"
#include "transfer/fragments.h"
#include "transfer/page_table.h"
#include "transfer/scenario.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::testing {
namespace {

using transfer::RankPageTable;

uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

uint8_t GuardByte(int64_t rank, int64_t pool, uint64_t offset) {
  return static_cast<uint8_t>(Mix((static_cast<uint64_t>(rank) << 48) ^
                                  (static_cast<uint64_t>(pool) << 40) ^ offset ^
                                  0x9e3779b97f4a7c15ULL));
}

// The heads a rank owns, from the model and its position alone (not from the
// planner's topology code): MLA keeps the one latent everywhere, attention DP all
// heads, otherwise heads are split evenly or each replicated tp/heads times.
struct Heads {
  int64_t first = 0;
  int64_t count = 0;
};
Heads OwnedHeads(const transfer::ModelSpec& model, const transfer::Topology& t) {
  if (model.is_mla) return {0, 1};
  if (t.attention_dp) return {0, model.num_kv_heads};
  if (t.tp_size <= model.num_kv_heads) {
    const int64_t per = model.num_kv_heads / t.tp_size;
    return {t.tp_rank * per, per};
  }
  return {t.tp_rank * model.num_kv_heads / t.tp_size, 1};
}

bool Participates(const transfer::Topology& t, int64_t dp_rank) {
  return !t.attention_dp || t.tp_rank == dp_rank;
}

// The positional tables of one side, one per group, identity where not given.
absl::StatusOr<std::vector<transfer::BlockList>> Tables(
    const std::vector<transfer::BlockList>& given, size_t num_groups, int64_t total,
    const char* side) {
  if (!given.empty() && given.size() != num_groups) {
    return absl::InvalidArgumentError(
        absl::StrCat(side, " tables need one entry per group: tables=", given.size(),
                     " groups=", num_groups));
  }
  std::vector<transfer::BlockList> tables;
  for (size_t g = 0; g < num_groups; ++g) {
    if (!given.empty() && !given[g].empty()) {
      tables.push_back(given[g]);
      continue;
    }
    transfer::BlockList identity;
    for (int64_t b = 0; b < total; ++b) identity.push_back(b);
    tables.push_back(std::move(identity));
  }
  return tables;
}

// The slice one side sends or asks for, built by the real slice builder over a
// fake V1 manager holding `tables` (SEMANTICS.md sections 3 and 4).
absl::StatusOr<transfer::KVSlice> BuildSideSlice(
    const transfer::ModelSpec& model, const transfer::ScenarioRequest& request,
    cache_reuse::Side side, int64_t prepopulated_prompt_len,
    const std::vector<transfer::BlockList>& tables) {
  FakeBlockTableCacheManager manager;
  manager.AddRequest(request.request_id, prepopulated_prompt_len, tables);
  const cache_reuse::V1Adapter adapter(&manager, cache_reuse::ReuseOptions{true});
  cache_reuse::SliceRequest slice_request;
  slice_request.request_id = request.request_id;
  slice_request.prompt_len = request.prompt_len;
  slice_request.tokens_per_block = model.tokens_per_block;
  slice_request.side = side;
  std::vector<cache_reuse::LayerGroupSpec> groups;
  for (const transfer::GroupSpec& group : model.groups) {
    groups.push_back(group.window ? cache_reuse::LayerGroupSpec::Windowed(*group.window)
                                  : cache_reuse::LayerGroupSpec::Full());
  }
  absl::StatusOr<cache_reuse::BuiltSlice> built =
      cache_reuse::BuildSlice(adapter, slice_request, groups);
  if (!built.ok()) return built.status();
  return built->slice;
}

// Enough slots for every id of the tables, so that the oracle can fill and check
// the blocks that do not travel too.
int64_t SlotsFor(int64_t num_slots, const std::vector<transfer::BlockList>& tables,
                 int64_t total, std::optional<int64_t> state_slot) {
  if (num_slots > 0) return num_slots;
  int64_t slots = std::max<int64_t>(1, total);
  if (state_slot) slots = std::max(slots, *state_slot + 1);
  for (const transfer::BlockList& table : tables) {
    for (int64_t id : table) slots = std::max(slots, id + 1);
  }
  return slots;
}

using Memory = std::vector<std::vector<uint8_t>>;  // per pool

Memory Allocate(const RankPageTable& table, int64_t rank) {
  Memory memory;
  for (size_t p = 0; p < table.pools.size(); ++p) {
    const transfer::Pool& pool = table.pools[p];
    std::vector<uint8_t> bytes(pool.slot_bytes * static_cast<uint64_t>(pool.num_slots));
    for (uint64_t i = 0; i < bytes.size(); ++i) bytes[i] = GuardByte(rank, p, i);
    memory.push_back(std::move(bytes));
  }
  return memory;
}

// Calls visit(pool, offset, value) for every byte of logical KV the rank owns in
// group g at block position b stored in slot `slot`.
template <typename Visit>
void ForBlockBytes(const transfer::ModelSpec& model, const RankPageTable& table, size_t g,
                   int64_t b, int64_t slot, Visit visit) {
  const transfer::AttentionGroup& group = table.attention_groups[g];
  const transfer::Pool& pool = table.pools[group.view.pool_index];
  // A table may name a slot past an explicit num_slots: the planner refuses it if
  // it travels, and there are no bytes to place.
  if (slot < 0 || slot >= pool.num_slots) return;
  const Heads heads = OwnedHeads(model, table.topology);
  const int64_t token_bytes = model.head_size * model.element_bytes;
  const int64_t head_bytes = model.tokens_per_block * token_bytes;
  const uint64_t slot_base = static_cast<uint64_t>(slot) * pool.slot_bytes;
  for (size_t i = 0; i < group.global_layer_ids.size(); ++i) {
    for (int64_t kv = 0; kv < (model.is_mla ? 1 : 2); ++kv) {
      const uint64_t buffer = slot_base + (kv == 0 ? group.view.layers[i].k_offset
                                                   : group.view.layers[i].v_offset);
      for (int64_t h = 0; h < heads.count; ++h) {
        for (int64_t t = 0; t < model.tokens_per_block; ++t) {
          for (int64_t byte = 0; byte < token_bytes; ++byte) {
            const uint64_t offset = buffer + h * head_bytes + t * token_bytes + byte;
            visit(group.view.pool_index, offset,
                  LogicalByte(group.global_layer_ids[i], b * model.tokens_per_block + t,
                              kv, heads.first + h, byte));
          }
        }
      }
    }
  }
}

// Calls visit(pool, offset, value) for every state byte the rank holds in `slot`.
// State is sharded like attention: by TP rank, or whole on a DP rank.
template <typename Visit>
void ForStateBytes(const RankPageTable& table, int64_t slot, Visit visit) {
  const int64_t shard = table.topology.attention_dp ? 0 : table.topology.tp_rank;
  for (const transfer::StateGroup& group : table.state_groups) {
    // A state slot past an explicit num_slots holds nothing (the planner refuses
    // it when the state travels).
    if (slot < 0 || slot >= table.pools[group.pool_index].num_slots) continue;
    const uint64_t base =
        static_cast<uint64_t>(slot) * table.pools[group.pool_index].slot_bytes;
    for (size_t i = 0; i < group.layers.size(); ++i) {
      for (uint64_t byte = 0; byte < group.layers[i].bytes; ++byte) {
        visit(group.pool_index, base + group.layers[i].offset + byte,
              LogicalByte(group.global_layer_ids[i], -1 - shard, 2, 0,
                          static_cast<int64_t>(byte)));
      }
    }
  }
}

}  // namespace

uint8_t LogicalByte(int64_t layer, int64_t token, int64_t kv, int64_t head,
                    int64_t byte) {
  return static_cast<uint8_t>(
      Mix((static_cast<uint64_t>(layer) << 44) ^ (static_cast<uint64_t>(token) << 24) ^
          (static_cast<uint64_t>(kv) << 60) ^ (static_cast<uint64_t>(head) << 16) ^
          static_cast<uint64_t>(byte)));
}

transfer::ModelSpec TinyModel(int64_t layers, int64_t heads, bool is_mla) {
  transfer::ModelSpec m;
  m.num_layers = layers;
  m.num_kv_heads = heads;
  m.head_size = 2;
  m.element_bytes = 2;
  m.tokens_per_block = 4;
  m.is_mla = is_mla;
  m.groups = {transfer::GroupSpec{std::nullopt, transfer::AllLayers(layers)}};
  return m;
}

absl::Status CheckScenarioBytes(const transfer::Scenario& scenario,
                                const ScenarioCaches& caches, OracleStats* stats) {
  OracleStats local;
  if (stats == nullptr) stats = &local;
  const transfer::ModelSpec& model = scenario.model;
  const transfer::ScenarioRequest& request = scenario.request;
  const int64_t tpb = model.tokens_per_block;
  if (tpb <= 0 || request.prompt_len < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad scenario: tokens_per_block=", tpb, " prompt_len=", request.prompt_len));
  }
  const int64_t total = transfer::CeilDiv(request.prompt_len, tpb);
  absl::StatusOr<std::vector<transfer::BlockList>> context_tables =
      Tables(caches.context_tables, model.groups.size(), total, "context");
  if (!context_tables.ok()) return context_tables.status();
  absl::StatusOr<std::vector<transfer::BlockList>> generation_tables =
      Tables(caches.generation_tables, model.groups.size(), total, "generation");
  if (!generation_tables.ok()) return generation_tables.status();
  absl::StatusOr<transfer::KVSlice> context_slice = BuildSideSlice(
      model, request, cache_reuse::Side::kContext, 0, *context_tables);
  if (!context_slice.ok()) return context_slice.status();
  absl::StatusOr<transfer::KVSlice> generation_slice =
      BuildSideSlice(model, request, cache_reuse::Side::kGeneration,
                     caches.generation_cached_tokens, *generation_tables);
  if (!generation_slice.ok()) return generation_slice.status();
  transfer::Scenario planned = scenario;
  planned.context.num_slots = SlotsFor(scenario.context.num_slots, *context_tables,
                                       total, request.context_state_slot);
  planned.generation.num_slots =
      SlotsFor(scenario.generation.num_slots, *generation_tables, total,
               request.generation_state_slot);
  absl::StatusOr<transfer::ScenarioPlan> plan =
      transfer::PlanScenario(planned, *context_slice, *generation_slice);
  if (!plan.ok()) return plan.status();

  // Context ranks: the logical KV of every block position their table holds.
  std::vector<Memory> context;
  for (size_t c = 0; c < plan->context_tables.size(); ++c) {
    const RankPageTable& table = plan->context_tables[c];
    Memory memory = Allocate(table, static_cast<int64_t>(c));
    for (size_t g = 0; g < model.groups.size(); ++g) {
      const std::vector<int64_t>& ids = (*context_tables)[g];
      for (int64_t b = 0; b < total && b < static_cast<int64_t>(ids.size()); ++b) {
        if (ids[b] < 0) continue;
        ForBlockBytes(model, table, g, b, ids[b],
                      [&](int64_t pool, uint64_t offset, uint8_t value) {
                        memory[pool][offset] = value;
                      });
      }
    }
    if (request.context_state_slot) {
      ForStateBytes(table, *request.context_state_slot,
                    [&](int64_t pool, uint64_t offset, uint8_t value) {
                      memory[pool][offset] = value;
                    });
    }
    context.push_back(std::move(memory));
  }

  // Generation ranks: guard bytes; expected = guard except what they lacked.
  std::vector<Memory> generation;
  std::vector<Memory> expected;
  std::vector<Memory> writes;
  std::vector<Memory> expected_writes;
  for (size_t q = 0; q < plan->generation_tables.size(); ++q) {
    const RankPageTable& table = plan->generation_tables[q];
    generation.push_back(Allocate(table, 1000 + static_cast<int64_t>(q)));
    expected.push_back(generation.back());
    Memory zero;
    for (const std::vector<uint8_t>& pool : generation.back()) {
      zero.emplace_back(pool.size(), 0);
    }
    writes.push_back(zero);
    expected_writes.push_back(std::move(zero));
    if (!Participates(table.topology, request.generation_dp_rank)) continue;
    if (request.context_state_slot && request.generation_state_slot) {
      ForStateBytes(table, *request.generation_state_slot,
                    [&](int64_t pool, uint64_t offset, uint8_t value) {
                      expected[q][pool][offset] = value;
                      expected_writes[q][pool][offset] = 1;
                    });
    }
    for (size_t g = 0; g < model.groups.size(); ++g) {
      absl::StatusOr<transfer::WindowBlocks> window =
          transfer::ComputeWindowBlocks(request.prompt_len, model.groups[g].window, tpb);
      if (!window.ok()) return window.status();
      // The oracle's own reading of section 4, not the builder's.
      const int64_t first =
          std::max(window->stale_end, caches.generation_cached_tokens / tpb);
      const std::vector<int64_t>& ids = (*generation_tables)[g];
      for (int64_t b = first; b < total; ++b) {
        ForBlockBytes(model, table, g, b, ids[b],
                      [&](int64_t pool, uint64_t offset, uint8_t value) {
                        expected[q][pool][offset] = value;
                        expected_writes[q][pool][offset] = 1;
                      });
      }
    }
  }

  for (const transfer::RankPairPlan& pair : plan->pairs) {
    const RankPageTable& src = plan->context_tables[pair.context_rank];
    const RankPageTable& dst = plan->generation_tables[pair.generation_rank];
    if (!pair.writes && !pair.plan.fragments.empty()) {
      return absl::DataLossError(absl::StrCat(
          "a replica that does not write has fragments: context_rank=", pair.context_rank,
          " generation_rank=", pair.generation_rank));
    }
    if (absl::Status s = transfer::ValidateFragments(pair.plan.fragments, src, dst);
        !s.ok()) {
      return s;
    }
    for (const transfer::Fragment& f : pair.plan.fragments) {
      std::memcpy(generation[pair.generation_rank][f.dst_pool].data() + f.dst_offset,
                  context[pair.context_rank][f.src_pool].data() + f.src_offset, f.bytes);
      std::vector<uint8_t>& count = writes[pair.generation_rank][f.dst_pool];
      for (uint64_t i = 0; i < f.bytes; ++i) {
        count[f.dst_offset + i] =
            static_cast<uint8_t>(std::min(count[f.dst_offset + i] + 1, 255));
      }
      ++stats->writes;
      stats->bytes_copied += f.bytes;
    }
  }

  for (size_t q = 0; q < generation.size(); ++q) {
    for (size_t p = 0; p < generation[q].size(); ++p) {
      for (uint64_t i = 0; i < generation[q][p].size(); ++i) {
        ++stats->bytes_checked;
        if (generation[q][p][i] == expected[q][p][i] &&
            writes[q][p][i] == expected_writes[q][p][i]) {
          continue;
        }
        return absl::DataLossError(absl::StrCat(
            "generation byte differs from the oracle: generation_rank=", q, " pool=", p,
            " offset=", i, " expected=", int{expected[q][p][i]},
            " actual=", int{generation[q][p][i]}, " writes=", int{writes[q][p][i]},
            " expected_writes=", int{expected_writes[q][p][i]}));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace kvx::testing
