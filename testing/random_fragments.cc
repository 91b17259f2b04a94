#include "testing/random_fragments.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "absl/types/span.h"

namespace kvx::testing {

FragmentLayout RandomFragmentLayout(std::mt19937_64& rng, uint64_t max_fragment,
                                    uint64_t payload_bytes, uint64_t alignment) {
  auto align = [alignment](uint64_t n) { return (n + alignment - 1) / alignment * alignment; };
  std::vector<uint64_t> lengths = {max_fragment, 1};
  uint64_t total = max_fragment + 1;
  std::uniform_real_distribution<double> log_size(0.0, std::log2(double(max_fragment)));
  while (total < payload_bytes) {
    const uint64_t length =
        std::min<uint64_t>(payload_bytes - total, uint64_t(std::exp2(log_size(rng))) + 1);
    lengths.push_back(length);
    total += length;
  }
  std::shuffle(lengths.begin(), lengths.end(), rng);

  FragmentLayout layout;
  layout.src_bytes = align(max_fragment) + 4096;
  std::uniform_int_distribution<uint64_t> gap(1, 4096);
  uint64_t cursor = align(gap(rng));
  for (uint64_t length : lengths) {
    length = align(length);
    std::uniform_int_distribution<uint64_t> src_at(0, (layout.src_bytes - length) / alignment);
    layout.fragments.push_back({src_at(rng) * alignment, cursor, length});
    cursor += length + align(gap(rng));
  }
  layout.dst_bytes = cursor;
  // Posting order differs from target order, so no backend can rely on ascending
  // addresses.
  std::shuffle(layout.fragments.begin(), layout.fragments.end(), rng);
  return layout;
}

void FillRandom(std::mt19937_64& rng, absl::Span<unsigned char> bytes) {
  size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    const uint64_t v = rng();
    std::memcpy(bytes.data() + i, &v, 8);
  }
  for (; i < bytes.size(); ++i) bytes[i] = static_cast<unsigned char>(rng());
}

}  // namespace kvx::testing
