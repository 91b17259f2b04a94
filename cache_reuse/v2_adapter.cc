#include "cache_reuse/v2_adapter.h"

#include <algorithm>
#include <cstdint>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "transfer/slice.h"

namespace kvx::cache_reuse {

ValidPages SplitPositionalTable(const transfer::BlockList& table) {
  const auto first_held = std::find_if(table.begin(), table.end(),
                                       [](int64_t id) { return id != kEvictedBlock; });
  ValidPages valid;
  valid.num_dropped_leading = first_held - table.begin();
  valid.pages.assign(first_held, table.end());
  return valid;
}

absl::StatusOr<int64_t> V2Adapter::GlobalCachedTokens(int64_t request_id,
                                                      int64_t tokens_per_block) const {
  if (!options_.enabled) return 0;
  const std::optional<int64_t> committed = manager_->NumCommittedTokens(request_id);
  if (!committed) return 0;  // the manager does not know the request
  if (*committed < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("committed token count must not be negative: request=", request_id,
                     " num_committed_tokens=", *committed));
  }
  return *committed / tokens_per_block * tokens_per_block;
}

absl::StatusOr<transfer::BlockList> V2Adapter::PositionalBlockTable(int64_t request_id,
                                                                    int layer_group) const {
  absl::StatusOr<ValidPages> valid = manager_->Pages(request_id, layer_group);
  if (!valid.ok()) return valid.status();
  if (valid->num_dropped_leading < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dropped page count must not be negative: request=", request_id,
        " group=", layer_group, " num_dropped_leading=", valid->num_dropped_leading));
  }
  // The manager kept only the valid tail; put each page back at its position so
  // that a dropped head can never be mistaken for a shorter table.
  transfer::BlockList table(valid->num_dropped_leading, kEvictedBlock);
  table.insert(table.end(), valid->pages.begin(), valid->pages.end());
  return table;
}

absl::StatusOr<int64_t> V2Adapter::BlockRangeInto(int64_t request_id, int layer_group,
                                                  int64_t first, int64_t end,
                                                  transfer::BlockList* out) const {
  absl::StatusOr<ValidPages> valid = manager_->Pages(request_id, layer_group);
  if (!valid.ok()) return valid.status();
  const int64_t dropped = valid->num_dropped_leading;
  if (dropped < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dropped page count must not be negative: request=", request_id,
        " group=", layer_group, " num_dropped_leading=", dropped));
  }
  const int64_t length = dropped + static_cast<int64_t>(valid->pages.size());
  out->clear();
  const int64_t stop = std::min(end, length);
  for (int64_t b = first; b < std::min(stop, dropped); ++b) out->push_back(kEvictedBlock);
  const int64_t from = std::max(first, dropped);
  if (from < stop) {
    out->insert(out->end(), valid->pages.begin() + (from - dropped),
                valid->pages.begin() + (stop - dropped));
  }
  return length;
}

absl::Status V2Adapter::CommitReceivedBlocks(int64_t request_id) {
  if (!options_.enabled || !manager_->HasCache(request_id)) return absl::OkStatus();
  return manager_->Commit(request_id);
}

}  // namespace kvx::cache_reuse
