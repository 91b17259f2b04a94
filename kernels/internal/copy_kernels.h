// Do not include directly: internal to //kernels.
// IWYU pragma: private, include "kernels/staging.h"
//
// What the host hands the CUDA kernels (internal/copy_kernels.cu), in plain C++
// that both nvcc and the host compiler read: no CUDA and no Abseil type, so the
// host side builds without the toolkit. The head arithmetic is shared by the host
// reference (heads.cc) and the kernel, so both move exactly the same runs.

#ifndef KVX_KERNELS_INTERNAL_COPY_KERNELS_H_
#define KVX_KERNELS_INTERNAL_COPY_KERNELS_H_

#include <cstdint>

#ifdef __CUDACC__
#define KVX_HOST_DEVICE __host__ __device__
#else
#define KVX_HOST_DEVICE
#endif

namespace kvx::kernels_internal {

// One entry of a workspace's pointer list, 16 bytes. Gather/scatter: entry i is
// fragment i's address and its offset in the packed stream (bytes before it);
// entry n holds {0, total bytes}, so fragment i is [offset_i, offset_{i+1}).
// Head kernels: entries [0, blocks) are block addresses, then one per part.
struct CopyEntry {
  uint64_t address;
  uint64_t offset;
};
static_assert(sizeof(CopyEntry) == 16, "the kernels read 16-byte entries");

enum class CopyDirection { kGather, kScatter };
enum class HeadDirection { kSplit, kConcat };

// A checked head split or concat (heads.cc). Units are the contiguous runs that
// move: one per (part, block, layer, K/V), numbered in that order, each
// heads_per_part heads of head_bytes.
struct HeadCopy {
  HeadDirection direction;
  uint64_t blocks;
  uint64_t parts;
  uint64_t layers;
  uint64_t head_bytes;  // tokens_per_block * head_size * element_bytes
  uint64_t run_bytes;   // heads_per_part * head_bytes

  KVX_HOST_DEVICE uint64_t units() const { return parts * blocks * layers * 2; }
};

// Where unit u lies: block `block` at `block_offset`, part `part` at
// `part_offset`.
struct HeadUnit {
  uint64_t block;
  uint64_t block_offset;
  uint64_t part;
  uint64_t part_offset;
};

// Block layout [layer][kv][head][token][dim]: with layer_kv = layer * 2 + kv, the
// run of part p starts at head p * heads_per_part, i.e. at
// (layer_kv * parts + p) * run_bytes. A part is [block][layer][kv][its heads]...,
// so unit (p, rest) with rest = block * layers * 2 + layer_kv is at rest * run_bytes.
KVX_HOST_DEVICE inline HeadUnit LocateHeadUnit(const HeadCopy& copy, uint64_t unit) {
  const uint64_t per_part = copy.blocks * copy.layers * 2;
  const uint64_t part = unit / per_part;
  const uint64_t rest = unit % per_part;
  const uint64_t layer_kv = rest % (copy.layers * 2);
  return HeadUnit{rest / (copy.layers * 2), (layer_kv * copy.parts + part) * copy.run_bytes,
                  part, rest * copy.run_bytes};
}

// Queue one kernel on `stream` (a cudaStream_t) that copies the `count`
// fragments listed in device memory at `entries` (count + 1 entries) to or from
// `staging`. Returns the launch's cudaError_t (0 is cudaSuccess).
int LaunchCopyKernel(const CopyEntry* entries, uint64_t count, CopyDirection direction,
                     void* staging, uint64_t total_bytes, void* stream);

// Queue one kernel that moves every unit of `copy`; `entries` (device memory)
// holds the block then the part addresses. Returns the cudaError_t.
int LaunchHeadKernel(const CopyEntry* entries, const HeadCopy& copy, void* stream);

}  // namespace kvx::kernels_internal

#endif  // KVX_KERNELS_INTERNAL_COPY_KERNELS_H_
