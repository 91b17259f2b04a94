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

namespace {

absl::Status TwoGroups(int64_t layer, size_t group, size_t other_group) {
  return absl::InvalidArgumentError(absl::StrCat("layer in two attention groups: layer=",
                                                 layer, " group=", group,
                                                 " other_group=", other_group));
}

absl::Status NoGroup(int64_t layer, int64_t first, int64_t end) {
  return absl::InvalidArgumentError(
      absl::StrCat("layer in no attention group and not a state layer: layer=", layer,
                   " first=", first, " end=", end));
}

}  // namespace

absl::Status CheckLayerCoverage(int64_t first, int64_t end,
                                absl::Span<const absl::Span<const int64_t>> groups,
                                absl::Span<const int64_t> state_layers) {
  size_t listed = state_layers.size();
  for (absl::Span<const int64_t> ids : groups) listed += ids.size();
  const uint64_t span = static_cast<uint64_t>(end) - static_cast<uint64_t>(first);
  if (span <= listed) {
    // The usual case: an owner per layer of the span, O(span + listed).
    constexpr size_t kNone = static_cast<size_t>(-1);
    std::vector<size_t> owner(span, kNone);
    int64_t twice = end;  // the smallest layer in two groups
    size_t group = 0;
    size_t other_group = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      for (int64_t id : groups[g]) {
        size_t& slot = owner[static_cast<size_t>(id - first)];
        if (slot != kNone && id < twice) {
          twice = id;
          group = slot;
          other_group = g;
        }
        if (slot == kNone) slot = g;
      }
    }
    if (twice < end) return TwoGroups(twice, group, other_group);
    size_t s = 0;
    for (int64_t layer = first; layer < end; ++layer) {
      while (s < state_layers.size() && state_layers[s] < layer) ++s;
      const bool in_state = s < state_layers.size() && state_layers[s] == layer;
      if (owner[static_cast<size_t>(layer - first)] == kNone && !in_state) {
        return NoGroup(layer, first, end);
      }
    }
    return absl::OkStatus();
  }
  // More layers than listed: some layer is in no group. Sort to report the first
  // repeat, if any, before the first gap.
  std::vector<std::pair<int64_t, size_t>> layers;  // (layer, group)
  for (size_t g = 0; g < groups.size(); ++g) {
    for (int64_t id : groups[g]) layers.emplace_back(id, g);
  }
  std::sort(layers.begin(), layers.end());
  for (size_t i = 1; i < layers.size(); ++i) {
    if (layers[i].first == layers[i - 1].first) {
      return TwoGroups(layers[i].first, layers[i - 1].second, layers[i].second);
    }
  }
  int64_t next = first;
  size_t a = 0;
  size_t s = 0;
  while (next < end) {
    const bool in_attention = a < layers.size() && layers[a].first == next;
    const bool in_state = s < state_layers.size() && state_layers[s] == next;
    if (!in_attention && !in_state) return NoGroup(next, first, end);
    a += in_attention;
    s += in_state;
    ++next;
  }
  return absl::OkStatus();
}

}  // namespace kvx::transfer_internal
