// Do not include directly: detail of transfer/page_table.h and transfer/scenario.h.
// IWYU pragma: private, include "transfer/page_table.h"
//
// The rule both a model and a rank's page table keep: every layer belongs to exactly
// one attention group, except Mamba state layers, which may belong to none. A layer
// in no group would silently never move; a layer in two would be written twice.

#ifndef KVX_TRANSFER_INTERNAL_LAYER_COVERAGE_H_
#define KVX_TRANSFER_INTERNAL_LAYER_COVERAGE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace kvx::transfer_internal {

// Checks that each layer of [first, end) is in exactly one of `groups`, or in none
// when it is in `state_layers`. REQUIRES: every list is strictly increasing inside
// [first, end) (the callers check that first, naming their own fields). Returns
// InvalidArgument "layer in two attention groups: layer=3 group=0 other_group=2" or
// "layer in no attention group and not a state layer: layer=5 first=0 end=8".
// O(L log L) in the listed layers; allocates nothing proportional to end - first.
absl::Status CheckLayerCoverage(int64_t first, int64_t end,
                                absl::Span<const absl::Span<const int64_t>> groups,
                                absl::Span<const int64_t> state_layers);

}  // namespace kvx::transfer_internal

#endif  // KVX_TRANSFER_INTERNAL_LAYER_COVERAGE_H_
