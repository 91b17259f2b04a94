// One typed suite for both reuse adapters: they must agree on every count and every
// slice when their managers describe the same cache state (SEMANTICS.md 3 and 4).

#include "cache_reuse/adapter.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cache_reuse/v1_adapter.h"
#include "cache_reuse/v2_adapter.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/fake_cache_managers.h"
#include "testing/status_matchers.h"
#include "transfer/slice.h"

namespace kvx::cache_reuse {
namespace {

using ::kvx::testing::FakeBlockTableCacheManager;
using ::kvx::testing::FakePagedCacheManager;
using ::kvx::testing::IsOk;
using ::kvx::testing::IsOkAndHolds;
using ::kvx::testing::StatusIs;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using transfer::BlockList;

constexpr int64_t kRequest = 17;
constexpr int64_t kTpb = 8;

BlockList Iota(int64_t first, int64_t n) {
  BlockList ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = first + i;
  return ids;
}

// Wraps one adapter and its fake manager behind the same calls.
struct V1Fixture {
  FakeBlockTableCacheManager manager;
  std::unique_ptr<CacheReuseAdapter> adapter;
  void Set(bool reuse, int64_t cached_tokens, std::vector<BlockList> tables) {
    manager.AddRequest(kRequest, cached_tokens, std::move(tables));
    adapter = std::make_unique<V1Adapter>(&manager, ReuseOptions{reuse});
  }
  bool Committed() const { return manager.stored_for_reuse(kRequest); }
};

struct V2Fixture {
  FakePagedCacheManager manager;
  std::unique_ptr<CacheReuseAdapter> adapter;
  void Set(bool reuse, int64_t cached_tokens, std::vector<BlockList> tables) {
    manager.AddRequestFromTables(kRequest, cached_tokens, tables);
    adapter = std::make_unique<V2Adapter>(&manager, ReuseOptions{reuse});
  }
  bool Committed() const { return manager.committed(kRequest); }
};

template <typename Fixture>
class AdapterTest : public ::testing::Test {
 protected:
  SliceRequest Request(int64_t prompt_len, Side side = Side::kGeneration) const {
    SliceRequest request;
    request.request_id = kRequest;
    request.prompt_len = prompt_len;
    request.tokens_per_block = kTpb;
    request.side = side;
    return request;
  }
  Fixture f_;
};

using AdapterTypes = ::testing::Types<V1Fixture, V2Fixture>;
class AdapterNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, V1Fixture> ? "V1" : "V2";
  }
};
TYPED_TEST_SUITE(AdapterTest, AdapterTypes, AdapterNames);

TYPED_TEST(AdapterTest, GlobalCountIsFlooredToABlock) {
  const struct {
    bool reuse;
    int64_t cached, want;
  } kCases[] = {{true, 0, 0}, {true, 7, 0}, {true, 8, 8}, {true, 100, 96},
                {true, 300, 296}, {false, 100, 0}};
  for (const auto& c : kCases) {
    SCOPED_TRACE(absl::StrCat("reuse=", c.reuse, " cached=", c.cached));
    this->f_.Set(c.reuse, c.cached, {Iota(0, 4)});
    ASSERT_OK_AND_ASSIGN(int64_t global, this->f_.adapter->GlobalCachedTokens(kRequest, kTpb));
    EXPECT_EQ(global, c.want);
  }
}

// SEMANTICS.md section 3: prompt 256, window 64, tpb 8, global 0 -> [0, 192].
TYPED_TEST(AdapterTest, PerGroupCountsSkipStaleWindowBlocks) {
  const std::vector<LayerGroupSpec> groups = {LayerGroupSpec::Full(),
                                              LayerGroupSpec::Windowed(64),
                                              LayerGroupSpec::Mamba()};
  EXPECT_THAT(CachedTokensPerGroup(0, 256, groups, kTpb),
              IsOkAndHolds(ElementsAre(0, 192, 0)));
  EXPECT_THAT(CachedTokensPerGroup(200, 256, groups, kTpb),
              IsOkAndHolds(ElementsAre(200, 200, 200)));
  EXPECT_THAT(CachedTokensPerGroup(-8, 256, groups, kTpb),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("cached_tokens=-8")));
  const std::vector<LayerGroupSpec> bad = {LayerGroupSpec::Windowed(0)};
  EXPECT_THAT(CachedTokensPerGroup(0, 256, bad, kTpb),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("group=0")));
}

// SEMANTICS.md section 4 on a 32-token prompt (4 blocks), with a draft-token
// block at the tail of every table and evicted stale heads in the windowed one.
TYPED_TEST(AdapterTest, BuildsSuffixListsOnBothSides) {
  const std::vector<LayerGroupSpec> groups = {
      LayerGroupSpec::Full(), LayerGroupSpec::Windowed(16), LayerGroupSpec::Mamba()};
  const std::vector<BlockList> tables = {{10, 11, 12, 13, 90}, {-1, -1, 22, 23, 91}, {}};
  const struct {
    const char* name;
    Side side;
    bool generation_only;
    int64_t cached;
    std::vector<int64_t> want_cached;
    BlockList want_full, want_window;
  } kCases[] = {
      {"context ignores the cache", Side::kContext, true, 20, {0, 16, 0}, Iota(10, 4),
       {22, 23}},
      {"generation with a partial prefix hit", Side::kGeneration, true, 20, {16, 16, 16},
       {12, 13}, {22, 23}},
      {"generation hit past the window floor", Side::kGeneration, true, 24, {24, 24, 24},
       {13}, {23}},
      {"generation hit of the whole prompt", Side::kGeneration, true, 32, {32, 32, 32}, {},
       {}},
      {"generation hit beyond the prompt", Side::kGeneration, true, 40, {40, 40, 40}, {},
       {}},
      {"not generation-only", Side::kGeneration, false, 20, {0, 16, 0}, Iota(10, 4),
       {22, 23}},
  };
  for (const auto& c : kCases) {
    SCOPED_TRACE(c.name);
    this->f_.Set(true, c.cached, tables);
    SliceRequest request = this->Request(32, c.side);
    request.generation_only = c.generation_only;
    ASSERT_OK_AND_ASSIGN(BuiltSlice built, BuildSlice(*this->f_.adapter, request, groups));
    EXPECT_THAT(built.cached_tokens, ElementsAreArray(c.want_cached));
    ASSERT_TRUE(built.slice.token_range.has_value());
    EXPECT_EQ(built.slice.token_range->start(), 0);
    EXPECT_EQ(built.slice.token_range->end(), 32);
    EXPECT_TRUE(built.slice.is_last_slice);
    ASSERT_EQ(built.slice.block_ids_per_layer_group.size(), 3u);
    EXPECT_THAT(built.slice.block_ids_per_layer_group[0], ElementsAreArray(c.want_full));
    EXPECT_THAT(built.slice.block_ids_per_layer_group[1], ElementsAreArray(c.want_window));
    EXPECT_THAT(built.slice.block_ids_per_layer_group[2], IsEmpty());
  }
}

TYPED_TEST(AdapterTest, ChunkListsEndAtTheChunk) {
  const std::vector<LayerGroupSpec> groups = {LayerGroupSpec::Full(),
                                              LayerGroupSpec::Windowed(16)};
  this->f_.Set(true, 0, {Iota(10, 4), {-1, -1, 22, 23}});
  SliceRequest request = this->Request(32);
  request.token_range = transfer::TokenRange::Create(0, 16).value();
  ASSERT_OK_AND_ASSIGN(BuiltSlice built, BuildSlice(*this->f_.adapter, request, groups));
  EXPECT_FALSE(built.slice.is_last_slice);
  EXPECT_THAT(built.slice.block_ids_per_layer_group[0], ElementsAre(10, 11));
  EXPECT_THAT(built.slice.block_ids_per_layer_group[1], IsEmpty());

  request.token_range = transfer::TokenRange::Create(16, 40).value();
  EXPECT_THAT(BuildSlice(*this->f_.adapter, request, groups),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("end=40"), HasSubstr("prompt_len=32"))));
}

TYPED_TEST(AdapterTest, EmptyPromptHasNoRangeAndNoBlocks) {
  this->f_.Set(true, 0, {{}});
  ASSERT_OK_AND_ASSIGN(BuiltSlice built,
                       BuildSlice(*this->f_.adapter, this->Request(0),
                                  std::vector<LayerGroupSpec>{LayerGroupSpec::Full()}));
  EXPECT_FALSE(built.slice.token_range.has_value());
  EXPECT_THAT(built.slice.block_ids_per_layer_group[0], IsEmpty());
}

TYPED_TEST(AdapterTest, MissingBlocksAreErrorsThatNameTheBlock) {
  const std::vector<LayerGroupSpec> groups = {LayerGroupSpec::Full(),
                                              LayerGroupSpec::Windowed(16)};
  // Block 2 of the windowed group is needed but evicted.
  this->f_.Set(true, 0, {Iota(10, 4), {-1, -1, -1, 23}});
  EXPECT_THAT(BuildSlice(*this->f_.adapter, this->Request(32), groups),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       AllOf(HasSubstr("request=17"), HasSubstr("group=1"),
                             HasSubstr("block=2"))));
  // The full group's table stops at 3 blocks of 4.
  this->f_.Set(true, 0, {Iota(10, 3), {-1, -1, 22, 23}});
  EXPECT_THAT(BuildSlice(*this->f_.adapter, this->Request(32), groups),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       AllOf(HasSubstr("group=0"), HasSubstr("table_len=3"),
                             HasSubstr("needed=4"))));
  // An unknown request is the manager's NotFound, with the group added.
  SliceRequest unknown = this->Request(32, Side::kContext);
  unknown.request_id = 99;
  EXPECT_THAT(BuildSlice(*this->f_.adapter, unknown, groups),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("group=0")));
}

TYPED_TEST(AdapterTest, CommitsOnlyWhenReuseIsEnabled) {
  this->f_.Set(false, 0, {Iota(0, 4)});
  ASSERT_OK(this->f_.adapter->CommitReceivedBlocks(kRequest));
  EXPECT_FALSE(this->f_.Committed());
  this->f_.Set(true, 0, {Iota(0, 4)});
  ASSERT_OK(this->f_.adapter->CommitReceivedBlocks(kRequest));
  EXPECT_TRUE(this->f_.Committed());
}

TEST(V2Adapter, UnknownRequestCountsZeroAndDroppedPagesKeepTheirPositions) {
  FakePagedCacheManager manager;
  manager.AddRequest(kRequest, std::nullopt, {ValidPages{3, {33, 34, 35}}});
  V2Adapter adapter(&manager, ReuseOptions{true});
  EXPECT_THAT(adapter.GlobalCachedTokens(kRequest, kTpb), IsOkAndHolds(0));
  EXPECT_THAT(adapter.GlobalCachedTokens(1234, kTpb), IsOkAndHolds(0));
  EXPECT_THAT(adapter.PositionalBlockTable(kRequest, 0),
              IsOkAndHolds(ElementsAre(-1, -1, -1, 33, 34, 35)));

  manager.AddRequest(kRequest, 16, {ValidPages{-1, {1}}});
  EXPECT_THAT(adapter.PositionalBlockTable(kRequest, 0),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("num_dropped_leading=-1")));
}

TEST(V2Adapter, SplitPositionalTableInvertsThePositionalTable) {
  const ValidPages valid = SplitPositionalTable({-1, -1, 22, 23, 91});
  EXPECT_EQ(valid.num_dropped_leading, 2);
  EXPECT_THAT(valid.pages, ElementsAre(22, 23, 91));
  EXPECT_EQ(SplitPositionalTable({}).num_dropped_leading, 0);
  // Only the leading run counts as dropped; a later gap stays a gap.
  EXPECT_THAT(SplitPositionalTable({5, -1, 7}).pages, ElementsAre(5, -1, 7));
}

TEST(V2Adapter, CommitsOnlyRequestsThatHaveACache) {
  FakePagedCacheManager manager;
  manager.AddRequest(kRequest, 0, {ValidPages{}}, /*has_cache=*/false);
  V2Adapter adapter(&manager, ReuseOptions{true});
  ASSERT_OK(adapter.CommitReceivedBlocks(kRequest));
  EXPECT_FALSE(manager.committed(kRequest));
}

TEST(V1Adapter, RejectsNegativePrepopulatedLength) {
  FakeBlockTableCacheManager manager;
  manager.AddRequest(kRequest, -8, {{}});
  V1Adapter adapter(&manager, ReuseOptions{true});
  EXPECT_THAT(adapter.GlobalCachedTokens(kRequest, kTpb),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("prepopulated_prompt_len=-8")));
}

}  // namespace
}  // namespace kvx::cache_reuse
