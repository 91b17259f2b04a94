#include "transfer/fragments.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/kv_oracle.h"
#include "testing/status_matchers.h"
#include "transfer/page_table.h"
#include "transfer/scenario.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::kvx::testing::TinyModel;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

RankPageTable Table(const ModelSpec& model, const Topology& topology) {
  absl::StatusOr<RankPageTable> table =
      BuildStandardPageTable(model, topology, 16, uint64_t{1} << 32);
  EXPECT_THAT(table, IsOk());
  return table.ok() ? *table : RankPageTable{};
}

std::vector<GroupPairing> Pairs(BlockList src, BlockList dst) {
  GroupPairing pairing;
  pairing.src = std::move(src);
  pairing.dst = std::move(dst);
  return {pairing};
}

TEST(AppendCoalesced, MergesOnlyWhenBothSidesContinue) {
  std::vector<Fragment> out;
  AppendCoalesced(Fragment{0, 0, 1, 100, 10}, &out);
  AppendCoalesced(Fragment{0, 10, 1, 110, 5}, &out);  // continues both
  AppendCoalesced(Fragment{0, 15, 1, 200, 5}, &out);  // dst jumps
  AppendCoalesced(Fragment{0, 20, 2, 205, 5}, &out);  // other dst pool
  EXPECT_THAT(out, ElementsAre(Fragment{0, 0, 1, 100, 15}, Fragment{0, 15, 1, 200, 5},
                               Fragment{0, 20, 2, 205, 5}));
}

TEST(FragmentPlanner, WholeSlotsCoalesceAcrossConsecutiveBlocks) {
  const ModelSpec model = TinyModel(2, 2);  // slot: 2 layers x K,V x 32 bytes = 128
  ASSERT_OK_AND_ASSIGN(FragmentPlanner planner,
                       FragmentPlanner::Create(Table(model, MakeTopology(1, {2}, 0)),
                                               Table(model, MakeTopology(1, {2}, 0))));
  EXPECT_TRUE(planner.writes());
  EXPECT_EQ(planner.group_kind(0), MapperKind::kWholeSlot);
  ASSERT_OK_AND_ASSIGN(FragmentPlan plan,
                       planner.Plan(Pairs({0, 1, 2, 5, 6}, {10, 11, 12, 13, 14}), {}));
  EXPECT_THAT(plan.fragments,
              ElementsAre(Fragment{0, 0, 0, 1280, 384}, Fragment{0, 640, 0, 1664, 256}));
  EXPECT_EQ(plan.fragments_before_coalescing, 5);
  EXPECT_EQ(plan.total_bytes, 640u);
}

TEST(FragmentPlanner, LayerRunAtEachSidesOffset) {
  const ModelSpec model = TinyModel(4, 2);
  // Context PP stage 1 holds layers 2-3 (slot 128); generation PP1 all 4 (slot 256).
  ASSERT_OK_AND_ASSIGN(
      FragmentPlanner planner,
      FragmentPlanner::Create(Table(model, MakeTopology(1, {2, 2}, 0, 1)),
                              Table(model, MakeTopology(1, {4}, 0))));
  EXPECT_EQ(planner.group_kind(0), MapperKind::kLayerRun);
  ASSERT_OK_AND_ASSIGN(FragmentPlan plan, planner.Plan(Pairs({3, 4}, {5, 6}), {}));
  EXPECT_THAT(plan.fragments, ElementsAre(Fragment{0, 384, 0, 1408, 128},
                                          Fragment{0, 512, 0, 1664, 128}));
  EXPECT_EQ(plan.fragments_before_coalescing, 2);
}

TEST(FragmentPlanner, HeadRunPerLayerAndKv) {
  const ModelSpec model = TinyModel(1, 2);
  // Context TP1 holds heads 0-1 (K 32, V 32); generation TP2 rank 1 holds head 1.
  ASSERT_OK_AND_ASSIGN(FragmentPlanner planner,
                       FragmentPlanner::Create(Table(model, MakeTopology(1, {1}, 0)),
                                               Table(model, MakeTopology(2, {1}, 1))));
  EXPECT_EQ(planner.group_kind(0), MapperKind::kHeadRun);
  ASSERT_OK_AND_ASSIGN(FragmentPlan plan, planner.Plan(Pairs({1}, {2}), {}));
  EXPECT_THAT(plan.fragments,
              ElementsAre(Fragment{0, 80, 0, 64, 16}, Fragment{0, 112, 0, 80, 16}));
  EXPECT_EQ(plan.fragments_before_coalescing, 2);
}

TEST(FragmentPlanner, ReplicatedHeadsWithUnequalHeadsPerRankMapOneHead) {
  // 2 heads; context TP4 holds one head per rank (each twice); generation TP1 holds
  // both. Context rank 2 (head 1) writes head 1 only, never a whole slot.
  const ModelSpec model = TinyModel(2, 2);
  ASSERT_OK_AND_ASSIGN(FragmentPlanner planner,
                       FragmentPlanner::Create(Table(model, MakeTopology(4, {2}, 2)),
                                               Table(model, MakeTopology(1, {2}, 0))));
  EXPECT_TRUE(planner.writes());
  EXPECT_EQ(planner.group_kind(0), MapperKind::kHeadRun);
  ASSERT_OK_AND_ASSIGN(FragmentPlan plan, planner.Plan(Pairs({0}, {0}), {}));
  EXPECT_THAT(plan.fragments,
              ElementsAre(Fragment{0, 0, 0, 16, 16}, Fragment{0, 16, 0, 48, 16},
                          Fragment{0, 32, 0, 80, 16}, Fragment{0, 48, 0, 112, 16}));
}

TEST(FragmentPlanner, ReplicaSendsEmptyWriteButChecksBlocks) {
  const ModelSpec model = TinyModel(2, 1);
  ASSERT_OK_AND_ASSIGN(FragmentPlanner planner,
                       FragmentPlanner::Create(Table(model, MakeTopology(2, {2}, 1)),
                                               Table(model, MakeTopology(1, {2}, 0))));
  EXPECT_TRUE(planner.overlaps());
  EXPECT_FALSE(planner.writes());
  ASSERT_OK_AND_ASSIGN(FragmentPlan plan, planner.Plan(Pairs({0, 1}, {2, 3}), {}));
  EXPECT_TRUE(plan.fragments.empty());
  EXPECT_THAT(planner.Plan(Pairs({0, 99}, {2, 3}), {}),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("block=99")));
}

TEST(FragmentPlanner, RejectsBadPairsBeforeEmitting) {
  const ModelSpec model = TinyModel(2, 2);
  ASSERT_OK_AND_ASSIGN(FragmentPlanner planner,
                       FragmentPlanner::Create(Table(model, MakeTopology(1, {2}, 0)),
                                               Table(model, MakeTopology(1, {2}, 0))));
  PlanContext context;
  context.request_id = 7;
  context.slice_id = 3;
  FragmentPlan plan;
  EXPECT_THAT(planner.PlanInto(Pairs({0, 1}, {5, 16}), context, &plan),
              StatusIs(absl::StatusCode::kOutOfRange,
                       HasSubstr("dst block id outside its pool: request=7 slice=3 "
                                 "group=0 index=1 block=16 num_slots=16")));
  EXPECT_TRUE(plan.fragments.empty());
  EXPECT_THAT(planner.Plan(Pairs({-1}, {5}), context),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("block=-1")));
  EXPECT_THAT(planner.Plan(Pairs({1, 2}, {5}), context),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("src=2 dst=1")));
  EXPECT_THAT(planner.Plan({}, context),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("pairings=0")));
}

TEST(FragmentPlanner, RejectsIncompatibleOrMalformedPeers) {
  const ModelSpec model = TinyModel(2, 2);
  ModelSpec other = model;
  other.tokens_per_block = 8;
  EXPECT_THAT(FragmentPlanner::Create(Table(model, MakeTopology(1, {2}, 0)),
                                      Table(other, MakeTopology(1, {2}, 0))),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("field=tokens_per_block")));
  RankPageTable bad = Table(model, MakeTopology(1, {2}, 0));
  bad.pools[0].num_slots = -1;
  EXPECT_THAT(FragmentPlanner::Create(Table(model, MakeTopology(1, {2}, 0)), bad),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dst page table")));
}

TEST(FragmentPlanner, CopiesMambaStatePerCommonLayer) {
  const ModelSpec model = TinyModel(4, 2);
  RankPageTable src = Table(model, MakeTopology(1, {2, 2}, 0, 1));
  RankPageTable dst = Table(model, MakeTopology(1, {4}, 0));
  src.pools.push_back(Pool{uint64_t{1} << 48, 64, 4, PoolRole::kMambaState});
  src.state_groups = {StateGroup{{2, 3}, 1, {{0, 32}, {32, 32}}}};
  dst.pools.push_back(Pool{uint64_t{1} << 48, 128, 4, PoolRole::kMambaState});
  dst.state_groups = {
      StateGroup{{0, 1, 2, 3}, 1, {{0, 32}, {32, 32}, {64, 32}, {96, 32}}}};
  ASSERT_OK_AND_ASSIGN(FragmentPlanner planner, FragmentPlanner::Create(src, dst));
  PlanContext context;
  context.src_state_slot = 1;
  context.dst_state_slot = 3;
  ASSERT_OK_AND_ASSIGN(FragmentPlan plan, planner.Plan(Pairs({}, {}), context));
  EXPECT_THAT(plan.fragments, ElementsAre(Fragment{1, 64, 1, 448, 64}));
  EXPECT_EQ(plan.fragments_before_coalescing, 2);
  context.dst_state_slot = 4;
  EXPECT_THAT(planner.Plan(Pairs({}, {}), context),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("state_group=0")));

  dst.state_groups[0].layers[3].bytes = 16;
  EXPECT_THAT(FragmentPlanner::Create(src, dst),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("layer=3")));
}

TEST(FragmentPlanner, SkipsMambaSliceGroups) {
  // A hybrid model's slices list a Mamba group (always empty) before the attention
  // group; pairings follow the slice order.
  const ModelSpec model = TinyModel(2, 2);
  RankPageTable table = Table(model, MakeTopology(1, {2}));
  table.slice_groups = {kStateSliceGroup, 0};
  ASSERT_OK_AND_ASSIGN(FragmentPlanner planner, FragmentPlanner::Create(table, table));
  std::vector<GroupPairing> pairings(2);
  pairings[1] = Pairs({0, 1}, {2, 3})[0];
  ASSERT_OK_AND_ASSIGN(FragmentPlan plan, planner.Plan(pairings, {}));
  EXPECT_THAT(plan.fragments, ElementsAre(Fragment{0, 0, 0, 256, 256}));
  pairings[0] = pairings[1];
  EXPECT_THAT(planner.Plan(pairings, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("mamba group")));
  EXPECT_THAT(planner.Plan(Pairs({0}, {0}), {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("groups=2")));
}

// One layer whose K and V sit at both ends of a 256-byte slot, with a gap between:
// two pieces per block, and V of block b continues K of block b + 1 when both ids go
// up by one, so fragments also coalesce across blocks outside whole-slot copies.
RankPageTable GappedTable() {
  RankPageTable table;
  table.tokens_per_block = 4;
  table.head_size = 8;
  table.element_bytes = 2;
  table.num_kv_heads = 1;
  table.topology.layers_per_pp_rank = {1};
  table.pools = {Pool{uint64_t{1} << 20, 256, 16, PoolRole::kKVCache}};
  AttentionGroup group;
  group.kv_heads_per_rank = 1;
  group.global_layer_ids = {0};
  group.view = PoolView{0, {{0, 192}}};
  table.attention_groups = {group};
  return table;
}

// Count must report what PlanInto builds, and list a prefix of it, for every kind of
// mapping and list limit.
TEST(FragmentPlanner, CountMatchesPlanIntoWithoutBuildingThePlan) {
  const ModelSpec model = TinyModel(4, 2);
  struct Case {
    const char* name;
    RankPageTable src, dst;
    std::vector<GroupPairing> pairings;
    int64_t want_after;
  };
  std::vector<Case> cases = {
      {"whole slot runs", Table(model, MakeTopology(1, {4})), Table(model, MakeTopology(1, {4})),
       Pairs({0, 1, 2, 5, 6, 9}, {10, 11, 12, 13, 14, 3}), 3},
      {"layer run", Table(model, MakeTopology(1, {2, 2}, 0, 1)),
       Table(model, MakeTopology(1, {4})), Pairs({3, 4, 5}, {5, 6, 7}), 3},
      {"head run", Table(model, MakeTopology(1, {4})), Table(model, MakeTopology(2, {4}, 1)),
       Pairs({1, 2}, {2, 3}), 16},
      {"gapped slots coalesce across blocks", GappedTable(), GappedTable(),
       Pairs({0, 1, 2, 7, 3}, {5, 6, 7, 8, 9}), 8},
      {"empty", GappedTable(), GappedTable(), Pairs({}, {}), 0},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    ASSERT_OK_AND_ASSIGN(FragmentPlanner planner, FragmentPlanner::Create(c.src, c.dst));
    ASSERT_OK_AND_ASSIGN(FragmentPlan plan, planner.Plan(c.pairings, {}));
    EXPECT_EQ(static_cast<int64_t>(plan.fragments.size()), c.want_after);
    for (size_t max_listed = 0; max_listed <= plan.fragments.size() + 1; ++max_listed) {
      SCOPED_TRACE(max_listed);
      std::vector<Fragment> first = {Fragment{9, 9, 9, 9, 9}};  // cleared by Count
      ASSERT_OK_AND_ASSIGN(PlanCounts counts,
                           planner.Count(c.pairings, {}, max_listed, &first));
      EXPECT_EQ(counts.fragments_before_coalescing, plan.fragments_before_coalescing);
      EXPECT_EQ(counts.fragments_after_coalescing,
                static_cast<int64_t>(plan.fragments.size()));
      EXPECT_EQ(counts.total_bytes, plan.total_bytes);
      const size_t listed = std::min(max_listed, plan.fragments.size());
      EXPECT_THAT(first, ElementsAreArray(plan.fragments.begin(),
                                          plan.fragments.begin() + listed));
    }
    ASSERT_OK_AND_ASSIGN(PlanCounts counts, planner.Count(c.pairings, {}, 0, nullptr));
    EXPECT_EQ(counts.fragments_after_coalescing, c.want_after);
  }
  ASSERT_OK_AND_ASSIGN(FragmentPlanner planner,
                       FragmentPlanner::Create(GappedTable(), GappedTable()));
  EXPECT_THAT(planner.Count(Pairs({16}, {0}), {}, 4, nullptr),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("block=16")));
}

// Regression: issue 8, finding 5. Pairs that name one slot again and again (which
// PairSliceBlocks now rejects, but PlanInto is public) summed bytes past 2^64 and
// reported the wrapped total.
TEST(FragmentPlanner, RefusesAPlanWhoseBytesPass64Bits) {
  ModelSpec model = TinyModel(1, 1);
  model.tokens_per_block = 1 << 20;
  model.head_size = 1 << 20;
  model.element_bytes = 8;  // K or V: 2^43 bytes; a slot 2^44
  ASSERT_OK_AND_ASSIGN(RankPageTable table,
                       BuildStandardPageTable(model, MakeTopology(1, {1}), 4, 0));
  ASSERT_OK_AND_ASSIGN(FragmentPlanner planner, FragmentPlanner::Create(table, table));
  BlockList ids;
  for (int i = 0; i < (1 << 20); ++i) ids.push_back(i % 2);  // 2^20 x 2^44 bytes
  PlanContext context;
  context.request_id = 5;
  EXPECT_THAT(planner.Plan(Pairs(ids, ids), context),
              StatusIs(absl::StatusCode::kOutOfRange,
                       HasSubstr("plan size overflows 64 bits: request=5 group=0")));
  EXPECT_THAT(planner.Count(Pairs(ids, ids), context, 0, nullptr),
              StatusIs(absl::StatusCode::kOutOfRange));
  ids.resize(1 << 19);  // 2^63 bytes: still fits
  ASSERT_OK_AND_ASSIGN(FragmentPlan plan, planner.Plan(Pairs(ids, ids), context));
  EXPECT_EQ(plan.total_bytes, uint64_t{1} << 63);
}

TEST(ValidateFragments, RejectsFragmentsOutsidePools) {
  const ModelSpec model = TinyModel(2, 2);
  const RankPageTable table = Table(model, MakeTopology(1, {2}, 0));  // 16 slots of 128
  EXPECT_THAT(ValidateFragments({Fragment{0, 0, 0, 1920, 128}}, table, table), IsOk());
  EXPECT_THAT(ValidateFragments({Fragment{0, 0, 0, 1921, 128}}, table, table),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("dst fragment")));
  EXPECT_THAT(ValidateFragments({Fragment{3, 0, 0, 0, 1}}, table, table),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("pool=3")));
  EXPECT_THAT(ValidateFragments({Fragment{0, 0, 0, 0, 0}}, table, table),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("bytes=0")));
}

}  // namespace
}  // namespace kvx::transfer
