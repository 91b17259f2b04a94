#include "transfer/internal/layer_coverage.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"

namespace kvx::transfer_internal {

absl::Status CheckLayerCoverage(int64_t first, int64_t end,
                                absl::Span<const absl::Span<const int64_t>> groups,
                                absl::Span<const int64_t> state_layers) {
  std::vector<std::pair<int64_t, size_t>> layers;  // (layer, group)
  for (size_t g = 0; g < groups.size(); ++g) {
    for (int64_t id : groups[g]) layers.emplace_back(id, g);
  }
  std::sort(layers.begin(), layers.end());
  for (size_t i = 1; i < layers.size(); ++i) {
    if (layers[i].first == layers[i - 1].first) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer in two attention groups: layer=", layers[i].first,
                       " group=", layers[i - 1].second, " other_group=", layers[i].second));
    }
  }
  // Walk the union of attention and state layers; the first gap is the culprit.
  int64_t next = first;
  size_t a = 0;
  size_t s = 0;
  while (next < end) {
    const bool in_attention = a < layers.size() && layers[a].first == next;
    const bool in_state = s < state_layers.size() && state_layers[s] == next;
    if (!in_attention && !in_state) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer in no attention group and not a state layer: layer=", next,
                       " first=", first, " end=", end));
    }
    a += in_attention;
    s += in_state;
    ++next;
  }
  return absl::OkStatus();
}

}  // namespace kvx::transfer_internal
