#include "transfer/slice.h"

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"

namespace kvx::transfer {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

BlockList Iota(int64_t first, int64_t n) {
  BlockList ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = first + i;
  return ids;
}

TEST(TokenRange, AcceptsHalfOpenNonEmptyRanges) {
  ASSERT_OK_AND_ASSIGN(TokenRange range, TokenRange::Create(0, 32));
  EXPECT_EQ(range.start(), 0);
  EXPECT_EQ(range.end(), 32);
  EXPECT_EQ(range.size(), 32);
  ASSERT_OK_AND_ASSIGN(LayerRange layers, LayerRange::Create(3, 4));
  EXPECT_EQ(layers.size(), 1);
}

TEST(TokenRange, RejectsNegativeAndEmptyRanges) {
  const struct {
    int64_t start, end;
  } kCases[] = {{-1, 4}, {0, -1}, {-5, -2}, {4, 4}, {5, 4}, {0, 0}};
  for (const auto& c : kCases) {
    SCOPED_TRACE(absl::StrCat("start=", c.start, " end=", c.end));
    EXPECT_THAT(TokenRange::Create(c.start, c.end),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("token range"),
                               HasSubstr(absl::StrCat("start=", c.start)))));
    EXPECT_THAT(LayerRange::Create(c.start, c.end),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer range")));
  }
}

// SEMANTICS.md section 2, every example plus edges.
TEST(ComputeWindowBlocks, MatchesSemanticsExamples) {
  const struct {
    int64_t prompt_len;
    std::optional<int64_t> window;
    int64_t tpb, total, stale_end, valid;
  } kCases[] = {
      {32, 16, 8, 4, 2, 2},   {32, 24, 8, 4, 1, 3},   {32, 32, 8, 4, 0, 4},
      {256, 64, 8, 32, 24, 8}, {64, 24, 8, 8, 5, 3},  {32, std::nullopt, 8, 4, 0, 4},
      {0, 16, 8, 0, 0, 0},    {1, 1, 8, 1, 0, 1},     {8, 1, 8, 1, 1, 0},
      {7, 1, 8, 1, 0, 1},     {9, 1, 8, 2, 1, 1},     {1000, 4096, 16, 63, 0, 63},
  };
  for (const auto& c : kCases) {
    SCOPED_TRACE(absl::StrCat("prompt_len=", c.prompt_len,
                              " window=", c.window.value_or(-1), " tpb=", c.tpb));
    ASSERT_OK_AND_ASSIGN(WindowBlocks blocks,
                         ComputeWindowBlocks(c.prompt_len, c.window, c.tpb));
    EXPECT_EQ(blocks.total_blocks, c.total);
    EXPECT_EQ(blocks.stale_end, c.stale_end);
    EXPECT_EQ(blocks.expected_valid, c.valid);
  }
}

TEST(ComputeWindowBlocks, DoesNotOverflowAtTheEdgesOfInt64) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  ASSERT_OK_AND_ASSIGN(WindowBlocks blocks, ComputeWindowBlocks(kMax, 1, kMax));
  EXPECT_EQ(blocks.total_blocks, 1);
  EXPECT_EQ(blocks.stale_end, 1);
  ASSERT_OK_AND_ASSIGN(blocks, ComputeWindowBlocks(kMax - 1, kMax, 1));
  EXPECT_EQ(blocks.stale_end, 0);
  EXPECT_EQ(CeilDiv(kMax, 2), kMax / 2 + 1);
}

TEST(ComputeWindowBlocks, RejectsBadInput) {
  EXPECT_THAT(ComputeWindowBlocks(-1, std::nullopt, 8),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("prompt_len=-1")));
  EXPECT_THAT(ComputeWindowBlocks(8, std::nullopt, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tokens_per_block=0")));
  EXPECT_THAT(ComputeWindowBlocks(8, 0, 8),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("window=0")));
}

TEST(AlignBlocks, PairsTheOverlap) {
  const struct {
    const char* name;
    BlockList src;
    int64_t src_start;
    BlockList dst;
    int64_t dst_start;
    int64_t floor;
    BlockList want_src, want_dst;
  } kCases[] = {
      {"same start", {1, 2, 3}, 0, {7, 8, 9}, 0, 0, {1, 2, 3}, {7, 8, 9}},
      {"dst starts later", {1, 2, 3, 4}, 0, {8, 9}, 16, 0, {3, 4}, {8, 9}},
      {"src starts later", {3, 4}, 16, {6, 7, 8, 9}, 0, 0, {3, 4}, {8, 9}},
      {"floor above both", {1, 2, 3, 4}, 0, {6, 7, 8, 9}, 0, 16, {3, 4}, {8, 9}},
      {"floor inside a block", {1, 2, 3, 4}, 0, {6, 7, 8, 9}, 0, 12, {2, 3, 4}, {7, 8, 9}},
      {"unaligned start floors the skip", {1, 2}, 5, {6, 7}, 0, 0, {1, 2}, {6, 7}},
      {"unaligned start past a block", {1, 2}, 9, {6, 7}, 0, 0, {1}, {7}},
      {"no overlap", {1, 2}, 0, {6}, 64, 0, {}, {}},
      {"empty src", {}, 32, {6, 7}, 16, 0, {}, {}},
      {"shorter dst tail", {1, 2, 3, 4}, 0, {8}, 8, 0, {2}, {8}},
  };
  for (const auto& c : kCases) {
    SCOPED_TRACE(c.name);
    ASSERT_OK_AND_ASSIGN(AlignedBlocks aligned,
                         AlignBlocks(c.src, c.src_start, c.dst, c.dst_start, 8, c.floor));
    EXPECT_THAT(aligned.src, ElementsAreArray(c.want_src));
    EXPECT_THAT(aligned.dst, ElementsAreArray(c.want_dst));
  }
}

TEST(AlignBlocks, RejectsNegativeStartsAndBadBlockSize) {
  const BlockList ids = {1};
  EXPECT_THAT(AlignBlocks(ids, -8, ids, 0, 8),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("src_start_token=-8")));
  EXPECT_THAT(AlignBlocks(ids, 0, ids, -1, 8),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dst_start_token=-1")));
  EXPECT_THAT(AlignBlocks(ids, 0, ids, 0, -8),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tokens_per_block=-8")));
}

TEST(FindRepeatedBlock, FindsTheEarliestRepetitionOnEveryPath) {
  const struct {
    const char* name;
    BlockList ids;
    std::optional<std::pair<size_t, size_t>> want;
  } kCases[] = {
      {"empty", {}, std::nullopt},
      {"one", {7}, std::nullopt},
      {"increasing", {1, 5, 9}, std::nullopt},
      {"dense permutation", {3, 1, 2, 0}, std::nullopt},
      {"dense repeat", {3, 1, 2, 1, 3}, std::make_pair(size_t{1}, size_t{3})},
      {"adjacent repeat", {4, 4}, std::make_pair(size_t{0}, size_t{1})},
      {"sparse distinct", {int64_t{1} << 62, 0, int64_t{1} << 40}, std::nullopt},
      {"sparse repeat",
       {int64_t{1} << 62, 5, int64_t{1} << 40, 5, int64_t{1} << 62},
       std::make_pair(size_t{1}, size_t{3})},
      {"extremes", {std::numeric_limits<int64_t>::max(), 0, std::numeric_limits<int64_t>::max()},
       std::make_pair(size_t{0}, size_t{2})},
      {"negative ids", {-1, 3, -1}, std::make_pair(size_t{0}, size_t{2})},
  };
  for (const auto& c : kCases) {
    SCOPED_TRACE(c.name);
    const std::optional<RepeatedBlock> got = FindRepeatedBlock(c.ids);
    ASSERT_EQ(got.has_value(), c.want.has_value());
    if (!got) continue;
    EXPECT_EQ(got->first, c.want->first);
    EXPECT_EQ(got->second, c.want->second);
  }
}

// Regression: issue 8, semantics gap 1 (two source blocks planned into one
// destination slot).
TEST(AlignBlocks, RejectsARepeatedBlockOnEitherSide) {
  EXPECT_THAT(AlignBlocks({1, 2, 3}, 0, {7, 8, 7}, 0, 8),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("destination block list repeats a block"),
                             HasSubstr("block=7 index=0 other_index=2"))));
  EXPECT_THAT(AlignBlocks({1, 1}, 0, {7, 8}, 0, 8),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("source block list repeats a block: block=1")));
}

KVSlice OneGroupSlice(int64_t end, BlockList ids) {
  KVSlice slice;
  slice.token_range = TokenRange::Create(0, end).value();
  slice.block_ids_per_layer_group = {std::move(ids)};
  slice.is_last_slice = true;
  return slice;
}

PairingOptions OneGroupOptions(std::optional<int64_t> window, int64_t prompt_len = 32) {
  PairingOptions options;
  options.tokens_per_block = 8;
  options.prompt_len = prompt_len;
  options.windows = {window};
  return options;
}

// SEMANTICS.md section 5, the worked-example table (tpb 8, prompt 32, total 4).
TEST(PairSliceBlocks, MatchesSemanticsWorkedExamples) {
  const struct {
    const char* name;
    int64_t slice_end;
    BlockList src, dst;
    std::optional<int64_t> window;
    int64_t src_start, dst_start;
    BlockList want_src, want_dst;
  } kCases[] = {
      {"no cache", 32, Iota(10, 4), Iota(20, 4), std::nullopt, 0, 0, Iota(10, 4), Iota(20, 4)},
      {"generation cached 2 blocks", 32, Iota(10, 4), {22, 23}, std::nullopt, 0, 16,
       {12, 13}, {22, 23}},
      {"context shorter by 2", 32, {12, 13}, Iota(20, 4), std::nullopt, 16, 0, {12, 13},
       {22, 23}},
      {"swa no cache", 32, {12, 13}, {22, 23}, 16, 16, 16, {12, 13}, {22, 23}},
      {"swa w24", 32, {10, 11}, {20, 21, 22}, 24, 16, 8, {10, 11}, {21, 22}},
      {"chunk ending at 16", 16, {10, 11}, {20, 21}, std::nullopt, 0, 0, {10, 11}, {20, 21}},
      {"chunk ending at 16 w16", 16, {}, {}, 16, 16, 16, {}, {}},
  };
  for (const auto& c : kCases) {
    SCOPED_TRACE(c.name);
    ASSERT_OK_AND_ASSIGN(std::vector<GroupPairing> pairings,
                         PairSliceBlocks(OneGroupSlice(c.slice_end, c.src),
                                         OneGroupSlice(c.slice_end, c.dst),
                                         OneGroupOptions(c.window)));
    ASSERT_EQ(pairings.size(), 1u);
    EXPECT_EQ(pairings[0].src_start_token, c.src_start);
    EXPECT_EQ(pairings[0].dst_start_token, c.dst_start);
    EXPECT_THAT(pairings[0].src, ElementsAreArray(c.want_src));
    EXPECT_THAT(pairings[0].dst, ElementsAreArray(c.want_dst));
  }
}

TEST(PairSliceBlocks, DropsOneTrailingDraftBlockOnEitherSide) {
  // A whole-prompt list with a draft block at the tail: the draft never moves.
  ASSERT_OK_AND_ASSIGN(
      std::vector<GroupPairing> pairings,
      PairSliceBlocks(OneGroupSlice(32, Iota(10, 4)), OneGroupSlice(32, {20, 21, 22, 23, 99}),
                      OneGroupOptions(std::nullopt)));
  EXPECT_EQ(pairings[0].dst_start_token, 0);
  EXPECT_THAT(pairings[0].src, ElementsAre(10, 11, 12, 13));
  EXPECT_THAT(pairings[0].dst, ElementsAre(20, 21, 22, 23));

  ASSERT_OK_AND_ASSIGN(
      pairings, PairSliceBlocks(OneGroupSlice(32, {10, 11, 12, 13, 98}),
                                OneGroupSlice(32, {22, 23}), OneGroupOptions(std::nullopt)));
  EXPECT_THAT(pairings[0].src, ElementsAre(12, 13));
  EXPECT_THAT(pairings[0].dst, ElementsAre(22, 23));
}

// The reference engine dropped dst's last id whenever dst was one longer than src;
// with a cached prefix on the generation side that pairs the wrong blocks.
TEST(PairSliceBlocks, DoesNotTrimDstThatIsOnlyLongerThanSrc) {
  ASSERT_OK_AND_ASSIGN(
      std::vector<GroupPairing> pairings,
      PairSliceBlocks(OneGroupSlice(32, {12, 13}), OneGroupSlice(32, {21, 22, 23}),
                      OneGroupOptions(std::nullopt)));
  EXPECT_THAT(pairings[0].src, ElementsAre(12, 13));
  EXPECT_THAT(pairings[0].dst, ElementsAre(22, 23));
}

// The reference engine raised both starts to the window floor before aligning,
// which pairs wrong blocks when only one list still holds stale blocks.
TEST(PairSliceBlocks, UntrimmedPeerListWithStaleBlocksStillPairsByPosition) {
  ASSERT_OK_AND_ASSIGN(
      std::vector<GroupPairing> pairings,
      PairSliceBlocks(OneGroupSlice(32, {12, 13}), OneGroupSlice(32, Iota(20, 4)),
                      OneGroupOptions(16)));
  EXPECT_EQ(pairings[0].src_start_token, 16);
  EXPECT_EQ(pairings[0].dst_start_token, 0);
  EXPECT_THAT(pairings[0].src, ElementsAre(12, 13));
  EXPECT_THAT(pairings[0].dst, ElementsAre(22, 23));
}

TEST(PairSliceBlocks, RejectsSurplusOfTwoBlocks) {
  EXPECT_THAT(
      PairSliceBlocks(OneGroupSlice(32, Iota(10, 4)), OneGroupSlice(32, Iota(20, 6)),
                      OneGroupOptions(std::nullopt)),
      StatusIs(absl::StatusCode::kInvalidArgument,
               AllOf(HasSubstr("destination block list longer than its suffix"),
                     HasSubstr("group=0"), HasSubstr("len=6"), HasSubstr("max=5"))));
  PairingOptions options = OneGroupOptions(std::nullopt);
  options.request_id = 17;
  options.slice_id = 2;
  EXPECT_THAT(PairSliceBlocks(OneGroupSlice(16, Iota(10, 4)), OneGroupSlice(16, {1, 2}),
                              options),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("source"), HasSubstr("request=17"),
                             HasSubstr("slice=2"), HasSubstr("end=16"))));
}

// Regression: issue 8, semantics gap 1. A peer's list naming one slot twice would
// have two source blocks written into it; the whole list is checked, also where
// nothing moves (the receiver's draft block, the sender's stale head).
TEST(PairSliceBlocks, RejectsARepeatedBlockNamingGroupAndBothPositions) {
  PairingOptions options = OneGroupOptions(std::nullopt);
  options.request_id = 17;
  options.slice_id = 2;
  EXPECT_THAT(
      PairSliceBlocks(OneGroupSlice(32, Iota(10, 4)), OneGroupSlice(32, {20, 21, 20, 23}),
                      options),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("destination block list repeats a block: request=17 slice=2 "
                         "group=0 block=20 index=0 other_index=2")));
  EXPECT_THAT(
      PairSliceBlocks(OneGroupSlice(32, Iota(10, 4)), OneGroupSlice(32, {20, 21, 22, 23, 21}),
                      OneGroupOptions(std::nullopt)),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("destination block list repeats a block: group=0 block=21 index=1 "
                         "other_index=4")));
  KVSlice src = OneGroupSlice(32, {10, 11});
  src.block_ids_per_layer_group.push_back({10, 11, 12, 11});
  KVSlice dst = OneGroupSlice(32, {20, 21});
  dst.block_ids_per_layer_group.push_back({30, 31});
  options.windows = {std::nullopt, 16};
  EXPECT_THAT(PairSliceBlocks(src, dst, options),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("source block list repeats a block: request=17 slice=2 "
                                 "group=1 block=11 index=1 other_index=3")));
  // The same id in two groups, or on both sides, is two different slots.
  src.block_ids_per_layer_group[1] = {10, 11};
  dst.block_ids_per_layer_group[1] = {10, 11};
  EXPECT_THAT(PairSliceBlocks(src, dst, options), IsOk());
}

TEST(PairSliceBlocks, HonoursReceiverStartHint) {
  PairingOptions options = OneGroupOptions(std::nullopt);
  options.dst_start_token = 24;
  ASSERT_OK_AND_ASSIGN(std::vector<GroupPairing> pairings,
                       PairSliceBlocks(OneGroupSlice(32, Iota(10, 4)),
                                       OneGroupSlice(32, {21, 22, 23}), options));
  EXPECT_EQ(pairings[0].dst_start_token, 24);
  EXPECT_THAT(pairings[0].src, ElementsAre(13));
  EXPECT_THAT(pairings[0].dst, ElementsAre(21));
  // A hint below the list's own start changes nothing.
  options.dst_start_token = 0;
  ASSERT_OK_AND_ASSIGN(pairings, PairSliceBlocks(OneGroupSlice(32, Iota(10, 4)),
                                                 OneGroupSlice(32, {22, 23}), options));
  EXPECT_EQ(pairings[0].dst_start_token, 16);
}

TEST(PairSliceBlocks, HandlesMixedGroupsIndependently) {
  KVSlice src = OneGroupSlice(256, Iota(0, 32));
  src.block_ids_per_layer_group.push_back(Iota(124, 8));  // W 64: blocks [24, 32)
  src.block_ids_per_layer_group.push_back({});            // Mamba
  KVSlice dst = OneGroupSlice(256, Iota(212, 20));        // cached 12 blocks
  dst.block_ids_per_layer_group.push_back(Iota(324, 8));
  dst.block_ids_per_layer_group.push_back({});
  PairingOptions options = OneGroupOptions(std::nullopt, 256);
  options.windows = {std::nullopt, 64, std::nullopt};
  ASSERT_OK_AND_ASSIGN(std::vector<GroupPairing> pairings,
                       PairSliceBlocks(src, dst, options));
  ASSERT_EQ(pairings.size(), 3u);
  EXPECT_THAT(pairings[0].src, ElementsAreArray(Iota(12, 20)));
  EXPECT_THAT(pairings[0].dst, ElementsAreArray(Iota(212, 20)));
  EXPECT_THAT(pairings[1].src, ElementsAreArray(Iota(124, 8)));
  EXPECT_THAT(pairings[1].dst, ElementsAreArray(Iota(324, 8)));
  EXPECT_THAT(pairings[2].src, IsEmpty());
}

TEST(PairSliceBlocks, EmptySliceWithoutRangeMovesNothing) {
  KVSlice empty;
  empty.block_ids_per_layer_group = {{}};
  ASSERT_OK_AND_ASSIGN(std::vector<GroupPairing> pairings,
                       PairSliceBlocks(empty, empty, OneGroupOptions(std::nullopt, 0)));
  EXPECT_THAT(pairings[0].src, IsEmpty());
  // ...but any id there breaks the suffix invariant by two (total is 0).
  empty.block_ids_per_layer_group = {{1, 2}};
  EXPECT_THAT(PairSliceBlocks(empty, empty, OneGroupOptions(std::nullopt, 0)),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(PairSliceBlocks, RejectsInconsistentInput) {
  const KVSlice one = OneGroupSlice(32, Iota(0, 4));
  KVSlice two = one;
  two.block_ids_per_layer_group.push_back({});
  EXPECT_THAT(PairSliceBlocks(one, two, OneGroupOptions(std::nullopt)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("src_groups=1"), HasSubstr("dst_groups=2"))));

  EXPECT_THAT(PairSliceBlocks(one, OneGroupSlice(16, Iota(0, 2)), OneGroupOptions(std::nullopt)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("src_end=32"), HasSubstr("dst_end=16"))));

  PairingOptions no_prompt = OneGroupOptions(16);
  no_prompt.prompt_len.reset();
  EXPECT_THAT(PairSliceBlocks(one, one, no_prompt),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("prompt length"), HasSubstr("window=16"))));

  PairingOptions bad_window = OneGroupOptions(-4);
  EXPECT_THAT(PairSliceBlocks(one, one, bad_window),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("window=-4")));

  PairingOptions bad_hint = OneGroupOptions(std::nullopt);
  bad_hint.dst_start_token = -8;
  EXPECT_THAT(PairSliceBlocks(one, one, bad_hint),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dst_start_token=-8")));

  PairingOptions bad_tpb = OneGroupOptions(std::nullopt);
  bad_tpb.tokens_per_block = 0;
  EXPECT_THAT(PairSliceBlocks(one, one, bad_tpb),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(PairSliceBlocks(one, one, OneGroupOptions(std::nullopt, -1)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("prompt_len=-1")));
}

}  // namespace
}  // namespace kvx::transfer
