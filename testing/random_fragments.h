// File: testing/random_fragments.h
//
// Random write lists for transport tests: fragments of log-uniform sizes taken from
// random offsets of a source buffer and laid out in a target buffer with guard gaps
// between them, so that a test can check every written byte and every byte that
// must stay untouched.
//
//   std::mt19937_64 rng(seed);
//   FragmentLayout layout = RandomFragmentLayout(rng, 64 << 20, 80 << 20);
//   std::vector<unsigned char> src(layout.src_bytes), dst(layout.dst_bytes, kGuard);
//   FillRandom(rng, absl::MakeSpan(src));
//
// Thread safety: pure functions of their arguments.

#ifndef KVX_TESTING_RANDOM_FRAGMENTS_H_
#define KVX_TESTING_RANDOM_FRAGMENTS_H_

#include <cstdint>
#include <random>
#include <vector>

#include "absl/types/span.h"

namespace kvx::testing {

struct RandomFragment {
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;
  uint64_t length = 0;
};

struct FragmentLayout {
  std::vector<RandomFragment> fragments;  // in random order; disjoint in the target
  uint64_t src_bytes = 0;                 // the source buffer they are taken from
  uint64_t dst_bytes = 0;                 // the target buffer, gaps included
};

// Lengths are log-uniform in [1, max_fragment] (max_fragment and 1 always appear)
// and add up to `payload_bytes` (at least max_fragment + 1). In the target the
// fragments follow one another with 1 to 4096 guard bytes before each.
// With `alignment` > 1 every length, offset and gap is rounded up to a multiple
// of it (so 1 becomes `alignment`); with 1 the draws are those of the default.
// REQUIRES: max_fragment >= 1; alignment a power of two <= 4096.
FragmentLayout RandomFragmentLayout(std::mt19937_64& rng, uint64_t max_fragment,
                                    uint64_t payload_bytes, uint64_t alignment = 1);

// Fills `bytes` from `rng`.
void FillRandom(std::mt19937_64& rng, absl::Span<unsigned char> bytes);

}  // namespace kvx::testing

#endif  // KVX_TESTING_RANDOM_FRAGMENTS_H_
