// Runs the README's planning example (planning_readme_example.cc): a 256-token
// request, a full and a 64-token windowed group, the generation side holding the
// first 8 blocks; identical layouts copy whole slots and coalesce.

#include "transfer/transceiver/planning_readme_example.h"

#include <cstdint>
#include <optional>

#include "cache_reuse/v1_adapter.h"
#include "gtest/gtest.h"
#include "testing/fake_cache_managers.h"
#include "testing/status_matchers.h"
#include "transfer/scenario.h"
#include "transfer/topology.h"

namespace kvx_readme {
namespace {

TEST(PlanningReadmeExample, PlansOnlyWhatTheGenerationSideLacks) {
  kvx::transfer::ModelSpec model;
  model.num_layers = 2;
  model.num_kv_heads = 2;
  model.head_size = 8;
  model.element_bytes = 2;
  model.tokens_per_block = 16;
  model.groups = {kvx::transfer::GroupSpec{std::nullopt, {0}},
                  kvx::transfer::GroupSpec{64, {1}}};
  const kvx::transfer::Topology topology = kvx::transfer::MakeTopology(1, {2});
  ASSERT_OK_AND_ASSIGN(auto context_rank,
                       kvx::transfer::BuildStandardPageTable(model, topology, 64, 0x1000));
  ASSERT_OK_AND_ASSIGN(auto generation_rank,
                       kvx::transfer::BuildStandardPageTable(model, topology, 64, 0x1000));
  kvx::transfer::BlockList table;
  for (int64_t b = 0; b < 16; ++b) table.push_back(b);
  kvx::testing::FakeBlockTableCacheManager context_cache, generation_cache;
  context_cache.AddRequest(17, 0, {table, table});
  generation_cache.AddRequest(17, /*prepopulated_prompt_len=*/128, {table, table});
  kvx::cache_reuse::V1Adapter context(&context_cache, {true});
  kvx::cache_reuse::V1Adapter generation(&generation_cache, {true});

  ASSERT_OK_AND_ASSIGN(auto src, Slice(context, kvx::cache_reuse::Side::kContext, 17, 256, 16));
  ASSERT_OK_AND_ASSIGN(auto dst,
                       Slice(generation, kvx::cache_reuse::Side::kGeneration, 17, 256, 16));
  ASSERT_OK_AND_ASSIGN(auto plan, Plan(src, dst, context_rank, generation_rank, 256));
  // Full group: blocks 8..15 (the hit skips 0..7); window: blocks 12..15 (stale_end
  // = (256 + 1 - 64) / 16 = 12). Whole slots, contiguous: one write per group.
  EXPECT_EQ(plan.fragments.size(), 2u);
  EXPECT_EQ(plan.fragments_before_coalescing, 8 + 4);
}

}  // namespace
}  // namespace kvx_readme
