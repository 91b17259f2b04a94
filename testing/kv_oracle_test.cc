#include "testing/kv_oracle.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "transfer/scenario.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::testing {
namespace {

using ::testing::HasSubstr;
using transfer::GroupSpec;
using transfer::ModelSpec;
using transfer::Scenario;
using transfer::Topology;

Topology Instance(int64_t tp, std::vector<int64_t> layers_per_pp, bool dp = false) {
  Topology t = transfer::MakeTopology(tp, std::move(layers_per_pp));
  t.attention_dp = dp;
  return t;
}

// A permutation of [0, n) ids drawn from `slots` slots: block ids need not be
// contiguous or ordered.
std::vector<int64_t> Shuffled(std::mt19937_64& rng, int64_t n, int64_t slots) {
  std::vector<int64_t> ids(slots);
  for (int64_t i = 0; i < slots; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), rng);
  ids.resize(n);
  return ids;
}

TEST(KvOracle, FixedTopologies) {
  struct Case {
    std::string name;
    ModelSpec model;
    Topology context;
    Topology generation;
    int64_t prompt_len;
    int64_t cached;
  };
  ModelSpec swa = TinyModel(4, 4);
  swa.groups = {GroupSpec{std::nullopt, {0, 2}}, GroupSpec{8, {1, 3}}};
  const Case cases[] = {
      {"identical", TinyModel(4, 4), Instance(1, {4}), Instance(1, {4}), 17, 0},
      {"identical tp2", TinyModel(4, 4), Instance(2, {4}), Instance(2, {4}), 16, 4},
      {"pp2 to pp1", TinyModel(5, 2), Instance(1, {2, 3}), Instance(1, {5}), 9, 0},
      {"pp1 to pp3 uneven", TinyModel(7, 2), Instance(1, {7}), Instance(1, {1, 4, 2}), 13,
       8},
      {"tp2 to tp4", TinyModel(3, 4), Instance(2, {3}), Instance(4, {3}), 12, 0},
      {"tp4 to tp1", TinyModel(3, 4), Instance(4, {3}), Instance(1, {3}), 5, 4},
      {"replicated tp8 to tp2", TinyModel(2, 2), Instance(8, {2}), Instance(2, {2}), 9,
       0},
      {"replicated tp2 to tp8", TinyModel(2, 2), Instance(2, {2}), Instance(8, {2}), 9,
       0},
      {"replicated tp4 to tp8, 2 heads", TinyModel(2, 2), Instance(4, {2}),
       Instance(8, {2}), 4, 0},
      {"mla tp4 to tp2 pp2", TinyModel(4, 8, true), Instance(4, {4}), Instance(2, {1, 3}),
       11, 4},
      {"attention dp", TinyModel(3, 4), Instance(2, {3}, true), Instance(4, {3}, true),
       10, 0},
      {"windowed groups", swa, Instance(2, {2, 2}), Instance(4, {4}), 21, 4},
      {"one token", TinyModel(2, 2), Instance(2, {2}), Instance(1, {1, 1}), 1, 0},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Scenario s;
    s.model = c.model;
    s.context.topology = c.context;
    s.generation.topology = c.generation;
    s.request.prompt_len = c.prompt_len;
    ScenarioCaches caches;
    caches.generation_cached_tokens = c.cached;
    s.request.context_dp_rank = 1;
    s.request.generation_dp_rank = 2;
    OracleStats stats;
    EXPECT_OK(CheckScenarioBytes(s, caches, &stats));
    EXPECT_GT(stats.bytes_copied, 0u);
  }
}

TEST(KvOracle, MambaStateAcrossPipelineSplits) {
  Scenario s;
  s.model = TinyModel(5, 4);
  s.model.state_layer_ids = {0, 2, 3};
  s.model.state_bytes_per_layer = 6;
  s.context.topology = Instance(2, {2, 3});
  s.generation.topology = Instance(2, {4, 1});
  s.request.prompt_len = 9;
  s.request.context_state_slot = 1;
  s.request.generation_state_slot = 4;
  EXPECT_OK(CheckScenarioBytes(s));
  s.generation.topology = Instance(4, {5});
  EXPECT_THAT(CheckScenarioBytes(s),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("dst_tp_size=4")));
}

TEST(KvOracle, PassesPlannerErrorsThrough) {
  // The generation instance splits fewer layers than the model has.
  Scenario s;
  s.model = TinyModel(2, 2);
  s.context.topology = Instance(1, {2});
  s.generation.topology = Instance(1, {1});
  s.request.prompt_len = 8;
  EXPECT_THAT(CheckScenarioBytes(s), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(KvOracle, PassesSliceBuilderErrorsThrough) {
  // A context table shorter than the prompt: the transfer needs a block it lacks,
  // which the real slice builder reports as FailedPrecondition (adapter.h).
  Scenario s;
  s.model = TinyModel(2, 2);
  s.context.topology = Instance(1, {2});
  s.generation.topology = Instance(1, {2});
  s.request.prompt_len = 8;
  ScenarioCaches caches;
  caches.context_tables = {{0}};
  EXPECT_THAT(CheckScenarioBytes(s, caches),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("block table shorter than the slice needs")));
  caches.context_tables = {{0, -1}};
  EXPECT_THAT(CheckScenarioBytes(s, caches),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("block=1 id=-1")));
  caches.context_tables = {{0, 1}, {2, 3}};
  EXPECT_THAT(CheckScenarioBytes(s, caches),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tables=2 groups=1")));
}

// Random topologies from {TP 1,2,4,8} x {PP 1,2,4} on each side, uneven layer
// splits, prompts on block and window boundaries, prefix hits, shuffled block ids,
// replicated heads, MLA, windowed groups and attention DP.
TEST(KvOracle, RandomTopologies) {
  const int seed = ::testing::UnitTest::GetInstance()->random_seed();
  SCOPED_TRACE(absl::StrCat("seed=", seed));
  std::mt19937_64 rng(seed);
  auto pick = [&](std::vector<int64_t> v) {
    return v[std::uniform_int_distribution<size_t>(0, v.size() - 1)(rng)];
  };
  auto split = [&](int64_t layers, int64_t pp) {
    // Uneven: cut points drawn at random, each stage at least one layer.
    std::vector<int64_t> cuts;
    std::vector<int64_t> candidates;
    for (int64_t i = 1; i < layers; ++i) candidates.push_back(i);
    std::shuffle(candidates.begin(), candidates.end(), rng);
    cuts.assign(candidates.begin(), candidates.begin() + (pp - 1));
    std::sort(cuts.begin(), cuts.end());
    std::vector<int64_t> sizes;
    int64_t prev = 0;
    for (int64_t cut : cuts) {
      sizes.push_back(cut - prev);
      prev = cut;
    }
    sizes.push_back(layers - prev);
    return sizes;
  };
  for (int iteration = 0; iteration < 400; ++iteration) {
    const int64_t layers = pick({4, 5, 7, 8});
    const bool mla = pick({0, 0, 0, 1}) == 1;
    const int64_t heads = pick({1, 2, 4, 8});
    ModelSpec model = TinyModel(layers, heads, mla);
    const int64_t tpb = model.tokens_per_block;
    const int64_t window = pick({0, 6, 8, 12});
    if (window > 0) {
      model.groups = {GroupSpec{std::nullopt, {}}, GroupSpec{window, {}}};
      for (int64_t l = 0; l < layers; ++l) {
        model.groups[l % 2].global_layer_ids.push_back(l);
      }
    }
    Scenario s;
    s.model = model;
    const bool dp = pick({0, 0, 0, 1}) == 1;
    for (Topology* t : {&s.context.topology, &s.generation.topology}) {
      int64_t tp = pick({1, 2, 4, 8});
      while (!mla && !dp && tp % heads != 0 && heads % tp != 0) tp = pick({1, 2, 4, 8});
      *t = Instance(tp, split(layers, std::min(layers, pick({1, 2, 4}))), dp);
    }
    const int64_t w = window > 0 ? window : 2 * tpb;
    s.request.prompt_len =
        std::max<int64_t>(1, pick({1, tpb - 1, tpb, tpb + 1, w - 1, w, w + 1, 3 * tpb,
                                   3 * tpb + 1, 5 * tpb - 1}));
    const int64_t total = transfer::CeilDiv(s.request.prompt_len, tpb);
    ScenarioCaches caches;
    caches.generation_cached_tokens =
        pick({0, 0, tpb, s.request.prompt_len / 2, s.request.prompt_len - 1});
    if (pick({0, 1}) == 1) {
      // Mamba state on every third layer; both sides must shard it alike.
      for (int64_t l = 0; l < layers; l += 3) s.model.state_layer_ids.push_back(l);
      s.model.state_bytes_per_layer = pick({1, 6});
      s.generation.topology.tp_size = s.context.topology.tp_size;
      s.request.context_state_slot = pick({0, 2});
      s.request.generation_state_slot = pick({0, 1, 3});
    }
    s.request.context_dp_rank = pick({0, 1, 7}) % s.context.topology.tp_size;
    s.request.generation_dp_rank = pick({0, 1, 7}) % s.generation.topology.tp_size;
    const bool shuffle = pick({0, 1}) == 1;
    if (shuffle) {
      for (size_t g = 0; g < model.groups.size(); ++g) {
        caches.context_tables.push_back(Shuffled(rng, total + 1, total + 3));
        caches.generation_tables.push_back(Shuffled(rng, total, total + 2));
      }
    }
    SCOPED_TRACE(absl::StrCat(
        "iteration=", iteration, " layers=", layers, " heads=", heads, " mla=", mla,
        " window=", window, " dp=", dp, " ctx_tp=", s.context.topology.tp_size,
        " ctx_pp=", absl::StrJoin(s.context.topology.layers_per_pp_rank, ","),
        " gen_tp=", s.generation.topology.tp_size,
        " gen_pp=", absl::StrJoin(s.generation.topology.layers_per_pp_rank, ","),
        " prompt=", s.request.prompt_len, " cached=", caches.generation_cached_tokens,
        " shuffle=", shuffle, " state_layers=", s.model.state_layer_ids.size()));
    ASSERT_OK(CheckScenarioBytes(s, caches));
  }
}

}  // namespace
}  // namespace kvx::testing
