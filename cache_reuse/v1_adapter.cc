#include "cache_reuse/v1_adapter.h"

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "transfer/slice.h"

namespace kvx::cache_reuse {

absl::StatusOr<int64_t> V1Adapter::GlobalCachedTokens(int64_t request_id,
                                                      int64_t tokens_per_block) const {
  if (!options_.enabled) return 0;
  absl::StatusOr<int64_t> prepopulated = manager_->PrepopulatedPromptLen(request_id);
  if (!prepopulated.ok()) return prepopulated.status();
  if (*prepopulated < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prepopulated prompt length must not be negative: request=",
                     request_id, " prepopulated_prompt_len=", *prepopulated));
  }
  return *prepopulated / tokens_per_block * tokens_per_block;
}

absl::StatusOr<transfer::BlockList> V1Adapter::PositionalBlockTable(int64_t request_id,
                                                                    int layer_group) const {
  return manager_->BlockTable(request_id, layer_group);
}

absl::StatusOr<int64_t> V1Adapter::BlockRangeInto(int64_t request_id, int layer_group,
                                                  int64_t first, int64_t end,
                                                  transfer::BlockList* out) const {
  absl::StatusOr<transfer::BlockList> table = manager_->BlockTable(request_id, layer_group);
  if (!table.ok()) return table.status();
  const int64_t length = static_cast<int64_t>(table->size());
  out->clear();
  if (first < std::min(end, length)) {
    out->assign(table->begin() + first, table->begin() + std::min(end, length));
  }
  return length;
}

absl::Status V1Adapter::CommitReceivedBlocks(int64_t request_id) {
  if (!options_.enabled) return absl::OkStatus();
  return manager_->StoreBlocksForReuse(request_id);
}

}  // namespace kvx::cache_reuse
