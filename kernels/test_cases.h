// File: kernels/test_cases.h
//
// What the kernels' host and GPU tests share (testonly): fragment list shapes
// for testing::RandomFragmentLayout, random head layouts, a fixture seeded from
// gtest's random seed, and a byte comparison that names the first difference
// instead of printing two large buffers.
//
//   TEST_F(SeededTest, Something) {
//     for (int i = 0; i < 100; ++i) {
//       const FragmentShape& shape = ShapeOf(i);
//       SCOPED_TRACE(Trace(i, shape));
//       HeadShape heads = RandomHeadShape(rng_);
//       EXPECT_EQ(FirstDifference(actual, expected), "");
//
// Thread safety: pure functions of their arguments.

#ifndef KVX_KERNELS_TEST_CASES_H_
#define KVX_KERNELS_TEST_CASES_H_

#include <cstdint>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

#include "kernels/heads.h"

namespace kvx::kernels {

// Single bytes, odd sizes, the KV sizes of issue 10 (4, 16 and 64 KiB), and
// 16-byte aligned lists.
struct FragmentShape {
  uint64_t max_fragment;
  uint64_t alignment;
};
inline constexpr FragmentShape kFragmentShapes[] = {
    {1, 1}, {7, 1}, {300, 1}, {4096, 1}, {65536, 1}, {4096, 16}, {16384, 16}, {65536, 16}};

// Seeds rng_ from gtest's random seed (pinned in BUILD, printed by Trace, so a
// failure replays with --gtest_random_seed=N).
class SeededTest : public ::testing::Test {
 protected:
  SeededTest() : seed_(::testing::UnitTest::GetInstance()->random_seed()), rng_(seed_) {}

  // Iteration i's shape, cycling through kFragmentShapes.
  static const FragmentShape& ShapeOf(int iteration) {
    return kFragmentShapes[iteration % std::size(kFragmentShapes)];
  }
  // "seed=N iteration=I max_fragment=M alignment=A", for SCOPED_TRACE.
  std::string Trace(int iteration, const FragmentShape& shape) const {
    return absl::StrCat("seed=", seed_, " iteration=", iteration,
                        " max_fragment=", shape.max_fragment, " alignment=", shape.alignment);
  }

  const uint64_t seed_;
  std::mt19937_64 rng_;
};

// A head split: a layout with 1-3 layers, 1-4 parts of 1-3 heads, 1-5 tokens,
// head sizes 1-9 (odd ones too), 1, 2 or 4-byte elements, and 0-4 blocks.
struct HeadShape {
  HeadLayout layout;
  int64_t parts = 0;
  int64_t blocks = 0;
};

inline HeadShape RandomHeadShape(std::mt19937_64& rng) {
  auto draw = [&rng](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  HeadShape shape;
  shape.parts = draw(1, 4);
  shape.layout.layers = draw(1, 3);
  shape.layout.kv_heads_per_rank = shape.parts * draw(1, 3);
  shape.layout.tokens_per_block = draw(1, 5);
  shape.layout.head_size = draw(1, 9);
  shape.layout.element_bytes = int64_t{1} << draw(0, 2);
  shape.blocks = draw(0, 4);
  return shape;
}

// "" when the buffers are equal, else the first differing index and both bytes
// ("index=17 actual=3 expected=4 actual_size=64 expected_size=64").
inline std::string FirstDifference(const std::vector<unsigned char>& actual,
                                   const std::vector<unsigned char>& expected) {
  for (size_t i = 0; i < actual.size() && i < expected.size(); ++i) {
    if (actual[i] != expected[i]) {
      return absl::StrCat("index=", i, " actual=", int{actual[i]}, " expected=", int{expected[i]},
                          " actual_size=", actual.size(), " expected_size=", expected.size());
    }
  }
  if (actual.size() == expected.size()) return "";
  return absl::StrCat("actual_size=", actual.size(), " expected_size=", expected.size());
}

}  // namespace kvx::kernels

#endif  // KVX_KERNELS_TEST_CASES_H_
