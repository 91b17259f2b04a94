#include "transfer/scenario.h"

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "transfer/fragments.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;

// The slice of a whole `prompt_len`-token prompt whose one group's list holds the
// ids first_block, first_block + 1, ..., cdiv(prompt_len, tpb) - 1: the identity
// table without its first `first_block` (cached) blocks.
KVSlice IdentitySuffix(int64_t prompt_len, int64_t tokens_per_block,
                       int64_t first_block = 0) {
  KVSlice slice;
  slice.token_range = TokenRange::Create(0, prompt_len).value();
  slice.is_last_slice = true;
  BlockList list;
  for (int64_t b = first_block; b < CeilDiv(prompt_len, tokens_per_block); ++b) {
    list.push_back(b);
  }
  slice.block_ids_per_layer_group = {list};
  return slice;
}

// Plans `s` with identity tables on both sides, the generation side holding its
// first `generation_cached_blocks` blocks already.
absl::StatusOr<ScenarioPlan> PlanIdentity(const Scenario& s,
                                          int64_t generation_cached_blocks = 0) {
  const int64_t tpb = s.model.tokens_per_block;
  return PlanScenario(s, IdentitySuffix(s.request.prompt_len, tpb),
                      IdentitySuffix(s.request.prompt_len, tpb, generation_cached_blocks));
}

Scenario Llama70B(Topology context, Topology generation, int64_t prompt_len) {
  Scenario s;
  s.model.num_layers = 80;
  s.model.num_kv_heads = 8;
  s.model.head_size = 128;
  s.model.element_bytes = 2;
  s.model.tokens_per_block = 32;
  s.model.groups = {GroupSpec{std::nullopt, AllLayers(80)}};
  s.context.topology = std::move(context);
  s.generation.topology = std::move(generation);
  s.request.prompt_len = prompt_len;
  return s;
}

// The figures PAGE_TABLE.md quotes for its example scenarios.
TEST(PlanScenario, Llama70BExamples) {
  struct Case {
    std::string name;
    Scenario scenario;
    size_t pairs;
    int64_t before;
    int64_t after;
    int64_t generation_cached_blocks = 0;
  };
  const Case cases[] = {
      // 256 blocks; each rank pair is one whole-slot run.
      {"tp8 to tp8", Llama70B(MakeTopology(8, {80}), MakeTopology(8, {80}), 8192), 8,
       8 * 256, 8},
      // Each context rank writes two generation ranks: 256 blocks x 80 layers x K,V.
      {"tp4 to tp8", Llama70B(MakeTopology(4, {80}), MakeTopology(8, {80}), 8192), 8,
       8 * 256 * 160, 8 * 256 * 160},
      // Each stage writes its 40 layers, one run per block.
      {"pp2 to pp1", Llama70B(MakeTopology(1, {40, 40}), MakeTopology(1, {80}), 8192), 2,
       2 * 256, 2 * 256},
      // Half the prompt (4k tokens, 128 blocks) cached: only 128 blocks move.
      {"pp2 to pp1, 4k cached",
       Llama70B(MakeTopology(1, {40, 40}), MakeTopology(1, {80}), 8192), 2, 2 * 128,
       2 * 128, 128},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    ASSERT_OK_AND_ASSIGN(ScenarioPlan plan,
                         PlanIdentity(c.scenario, c.generation_cached_blocks));
    EXPECT_EQ(plan.pairs.size(), c.pairs);
    EXPECT_EQ(plan.fragments_before_coalescing, c.before);
    EXPECT_EQ(plan.fragments_after_coalescing, c.after);
  }
}

TEST(PlanScenario, ReportsReplicasThatOnlyReport) {
  // Two heads: each is held by 4 context ranks; the generation rank holds both, so
  // one replica per head writes that head (not a whole slot) and 6 only report.
  Scenario s = Llama70B(MakeTopology(8, {80}), MakeTopology(1, {80}), 100);
  s.model.num_kv_heads = 2;
  ASSERT_OK_AND_ASSIGN(ScenarioPlan plan, PlanIdentity(s));
  ASSERT_EQ(plan.pairs.size(), 8u);
  int writers = 0;
  for (const RankPairPlan& pair : plan.pairs) {
    writers += pair.writes;
    if (pair.writes) {
      EXPECT_EQ(pair.group_kinds[0], MapperKind::kHeadRun);
    } else {
      EXPECT_TRUE(pair.plan.fragments.empty());
    }
  }
  EXPECT_EQ(writers, 2);
}

// A table shorter than the prompt, or with an evicted block where one is needed,
// is the slice builder's to reject (cache_reuse::BuildSlice, FailedPrecondition;
// testing/kv_oracle_test.cc runs it); what reaches the planner is a slice.
TEST(PlanScenario, RejectsBadSlices) {
  Scenario s = Llama70B(MakeTopology(1, {80}), MakeTopology(1, {80}), 100);
  KVSlice bad = IdentitySuffix(100, 32);
  bad.block_ids_per_layer_group = {{0, -1, 2, 3}};
  EXPECT_THAT(PlanScenario(s, bad, IdentitySuffix(100, 32)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("context slice holds a negative block id: request=0 "
                                 "group=0 index=1 block=-1")));
  bad.block_ids_per_layer_group = {{0, 1, 2, 3}, {0}};
  EXPECT_THAT(PlanScenario(s, IdentitySuffix(100, 32), bad),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("generation slice needs one block list per group")));
  // Longer than its suffix by two: the pairing rejects it.
  bad.block_ids_per_layer_group = {{0, 1, 2, 3, 4, 5}};
  EXPECT_THAT(PlanScenario(s, bad, IdentitySuffix(100, 32)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  s.context.num_slots = 2;
  EXPECT_THAT(PlanIdentity(s),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("block=2 num_slots=2")));
  s.context.num_slots = int64_t{1} << 62;
  EXPECT_THAT(PlanIdentity(s), StatusIs(absl::StatusCode::kInvalidArgument,
                                        HasSubstr("does not fit 64-bit addresses")));
  s.context.num_slots = 0;
  s.generation.topology = MakeTopology(1, {79});
  EXPECT_THAT(PlanIdentity(s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("split_layers=79")));
}

TEST(PlanScenario, DerivesSlotsFromTheLargestBlockId) {
  Scenario s = Llama70B(MakeTopology(1, {80}), MakeTopology(1, {80}), 64);
  KVSlice src = IdentitySuffix(64, 32);
  src.block_ids_per_layer_group = {{7, 3}};
  KVSlice dst = IdentitySuffix(64, 32);
  dst.block_ids_per_layer_group = {{12}};  // the first block is cached
  ASSERT_OK_AND_ASSIGN(ScenarioPlan plan, PlanScenario(s, src, dst));
  EXPECT_EQ(plan.context_tables[0].pools[0].num_slots, 8);
  EXPECT_EQ(plan.generation_tables[0].pools[0].num_slots, 13);
  ASSERT_EQ(plan.pairs.size(), 1u);
  EXPECT_EQ(plan.fragments_after_coalescing, 1);
  s.request.context_state_slot = 20;
  ASSERT_OK_AND_ASSIGN(plan, PlanScenario(s, src, dst));
  EXPECT_EQ(plan.context_tables[0].pools[0].num_slots, 21);
}

// Regression: issue 8, semantics gap 2. A layer in no group was never transferred,
// a layer in two groups was accepted (and "2,000 groups that all name layer 0"
// multiplied every rank's page table).
TEST(PlanScenario, EveryLayerIsInExactlyOneGroup) {
  struct Case {
    const char* name;
    std::vector<GroupSpec> groups;
    std::vector<int64_t> state_layers;
    std::string error;  // empty: accepted
  };
  const Case cases[] = {
      {"partition", {{std::nullopt, {0, 2}}, {16, {1, 3}}}, {}, ""},
      {"layer in two groups", {{std::nullopt, {0, 1, 2, 3}}, {16, {0}}}, {},
       "layer in two attention groups: layer=0 group=0 other_group=1"},
      {"layer in no group", {{std::nullopt, {0, 1, 3}}}, {},
       "layer in no attention group and not a state layer: layer=2 first=0 end=4"},
      {"state layer in no group", {{std::nullopt, {0, 1, 3}}}, {2}, ""},
      {"state layer in a group too", {{std::nullopt, {0, 1, 2, 3}}}, {2}, ""},
      {"empty group", {{std::nullopt, {0, 1, 2, 3}}, {16, {}}}, {},
       "group holds no layer: group=1"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Scenario s = Llama70B(MakeTopology(1, {4}), MakeTopology(1, {2, 2}), 64);
    s.model.num_layers = 4;
    s.model.groups = c.groups;
    s.model.state_layer_ids = c.state_layers;
    s.model.state_bytes_per_layer = 16;
    KVSlice slice = IdentitySuffix(64, 32);
    slice.block_ids_per_layer_group.assign(c.groups.size(), {0, 1});
    const absl::StatusOr<ScenarioPlan> plan = PlanScenario(s, slice, slice);
    if (c.error.empty()) {
      EXPECT_THAT(plan, IsOk());
    } else {
      EXPECT_THAT(plan, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.error)));
    }
  }
}

// Regression: issue 8, finding 4. The default slot count is the largest id + 1,
// which for id 2^63-1 was signed overflow (and a wrong count in -c opt).
TEST(PlanScenario, LargestBlockIdLeavesNoRoomForADefaultSlotCount) {
  Scenario s = Llama70B(MakeTopology(1, {80}), MakeTopology(1, {80}), 64);
  KVSlice src = IdentitySuffix(64, 32);
  src.block_ids_per_layer_group = {{0, std::numeric_limits<int64_t>::max()}};
  EXPECT_THAT(PlanScenario(s, src, IdentitySuffix(64, 32)),
              StatusIs(absl::StatusCode::kOutOfRange,
                       HasSubstr("context block id leaves no default slot count: request=0 "
                                 "group=0 index=1 block=9223372036854775807")));
  // A large id with room for its slot count is the page table's to refuse.
  src.block_ids_per_layer_group = {{0, std::numeric_limits<int64_t>::max() - 1}};
  EXPECT_THAT(PlanScenario(s, src, IdentitySuffix(64, 32)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("does not fit 64-bit addresses")));
}

// Regression: issue 8, finding 3. Inputs whose every field is in bounds but whose
// product is not: 65536 layers x 256k one-token blocks, TP4 -> TP8, is 3.4e10
// fragments per rank pair (the reviewers' 1M blocks: 1.4e11). Holding them is
// refused before anything is built; with max_fragments_listed 0 the counts come
// without the list.
TEST(PlanScenario, CountsAHugePlanWithoutHoldingIt) {
  constexpr int64_t kLayers = 65536;
  constexpr int64_t kBlocks = int64_t{1} << 18;
  Scenario s = Llama70B(MakeTopology(4, {kLayers}), MakeTopology(8, {kLayers}), kBlocks);
  s.model.num_layers = kLayers;
  s.model.head_size = 4;
  s.model.tokens_per_block = 1;
  s.model.groups = {GroupSpec{std::nullopt, AllLayers(kLayers)}};
  const KVSlice slice = IdentitySuffix(kBlocks, 1);
  EXPECT_THAT(PlanScenario(s, slice, slice),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("fragments_held=34359738368 max_fragments_held=4194304 "
                                 "context_rank=0 generation_rank=0")));
  s.max_fragments_listed = 0;
  ASSERT_OK_AND_ASSIGN(ScenarioPlan plan, PlanScenario(s, slice, slice));
  ASSERT_EQ(plan.pairs.size(), 8u);
  // Per pair: each block, layer and K/V one run of the generation rank's one head.
  const int64_t per_pair = kBlocks * kLayers * 2;
  EXPECT_EQ(plan.pairs[0].plan.fragments_before_coalescing, per_pair);
  EXPECT_EQ(plan.pairs[0].fragments_after_coalescing, per_pair);
  EXPECT_TRUE(plan.pairs[0].plan.fragments.empty());
  EXPECT_EQ(plan.pairs[0].plan.total_bytes, static_cast<uint64_t>(per_pair) * 4 * 2);
  EXPECT_EQ(plan.fragments_after_coalescing, 8 * per_pair);
  s.max_fragments_listed = 3;
  ASSERT_OK_AND_ASSIGN(plan, PlanScenario(s, slice, slice));
  EXPECT_EQ(plan.pairs[7].plan.fragments.size(), 3u);
  EXPECT_EQ(plan.pairs[7].fragments_after_coalescing, per_pair);
}

TEST(PlanScenario, RefusesInstancesPastItsLimitsBeforeBuildingThem) {
  // 65,536 ranks a side: every page table carries the 16-stage split.
  Scenario s = Llama70B(MakeTopology(4096, std::vector<int64_t>(16, 1)),
                        MakeTopology(4096, std::vector<int64_t>(16, 1)), 64);
  s.model.num_layers = 16;
  s.model.num_kv_heads = 4096;
  s.model.groups = {GroupSpec{std::nullopt, AllLayers(16)}};
  EXPECT_THAT(PlanIdentity(s),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("scenario page tables exceed the layout bound: "
                                 "layout_entries=2359296 max_layout_entries=2097152 "
                                 "context_ranks=65536 generation_ranks=65536 groups=1 "
                                 "num_layers=16")));
  // Few entries, but 2048 x 4096 rank pairs to examine.
  s.context.topology = MakeTopology(2048, {16});
  s.generation.topology = MakeTopology(4096, {16});
  EXPECT_THAT(PlanIdentity(s),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("rank_pairs=8388608 max_rank_pairs_examined=4194304")));
  // More overlapping pairs than may be planned: TP1 -> TP4096, one head each.
  s.context.topology = MakeTopology(1, {16});
  s.limits.max_rank_pairs_planned = 4095;
  EXPECT_THAT(PlanIdentity(s),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("scenario plans too many rank pairs: "
                                 "max_rank_pairs_planned=4095 context_rank=0 "
                                 "generation_rank=4095")));
  // Rank pairs whose planners would read more than the bound.
  s.limits.max_rank_pairs_planned = ScenarioLimits().max_rank_pairs_planned;
  s.limits.max_layout_entries = 4096 * 19 + 17 + 100;
  EXPECT_THAT(PlanIdentity(s),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("scenario rank pairs exceed the layout bound")));
}

// Regression: issue 8, finding 5. Eight rank pairs of 2^63 bytes each summed past
// 2^64 and the plan reported the wrapped total.
TEST(PlanScenario, RefusesTotalsPast64Bits) {
  constexpr int64_t kBlocks = int64_t{1} << 19;
  Scenario s = Llama70B(MakeTopology(8, {1}), MakeTopology(8, {1}), 0);
  s.model.num_layers = 1;
  s.model.head_size = 1 << 20;
  s.model.tokens_per_block = 1 << 20;
  s.model.element_bytes = 8;  // one head's K or V of a block: 2^43 bytes
  s.model.groups = {GroupSpec{std::nullopt, {0}}};
  s.request.prompt_len = kBlocks << 20;
  s.max_fragments_listed = 0;
  KVSlice slice = IdentitySuffix(s.request.prompt_len, s.model.tokens_per_block);
  EXPECT_THAT(PlanScenario(s, slice, slice),
              StatusIs(absl::StatusCode::kOutOfRange,
                       HasSubstr("scenario totals overflow 64 bits: request=0 "
                                 "context_rank=1 generation_rank=1")));
  s.context.topology = MakeTopology(8, {1}, 0);
  s.generation.topology = MakeTopology(1, {1});  // one pair of 2^63 bytes fits
  s.model.num_kv_heads = 1;
  ASSERT_OK_AND_ASSIGN(ScenarioPlan plan, PlanScenario(s, slice, slice));
  EXPECT_EQ(plan.total_bytes, uint64_t{1} << 63);
}

}  // namespace
}  // namespace kvx::transfer
