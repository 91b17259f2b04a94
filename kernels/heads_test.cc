#include "kernels/heads.h"

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/launch.h"
#include "kernels/test_cases.h"
#include "testing/random_fragments.h"
#include "testing/status_matchers.h"

namespace kvx::kernels {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::IsOkAndHolds;
using ::kvx::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr unsigned char kGuard = 0x5A;

// Two blocks of one layer, 2 heads, 1 token, head size 2, 1-byte elements:
// block = K[h0 h1] V[h0 h1]. Part 0 takes head 0 of K and V of each block.
TEST(HeadsTest, SplitsTwoHeadsIntoTwoPeerBlocks) {
  const HeadLayout layout{/*layers=*/1, /*kv_heads_per_rank=*/2, /*tokens_per_block=*/1,
                          /*head_size=*/2, /*element_bytes=*/1};
  EXPECT_THAT(BlockBytes(layout), IsOkAndHolds(8));
  unsigned char block0[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  unsigned char block1[8] = {10, 11, 12, 13, 14, 15, 16, 17};
  unsigned char part0[8] = {};
  unsigned char part1[8] = {};
  const void* blocks[] = {block0, block1};
  void* parts[] = {part0, part1};
  ASSERT_THAT(SplitHeads(Launch::Host(), layout, blocks, parts), IsOk());
  EXPECT_THAT(part0, ElementsAre(0, 1, 4, 5, 10, 11, 14, 15));
  EXPECT_THAT(part1, ElementsAre(2, 3, 6, 7, 12, 13, 16, 17));

  unsigned char back0[8] = {};
  unsigned char back1[8] = {};
  const void* sources[] = {part0, part1};
  void* targets[] = {back0, back1};
  ASSERT_THAT(ConcatHeads(Launch::Host(), layout, sources, targets), IsOk());
  EXPECT_THAT(back0, ElementsAre(0, 1, 2, 3, 4, 5, 6, 7));
  EXPECT_THAT(back1, ElementsAre(10, 11, 12, 13, 14, 15, 16, 17));
}

// A random layout and buffers for it: blocks at odd offsets of one pool, in a
// shuffled order, guard bytes between them; each part in its own buffer at an
// odd offset with guards after it.
struct HeadCase {
  HeadLayout layout;
  int64_t parts = 0;
  uint64_t block_bytes = 0;
  std::vector<uint64_t> block_offsets;  // in pool, list order
  std::vector<unsigned char> pool;
  std::vector<std::vector<unsigned char>> part_buffers;
  static constexpr uint64_t kPartOffset = 3;

  uint64_t part_bytes() const { return block_offsets.size() * block_bytes / parts; }
  std::vector<const void*> Blocks() const {
    std::vector<const void*> out;
    for (uint64_t o : block_offsets) out.push_back(pool.data() + o);
    return out;
  }
  std::vector<void*> MutableBlocks() {
    std::vector<void*> out;
    for (uint64_t o : block_offsets) out.push_back(pool.data() + o);
    return out;
  }
  std::vector<void*> Parts() {
    std::vector<void*> out;
    for (auto& buffer : part_buffers) out.push_back(buffer.data() + kPartOffset);
    return out;
  }
};

HeadCase RandomHeadCase(std::mt19937_64& rng) {
  const HeadShape shape = RandomHeadShape(rng);
  HeadCase c;
  c.layout = shape.layout;
  c.parts = shape.parts;
  c.block_bytes = BlockBytes(c.layout).value();
  auto gap = [&rng] { return std::uniform_int_distribution<uint64_t>(1, 15)(rng); };
  uint64_t cursor = gap();
  for (int64_t b = 0; b < shape.blocks; ++b) {
    c.block_offsets.push_back(cursor);
    cursor += c.block_bytes + gap();
  }
  std::shuffle(c.block_offsets.begin(), c.block_offsets.end(), rng);
  c.pool.resize(cursor);
  ::kvx::testing::FillRandom(rng, absl::MakeSpan(c.pool));
  c.part_buffers.assign(c.parts, std::vector<unsigned char>(HeadCase::kPartOffset +
                                                                c.part_bytes() + 5,
                                                            kGuard));
  return c;
}

// The oracle indexes [layer][kv][head][token][dim] one element at a time: head h
// of a block goes to part h / heads_per_part as its head h % heads_per_part.
std::vector<std::vector<unsigned char>> OracleSplit(const HeadCase& c) {
  const HeadLayout& l = c.layout;
  const int64_t per_part = l.kv_heads_per_rank / c.parts;
  std::vector<std::vector<unsigned char>> parts(
      c.parts, std::vector<unsigned char>(HeadCase::kPartOffset + c.part_bytes() + 5, kGuard));
  for (size_t b = 0; b < c.block_offsets.size(); ++b) {
    for (int64_t layer = 0; layer < l.layers; ++layer) {
      for (int64_t kv = 0; kv < 2; ++kv) {
        for (int64_t h = 0; h < l.kv_heads_per_rank; ++h) {
          for (int64_t t = 0; t < l.tokens_per_block; ++t) {
            for (int64_t d = 0; d < l.head_size; ++d) {
              const int64_t src_element =
                  (((layer * 2 + kv) * l.kv_heads_per_rank + h) * l.tokens_per_block + t) *
                      l.head_size + d;
              const int64_t dst_element =
                  ((((static_cast<int64_t>(b) * l.layers + layer) * 2 + kv) * per_part +
                    h % per_part) * l.tokens_per_block + t) * l.head_size + d;
              for (int64_t e = 0; e < l.element_bytes; ++e) {
                parts[h / per_part][HeadCase::kPartOffset + dst_element * l.element_bytes + e] =
                    c.pool[c.block_offsets[b] + src_element * l.element_bytes + e];
              }
            }
          }
        }
      }
    }
  }
  return parts;
}

using HeadsPropertyTest = SeededTest;

TEST_F(HeadsPropertyTest, SplitMatchesIndexOracleAndConcatInvertsIt) {
  for (int iteration = 0; iteration < 500; ++iteration) {
    HeadCase c = RandomHeadCase(rng_);
    SCOPED_TRACE(::testing::Message()
                 << "seed=" << seed_ << " iteration=" << iteration << " layers=" << c.layout.layers
                 << " kv_heads_per_rank=" << c.layout.kv_heads_per_rank
                 << " tokens_per_block=" << c.layout.tokens_per_block
                 << " head_size=" << c.layout.head_size
                 << " element_bytes=" << c.layout.element_bytes << " parts=" << c.parts
                 << " blocks=" << c.block_offsets.size());

    ASSERT_THAT(SplitHeads(Launch::Host(), c.layout, c.Blocks(), c.Parts()), IsOk());
    const std::vector<std::vector<unsigned char>> expected_parts = OracleSplit(c);
    for (int64_t p = 0; p < c.parts; ++p) {
      ASSERT_EQ(FirstDifference(c.part_buffers[p], expected_parts[p]), "") << "part=" << p;
    }

    // Concat into a fresh pool: every block byte comes back, gaps stay guards.
    const std::vector<unsigned char> original = c.pool;
    std::vector<unsigned char> expected(original.size(), kGuard);
    for (uint64_t o : c.block_offsets) {
      std::copy(original.begin() + o, original.begin() + o + c.block_bytes,
                expected.begin() + o);
    }
    std::fill(c.pool.begin(), c.pool.end(), kGuard);
    std::vector<const void*> parts;
    for (void* p : c.Parts()) parts.push_back(p);
    ASSERT_THAT(ConcatHeads(Launch::Host(), c.layout, parts, c.MutableBlocks()), IsOk());
    ASSERT_EQ(FirstDifference(c.pool, expected), "");
  }
}

TEST(HeadsTest, RejectsBadLayoutsAndListsWithoutWriting) {
  const HeadLayout good{2, 4, 2, 2, 2};
  unsigned char block[64];
  unsigned char part[64];
  std::fill(std::begin(part), std::end(part), kGuard);
  const void* one_block[] = {block};
  const void* null_block[] = {block, nullptr};
  void* two_parts[] = {part, part + 32};
  void* three_parts[] = {part, part + 16, part + 32};
  void* null_part[] = {part, nullptr};
  // BlockBytes of 2^61: eight of them do not fit in 64 bits.
  const HeadLayout wide{int64_t{1} << 30, int64_t{1} << 30, 1, 1, 1};
  const void* eight_blocks[] = {block, block, block, block, block, block, block, block};
  struct Row {
    const char* name;
    HeadLayout layout;
    absl::Span<const void* const> blocks;
    absl::Span<void* const> parts;
    absl::StatusCode code;
    const char* message;
  } rows[] = {
      {"zero heads", {2, 0, 2, 2, 2}, one_block, two_parts, absl::StatusCode::kInvalidArgument,
       "split heads: head layout field < 1: field=kv_heads_per_rank value=0"},
      {"negative element size", {2, 4, 2, 2, -2}, one_block, two_parts,
       absl::StatusCode::kInvalidArgument, "field=element_bytes value=-2"},
      {"block bytes overflow", {int64_t{1} << 40, int64_t{1} << 30, 1, 1, 1}, one_block,
       two_parts, absl::StatusCode::kInvalidArgument,
       "block bytes overflow 64 bits: layers=1099511627776"},
      {"no parts", good, one_block, {}, absl::StatusCode::kInvalidArgument,
       "not a positive multiple of parts: parts=0"},
      {"heads not a multiple", good, one_block, three_parts, absl::StatusCode::kInvalidArgument,
       "parts=3 layers=2 kv_heads_per_rank=4"},
      {"null block", good, null_block, two_parts, absl::StatusCode::kInvalidArgument,
       "split heads: block is null: block=1"},
      {"null part", good, one_block, null_part, absl::StatusCode::kInvalidArgument,
       "split heads: part is null: part=1"},
      {"total overflows", wide, eight_blocks, two_parts, absl::StatusCode::kInvalidArgument,
       "total bytes overflow 64 bits: blocks=8 block_bytes=2305843009213693952"},
  };
  for (const Row& row : rows) {
    SCOPED_TRACE(row.name);
    EXPECT_THAT(SplitHeads(Launch::Host(), row.layout, row.blocks, row.parts),
                StatusIs(row.code, HasSubstr(row.message)));
    EXPECT_THAT(part, ::testing::Each(kGuard));
  }
  const void* null_source[] = {part, nullptr};
  void* blocks[] = {block};
  EXPECT_THAT(ConcatHeads(Launch::Host(), good, null_source, blocks),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("concat heads: part is null: part=1")));
}

}  // namespace
}  // namespace kvx::kernels
