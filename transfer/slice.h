// File: transfer/slice.h
//
// The slice math of a KV-cache transfer: token and layer ranges, the slice a side
// sends or asks for, the sliding-window quantities, and the pairing of source and
// destination blocks (SEMANTICS.md sections 1, 2 and 5). Pure functions: no threads,
// no I/O, no allocation beyond the returned lists.
//
// Example: pair what the context side holds with what the generation side lacks.
//
//   KVSlice src;  // context side: 4 blocks of a 32-token prompt, tpb 8
//   src.token_range = TokenRange::Create(0, 32).value();
//   src.block_ids_per_layer_group = {{10, 11, 12, 13}};
//   KVSlice dst = src;  // generation side cached 2 blocks: its list is shorter
//   dst.block_ids_per_layer_group = {{22, 23}};
//   PairingOptions options;
//   options.tokens_per_block = 8;
//   options.prompt_len = 32;
//   options.windows = {std::nullopt};
//   absl::StatusOr<std::vector<GroupPairing>> pairs = PairSliceBlocks(src, dst, options);
//   // pairs->at(0).src == {12, 13}, pairs->at(0).dst == {22, 23}
//
// Thread safety: every function is pure; the types are plain values.

#ifndef KVX_TRANSFER_SLICE_H_
#define KVX_TRANSFER_SLICE_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvx::transfer {

// A sequence of physical block (slot) ids of one layer group.
using BlockList = std::vector<int64_t>;

// The half-open interval [start, end) of positions of one kind: `Unit` names it
// (TokenUnit, LayerUnit). Never empty: an empty transfer is expressed by empty
// block lists (SEMANTICS.md section 1).
template <typename Unit>
class HalfOpenRange {
 public:
  // Returns InvalidArgument when start < 0, end < 0 or start >= end.
  // (Defined in slice.cc for TokenUnit and LayerUnit, so both kinds share one set
  // of rules and messages.)
  ABSL_MUST_USE_RESULT static absl::StatusOr<HalfOpenRange> Create(int64_t start,
                                                                   int64_t end);

  int64_t start() const { return start_; }
  int64_t end() const { return end_; }
  int64_t size() const { return end_ - start_; }

  friend bool operator==(const HalfOpenRange& a, const HalfOpenRange& b) {
    return a.start_ == b.start_ && a.end_ == b.end_;
  }
  friend bool operator!=(const HalfOpenRange& a, const HalfOpenRange& b) {
    return !(a == b);
  }

 private:
  HalfOpenRange(int64_t start, int64_t end) : start_(start), end_(end) {}
  int64_t start_;
  int64_t end_;
};

struct TokenUnit {
  static constexpr char kName[] = "token range";
};
struct LayerUnit {
  static constexpr char kName[] = "layer range";
};

extern template class HalfOpenRange<TokenUnit>;
extern template class HalfOpenRange<LayerUnit>;

// Token positions [start, end).
using TokenRange = HalfOpenRange<TokenUnit>;
// Layer indices [start, end).
using LayerRange = HalfOpenRange<LayerUnit>;

// What one side sends (context) or asks for (generation) for one request and one
// slice. Suffix invariant: every block list is the tail of the block sequence that
// covers [0, token_range->end()); a cached prefix or the stale head of a window
// shows up only as a shorter list.
struct KVSlice {
  std::optional<TokenRange> token_range;
  std::optional<LayerRange> layer_range;
  // One list per layer group, indexed like the local page table's layer groups.
  std::vector<BlockList> block_ids_per_layer_group;
  bool is_last_slice = false;
  std::optional<int64_t> mamba_state_index;
};

// cdiv(a, b) for a >= 0, b > 0; exact for every such pair (no a + b - 1 overflow).
constexpr int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// The sliding-window quantities of one layer group for one request
// (SEMANTICS.md section 2).
struct WindowBlocks {
  int64_t total_blocks = 0;    // cdiv(prompt_len, tpb)
  int64_t stale_end = 0;       // leading blocks wholly outside the window; 0 if full
  int64_t expected_valid = 0;  // total_blocks - stale_end, at least 0
};

// `window` is the group's attention window in tokens, nullopt for full attention.
// Returns InvalidArgument when prompt_len < 0, tokens_per_block <= 0 or window <= 0.
ABSL_MUST_USE_RESULT absl::StatusOr<WindowBlocks> ComputeWindowBlocks(
    int64_t prompt_len, std::optional<int64_t> window, int64_t tokens_per_block);

// Two positions of one block id in a block list: first < second.
struct RepeatedBlock {
  size_t first = 0;
  size_t second = 0;
};

// The repetition in `ids` with the smallest second position, nullopt when every id
// is distinct. Within one request and layer group a block id names one slot, so a
// repeated id would have two source blocks written into one destination slot (or
// one source block into two): PairSliceBlocks and AlignBlocks reject it. O(n) for
// increasing lists and for ids within a range of about 64 * n; O(n log n) and one
// allocation of n pairs otherwise.
std::optional<RepeatedBlock> FindRepeatedBlock(absl::Span<const int64_t> ids);

// Two equally long lists: src[i] is written into dst[i].
struct AlignedBlocks {
  BlockList src;
  BlockList dst;
};

// Section 5 step 7: `src` starts at token `src_start_token`, `dst` at
// `dst_start_token`; pairs the blocks that cover the same tokens from
// max(src_start_token, dst_start_token, floor_token) on. Start tokens need not be
// block aligned (the skip is floored). Returns InvalidArgument for a negative token,
// tokens_per_block <= 0 or a list that repeats a block id (naming the side, the id
// and both positions).
ABSL_MUST_USE_RESULT absl::StatusOr<AlignedBlocks> AlignBlocks(
    absl::Span<const int64_t> src, int64_t src_start_token,
    absl::Span<const int64_t> dst, int64_t dst_start_token, int64_t tokens_per_block,
    int64_t floor_token = 0);

// What PairSliceBlocks needs to know besides the two slices.
struct PairingOptions {
  // REQUIRES: > 0.
  int64_t tokens_per_block = 0;
  // The request's prompt length; required when any group has a window.
  std::optional<int64_t> prompt_len;
  // One entry per layer group: the window in tokens, or nullopt for full attention
  // (and for Mamba groups, whose lists are empty).
  std::vector<std::optional<int64_t>> windows;
  // The receiver's explicit first destination token, if it sent one (step 5).
  std::optional<int64_t> dst_start_token;
  // Named in error messages only.
  std::optional<int64_t> request_id;
  std::optional<int64_t> slice_id;
};

// The pairing of one layer group.
struct GroupPairing {
  int64_t src_start_token = 0;  // where the (trimmed) source list starts
  int64_t dst_start_token = 0;  // where the destination list starts, after step 5
  BlockList src;                // the source ids that move ...
  BlockList dst;                // ... and where each one goes; same length
};

// SEMANTICS.md section 5: for one send slice `src` and the receiver's request data
// `dst` (its suffix lists for the same slice), per layer group, which source block
// is written into which destination block. The slice end is
// src.token_range->end() (0 when absent).
//
// Errors (all InvalidArgument, naming request, slice, group and the numbers):
// the two slices or `options.windows` disagree on the number of groups; both
// slices have token ranges that end at different tokens; a list is
// longer than its suffix by more than one block (one trailing draft-token block is
// dropped); a list that holds one block id twice (either side, the whole list, draft
// block included: "destination block list repeats a block: request=17 group=1
// block=40 index=2 other_index=5"); a windowed group without options.prompt_len; a
// negative hint or prompt length; tokens_per_block <= 0.
ABSL_MUST_USE_RESULT absl::StatusOr<std::vector<GroupPairing>> PairSliceBlocks(
    const KVSlice& src, const KVSlice& dst, const PairingOptions& options);

// PairSliceBlocks into `*out`, keeping the capacity of its vectors: a caller that
// plans request after request with one `out` allocates nothing once warm (first-touch
// page faults of fresh lists, not the pairing, dominated planning a long prompt).
// On error `*out` holds partial results.
ABSL_MUST_USE_RESULT absl::Status PairSliceBlocksInto(const KVSlice& src, const KVSlice& dst,
                                                      const PairingOptions& options,
                                                      std::vector<GroupPairing>* out);

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_SLICE_H_
