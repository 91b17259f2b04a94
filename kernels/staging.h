// File: kernels/staging.h
//
// Gather and scatter between a fragment list and a contiguous staging buffer.
// When a plan moves KV in many small pieces, one remote write per piece is slow
// on every fabric; the sender gathers the pieces into a registered staging buffer
// and sends one write, and the receiver scatters it back into its blocks.
//
//   Gather:  fragments[0], fragments[1], ... -> staging[offset, offset + total)
//   Scatter: staging[offset, offset + total) -> fragments[0], fragments[1], ...
//
// Fragments are packed back to back in list (plan) order with no padding:
// fragment i occupies staging bytes [offset + sum of bytes before i, + bytes_i).
// Zero-byte fragments are allowed and move nothing. On kCuda both are one kernel
// launch, copying 16 bytes at a time where source and destination share their
// alignment (and 8, 4, 2 or 1 where they share less).
//
// Example (sender: gather one peer's pieces into slot 2 of a staging arena):
//
//   std::vector<SrcFragment> pieces;  // reuse across calls
//   for (const transfer::Fragment& f : plan.fragments)
//     pieces.push_back({pool_base + f.src_offset, f.bytes});
//   absl::Status s = Gather(launch, pieces, StagingBuffer{arena, arena_bytes},
//                           /*offset=*/2 * slot_bytes);
//
// The fragment list is read during the call only (kCuda: copied into the
// workspace), so it may be reused on return; the memory it points to and the
// staging buffer must stay valid until the launch completes (Wait).
//
// Thread safety: calls on disjoint memory may run concurrently (kCuda: with
// different workspaces).

#ifndef KVX_KERNELS_STAGING_H_
#define KVX_KERNELS_STAGING_H_

#include <cstdint>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/launch.h"

namespace kvx::kernels {

// A piece to gather: `bytes` bytes at `data`.
struct SrcFragment {
  const void* data = nullptr;
  uint64_t bytes = 0;
};

// A piece to scatter into: `bytes` bytes at `data`.
struct DstFragment {
  void* data = nullptr;
  uint64_t bytes = 0;
};

// A contiguous staging buffer of `bytes` bytes at `data`.
struct StagingBuffer {
  void* data = nullptr;
  uint64_t bytes = 0;
};

// Copies every fragment, in order, into `staging` from `offset` on.
//
// Errors (nothing is copied or queued): InvalidArgument for a null fragment or
// staging pointer, a total (offset + sum of sizes) that overflows 64 bits, or a
// kCuda launch without a workspace; OutOfRange when offset + total exceeds
// staging.bytes; ResourceExhausted when a kCuda call has more fragments than the
// workspace's capacity; Unimplemented for kCuda without the toolkit; a launch
// error from CUDA (Internal, or the code of the CUDA error) otherwise.
// REQUIRES: the fragments do not overlap the written staging range; kCuda: every
// pointer is device-accessible.
ABSL_MUST_USE_RESULT absl::Status Gather(const Launch& launch,
                                         absl::Span<const SrcFragment> fragments,
                                         StagingBuffer staging, uint64_t offset);

// The inverse of Gather: copies staging[offset, offset + total) into the
// fragments, in order. Same errors. REQUIRES: the fragments are pairwise disjoint
// and do not overlap the read staging range; kCuda: every pointer is
// device-accessible.
ABSL_MUST_USE_RESULT absl::Status Scatter(const Launch& launch, StagingBuffer staging,
                                          uint64_t offset,
                                          absl::Span<const DstFragment> fragments);

}  // namespace kvx::kernels

#endif  // KVX_KERNELS_STAGING_H_
