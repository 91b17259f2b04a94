// File: testing/fuzz_bytes.h
//
// Choices drawn from a fuzz input, for libFuzzer targets that build a structured
// input (a scenario, a sequence of events) out of the fuzzer's bytes. A choice in
// [lo, hi] consumes as many bytes as its range needs (one for a range under 256,
// big-endian), so one input byte steers one decision and a mutation of a byte is a
// small change of the structure. Once the input is used up, every choice is its
// lowest value and empty() is true.
//
//   kvx::testing::FuzzBytes in(data, size);
//   const int64_t tp = in.Pick({1, 2, 4, 8});
//   while (!in.empty()) {
//     switch (in.Int(0, 3)) { ... one event per step ... }
//   }
//
// A seed written by hand follows the same rule: for a choice whose range is under
// 256, write the byte value - lo.
//
// Thread safety: none; one per input.

#ifndef KVX_TESTING_FUZZ_BYTES_H_
#define KVX_TESTING_FUZZ_BYTES_H_

#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace kvx::testing {

class FuzzBytes {
 public:
  // `data` must outlive this object.
  FuzzBytes(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  // An integer in [lo, hi]. REQUIRES: lo <= hi, hi - lo < 2^64 - 1.
  int64_t Int(int64_t lo, int64_t hi) {
    const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
    uint64_t value = 0;
    for (uint64_t left = range; left > 0 && pos_ < size_; left >>= 8) {
      value = (value << 8) | data_[pos_++];
    }
    return static_cast<int64_t>(static_cast<uint64_t>(lo) + value % (range + 1));
  }
  bool OneIn(int64_t n) { return Int(0, n - 1) == 0; }
  int64_t Pick(std::initializer_list<int64_t> choices) {
    return choices.begin()[Int(0, static_cast<int64_t>(choices.size()) - 1)];
  }

  // True once every byte of the input has been used.
  bool empty() const { return pos_ >= size_; }

 private:
  const uint8_t* const data_;
  const size_t size_;
  size_t pos_ = 0;
};

}  // namespace kvx::testing

#endif  // KVX_TESTING_FUZZ_BYTES_H_
