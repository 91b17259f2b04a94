#include "transfer/scenario.h"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "transfer/fragments.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;

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
  };
  Scenario cached = Llama70B(MakeTopology(1, {40, 40}), MakeTopology(1, {80}), 8192);
  cached.request.generation_cached_tokens = 4096;
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
      // Half the prompt cached: only 128 blocks move.
      {"pp2 to pp1, 4k cached", cached, 2, 2 * 128, 2 * 128},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    ASSERT_OK_AND_ASSIGN(ScenarioPlan plan, PlanScenario(c.scenario));
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
  ASSERT_OK_AND_ASSIGN(ScenarioPlan plan, PlanScenario(s));
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

TEST(PlanScenario, RejectsMissingBlocks) {
  Scenario s = Llama70B(MakeTopology(1, {80}), MakeTopology(1, {80}), 100);
  s.request.context_tables = {{0, 1}};
  EXPECT_THAT(PlanScenario(s), StatusIs(absl::StatusCode::kInvalidArgument,
                                        HasSubstr("shorter than the prompt")));
  s.request.context_tables = {{0, -1, 2, 3}};
  EXPECT_THAT(PlanScenario(s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("block=1")));
  s.request.context_tables = {};
  s.context.num_slots = 2;
  EXPECT_THAT(PlanScenario(s),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("block=2 num_slots=2")));
  s.context.num_slots = int64_t{1} << 62;
  EXPECT_THAT(PlanScenario(s), StatusIs(absl::StatusCode::kInvalidArgument,
                                        HasSubstr("does not fit 64-bit addresses")));
  s.context.num_slots = 0;
  s.generation.topology = MakeTopology(1, {79});
  EXPECT_THAT(PlanScenario(s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("split_layers=79")));
}

}  // namespace
}  // namespace kvx::transfer
