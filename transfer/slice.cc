#include "transfer/slice.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"

namespace kvx::transfer {
namespace {

absl::Status CheckTokensPerBlock(int64_t tokens_per_block) {
  if (tokens_per_block <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokens_per_block must be positive: tokens_per_block=",
                     tokens_per_block));
  }
  return absl::OkStatus();
}

// " request=17 slice=2", naming only what is known.
std::string Where(const PairingOptions& options) {
  std::string where;
  if (options.request_id) absl::StrAppend(&where, " request=", *options.request_id);
  if (options.slice_id) absl::StrAppend(&where, " slice=", *options.slice_id);
  return where;
}

// " request=17 slice=2 group=1".
std::string Where(const PairingOptions& options, size_t group) {
  return absl::StrCat(Where(options), " group=", group);
}

// Step 3: a list may carry one trailing draft-token block past its suffix, which
// never moves; anything longer breaks the suffix invariant. Shorter lists are kept
// as they are: their length is what says where they start.
absl::StatusOr<size_t> SuffixLength(const char* side, size_t len, int64_t total_blocks,
                                    const PairingOptions& options, size_t group) {
  const size_t total = static_cast<size_t>(total_blocks);
  if (len <= total) return len;
  if (len == total + 1) return total;
  return absl::InvalidArgumentError(absl::StrCat(
      side, " block list longer than its suffix:", Where(options, group), " len=", len,
      " end=", total_blocks * options.tokens_per_block,
      " tpb=", options.tokens_per_block, " max=", total + 1));
}

// A repeated id in `ids` as a pairing error: "<side> block list repeats a block:
// <where> block=B index=I other_index=J".
absl::Status CheckDistinct(const char* side, absl::Span<const int64_t> ids,
                           const std::string& where) {
  const std::optional<RepeatedBlock> repeated = FindRepeatedBlock(ids);
  if (!repeated) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      side, " block list repeats a block:", where, " block=", ids[repeated->first],
      " index=", repeated->first, " other_index=", repeated->second));
}

// Step 7 on lists already checked, into `src_out` and `dst_out` (their capacity is
// kept: a caller that plans request after request allocates nothing once warm).
void AlignInto(absl::Span<const int64_t> src, int64_t src_start_token,
               absl::Span<const int64_t> dst, int64_t dst_start_token,
               int64_t tokens_per_block, int64_t floor_token, BlockList* src_out,
               BlockList* dst_out) {
  const int64_t overlap = std::max({src_start_token, dst_start_token, floor_token});
  const int64_t src_skip = (overlap - src_start_token) / tokens_per_block;
  const int64_t dst_skip = (overlap - dst_start_token) / tokens_per_block;
  const int64_t n = std::min(static_cast<int64_t>(src.size()) - src_skip,
                             static_cast<int64_t>(dst.size()) - dst_skip);
  src_out->clear();
  dst_out->clear();
  if (n <= 0) return;
  src_out->assign(src.begin() + src_skip, src.begin() + src_skip + n);
  dst_out->assign(dst.begin() + dst_skip, dst.begin() + dst_skip + n);
}

AlignedBlocks Align(absl::Span<const int64_t> src, int64_t src_start_token,
                    absl::Span<const int64_t> dst, int64_t dst_start_token,
                    int64_t tokens_per_block, int64_t floor_token) {
  AlignedBlocks aligned;
  AlignInto(src, src_start_token, dst, dst_start_token, tokens_per_block, floor_token,
            &aligned.src, &aligned.dst);
  return aligned;
}

}  // namespace

std::optional<RepeatedBlock> FindRepeatedBlock(absl::Span<const int64_t> ids) {
  const size_t n = ids.size();
  // Allocators often hand out increasing ids: no repeat possible, nothing allocated.
  if (std::adjacent_find(ids.begin(), ids.end(), std::greater_equal<int64_t>()) ==
      ids.end()) {
    return std::nullopt;
  }
  const auto [lo_it, hi_it] = std::minmax_element(ids.begin(), ids.end());
  const int64_t lo = *lo_it;
  const int64_t hi = *hi_it;
  // The earliest position j whose id occurred before; the first occurrence is found
  // on the cold path.
  size_t second = n;
  const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
  if (range / 64 <= 4 * static_cast<uint64_t>(n)) {
    // Dense ids (slots of one pool): a bitmap over [lo, hi].
    std::vector<uint64_t> seen(range / 64 + 1, 0);
    for (size_t j = 0; j < n && second == n; ++j) {
      const uint64_t bit = static_cast<uint64_t>(ids[j]) - static_cast<uint64_t>(lo);
      uint64_t& word = seen[bit / 64];
      const uint64_t mask = uint64_t{1} << (bit % 64);
      if (word & mask) second = j;
      word |= mask;
    }
  } else {
    // Sparse ids: sort (id, position); within each id the second-smallest position
    // is where it repeats.
    std::vector<std::pair<int64_t, size_t>> sorted(n);
    for (size_t i = 0; i < n; ++i) sorted[i] = {ids[i], i};
    std::sort(sorted.begin(), sorted.end());
    for (size_t k = 1; k < n; ++k) {
      if (sorted[k].first == sorted[k - 1].first &&
          (k < 2 || sorted[k - 2].first != sorted[k].first)) {
        second = std::min(second, sorted[k].second);
      }
    }
  }
  if (second == n) return std::nullopt;
  const size_t first =
      static_cast<size_t>(std::find(ids.begin(), ids.end(), ids[second]) - ids.begin());
  return RepeatedBlock{first, second};
}

template <typename Unit>
absl::StatusOr<HalfOpenRange<Unit>> HalfOpenRange<Unit>::Create(int64_t start, int64_t end) {
  if (start < 0 || end < 0 || start >= end) {
    return absl::InvalidArgumentError(absl::StrCat(
        Unit::kName, " must satisfy 0 <= start < end: start=", start, " end=", end));
  }
  return HalfOpenRange(start, end);
}

template class HalfOpenRange<TokenUnit>;
template class HalfOpenRange<LayerUnit>;

absl::StatusOr<WindowBlocks> ComputeWindowBlocks(int64_t prompt_len,
                                                 std::optional<int64_t> window,
                                                 int64_t tokens_per_block) {
  if (absl::Status s = CheckTokensPerBlock(tokens_per_block); !s.ok()) return s;
  if (prompt_len < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt length must not be negative: prompt_len=", prompt_len));
  }
  if (window && *window <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention window must be positive: window=", *window));
  }
  WindowBlocks blocks;
  blocks.total_blocks = CeilDiv(prompt_len, tokens_per_block);
  // Position prompt_len (the next token) attends to [prompt_len + 1 - W,
  // prompt_len]; a block whose last token precedes that start is stale.
  // Written so that no term overflows for any prompt_len and window.
  if (window && *window <= prompt_len) {
    blocks.stale_end = (prompt_len - *window + 1) / tokens_per_block;
  }
  blocks.expected_valid = std::max<int64_t>(0, blocks.total_blocks - blocks.stale_end);
  return blocks;
}

absl::StatusOr<AlignedBlocks> AlignBlocks(absl::Span<const int64_t> src,
                                          int64_t src_start_token,
                                          absl::Span<const int64_t> dst,
                                          int64_t dst_start_token,
                                          int64_t tokens_per_block, int64_t floor_token) {
  if (absl::Status s = CheckTokensPerBlock(tokens_per_block); !s.ok()) return s;
  if (src_start_token < 0 || dst_start_token < 0 || floor_token < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "start tokens must not be negative: src_start_token=", src_start_token,
        " dst_start_token=", dst_start_token, " floor_token=", floor_token));
  }
  if (absl::Status s = CheckDistinct("source", src, ""); !s.ok()) return s;
  if (absl::Status s = CheckDistinct("destination", dst, ""); !s.ok()) return s;
  return Align(src, src_start_token, dst, dst_start_token, tokens_per_block, floor_token);
}

absl::StatusOr<std::vector<GroupPairing>> PairSliceBlocks(const KVSlice& src,
                                                          const KVSlice& dst,
                                                          const PairingOptions& options) {
  std::vector<GroupPairing> pairings;
  if (absl::Status s = PairSliceBlocksInto(src, dst, options, &pairings); !s.ok()) return s;
  return pairings;
}

absl::Status PairSliceBlocksInto(const KVSlice& src, const KVSlice& dst,
                                 const PairingOptions& options,
                                 std::vector<GroupPairing>* pairings_out) {
  if (absl::Status s = CheckTokensPerBlock(options.tokens_per_block); !s.ok()) return s;
  const size_t num_groups = src.block_ids_per_layer_group.size();
  if (dst.block_ids_per_layer_group.size() != num_groups ||
      options.windows.size() != num_groups) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layer group counts differ:", Where(options),
        " src_groups=", num_groups, " dst_groups=", dst.block_ids_per_layer_group.size(),
        " windows=", options.windows.size()));
  }
  if (options.prompt_len && *options.prompt_len < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt length must not be negative: prompt_len=", *options.prompt_len));
  }
  if (options.dst_start_token && *options.dst_start_token < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "destination start token must not be negative: dst_start_token=",
        *options.dst_start_token));
  }

  if (src.token_range && dst.token_range && src.token_range->end() != dst.token_range->end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "source and destination slices end at different tokens:", Where(options),
        " src_end=", src.token_range->end(), " dst_end=", dst.token_range->end()));
  }

  const int64_t tpb = options.tokens_per_block;
  const int64_t slice_end = src.token_range ? src.token_range->end() : 0;
  const int64_t total = CeilDiv(slice_end, tpb);

  std::vector<GroupPairing>& pairings = *pairings_out;
  pairings.resize(num_groups);
  for (size_t g = 0; g < num_groups; ++g) {
    const BlockList& src_list = src.block_ids_per_layer_group[g];
    const BlockList& dst_list = dst.block_ids_per_layer_group[g];
    absl::StatusOr<size_t> src_len = SuffixLength("source", src_list.size(), total, options, g);
    if (!src_len.ok()) return src_len.status();
    absl::StatusOr<size_t> dst_len =
        SuffixLength("destination", dst_list.size(), total, options, g);
    if (!dst_len.ok()) return dst_len.status();
    // A peer's list is checked whole: a repeated id is a broken list even where it
    // would not move (draft tail, a prefix the other side holds).
    if (absl::Status s = CheckDistinct("source", src_list, Where(options, g)); !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckDistinct("destination", dst_list, Where(options, g));
        !s.ok()) {
      return s;
    }

    GroupPairing& pairing = pairings[g];
    pairing.src_start_token = (total - static_cast<int64_t>(*src_len)) * tpb;
    pairing.dst_start_token = (total - static_cast<int64_t>(*dst_len)) * tpb;
    if (options.dst_start_token) {
      pairing.dst_start_token = std::max(pairing.dst_start_token, *options.dst_start_token);
    }

    int64_t floor_token = 0;
    if (const std::optional<int64_t>& window = options.windows[g]; window) {
      if (!options.prompt_len) {
        return absl::InvalidArgumentError(absl::StrCat(
            "windowed group needs the request's prompt length:", Where(options, g),
            " window=", *window));
      }
      absl::StatusOr<WindowBlocks> blocks = ComputeWindowBlocks(*options.prompt_len, window, tpb);
      if (!blocks.ok()) {
        return absl::Status(blocks.status().code(),
                            absl::StrCat(blocks.status().message(), ":", Where(options, g)));
      }
      floor_token = blocks->stale_end * tpb;
    }

    AlignInto(absl::MakeConstSpan(src_list.data(), *src_len), pairing.src_start_token,
              absl::MakeConstSpan(dst_list.data(), *dst_len), pairing.dst_start_token, tpb,
              floor_token, &pairing.src, &pairing.dst);
  }
  return absl::OkStatus();
}

}  // namespace kvx::transfer
