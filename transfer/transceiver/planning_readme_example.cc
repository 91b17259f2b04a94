// The "Using the planning core" example of README.md, compiled as written (the text
// between the markers is the README's code block; readme_example_sync_test checks
// it) and run by planning_readme_example_test.

#include "transfer/transceiver/planning_readme_example.h"

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache_reuse/adapter.h"
#include "transfer/fragments.h"
#include "transfer/page_table.h"
#include "transfer/slice.h"

namespace kvx_readme {

// README-BEGIN
// Each side builds its slice of a request through its cache manager's adapter
// (SEMANTICS.md sections 3 and 4): the generation side's lists skip its prefix hit.
absl::StatusOr<kvx::transfer::KVSlice> Slice(const kvx::cache_reuse::CacheReuseAdapter& adapter,
                                             kvx::cache_reuse::Side side, int64_t rid,
                                             int64_t prompt_len, int64_t tokens_per_block) {
  kvx::cache_reuse::SliceRequest request;
  request.request_id = rid;
  request.prompt_len = prompt_len;
  request.tokens_per_block = tokens_per_block;
  request.side = side;
  const std::vector<kvx::cache_reuse::LayerGroupSpec> groups = {
      kvx::cache_reuse::LayerGroupSpec::Full(), kvx::cache_reuse::LayerGroupSpec::Windowed(64)};
  absl::StatusOr<kvx::cache_reuse::BuiltSlice> built =
      kvx::cache_reuse::BuildSlice(adapter, request, groups);
  if (!built.ok()) return built.status();
  return built->slice;
}

// The sender pairs its slice with the receiver's (section 5) and plans the bytes of
// one rank pair (section 6) from both ranks' page tables.
absl::StatusOr<kvx::transfer::FragmentPlan> Plan(
    const kvx::transfer::KVSlice& context_slice, const kvx::transfer::KVSlice& generation_slice,
    const kvx::transfer::RankPageTable& context_rank,
    const kvx::transfer::RankPageTable& generation_rank, int64_t prompt_len) {
  kvx::transfer::PairingOptions options;
  options.tokens_per_block = context_rank.tokens_per_block;
  options.prompt_len = prompt_len;
  options.windows = {std::nullopt, 64};
  absl::StatusOr<std::vector<kvx::transfer::GroupPairing>> pairs =
      kvx::transfer::PairSliceBlocks(context_slice, generation_slice, options);
  if (!pairs.ok()) return pairs.status();
  absl::StatusOr<kvx::transfer::FragmentPlanner> planner =
      kvx::transfer::FragmentPlanner::Create(context_rank, generation_rank);
  if (!planner.ok()) return planner.status();
  return planner->Plan(*pairs, kvx::transfer::PlanContext{});
}
// README-END

}  // namespace kvx_readme
