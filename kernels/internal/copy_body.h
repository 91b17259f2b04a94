// Do not include directly: internal to //kernels.
// IWYU pragma: private, include "kernels/staging.h"
//
// What one CUDA thread of the copy kernels does, as host-and-device code. The
// kernels (copy_kernels.cu) call CopyStream with their block and thread index;
// copy_body_test.cc calls it for every (block, thread) pair on the CPU. Threads
// never communicate (no shared memory, no barrier, disjoint writes), so running
// them one after another computes exactly what the GPU computes, and the
// index arithmetic, alignment paths and chunk walking are tested on machines
// without a GPU.
//
// The bytes that move form a stream [0, total) of pieces (a fragment, or a head
// run), each with a source and a destination. Block b copies the chunks
// [b * chunk_bytes, + chunk_bytes) of the stream, then b + blocks and so on, so
// work is balanced whatever the piece sizes. A block finds its first piece once
// (a binary search over the entries' offsets, or a division for head runs), then
// walks the pieces in order; within a piece all its threads copy with the
// widest word both pointers are aligned to alike (16 bytes when the stream and
// the fragments are 16-byte aligned).

#ifndef KVX_KERNELS_INTERNAL_COPY_BODY_H_
#define KVX_KERNELS_INTERNAL_COPY_BODY_H_

#include <cstdint>

#include "kernels/internal/copy_kernels.h"

namespace kvx::kernels_internal {

// Who runs: block `block` of `blocks`, thread `thread` of `threads`.
struct ThreadIndex {
  uint64_t block;
  uint64_t blocks;
  uint64_t thread;
  uint64_t threads;
};

// A 16-byte word; its alignment makes nvcc load and store it in one instruction.
struct alignas(16) Word16 {
  uint64_t lo;
  uint64_t hi;
};

// This thread's share of copying n bytes with words of type V. REQUIRES: dst and
// src have the same address modulo sizeof(V), so after a few head bytes both are
// V-aligned. Four loads before four stores keep more requests in flight.
template <typename V>
KVX_HOST_DEVICE void CopyWords(unsigned char* __restrict__ dst,
                               const unsigned char* __restrict__ src, uint64_t n,
                               uint64_t thread, uint64_t threads) {
  constexpr uint64_t kWord = sizeof(V);
  const uint64_t misaligned = reinterpret_cast<uintptr_t>(src) % kWord;
  uint64_t head = misaligned == 0 ? 0 : kWord - misaligned;
  if (head > n) head = n;
  const uint64_t words = (n - head) / kWord;
  for (uint64_t i = thread; i < head; i += threads) dst[i] = src[i];

  const V* __restrict__ s = reinterpret_cast<const V*>(src + head);
  V* __restrict__ d = reinterpret_cast<V*>(dst + head);
  uint64_t i = thread;
  for (; i + 3 * threads < words; i += 4 * threads) {
    const V a = s[i];
    const V b = s[i + threads];
    const V c = s[i + 2 * threads];
    const V e = s[i + 3 * threads];
    d[i] = a;
    d[i + threads] = b;
    d[i + 2 * threads] = c;
    d[i + 3 * threads] = e;
  }
  for (; i < words; i += threads) d[i] = s[i];

  for (uint64_t j = head + words * kWord + thread; j < n; j += threads) dst[j] = src[j];
}

// Picks the widest word by which dst and src are aligned alike.
KVX_HOST_DEVICE inline void CopyBytes(unsigned char* dst, const unsigned char* src, uint64_t n,
                                      uint64_t thread, uint64_t threads) {
  const uintptr_t phase = reinterpret_cast<uintptr_t>(dst) ^ reinterpret_cast<uintptr_t>(src);
  if ((phase & 15) == 0) {
    CopyWords<Word16>(dst, src, n, thread, threads);
  } else if ((phase & 7) == 0) {
    CopyWords<uint64_t>(dst, src, n, thread, threads);
  } else if ((phase & 3) == 0) {
    CopyWords<uint32_t>(dst, src, n, thread, threads);
  } else if ((phase & 1) == 0) {
    CopyWords<uint16_t>(dst, src, n, thread, threads);
  } else {
    CopyWords<unsigned char>(dst, src, n, thread, threads);
  }
}

// One piece of the stream: [begin, end) moves from src to dst.
struct Piece {
  uint64_t begin;
  uint64_t end;
  const unsigned char* src;
  unsigned char* dst;
};

// Gather/scatter: piece i is fragment i (entries as in copy_kernels.h).
struct ListMap {
  const CopyEntry* entries;  // count + 1
  uint64_t count;
  unsigned char* staging;
  CopyDirection direction;

  // The last fragment starting at or before pos, i.e. the nonempty one holding
  // it. REQUIRES: pos < entries[count].offset (the total).
  KVX_HOST_DEVICE uint64_t Find(uint64_t pos) const {
    uint64_t lo = 0;
    uint64_t hi = count;  // entries[lo].offset <= pos < entries[hi].offset
    while (hi - lo > 1) {
      const uint64_t mid = lo + (hi - lo) / 2;
      if (entries[mid].offset <= pos) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    return lo;
  }

  KVX_HOST_DEVICE Piece Get(uint64_t i) const {
    const uint64_t begin = entries[i].offset;
    const uint64_t end = entries[i + 1].offset;
    unsigned char* fragment = reinterpret_cast<unsigned char*>(entries[i].address);
    unsigned char* packed = staging + begin;
    return direction == CopyDirection::kGather ? Piece{begin, end, fragment, packed}
                                               : Piece{begin, end, packed, fragment};
  }
};

// Head split/concat: piece u is head run u (LocateHeadUnit); entries hold the
// block addresses, then the part addresses.
struct HeadMap {
  const CopyEntry* entries;
  HeadCopy copy;

  KVX_HOST_DEVICE uint64_t Find(uint64_t pos) const { return pos / copy.run_bytes; }

  KVX_HOST_DEVICE Piece Get(uint64_t u) const {
    const HeadUnit unit = LocateHeadUnit(copy, u);
    unsigned char* block =
        reinterpret_cast<unsigned char*>(entries[unit.block].address) + unit.block_offset;
    unsigned char* part =
        reinterpret_cast<unsigned char*>(entries[copy.blocks + unit.part].address) +
        unit.part_offset;
    const uint64_t begin = u * copy.run_bytes;
    const uint64_t end = begin + copy.run_bytes;
    return copy.direction == HeadDirection::kSplit ? Piece{begin, end, block, part}
                                                   : Piece{begin, end, part, block};
  }
};

// One thread's share of moving the stream [0, total) described by `map`.
template <typename Map>
KVX_HOST_DEVICE void CopyStream(const Map& map, uint64_t total, uint64_t chunk_bytes,
                                const ThreadIndex& at) {
  for (uint64_t chunk = at.block * chunk_bytes; chunk < total;
       chunk += at.blocks * chunk_bytes) {
    const uint64_t chunk_end = total - chunk < chunk_bytes ? total : chunk + chunk_bytes;
    uint64_t pos = chunk;
    // Zero-length pieces (empty fragments) have end == begin == pos: skipped.
    for (uint64_t i = map.Find(chunk); pos < chunk_end; ++i) {
      const Piece piece = map.Get(i);
      const uint64_t stop = piece.end < chunk_end ? piece.end : chunk_end;
      if (stop > pos) {
        CopyBytes(piece.dst + (pos - piece.begin), piece.src + (pos - piece.begin), stop - pos,
                  at.thread, at.threads);
        pos = stop;
      }
    }
  }
}

}  // namespace kvx::kernels_internal

#endif  // KVX_KERNELS_INTERNAL_COPY_BODY_H_
