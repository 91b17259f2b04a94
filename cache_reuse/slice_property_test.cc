// Property test: slice building (both adapters, both sides) followed by block
// pairing must move exactly what the token-level oracle says, on random scenarios:
// full, windowed and Mamba groups, prefix hits of every size (none, partial, whole
// prompt, beyond the prompt), draft-token tail blocks, evicted stale blocks,
// chunked slices, and peers that send an untrimmed draft block.
//
// Replay a failure with --gtest_random_seed=<seed> (printed with every failure,
// together with the scenario as a `kvplan transfer` input).

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cache_reuse/adapter.h"
#include "cache_reuse/v1_adapter.h"
#include "cache_reuse/v2_adapter.h"
#include "gtest/gtest.h"
#include "testing/fake_cache_managers.h"
#include "testing/token_oracle.h"
#include "transfer/slice.h"

namespace kvx::cache_reuse {
namespace {

using transfer::BlockList;
using transfer::GroupPairing;
using transfer::KVSlice;

constexpr int64_t kRequest = 7;
constexpr int kScenarios = 10000;

// Everything a scenario is made of; the oracle and the code under test both see it.
struct Scenario {
  int64_t tpb = 8;
  int64_t prompt_len = 0;
  std::optional<std::pair<int64_t, int64_t>> token_range;
  bool context_v2 = false;
  bool generation_v2 = false;
  bool reuse_enabled = true;
  bool generation_only = true;
  // Raw count the generation side's manager reports; nullopt: V2 unknown request.
  std::optional<int64_t> generation_cached;
  // Peers from the reference engine send a whole-prompt list with its draft block,
  // and windowed lists that still carry stale blocks at the head.
  bool peer_sends_draft_block = false;
  bool peer_sends_stale_head = false;
  std::vector<testing::OracleGroup> groups;
};

// The scenario as `kvplan transfer` input, so a failure can be replayed by hand.
std::string Describe(const Scenario& s) {
  const auto side = [&](bool generation) {
    std::vector<std::string> groups;
    for (const testing::OracleGroup& g : s.groups) {
      if (g.mamba) {
        groups.push_back(R"({"kind": "mamba"})");
        continue;
      }
      groups.push_back(absl::StrCat(
          R"({"window": )", g.window ? absl::StrCat(*g.window) : "null",
          R"(, "block_ids": [)",
          absl::StrJoin(generation ? g.generation_table : g.context_table, ", "), "]}"));
    }
    const bool v2 = generation ? s.generation_v2 : s.context_v2;
    std::string reuse = absl::StrCat(R"({"enabled": )", s.reuse_enabled ? "true" : "false",
                                     R"(, "adapter": ")", v2 ? "v2" : "v1", R"(", )");
    const std::string cached = generation && s.generation_cached
                                   ? absl::StrCat(*s.generation_cached)
                                   : (v2 ? "null" : "0");
    absl::StrAppend(&reuse, v2 ? R"("num_committed_tokens": )" : R"("prepopulated_prompt_len": )",
                    cached, "}");
    return absl::StrCat(R"({"generation_only": )", s.generation_only ? "true" : "false",
                        R"(, "reuse": )", reuse, R"(, "groups": [)",
                        absl::StrJoin(groups, ", "), "]}");
  };
  std::string range = s.token_range ? absl::StrCat(R"(, "token_range": [)",
                                                   s.token_range->first, ", ",
                                                   s.token_range->second, "]")
                                    : "";
  return absl::StrCat(R"({"tokens_per_block": )", s.tpb, R"(, "prompt_len": )",
                      s.prompt_len, range, R"(, "context": )", side(false),
                      R"(, "generation": )", side(true),
                      "}\npeer_sends_draft_block=", s.peer_sends_draft_block,
                      " peer_sends_stale_head=", s.peer_sends_stale_head);
}

int64_t Pick(std::mt19937_64& rng, int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}
bool Chance(std::mt19937_64& rng, double p) {
  return std::bernoulli_distribution(p)(rng);
}

// Interesting values cluster at block and window boundaries.
int64_t PickNear(std::mt19937_64& rng, const std::vector<int64_t>& anchors, int64_t max) {
  const int64_t anchor = anchors[Pick(rng, 0, anchors.size() - 1)];
  return std::clamp<int64_t>(anchor + Pick(rng, -1, 1), 0, max);
}

// A positional table for one side. Positions before `first_held` that are stale
// may have been evicted (-1); an evicted block may also, rarely, be one the
// transfer needs, which the oracle and the code must both refuse.
BlockList MakeTable(std::mt19937_64& rng, int64_t total, int64_t stale_blocks,
                    int64_t* next_id, bool evict_stale_head) {
  BlockList table;
  const int64_t drafts = Pick(rng, 0, 2);
  for (int64_t b = 0; b < total + drafts; ++b) table.push_back((*next_id)++);
  if (evict_stale_head) {
    const int64_t evicted = Pick(rng, 0, stale_blocks);
    std::fill(table.begin(), table.begin() + evicted, cache_reuse::kEvictedBlock);
  }
  if (total > 0 && Chance(rng, 0.01)) table[Pick(rng, 0, total - 1)] = kEvictedBlock;
  return table;
}

Scenario Generate(std::mt19937_64& rng) {
  Scenario s;
  const int64_t tpbs[] = {1, 2, 3, 4, 8, 16};
  s.tpb = tpbs[Pick(rng, 0, 5)];
  const int64_t window_anchor = s.tpb * Pick(rng, 1, 8);
  s.prompt_len = Chance(rng, 0.5)
                     ? PickNear(rng, {1, s.tpb, 2 * s.tpb, 5 * s.tpb, window_anchor,
                                      window_anchor + s.tpb},
                                400)
                     : Pick(rng, 0, 300);
  const int64_t total = transfer::CeilDiv(s.prompt_len, s.tpb);
  if (s.prompt_len > 0 && Chance(rng, 0.3)) {
    const int64_t end = Pick(rng, 1, s.prompt_len);
    s.token_range = std::make_pair(Pick(rng, 0, end - 1), end);
  }
  s.context_v2 = Chance(rng, 0.5);
  s.generation_v2 = Chance(rng, 0.5);
  s.reuse_enabled = Chance(rng, 0.85);
  s.generation_only = Chance(rng, 0.9);
  switch (Pick(rng, 0, 4)) {
    case 0: s.generation_cached = 0; break;
    case 1: s.generation_cached = Pick(rng, 0, s.prompt_len); break;
    case 2: s.generation_cached = s.prompt_len; break;
    case 3: s.generation_cached = s.prompt_len + Pick(rng, 1, 3 * s.tpb); break;
    default: s.generation_cached = PickNear(rng, {s.tpb, 2 * s.tpb, window_anchor}, 500);
  }
  if (s.generation_v2 && Chance(rng, 0.1)) s.generation_cached.reset();
  s.peer_sends_draft_block = Chance(rng, 0.2);
  s.peer_sends_stale_head = Chance(rng, 0.3);

  int64_t next_context_id = 1000;
  int64_t next_generation_id = 100000;
  const int num_groups = static_cast<int>(Pick(rng, 1, 4));
  for (int g = 0; g < num_groups; ++g) {
    testing::OracleGroup group;
    const int kind = static_cast<int>(Pick(rng, 0, 9));
    if (kind == 0) {
      group.mamba = true;
      s.groups.push_back(group);
      continue;
    }
    if (kind >= 5) {
      group.window = Chance(rng, 0.5) ? PickNear(rng, {1, s.tpb, window_anchor,
                                                       s.prompt_len, s.prompt_len + 1},
                                                 1000)
                                      : Pick(rng, 1, 400);
      if (*group.window == 0) group.window = 1;
    }
    const int64_t stale =
        group.window ? std::max<int64_t>(0, (s.prompt_len + 1 - *group.window) / s.tpb) : 0;
    // V2 managers drop only a leading run; V1 tables may show any stale head.
    group.context_table = MakeTable(rng, total, stale, &next_context_id, true);
    group.generation_table = MakeTable(rng, total, stale, &next_generation_id, true);
    s.groups.push_back(std::move(group));
  }
  return s;
}

// Builds one side's slice through the adapter the scenario names.
absl::StatusOr<BuiltSlice> Build(const Scenario& s, bool generation) {
  const bool v2 = generation ? s.generation_v2 : s.context_v2;
  std::vector<BlockList> tables;
  std::vector<LayerGroupSpec> specs;
  for (const testing::OracleGroup& g : s.groups) {
    tables.push_back(generation ? g.generation_table : g.context_table);
    specs.push_back(g.mamba ? LayerGroupSpec::Mamba()
                            : g.window ? LayerGroupSpec::Windowed(*g.window)
                                       : LayerGroupSpec::Full());
  }
  const std::optional<int64_t> cached = generation ? s.generation_cached : 0;
  testing::FakeBlockTableCacheManager v1_manager;
  testing::FakePagedCacheManager v2_manager;
  std::unique_ptr<CacheReuseAdapter> adapter;
  if (v2) {
    v2_manager.AddRequestFromTables(kRequest, cached, tables);
    adapter = std::make_unique<V2Adapter>(&v2_manager, ReuseOptions{s.reuse_enabled});
  } else {
    v1_manager.AddRequest(kRequest, cached.value_or(0), tables);
    adapter = std::make_unique<V1Adapter>(&v1_manager, ReuseOptions{s.reuse_enabled});
  }
  SliceRequest request;
  request.request_id = kRequest;
  request.prompt_len = s.prompt_len;
  request.tokens_per_block = s.tpb;
  request.side = generation ? Side::kGeneration : Side::kContext;
  request.generation_only = s.generation_only;
  if (s.token_range) {
    request.token_range =
        transfer::TokenRange::Create(s.token_range->first, s.token_range->second).value();
  }
  return BuildSlice(*adapter, request, specs);
}

// What an untrusted (reference-engine) receiver may send instead of the exact
// suffix lists: a whole-prompt list with its draft-token block still attached, and
// a windowed list that still starts with stale blocks it holds. Pairing must
// undo the first and pair by position despite the second.
void AddPeerQuirks(const Scenario& s, KVSlice* slice) {
  if (!slice->token_range) return;
  const int64_t total = transfer::CeilDiv(slice->token_range->end(), s.tpb);
  for (size_t g = 0; g < s.groups.size(); ++g) {
    const testing::OracleGroup& group = s.groups[g];
    BlockList& list = slice->block_ids_per_layer_group[g];
    if (group.mamba) continue;
    if (s.peer_sends_stale_head && group.window && !list.empty()) {
      const int64_t first = total - static_cast<int64_t>(list.size());
      const int64_t stale_end =
          std::max<int64_t>(0, (s.prompt_len + 1 - *group.window) / s.tpb);
      // Only stale blocks may be prepended: a list that starts past the window
      // floor starts at a cache hit, and cached blocks are never asked for.
      if (first == stale_end) {
        for (int64_t b = first - 1; b >= 0 && group.generation_table[b] >= 0; --b) {
          list.insert(list.begin(), group.generation_table[b]);
        }
      }
    }
    if (s.peer_sends_draft_block && static_cast<int64_t>(list.size()) == total) {
      list.push_back(-7);  // never a real id: if it were paired, the check fails
    }
  }
}

testing::OracleScenario ToOracle(const Scenario& s) {
  testing::OracleScenario o;
  o.tokens_per_block = s.tpb;
  o.prompt_len = s.prompt_len;
  if (s.token_range) o.slice_end = s.token_range->second;
  const bool reuse_applies = s.reuse_enabled && s.generation_only;
  o.receiver_cached_tokens = reuse_applies ? s.generation_cached.value_or(0) : 0;
  o.groups = s.groups;
  return o;
}

// Returns an empty string when the code agrees with the oracle, else why not.
std::string Check(const Scenario& s) {
  const testing::OracleResult want = ExpectedMoves(ToOracle(s));
  absl::StatusOr<BuiltSlice> context = Build(s, false);
  absl::StatusOr<BuiltSlice> generation = Build(s, true);
  if (!context.ok() || !generation.ok()) {
    if (!want.feasible) return "";
    return absl::StrCat("slice building failed on a feasible scenario: context=",
                        context.status().ToString(),
                        " generation=", generation.status().ToString());
  }
  if (!want.feasible) {
    return absl::StrCat("slices built although the oracle refuses: ", want.why_infeasible);
  }
  AddPeerQuirks(s, &generation->slice);

  transfer::PairingOptions options;
  options.tokens_per_block = s.tpb;
  options.prompt_len = s.prompt_len;
  options.request_id = kRequest;
  for (const testing::OracleGroup& g : s.groups) options.windows.push_back(g.window);
  absl::StatusOr<std::vector<GroupPairing>> pairings =
      PairSliceBlocks(context->slice, generation->slice, options);
  if (!pairings.ok()) return absl::StrCat("pairing failed: ", pairings.status().ToString());
  for (size_t g = 0; g < s.groups.size(); ++g) {
    std::vector<std::pair<int64_t, int64_t>> got;
    for (size_t i = 0; i < (*pairings)[g].src.size(); ++i) {
      got.emplace_back((*pairings)[g].src[i], (*pairings)[g].dst[i]);
    }
    if (got != want.pairs[g]) {
      const auto show = [](const std::vector<std::pair<int64_t, int64_t>>& pairs) {
        return absl::StrJoin(pairs, " ", absl::PairFormatter("->"));
      };
      return absl::StrCat("group=", g, " moved [", show(got), "] but the oracle moves [",
                          show(want.pairs[g]), "]");
    }
  }
  return "";
}

// Greedy shrinking: drop groups, the chunk, the draft quirk and the cache hit while
// the failure persists, so the printed scenario is as small as it gets.
Scenario Shrink(Scenario s) {
  for (bool progress = true; progress;) {
    progress = false;
    std::vector<Scenario> candidates;
    for (size_t g = 0; s.groups.size() > 1 && g < s.groups.size(); ++g) {
      Scenario c = s;
      c.groups.erase(c.groups.begin() + g);
      candidates.push_back(std::move(c));
    }
    if (s.token_range) candidates.push_back(s), candidates.back().token_range.reset();
    if (s.peer_sends_draft_block) {
      candidates.push_back(s), candidates.back().peer_sends_draft_block = false;
    }
    if (s.peer_sends_stale_head) {
      candidates.push_back(s), candidates.back().peer_sends_stale_head = false;
    }
    if (s.generation_cached != 0) candidates.push_back(s), candidates.back().generation_cached = 0;
    for (Scenario& c : candidates) {
      if (!Check(c).empty()) {
        s = std::move(c);
        progress = true;
        break;
      }
    }
  }
  return s;
}

TEST(SliceProperty, BuildingAndPairingMoveExactlyWhatTheOracleSays) {
  const uint64_t seed = ::testing::UnitTest::GetInstance()->random_seed();
  std::mt19937_64 rng(seed);
  int feasible = 0;
  for (int i = 0; i < kScenarios; ++i) {
    const Scenario s = Generate(rng);
    const std::string failure = Check(s);
    if (!failure.empty()) {
      const Scenario small = Shrink(s);
      FAIL() << "seed=" << seed << " scenario=" << i << ": " << failure
             << "\nshrunk: " << Check(small) << "\n" << Describe(small);
    }
    feasible += ExpectedMoves(ToOracle(s)).feasible;
  }
  // The generator must mostly produce transfers that can happen, or the test
  // would pass on refusals alone.
  EXPECT_GT(feasible, kScenarios * 8 / 10) << "seed=" << seed;
}

}  // namespace
}  // namespace kvx::cache_reuse
