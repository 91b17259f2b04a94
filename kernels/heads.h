// File: kernels/heads.h
//
// Head split and concat for instances with different TP sizes. A KV block of a
// rank holds, for each of its `layers` layers, a K and a V buffer, each
// [head][token-in-block][dim] (transfer/page_table.h), so the whole block is
//
//   block[layer][kv][head][token][dim],   kv = 0 for K, 1 for V,
//
// with `kv_heads_per_rank` heads of `tokens_per_block * head_size` elements of
// `element_bytes` bytes. When the peer instance has `parts` times more TP ranks,
// each peer rank holds kv_heads_per_rank / parts of these heads, and the pieces
// one peer needs are scattered across the block (one per layer and K/V).
//
//   SplitHeads:  blocks -> parts: part p receives, block after block, the block
//                restricted to heads [p * h, (p + 1) * h), h = kv_heads_per_rank
//                / parts: part[p][block][layer][kv][head - p * h][token][dim],
//                which is exactly that peer rank's own block layout.
//   ConcatHeads: the inverse (the receiver of fewer, wider ranks): parts laid out
//                as above -> blocks.
//
// Each part buffer holds blocks * BlockBytes(layout) / parts bytes. Blocks may
// lie anywhere (their pointers are a list); parts are contiguous (e.g. one peer's
// staging slot). On kCuda each call is one kernel launch.
//
// Example (TP4 sender, 2 heads per block, to TP8 receivers 2r and 2r + 1):
//
//   HeadLayout layout{/*layers=*/80, /*kv_heads_per_rank=*/2,
//                     /*tokens_per_block=*/32, /*head_size=*/128,
//                     /*element_bytes=*/2};
//   std::vector<const void*> blocks = ...;  // the request's blocks, in order
//   std::vector<void*> parts = {staging_for_2r, staging_for_2r_plus_1};
//   absl::Status s = SplitHeads(launch, layout, blocks, parts);
//
// Pointer lists are read during the call only; the memory they point to must stay
// valid until the launch completes (Wait). Thread safety: as kernels/staging.h.

#ifndef KVX_KERNELS_HEADS_H_
#define KVX_KERNELS_HEADS_H_

#include <cstdint>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/launch.h"

namespace kvx::kernels {

// The shape of one block on the side that holds the wider head range, in the
// vocabulary of transfer::RankPageTable. MLA (one latent, no heads to split) never
// needs these kernels.
struct HeadLayout {
  int64_t layers = 0;             // layers in one block
  int64_t kv_heads_per_rank = 0;  // heads in one block
  int64_t tokens_per_block = 0;
  int64_t head_size = 0;          // elements per head per token
  int64_t element_bytes = 0;      // 2 for bf16
};

// layers * 2 * kv_heads_per_rank * tokens_per_block * head_size * element_bytes.
// Errors: InvalidArgument naming the field when one is < 1, or when the product
// overflows 64 bits.
ABSL_MUST_USE_RESULT absl::StatusOr<uint64_t> BlockBytes(const HeadLayout& layout);

// Splits every block's heads into dst_parts.size() parts (see the top of the file).
//
// Errors (nothing is copied or queued): InvalidArgument for an invalid layout, no
// parts, kv_heads_per_rank not a multiple of the number of parts, a null pointer,
// total bytes (blocks * BlockBytes) that overflow 64 bits, or a kCuda launch
// without a workspace; ResourceExhausted when a kCuda call has more blocks + parts
// than the workspace's capacity; Unimplemented for kCuda without the toolkit.
// REQUIRES: each block has BlockBytes(layout) bytes and each part
// src_blocks.size() * BlockBytes(layout) / parts; no part overlaps a block or
// another part; kCuda: every pointer is device-accessible.
ABSL_MUST_USE_RESULT absl::Status SplitHeads(const Launch& launch, const HeadLayout& layout,
                                             absl::Span<const void* const> src_blocks,
                                             absl::Span<void* const> dst_parts);

// The inverse of SplitHeads: dst_blocks[b] receives from each part p the heads
// [p * h, (p + 1) * h) of block b. Same errors; REQUIRES as SplitHeads with the
// roles exchanged (blocks pairwise disjoint).
ABSL_MUST_USE_RESULT absl::Status ConcatHeads(const Launch& launch, const HeadLayout& layout,
                                              absl::Span<const void* const> src_parts,
                                              absl::Span<void* const> dst_blocks);

}  // namespace kvx::kernels

#endif  // KVX_KERNELS_HEADS_H_
