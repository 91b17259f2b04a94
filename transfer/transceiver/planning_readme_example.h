// Do not include outside tests: the README's planning example, compiled (see
// planning_readme_example.cc).

#ifndef KVX_TRANSFER_TRANSCEIVER_PLANNING_README_EXAMPLE_H_
#define KVX_TRANSFER_TRANSCEIVER_PLANNING_README_EXAMPLE_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "cache_reuse/adapter.h"
#include "transfer/fragments.h"
#include "transfer/page_table.h"
#include "transfer/slice.h"

namespace kvx_readme {

absl::StatusOr<kvx::transfer::KVSlice> Slice(const kvx::cache_reuse::CacheReuseAdapter& adapter,
                                             kvx::cache_reuse::Side side, int64_t rid,
                                             int64_t prompt_len, int64_t tokens_per_block);

absl::StatusOr<kvx::transfer::FragmentPlan> Plan(
    const kvx::transfer::KVSlice& context_slice, const kvx::transfer::KVSlice& generation_slice,
    const kvx::transfer::RankPageTable& context_rank,
    const kvx::transfer::RankPageTable& generation_rank, int64_t prompt_len);

}  // namespace kvx_readme

#endif  // KVX_TRANSFER_TRANSCEIVER_PLANNING_README_EXAMPLE_H_
