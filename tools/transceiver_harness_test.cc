// The reference engine's own parts: the pattern and its checks must catch what they
// are there to catch, the cache manager must hand out and take back exactly, and
// the workload must be the same on both sides.

#include "tools/transceiver_harness.h"

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cache_reuse/adapter.h"
#include "cache_reuse/v2_adapter.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "transfer/page_table.h"
#include "transfer/scenario.h"
#include "transfer/topology.h"

namespace kvx::harness {
namespace {

using ::kvx::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

transfer::ModelSpec SmallModel() {
  ModelOptions options;
  options.num_layers = 4;
  options.num_kv_heads = 4;
  options.head_size = 6;  // 12-byte rows: words that straddle rows
  options.tokens_per_block = 4;
  options.windows = {std::nullopt, 12};
  return BuildModel(options).value();
}

struct Slots {
  transfer::RankPageTable table;
  RankLayout layout;
  std::vector<uint8_t> memory;
};

Slots MakeSlots(const transfer::ModelSpec& model, const Shape& shape, int64_t rank) {
  Slots s;
  const transfer::Topology t = RankTopology(shape, model.num_layers, rank).value();
  s.table = transfer::BuildStandardPageTable(model, t, 4, 0).value();
  s.layout = RankLayout::Create(model, s.table).value();
  s.memory.assign(s.table.pools[0].slot_bytes, 0);
  return s;
}

TEST(RankLayout, PatternChecksAndACorruptByteIsNamed) {
  Slots s = MakeSlots(SmallModel(), Shape{2, 1, {}, false}, 1);  // heads 2..3
  s.layout.FillBlock(7, 0, 3, s.memory.data());
  EXPECT_FALSE(s.layout.CheckBlock(7, 0, 3, s.memory.data()).has_value());
  // Another request, block or group is another pattern.
  EXPECT_TRUE(s.layout.CheckBlock(8, 0, 3, s.memory.data()).has_value());
  EXPECT_TRUE(s.layout.CheckBlock(7, 0, 2, s.memory.data()).has_value());
  // Group 0 holds layers 0 and 2; each K or V buffer is 2 heads x 4 tokens x 12 bytes.
  const uint64_t offset = 96 * 3 + 12 * 5 + 7;  // layer 2, V, head 3, token 13, byte 7
  s.memory[offset] ^= 0x40;
  const std::optional<RankLayout::Mismatch> m = s.layout.CheckBlock(7, 0, 3, s.memory.data());
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->offset, offset);
  EXPECT_EQ(m->actual, m->expected ^ 0x40);
  EXPECT_EQ(m->where, "layer=2 kv=v head=3 token=13 byte=7");
}

TEST(RankLayout, MarkersAndFreeSlotsDifferFromThePatternAndEachOther) {
  Slots s = MakeSlots(SmallModel(), Shape{1, 1, {}, false}, 0);
  s.layout.FillMarker(7, 1, 2, s.memory.data());
  EXPECT_FALSE(s.layout.CheckMarker(7, 1, 2, s.memory.data()).has_value());
  EXPECT_TRUE(s.layout.CheckMarker(7, 1, 3, s.memory.data()).has_value());
  EXPECT_TRUE(s.layout.CheckBlock(7, 1, 2, s.memory.data()).has_value());
  EXPECT_TRUE(s.layout.CheckFree(1, 2, s.memory.data()).has_value());
  s.layout.FillFree(1, 2, s.memory.data());
  EXPECT_FALSE(s.layout.CheckFree(1, 2, s.memory.data()).has_value());
  s.memory.back() ^= 1;  // the very last byte counts too
  const std::optional<RankLayout::Mismatch> m = s.layout.CheckFree(1, 2, s.memory.data());
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->offset, s.memory.size() - 1);
  EXPECT_EQ(m->where, "free slot");
}

TEST(RankLayout, ReplicatedHeadsAndMlaOwnWhatTheTableSays) {
  transfer::ModelSpec model = SmallModel();
  model.num_kv_heads = 2;
  // TP4 over 2 heads: ranks 2 and 3 both hold head 1.
  Slots a = MakeSlots(model, Shape{4, 1, {}, false}, 2);
  Slots b = MakeSlots(model, Shape{4, 1, {}, false}, 3);
  a.layout.FillBlock(1, 0, 0, a.memory.data());
  EXPECT_FALSE(b.layout.CheckBlock(1, 0, 0, a.memory.data()).has_value());
  Slots c = MakeSlots(model, Shape{4, 1, {}, false}, 1);  // head 0
  EXPECT_TRUE(c.layout.CheckBlock(1, 0, 0, a.memory.data()).has_value());
  model.is_mla = true;
  Slots mla = MakeSlots(model, Shape{2, 1, {}, false}, 1);
  EXPECT_EQ(mla.table.pools[0].slot_bytes, 2u * 4 * 12);  // two layers, one latent each
}

TEST(DemoCacheManager, AllocatesPositionallyAndTakesBackExactly) {
  DemoCacheManager manager(2, 6);
  ASSERT_OK_AND_ASSIGN(std::vector<transfer::BlockList> tables,
                       manager.Allocate(1, 9, {{3, 0}, {4, 2}}));
  EXPECT_THAT(tables[0], ElementsAre(0, 1, 2));
  EXPECT_THAT(tables[1], ElementsAre(-1, -1, 0, 1));
  EXPECT_EQ(manager.free_slots(1), 4);
  // The adapter sees the pages back at their positions and the committed count.
  cache_reuse::V2Adapter adapter(&manager, cache_reuse::ReuseOptions{true});
  EXPECT_THAT(adapter.PositionalBlockTable(1, 1).value(), ElementsAre(-1, -1, 0, 1));
  EXPECT_EQ(adapter.GlobalCachedTokens(1, 4).value(), 8);
  EXPECT_THAT(manager.Allocate(1, 0, {{1, 0}, {1, 0}}), StatusIs(absl::StatusCode::kAlreadyExists));
  // Out of slots in one group: nothing is taken from the other.
  EXPECT_THAT(manager.Allocate(2, 0, {{1, 0}, {5, 0}}),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(manager.free_slots(0), 3);
  EXPECT_FALSE(manager.committed(1));
  ASSERT_OK(adapter.CommitReceivedBlocks(1));
  EXPECT_TRUE(manager.committed(1));
  ASSERT_OK(manager.Release(1));
  EXPECT_EQ(manager.free_slots(0), 6);
  EXPECT_EQ(manager.free_slots(1), 6);
  EXPECT_THAT(manager.Release(1), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_FALSE(manager.NumCommittedTokens(1).has_value());
}

TEST(Workload, IsTheSameForTheSameSeedAndCoversEveryPrompt) {
  WorkloadOptions options;
  options.requests = 500;
  options.seed = 42;
  options.max_prompt = 300;
  options.chunk_rate = 0.5;
  options.cancel_rate = 0.3;
  options.generation_dp_size = 3;
  ASSERT_OK_AND_ASSIGN(std::vector<RequestPlan> a, MakeWorkload(options, 16));
  ASSERT_OK_AND_ASSIGN(std::vector<RequestPlan> b, MakeWorkload(options, 16));
  ASSERT_EQ(a.size(), 500u);
  int64_t chunked = 0, cancelled = 0, hits = 0, whole = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("request=", a[i].rid));
    EXPECT_EQ(a[i].rid, b[i].rid);
    EXPECT_EQ(a[i].prompt_len, b[i].prompt_len);
    EXPECT_EQ(a[i].hit_tokens, b[i].hit_tokens);
    EXPECT_EQ(a[i].chunks.size(), b[i].chunks.size());
    EXPECT_EQ(a[i].cancel, b[i].cancel);
    EXPECT_GE(a[i].hit_tokens, 0);
    EXPECT_LE(a[i].hit_tokens, a[i].prompt_len);
    EXPECT_LT(a[i].generation_dp_rank, 3);
    // Slices split [0, prompt_len) in order.
    int64_t start = 0;
    for (const Chunk& c : a[i].chunks) {
      EXPECT_EQ(c.start, start);
      EXPECT_LT(c.start, c.end);
      start = c.end;
    }
    EXPECT_EQ(start, a[i].prompt_len);
    chunked += a[i].chunks.size() > 1;
    cancelled += a[i].cancel != CancelWhen::kNone;
    hits += a[i].hit_tokens > 0;
    whole += a[i].hit_tokens == a[i].prompt_len;
  }
  EXPECT_GT(chunked, 150);
  EXPECT_GT(cancelled, 100);
  EXPECT_GT(hits, 180);
  EXPECT_GT(whole, 30);
  options.seed = 43;
  ASSERT_OK_AND_ASSIGN(std::vector<RequestPlan> c, MakeWorkload(options, 16));
  EXPECT_NE(a[0].prompt_len + a[1].prompt_len, c[0].prompt_len + c[1].prompt_len);
  options.max_chunks = 1;
  EXPECT_THAT(MakeWorkload(options, 16), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(GenerationBlocks, FollowsTheSemanticsExamples) {
  // SEMANTICS.md section 2 (tpb 8) and section 3 (window clamp).
  transfer::ModelSpec model;
  model.tokens_per_block = 8;
  model.groups = {transfer::GroupSpec{std::nullopt, {0}}, transfer::GroupSpec{16, {1}},
                  transfer::GroupSpec{24, {2}}, transfer::GroupSpec{32, {3}}};
  RequestPlan plan;
  plan.prompt_len = 32;
  std::vector<GroupBlocks> b = GenerationBlocks(model, plan);
  EXPECT_EQ(b[0].stale, 0);
  EXPECT_EQ(b[1].stale, 2);
  EXPECT_EQ(b[2].stale, 1);
  EXPECT_EQ(b[3].stale, 0);
  plan.hit_tokens = 23;  // two whole blocks
  b = GenerationBlocks(model, plan);
  EXPECT_EQ(b[0].first, 2);
  EXPECT_EQ(b[1].first, 2);
  EXPECT_EQ(b[2].first, 2);
  plan.prompt_len = 64;
  plan.hit_tokens = 0;
  model.groups[1].window = 24;
  b = GenerationBlocks(model, plan);
  EXPECT_EQ(b[1].stale, 5);
  EXPECT_EQ(b[1].total - b[1].stale, 3);
}

TEST(SideReport, SurvivesJson) {
  SideReport report;
  report.role = "generation";
  report.requests = 3;
  report.succeeded = 2;
  report.failed = 1;
  report.bytes = uint64_t{1} << 40;
  report.latency_ms = {1, 2, 3, 4};
  report.failures = {"request=3 ended ERROR"};
  report.metrics.bad_messages = 5;
  ASSERT_OK_AND_ASSIGN(SideReport back, SideReportFromJson(ToJson(report)));
  EXPECT_EQ(back.bytes, report.bytes);
  EXPECT_EQ(back.failures, report.failures);
  EXPECT_EQ(back.metrics.bad_messages, 5);
  EXPECT_EQ(back.percentile_ms(50), 2);
  EXPECT_EQ(back.percentile_ms(99), 4);
  EXPECT_FALSE(back.ok());
  nlohmann::json broken = ToJson(report);
  broken["bytes"] = "many";
  EXPECT_THAT(SideReportFromJson(broken).status().message(), HasSubstr("field=bytes"));
  broken.erase("bytes");
  EXPECT_THAT(SideReportFromJson(broken).status().message(), HasSubstr("lacks a field: field=bytes"));
}

}  // namespace
}  // namespace kvx::harness
