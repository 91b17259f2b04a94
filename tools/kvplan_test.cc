#include "tools/kvplan.h"

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/status_matchers.h"

namespace kvx::kvplan {
namespace {

using json = nlohmann::json;
using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;
using ::testing::Not;

// Runs `command` on `input` and parses its output; fails the test on an error.
json RunJson(const std::string& command, const json& input) {
  absl::StatusOr<std::string> out = RunCommand(command, input.dump());
  EXPECT_THAT(out, IsOk()) << input.dump();
  if (!out.ok()) return nullptr;
  EXPECT_EQ(out->back(), '\n');
  EXPECT_EQ(out->find('\n'), out->size() - 1) << "output must be one line";
  return json::parse(*out);
}

// ---------------------------------------------------------------------------
// align

TEST(KvplanAlign, PairsTheBlocksThatCoverTheSameTokens) {
  const json out = RunJson("align", {{"tokens_per_block", 8},
                                     {"src", {10, 11, 12, 13}},
                                     {"dst", {22, 23}},
                                     {"src_start_token", 0},
                                     {"dst_start_token", 16}});
  EXPECT_EQ(out, json::object({{"src", {12, 13}}, {"dst", {22, 23}}}));
}

TEST(KvplanAlign, NothingMovesWhenTheListsDoNotOverlap) {
  const json out = RunJson("align", {{"tokens_per_block", 8},
                                     {"src", {1, 2}},
                                     {"dst", {3}},
                                     {"src_start_token", 0},
                                     {"dst_start_token", 16}});
  EXPECT_EQ(out, json::object({{"src", json::array()}, {"dst", json::array()}}));
}

TEST(KvplanAlign, OutputKeepsTheContractKeyOrder) {
  absl::StatusOr<std::string> out =
      RunCommand("align", R"({"tokens_per_block": 8, "src": [1], "dst": [2],
                   "src_start_token": 0, "dst_start_token": 0})");
  ASSERT_THAT(out, IsOk());
  EXPECT_EQ(*out, "{\"src\":[1],\"dst\":[2]}\n");
}

// ---------------------------------------------------------------------------
// pair: the worked examples of SEMANTICS.md section 5 (tpb 8, prompt 32).

TEST(KvplanPair, WorkedExamplesOfSection5) {
  struct Row {
    const char* name;
    json token_range;  // null: default [0, 32)
    json window;
    json src, dst;
    int64_t src_start, dst_start;
    json src_moved, dst_moved;
  };
  const Row rows[] = {
      {"no cache", nullptr, nullptr, {1, 2, 3, 4}, {5, 6, 7, 8}, 0, 0, {1, 2, 3, 4}, {5, 6, 7, 8}},
      {"generation cached 2 blocks", nullptr, nullptr, {1, 2, 3, 4}, {7, 8}, 0, 16, {3, 4}, {7, 8}},
      {"context shorter by 2", nullptr, nullptr, {3, 4}, {5, 6, 7, 8}, 16, 0, {3, 4}, {7, 8}},
      {"SWA, no cache", nullptr, 16, {3, 4}, {7, 8}, 16, 16, {3, 4}, {7, 8}},
      {"SWA, W 24", nullptr, 24, {10, 11}, {20, 21, 22}, 16, 8, {10, 11}, {21, 22}},
      {"chunk ending at 16", {0, 16}, nullptr, {1, 2}, {5, 6}, 0, 0, {1, 2}, {5, 6}},
      {"chunk ending at 16, W 16",
       {0, 16},
       16,
       json::array(),
       json::array(),
       16,
       16,
       json::array(),
       json::array()},
  };
  for (const Row& row : rows) {
    SCOPED_TRACE(row.name);
    json input = {{"tokens_per_block", 8},
                  {"prompt_len", 32},
                  {"windows", json::array({row.window})},
                  {"src", json::array({row.src})},
                  {"dst", json::array({row.dst})}};
    if (!row.token_range.is_null()) input["token_range"] = row.token_range;
    const json out = RunJson("pair", input);
    ASSERT_EQ(out["groups"].size(), 1u);
    const json& group = out["groups"][0];
    EXPECT_EQ(group["src_start_token"], row.src_start);
    EXPECT_EQ(group["dst_start_token"], row.dst_start);
    EXPECT_EQ(group["src"], row.src_moved);
    EXPECT_EQ(group["dst"], row.dst_moved);
  }
}

TEST(KvplanPair, DropsOneTrailingDraftBlock) {
  const json out = RunJson("pair", {{"tokens_per_block", 8},
                                    {"prompt_len", 32},
                                    {"windows", {nullptr}},
                                    {"src", {{1, 2, 3, 4}}},
                                    {"dst", {{5, 6, 7, 8, 9}}}});
  EXPECT_EQ(out["groups"][0]["dst"], json::array({5, 6, 7, 8}));
}

TEST(KvplanPair, RejectsADestinationSurplusOfTwoBlocks) {
  EXPECT_THAT(RunCommand("pair", R"({"tokens_per_block": 8, "prompt_len": 32,
                                     "windows": [null], "src": [[1, 2, 3, 4]],
                                     "dst": [[5, 6, 7, 8, 9, 10]]})"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("destination block list longer than its suffix")));
}

TEST(KvplanPair, RejectsASourceThatBreaksTheSuffixInvariant) {
  EXPECT_THAT(RunCommand("pair", R"({"tokens_per_block": 8, "prompt_len": 16,
                                     "windows": [null], "src": [[1, 2, 3, 4, 5]],
                                     "dst": [[5, 6]]})"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("source block list longer than its suffix")));
}

TEST(KvplanPair, EmptyPromptWithoutRangeMovesNothing) {
  const json out = RunJson("pair", {{"tokens_per_block", 8},
                                    {"prompt_len", 0},
                                    {"windows", {nullptr}},
                                    {"src", {json::array()}},
                                    {"dst", {json::array()}}});
  EXPECT_EQ(out["groups"][0]["src"], json::array());
  // The one draft block of an empty slice is dropped too.
  const json draft = RunJson("pair", {{"tokens_per_block", 8},
                                      {"prompt_len", 0},
                                      {"windows", {nullptr}},
                                      {"src", {{1}}},
                                      {"dst", {{2}}}});
  EXPECT_EQ(draft["groups"][0]["src"], json::array());
}

TEST(KvplanPair, DestinationHintRaisesTheDestinationStart) {
  const json out = RunJson("pair", {{"tokens_per_block", 8},
                                    {"prompt_len", 32},
                                    {"windows", {nullptr}},
                                    {"src", {{1, 2, 3, 4}}},
                                    {"dst", {{7, 8}}},
                                    {"dst_start_token", 24}});
  EXPECT_EQ(out["groups"][0]["dst_start_token"], 24);
  EXPECT_EQ(out["groups"][0]["src"], json::array({4}));
  EXPECT_EQ(out["groups"][0]["dst"], json::array({7}));
}

// ---------------------------------------------------------------------------
// slice

json SliceInput(const std::string& side, json reuse, json groups) {
  json input = {
      {"tokens_per_block", 8}, {"prompt_len", 32}, {"side", side}, {"groups", std::move(groups)}};
  if (!reuse.is_null()) input["reuse"] = std::move(reuse);
  return input;
}

const json kFullTable = {{"window", nullptr}, {"block_ids", {10, 11, 12, 13, 14}}};
const json kWindowTable = {{"window", 16}, {"block_ids", {-1, -1, 22, 23}}};

TEST(KvplanSlice, V1PrepopulatedPromptIsFlooredToABlock) {
  const json out = RunJson(
      "slice", SliceInput("generation",
                          {{"enabled", true}, {"adapter", "v1"}, {"prepopulated_prompt_len", 20}},
                          {kFullTable, kWindowTable}));
  EXPECT_EQ(out["token_range"], json::array({0, 32}));
  EXPECT_EQ(out["cached_tokens"], json::array({16, 16}));
  EXPECT_EQ(out["block_ids"], json::array({{12, 13}, {22, 23}}));
}

TEST(KvplanSlice, V2CommittedTokensAndUnknownRequest) {
  struct Row {
    const char* name;
    json committed;
    json cached;
    json block_ids;
  };
  const Row rows[] = {
      {"committed 25", 25, {24, 24}, {{13}, {23}}},
      {"unknown request", nullptr, {0, 16}, {{10, 11, 12, 13}, {22, 23}}},
      {"committed past the prompt", 40, {40, 40}, {json::array(), json::array()}},
  };
  for (const Row& row : rows) {
    SCOPED_TRACE(row.name);
    const json out = RunJson(
        "slice",
        SliceInput("generation",
                   {{"enabled", true}, {"adapter", "v2"}, {"num_committed_tokens", row.committed}},
                   {kFullTable, kWindowTable}));
    EXPECT_EQ(out["cached_tokens"], row.cached);
    EXPECT_EQ(out["block_ids"], row.block_ids);
  }
}

TEST(KvplanSlice, OnlyGenerationOnlyRequestsOnTheGenerationSideReuse) {
  const json reuse = {{"enabled", true}, {"adapter", "v1"}, {"prepopulated_prompt_len", 16}};
  const json context = RunJson("slice", SliceInput("context", reuse, json::array({kFullTable})));
  EXPECT_EQ(context["cached_tokens"], json::array({0}));
  EXPECT_EQ(context["block_ids"], json::array({{10, 11, 12, 13}}));
  json not_generation_only = SliceInput("generation", reuse, json::array({kFullTable}));
  not_generation_only["generation_only"] = false;
  EXPECT_EQ(RunJson("slice", not_generation_only)["cached_tokens"], json::array({0}));
  // Disabled, or absent: nothing cached, and the count may be left out.
  EXPECT_EQ(RunJson("slice", SliceInput("generation", {{"enabled", false}, {"adapter", "v2"}},
                                        json::array({kFullTable})))["cached_tokens"],
            json::array({0}));
  EXPECT_EQ(RunJson("slice",
                    SliceInput("generation", nullptr, json::array({kFullTable})))["cached_tokens"],
            json::array({0}));
}

TEST(KvplanSlice, MambaGroupsGetEmptyListsAndWindowMayBeOmitted) {
  const json out =
      RunJson("slice",
              SliceInput("context", nullptr, {{{"kind", "mamba"}}, {{"block_ids", {1, 2, 3, 4}}}}));
  EXPECT_EQ(out["block_ids"], json::array({json::array(), {1, 2, 3, 4}}));
}

TEST(KvplanSlice, ChunkKeepsItsRangeAndEndsAtItsOwnBlock) {
  json input = SliceInput("context", nullptr, json::array({kFullTable}));
  input["token_range"] = {8, 16};
  const json out = RunJson("slice", input);
  EXPECT_EQ(out["token_range"], json::array({8, 16}));
  EXPECT_EQ(out["block_ids"], json::array({{10, 11}}));
}

TEST(KvplanSlice, EmptyPromptHasNoRange) {
  json input = SliceInput("context", nullptr, {{{"block_ids", json::array()}}});
  input["prompt_len"] = 0;
  const json out = RunJson("slice", input);
  EXPECT_TRUE(out["token_range"].is_null());
  EXPECT_EQ(out["block_ids"], json::array({json::array()}));
}

TEST(KvplanSlice, ANeededBlockThatIsNotHeldIsAnError) {
  EXPECT_THAT(
      RunCommand("slice",
                 SliceInput("context", nullptr, {{{"block_ids", {10, -1, 12, 13}}}}).dump()),
      StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("group=0 block=1")));
  EXPECT_THAT(
      RunCommand("slice", SliceInput("context", nullptr, {{{"block_ids", {10, 11}}}}).dump()),
      StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("block table shorter")));
}

// ---------------------------------------------------------------------------
// transfer

json TransferInput() {
  // tpb 8, prompt 64; a full group and a W 24 group (stale_end 5); the generation
  // side has a V2 prefix hit of 20 tokens (2 blocks) and a draft block.
  return {{"tokens_per_block", 8},
          {"prompt_len", 64},
          {"context",
           {{"groups",
             {{{"window", nullptr}, {"block_ids", {0, 1, 2, 3, 4, 5, 6, 7}}},
              {{"window", 24}, {"block_ids", {-1, -1, -1, -1, -1, 15, 16, 17}}}}}}},
          {"generation",
           {{"reuse", {{"enabled", true}, {"adapter", "v2"}, {"num_committed_tokens", 20}}},
            {"groups",
             {{{"window", nullptr}, {"block_ids", {30, 31, 32, 33, 34, 35, 36, 37, 38}}},
              {{"window", 24}, {"block_ids", {-1, -1, -1, -1, -1, 45, 46, 47}}}}}}}};
}

TEST(KvplanTransfer, CountsWhatMovesAndWhy) {
  const json out = RunJson("transfer", TransferInput());
  ASSERT_EQ(out["groups"].size(), 2u);
  const json& full = out["groups"][0];
  EXPECT_EQ(full["src"], json::array({2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(full["dst"], json::array({32, 33, 34, 35, 36, 37}));
  EXPECT_EQ(full["src_start_token"], 0);
  EXPECT_EQ(full["dst_start_token"], 16);
  EXPECT_EQ(full["total_blocks"], 8);
  EXPECT_EQ(full["moved"], 6);
  EXPECT_EQ(full["skipped_cached"], 2);
  EXPECT_EQ(full["skipped_window"], 0);
  const json& window = out["groups"][1];
  EXPECT_EQ(window["window"], 24);
  EXPECT_EQ(window["src"], json::array({15, 16, 17}));
  EXPECT_EQ(window["dst"], json::array({45, 46, 47}));
  EXPECT_EQ(window["moved"], 3);
  EXPECT_EQ(window["skipped_window"], 5);
  EXPECT_EQ(window["skipped_cached"], 0);
  EXPECT_EQ(out["totals"]["moved"], 9);
  EXPECT_EQ(out["totals"]["total_blocks"], 16);
  EXPECT_EQ(out["token_range"], json::array({0, 64}));
  EXPECT_EQ(out["cached_tokens"]["generation"], json::array({16, 40}));
  EXPECT_EQ(out["cached_tokens"]["context"], json::array({0, 40}));
}

TEST(KvplanTransfer, CountsAddUpWithAHintAndAChunk) {
  json input = TransferInput();
  input["dst_start_token"] = 36;  // not block aligned: block 4 still moves
  json out = RunJson("transfer", input);
  EXPECT_EQ(out["groups"][0]["skipped_cached"], 2);
  EXPECT_EQ(out["groups"][0]["skipped_hint"], 2);
  EXPECT_EQ(out["groups"][0]["moved"], 4);

  input = TransferInput();
  input["token_range"] = {0, 24};  // chunk: 3 blocks, all stale for the window
  out = RunJson("transfer", input);
  EXPECT_EQ(out["groups"][0]["total_blocks"], 3);
  EXPECT_EQ(out["groups"][0]["moved"], 1);
  EXPECT_EQ(out["groups"][1]["skipped_window"], 3);
  EXPECT_EQ(out["groups"][1]["moved"], 0);
}

TEST(KvplanTransfer, SideCopiesMustAgree) {
  json input = TransferInput();
  input["context"]["tokens_per_block"] = 8;
  input["generation"]["prompt_len"] = 64;
  input["generation"]["side"] = "generation";
  input["generation"]["dst_start_token"] = 16;
  EXPECT_THAT(RunCommand("transfer", input.dump()), IsOk());

  input["context"]["tokens_per_block"] = 16;
  EXPECT_THAT(RunCommand("transfer", input.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("context.tokens_per_block: must agree")));
  input = TransferInput();
  input["generation"]["groups"][1]["window"] = 32;
  EXPECT_THAT(
      RunCommand("transfer", input.dump()),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("generation.groups[1]: must match")));
  input = TransferInput();
  input["context"]["side"] = "generation";
  EXPECT_THAT(RunCommand("transfer", input.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("context.side")));
  input = TransferInput();
  input["dst_start_token"] = 8;
  input["generation"]["dst_start_token"] = 16;
  EXPECT_THAT(
      RunCommand("transfer", input.dump()),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("generation.dst_start_token")));
  input = TransferInput();
  input["context"]["dst_start_token"] = 16;
  EXPECT_THAT(RunCommand("transfer", input.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("context.dst_start_token: unknown field")));
}

TEST(KvplanTransfer, NamesTheSideWhoseBlockIsGone) {
  json input = TransferInput();
  input["context"]["groups"][1]["block_ids"][6] = -1;
  EXPECT_THAT(RunCommand("transfer", input.dump()),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("context: a block the transfer needs is not held")));
}

// ---------------------------------------------------------------------------
// Rejected input: every reason is one line and names the field.

// ---------------------------------------------------------------------------
// fragments: a small model (2 layers, 4 KV heads, head size 8, 2-byte elements,
// 4 tokens per block): one head of one block is 64 bytes.

json TinyModel() {
  return {{"num_layers", 2},
          {"num_kv_heads", 4},
          {"head_size", 8},
          {"element_bytes", 2},
          {"tokens_per_block", 4}};
}

json FragmentJson(int64_t src_offset, int64_t dst_offset, int64_t bytes) {
  return {{"src_pool", 0},
          {"src_offset", src_offset},
          {"dst_pool", 0},
          {"dst_offset", dst_offset},
          {"bytes", bytes}};
}

TEST(KvplanFragments, IdenticalLayoutCoalescesToOneFragmentPerPair) {
  // TP2 both sides: a slot is 2 layers x K,V x 2 heads x 64 bytes = 512 bytes; the
  // four consecutive blocks on each side are one 2048-byte run per rank pair.
  const json out = RunJson(
      "fragments", {{"model", TinyModel()},
                    {"request", {{"prompt_len", 16}}},
                    {"context", {{"tp", 2}}},
                    {"generation", {{"tp", 2}, {"groups", {{{"block_ids", {5, 6, 7, 8}}}}}}}});
  ASSERT_EQ(out["pairs"].size(), 2u);
  for (int rank = 0; rank < 2; ++rank) {
    SCOPED_TRACE(rank);
    const json& pair = out["pairs"][rank];
    EXPECT_EQ(pair["context_rank"], rank);
    EXPECT_EQ(pair["generation_rank"], rank);
    EXPECT_EQ(pair["writes"], true);
    EXPECT_EQ(pair["fragments_before_coalescing"], 4);
    EXPECT_EQ(pair["fragments_after_coalescing"], 1);
    EXPECT_EQ(pair["fragments"], json::array({FragmentJson(0, 5 * 512, 2048)}));
    EXPECT_EQ(pair["bytes"], 2048);
  }
  EXPECT_EQ(out["totals"], json({{"rank_pairs", 2},
                                 {"fragments_before_coalescing", 8},
                                 {"fragments_after_coalescing", 2},
                                 {"bytes", 4096}}));
  EXPECT_EQ(out["block_ids"]["generation"], json::array({{5, 6, 7, 8}}));
}

TEST(KvplanFragments, TpMismatchGivesPerHeadFragments) {
  // TP1 -> TP2: the context rank holds heads 0-3 (K buffer 256 bytes, a layer 512),
  // each generation rank two of them (K buffer 128 bytes): per block, layer and
  // K/V one 128-byte run at the head offset of the generation rank.
  const json out = RunJson("fragments", {{"model", TinyModel()},
                                         {"request", {{"prompt_len", 16}}},
                                         {"context", {{"tp", 1}}},
                                         {"generation", {{"tp", 2}}},
                                         {"max_fragments_listed", 2}});
  ASSERT_EQ(out["pairs"].size(), 2u);
  const json& second = out["pairs"][1];
  EXPECT_EQ(second["generation_rank"], 1);
  EXPECT_EQ(second["fragments_before_coalescing"], 4 * 2 * 2);
  EXPECT_EQ(second["fragments_after_coalescing"], 4 * 2 * 2);
  EXPECT_EQ(second["fragments"],
            json::array({FragmentJson(128, 0, 128), FragmentJson(256 + 128, 128, 128)}));
  EXPECT_EQ(second["bytes"], 16 * 128);
  EXPECT_EQ(out["pairs"][0]["fragments"][0], FragmentJson(0, 0, 128));
  EXPECT_EQ(out["totals"]["fragments_after_coalescing"], 32);
  EXPECT_EQ(out["totals"]["bytes"], 32 * 128);
}

TEST(KvplanFragments, GenerationPrefixHitAndWindowShortenTheSlices) {
  // A W=8 group (layer 0) and a full group (layer 1), PP2 -> PP1; the generation
  // side holds 9 tokens already (V1, floored to 2 blocks): the full group moves
  // blocks 2-3; the window group starts at block 2 anyway.
  const json model = {{"num_layers", 2},
                      {"num_kv_heads", 4},
                      {"head_size", 8},
                      {"element_bytes", 2},
                      {"tokens_per_block", 4},
                      {"groups", {{{"window", 8}, {"layers", {0}}}, {{"layers", {1}}}}}};
  const json out = RunJson(
      "fragments",
      {{"model", model},
       {"request", {{"prompt_len", 16}}},
       {"context", {{"tp", 1}, {"pp_layers", {1, 1}}}},
       {"generation",
        {{"tp", 1},
         {"reuse", {{"enabled", true}, {"adapter", "v1"}, {"prepopulated_prompt_len", 9}}},
         {"groups",
          {{{"block_ids", {10, 11, 12, 13}}}, {{"block_ids", {20, 21, 22, 23, 24}}}}}}}});
  EXPECT_EQ(out["cached_tokens"]["generation"], json::array({8, 8}));
  EXPECT_EQ(out["block_ids"]["context"], json::array({{2, 3}, {0, 1, 2, 3}}));
  EXPECT_EQ(out["block_ids"]["generation"], json::array({{12, 13}, {22, 23}}));
  ASSERT_EQ(out["pairs"].size(), 2u);
  // Each stage writes its one layer's K and V (256 bytes each) of two blocks.
  for (const json& pair : out["pairs"]) EXPECT_EQ(pair["bytes"], 2 * 2 * 256);
}

TEST(KvplanFragments, CoreErrorsKeepTheirCode) {
  const json input = {{"model", TinyModel()},
                      {"request", {{"prompt_len", 16}}},
                      {"context", {{"tp", 1}, {"num_slots", 2}}},
                      {"generation", {{"tp", 1}}}};
  EXPECT_THAT(RunCommand("fragments", input.dump()),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("block=2 num_slots=2")));
  json bad_tp = input;
  bad_tp["context"] = {{"tp", 3}};
  EXPECT_THAT(RunCommand("fragments", bad_tp.dump()),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("tp_size=3")));
  json gone = input;
  gone["context"] = {{"tp", 1}, {"groups", {{{"block_ids", {0, -1, 2, 3}}}}}};
  EXPECT_THAT(RunCommand("fragments", gone.dump()),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("context: a block the transfer needs is not held")));
}

TEST(KvplanRejects, MalformedAndInvalidInput) {
  const std::string kAlign =
      R"("src": [1], "dst": [2], "src_start_token": 0, "dst_start_token": 0)";
  const std::string kPair = R"("tokens_per_block": 8, "prompt_len": 32)";
  const std::string kSlice = R"("tokens_per_block": 8, "prompt_len": 32, "side": "context")";
  const std::string kFragmentsModel =
      R"("model": {"num_layers": 2, "num_kv_heads": 4, "head_size": 8, "element_bytes": 2,
                   "tokens_per_block": 4})";
  const std::string kFragmentsRest =
      R"("request": {"prompt_len": 16}, "context": {"tp": 1}, "generation": {"tp": 1})";
  struct Row {
    const char* command;
    std::string input;
    const char* reason;
  };
  const Row rows[] = {
      {"align", "", "malformed JSON"},
      {"align", "{\"tokens_per_block\": 8,", "malformed JSON: parse error at line 1"},
      {"align", "{} {}", "malformed JSON"},
      {"align", R"({"tokens_per_block": 8, "tokens_per_block": 16})",
       "tokens_per_block: field given twice in one object"},
      {"align", "[1, 2]", "input: must be a JSON object, got array"},
      {"align", "{\"tokens_per_block\": \"8\", " + kAlign + "}",
       "tokens_per_block: must be an integer in [1, 9007199254740991], got string \"8\""},
      {"align", "{\"tokens_per_block\": 8.5, " + kAlign + "}", "got number 8.5"},
      {"align", "{\"tokens_per_block\": 8.0, " + kAlign + "}", "tokens_per_block"},
      {"align", "{\"tokens_per_block\": true, " + kAlign + "}", "got boolean true"},
      {"align", "{\"tokens_per_block\": 0, " + kAlign + "}", "tokens_per_block"},
      {"align", "{\"tokens_per_block\": -8, " + kAlign + "}", "got -8"},
      {"align", "{\"tokens_per_block\": 9223372036854775808, " + kAlign + "}",
       "does not fit in int64"},
      {"align",
       "{\"tokens_per_block\": 8, \"src\": [1, -3], \"dst\": [], "
       "\"src_start_token\": 0, \"dst_start_token\": 0}",
       "src[1]: must be a block id in [0, 9007199254740991], got -3"},
      {"align",
       "{\"tokens_per_block\": 8, \"src\": [], \"dst\": [], "
       "\"src_start_token\": -1, \"dst_start_token\": 0}",
       "src_start_token"},
      {"align", "{\"tokens_per_block\": 8, \"src\": []}", "dst: missing required field"},
      {"align", "{\"tokens_per_blok\": 8, " + kAlign + "}", "tokens_per_blok: unknown field"},
      {"pair", R"({"tokens_per_block": 8, "prompt_len": -1, "windows": [], "src": [], "dst": []})",
       "prompt_len: must be an integer in [0, 9007199254740991], got -1"},
      {"pair",
       "{" + kPair + ", \"token_range\": [4, 4], \"windows\": [], \"src\": [], \"dst\": []}",
       "token_range: must satisfy start < end, got start=4 end=4"},
      {"pair",
       "{" + kPair + ", \"token_range\": [8, 4], \"windows\": [], \"src\": [], \"dst\": []}",
       "token_range"},
      {"pair", "{" + kPair + ", \"token_range\": [4], \"windows\": [], \"src\": [], \"dst\": []}",
       "token_range: must be [start, end]"},
      {"pair",
       "{" + kPair + ", \"token_range\": [-4, 8], \"windows\": [], \"src\": [], \"dst\": []}",
       "token_range[0]"},
      {"pair", "{" + kPair + ", \"windows\": [0], \"src\": [[]], \"dst\": [[]]}",
       "windows[0]: must be null or an integer in [1, 9007199254740991], got 0"},
      {"pair", "{" + kPair + ", \"windows\": [\"64\"], \"src\": [[]], \"dst\": [[]]}",
       "windows[0]"},
      {"pair", "{" + kPair + ", \"windows\": [null], \"src\": [[], []], \"dst\": [[]]}",
       "src: must list one block list per layer group: src_groups=2 windows=1"},
      {"pair", "{" + kPair + ", \"windows\": [null], \"src\": [[]], \"dst\": []}",
       "dst: must list one block list per layer group"},
      {"pair",
       "{" + kPair +
           ", \"windows\": [null], \"src\": [[]], \"dst\": [[]], "
           "\"dst_start_token\": -8}",
       "dst_start_token"},
      {"slice", "{" + kSlice + ", \"groups\": [{\"block_ids\": [1, -2]}]}",
       "groups[0].block_ids[1]: must be -1 (not held) or a block id in [0, "
       "9007199254740991], got -2"},
      {"slice", "{" + kSlice + ", \"token_range\": [0, 40], \"groups\": []}",
       "token_range: must end at or before the prompt's end"},
      {"slice", R"({"tokens_per_block": 8, "prompt_len": 32, "side": "decode", "groups": []})",
       "side: must be one of \"context\", \"generation\""},
      {"slice", "{" + kSlice + ", \"groups\": [{\"kind\": \"ssm\"}]}", "groups[0].kind"},
      {"slice", "{" + kSlice + ", \"groups\": [{\"kind\": \"mamba\", \"block_ids\": []}]}",
       "groups[0].block_ids: unknown field"},
      {"slice", "{" + kSlice + ", \"groups\": [{\"window\": 16}]}",
       "groups[0].block_ids: missing required field"},
      {"slice",
       "{" + kSlice +
           ", \"reuse\": {\"enabled\": true, \"adapter\": \"v3\"}, "
           "\"groups\": []}",
       "reuse.adapter: must be one of \"v1\", \"v2\""},
      {"slice",
       "{" + kSlice +
           ", \"reuse\": {\"enabled\": true, \"adapter\": \"v1\"}, "
           "\"groups\": []}",
       "reuse.prepopulated_prompt_len: missing required field"},
      {"slice",
       "{" + kSlice +
           ", \"reuse\": {\"enabled\": true, \"adapter\": \"v1\", "
           "\"num_committed_tokens\": 8}, \"groups\": []}",
       "reuse.num_committed_tokens: unknown field"},
      {"slice",
       "{" + kSlice +
           ", \"reuse\": {\"enabled\": 1, \"adapter\": \"v2\", "
           "\"num_committed_tokens\": 8}, \"groups\": []}",
       "reuse.enabled: must be true or false"},
      {"slice",
       "{" + kSlice +
           ", \"reuse\": {\"enabled\": true, \"adapter\": \"v2\", "
           "\"num_committed_tokens\": -8}, \"groups\": []}",
       "reuse.num_committed_tokens"},
      {"slice", "{" + kSlice + ", \"generation_only\": \"yes\", \"groups\": []}",
       "generation_only: must be true or false"},
      {"transfer", R"({"tokens_per_block": 8, "prompt_len": 32, "context": {"groups": []}})",
       "generation: missing required field"},
      {"transfer", R"({"tokens_per_block": 8, "prompt_len": 32, "context": {"groups": []},
                       "generation": {"groups": [{"block_ids": []}]}})",
       "generation.groups: must list the same layer groups"},
      {"fragments", "{" + kFragmentsModel + "}", "request: missing required field"},
      {"fragments",
       R"({"model": {"num_layers": 2, "num_kv_heads": 4, "head_size": 8,
                     "tokens_per_block": 4}})",
       "model.element_bytes: missing required field"},
      {"fragments", "{" + kFragmentsModel + ", " + kFragmentsRest + ", \"extra\": 1}",
       "extra: unknown field"},
      {"fragments",
       R"({"model": {"num_layers": 2, "num_kv_heads": 4, "head_size": 8, "element_bytes": 2,
                     "tokens_per_block": 4, "groups": [{"window": 0}]}, )" +
           kFragmentsRest + "}",
       "model.groups[0].window: must be null or an integer in [1, 9007199254740991], got 0"},
      {"fragments",
       R"({"model": {"num_layers": 2, "num_kv_heads": 4, "head_size": 8, "element_bytes": 2,
                     "tokens_per_block": 4, "groups": [{"layers": [0]}, {"window": 8}]}, )" +
           kFragmentsRest + "}",
       "model.groups[1].layers: missing required field"},
      {"fragments",
       R"({"model": {"num_layers": 2, "num_kv_heads": 4, "head_size": 8, "element_bytes": 2,
                     "tokens_per_block": 4, "groups": [{"layers": [1, 0]}]}, )" +
           kFragmentsRest + "}",
       "model.groups[0].layers[1]: layer ids must increase"},
      {"fragments",
       "{" + kFragmentsModel +
           R"(, "request": {"prompt_len": 16}, "context": {"tp": 0}, "generation": {"tp": 1}})",
       "context.tp: must be an integer in [1, 4096], got 0"},
      {"fragments",
       "{" + kFragmentsModel +
           R"(, "request": {"prompt_len": 16}, "context": {"tp": 1, "tpp": 2},
               "generation": {"tp": 1}})",
       "context.tpp: unknown field"},
      {"fragments",
       "{" + kFragmentsModel +
           R"(, "request": {"prompt_len": 16}, "context": {"tp": 1, "pp_layers": [1, 2]},
               "generation": {"tp": 1}})",
       "context.pp_layers: must add up to model.num_layers, got 3 vs 2"},
      {"fragments",
       "{" + kFragmentsModel +
           R"(, "request": {"prompt_len": 16}, "context": {"tp": 1},
               "generation": {"tp": 2, "dp_rank": 2}})",
       "generation.dp_rank: must be an integer in [0, tp-1=1], got 2"},
      {"fragments",
       "{" + kFragmentsModel +
           R"(, "request": {"prompt_len": 16}, "context": {"tp": 1},
               "generation": {"tp": 1, "groups": [{"block_ids": []}, {"block_ids": []}]}})",
       "generation.groups: must list one block table per model group: groups=2 model_groups=1"},
      {"fragments",
       "{" + kFragmentsModel +
           R"(, "request": {"prompt_len": 16}, "context": {"tp": 1},
               "generation": {"tp": 1, "groups": [{"window": 8, "block_ids": [0, 1, 2, 3]}]}})",
       "generation.groups[0].window: must match model.groups[0].window, got 8 vs null"},
      {"fragments",
       "{" + kFragmentsModel +
           R"(, "request": {"prompt_len": 16}, "context": {"tp": 1},
               "generation": {"tp": 1, "groups": [{"kind": "mamba"}]}})",
       "generation.groups[0].kind: fragments plans attention groups only"},
      {"fragments",
       "{" + kFragmentsModel +
           R"(, "request": {"prompt_len": 16, "token_range": [0, 20]}, "context": {"tp": 1},
               "generation": {"tp": 1}})",
       "request.token_range: must end at or before the prompt's end"},
      {"fragments",
       "{" + kFragmentsModel +
           R"(, "request": {"prompt_len": 9007199254740991}, "context": {"tp": 1},
               "generation": {"tp": 1}})",
       "context.groups: missing, and the default identity tables would hold"},
      {"fragments",
       "{" + kFragmentsModel + ", " + kFragmentsRest + ", \"max_fragments_listed\": -1}",
       "max_fragments_listed: must be an integer >= 0, got -1"},
      {"plan", "{}", "unknown command: plan"},
  };
  for (const Row& row : rows) {
    SCOPED_TRACE(absl::StrCat(row.command, " ", row.input));
    absl::StatusOr<std::string> out = RunCommand(row.command, row.input);
    EXPECT_THAT(out, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(row.reason)));
    EXPECT_THAT(std::string(out.status().message()), Not(HasSubstr("\n")));
  }
}

// ---------------------------------------------------------------------------
// Hostile input (issue 8): every rejection is one line of printable ASCII.

void ExpectOneLine(const absl::Status& status) {
  const std::string message(status.message());
  EXPECT_LE(message.size(), 1100u);
  for (const char c : message) {
    ASSERT_TRUE(c >= 0x20 && c < 0x7f) << "byte " << static_cast<int>(c) << " in " << message;
  }
}

const char* const kCommands[] = {"align", "pair", "slice", "transfer", "fragments"};

// Regression: issue 8, finding 1 (1e400 in any command: SIGABRT).
TEST(KvplanHostile, NumberPastDoubleRangeInEveryCommand) {
  for (const char* command : kCommands) {
    SCOPED_TRACE(command);
    const absl::StatusOr<std::string> out =
        RunCommand(command, R"({"tokens_per_block": 1e400, "prompt_len": 8})");
    EXPECT_THAT(out, StatusIs(absl::StatusCode::kInvalidArgument,
                              HasSubstr("malformed JSON: number overflow parsing '1e400'")));
  }
}

// Regression: issue 8, findings 6 and 7.
TEST(KvplanHostile, EchoedTextIsEscapedAndCut) {
  const std::string big_key(10 << 20, 'k');
  const struct {
    const char* command;
    std::string input;
    const char* reason;
  } rows[] = {
      {"align", "{\"tokens\\u000bper_block\": 8}", "tokens\\x0bper_block: unknown field"},
      {"align", "{\"a\\u2028b\": 8}", "a\\xe2\\x80\\xa8b: unknown field"},
      {"align", "{\"a\\u0085b\": 8}", "a\\xc2\\x85b: unknown field"},
      {"slice",
       "{\"tokens_per_block\": 8, \"prompt_len\": 8, \"side\": \"con\\ntext\\u2028\", "
       "\"groups\": []}",
       "side: must be one of \"context\", \"generation\", got string "
       "\"con\\ntext\\xe2\\x80\\xa8\""},
      {"align", "{\"" + big_key + "\": 1}", "...(10485760 bytes): unknown field"},
      {"align", "{\"" + big_key.substr(0, 7 << 20) + "\": 1, \"" + big_key.substr(0, 7 << 20) +
                    "\": 2}",
       "...(7340032 bytes): field given twice"},
      {"pair", std::string("{\"tokens_per_block\": 8}\0{\"x\": 1}", 33), "NUL byte at offset=23"},
      {"align", "[\"\xe2\x80\xa8", "malformed JSON"},
      {"pl\nan\xc2\x85", "{}", "unknown command: pl\\nan\\xc2\\x85"},
  };
  for (const auto& row : rows) {
    SCOPED_TRACE(row.reason);
    const absl::StatusOr<std::string> out = RunCommand(row.command, row.input);
    EXPECT_THAT(out, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(row.reason)));
    ExpectOneLine(out.status());
  }
}

json SmallFragments() {
  return {{"model", TinyModel()},
          {"request", {{"prompt_len", 16}}},
          {"context", {{"tp", 1}}},
          {"generation", {{"tp", 1}}}};
}

// Regression: issue 8, finding 3: a few hundred bytes whose every field is in
// bounds but whose product is not.
TEST(KvplanHostile, FragmentsBoundsItsWorkAndCountsWithoutListing) {
  // 65,536 layers x 256k one-token blocks, TP4 -> TP8: 3.4e10 fragments a pair (the
  // reviewers' 1M blocks: 1.4e11).
  json huge = {{"model",
                {{"num_layers", 65536},
                 {"num_kv_heads", 8},
                 {"head_size", 4},
                 {"element_bytes", 1},
                 {"tokens_per_block", 1}}},
               {"request", {{"prompt_len", 1 << 18}}},
               {"context", {{"tp", 4}}},
               {"generation", {{"tp", 8}}}};
  EXPECT_THAT(RunCommand("fragments", huge.dump()),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("fragments_held=34359738368 max_fragments_held=131072")));
  huge["max_fragments_listed"] = 0;
  const json counted = RunJson("fragments", huge);
  EXPECT_EQ(counted["totals"]["rank_pairs"], 8);
  EXPECT_EQ(counted["totals"]["fragments_after_coalescing"], int64_t{8} << 35);
  EXPECT_EQ(counted["pairs"][0]["fragments"], json::array());

  // 2,000 groups that all name layer 0.
  json groups = SmallFragments();
  groups["model"]["groups"] = json::array();
  for (int g = 0; g < 2000; ++g) groups["model"]["groups"].push_back({{"layers", {0}}});
  EXPECT_THAT(RunCommand("fragments", groups.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layer in two attention groups: layer=0 group=0 "
                                 "other_group=1")));

  // 65,536 ranks a side.
  json ranks = SmallFragments();
  ranks["model"]["num_layers"] = 16;
  ranks["model"]["num_kv_heads"] = 4096;
  for (const char* side : {"context", "generation"}) {
    ranks[side] = {{"tp", 4096}, {"pp_layers", std::vector<int>(16, 1)}};
  }
  EXPECT_THAT(RunCommand("fragments", ranks.dump()),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("max_layout_entries=2097152 context_ranks=65536")));

  // Identity tables bounded over all groups, not per table.
  json identity = SmallFragments();
  identity["model"]["num_layers"] = 64;
  identity["model"]["groups"] = json::array();
  for (int g = 0; g < 64; ++g) identity["model"]["groups"].push_back({{"layers", {g}}});
  identity["request"]["prompt_len"] = 1 << 16;
  identity["model"]["tokens_per_block"] = 1;
  EXPECT_THAT(RunCommand("fragments", identity.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("would hold 65536 blocks x 64 groups (max 524288 ids)")));
}

// Every group is several objects of the output: a 12 MB input of 350k Mamba
// groups per side made `transfer` hold 820 MB. Group lists are bounded.
TEST(KvplanHostile, GroupListsAreBounded) {
  const std::string many = absl::StrCat(
      "[", absl::StrJoin(std::vector<std::string>(65537, "{\"kind\": \"mamba\"}"), ","), "]");
  EXPECT_THAT(RunCommand("slice", absl::StrCat(R"({"tokens_per_block": 8, "prompt_len": 0,
                                                   "side": "context", "groups": )",
                                               many, "}")),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("groups: must be an array of at most 65536 layer groups, got "
                                 "65537 of them")));
  const std::string nulls =
      absl::StrCat("[", absl::StrJoin(std::vector<std::string>(65537, "null"), ","), "]");
  EXPECT_THAT(RunCommand("pair", absl::StrCat(R"({"tokens_per_block": 8, "prompt_len": 0,
                                                  "src": [], "dst": [], "windows": )",
                                              nulls, "}")),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("windows: must be an array of at most 65536 null or windows")));
  const std::string exactly = absl::StrCat(
      "[", absl::StrJoin(std::vector<std::string>(65536, "{\"kind\": \"mamba\"}"), ","), "]");
  EXPECT_THAT(RunCommand("slice", absl::StrCat(R"({"tokens_per_block": 8, "prompt_len": 0,
                                                   "side": "context", "groups": )",
                                               exactly, "}")),
              IsOk());
}

// Regression: issue 8, finding 4. A block id of 2^63-1 overflowed deriving the
// default num_slots; ids now stop at 2^53-1, where slot counts stop at 2^53
// (semantics gap 4: num_slots 2^53 was refused while larger ids were accepted).
TEST(KvplanHostile, BlockIdsAndSlotCountsShareOneBound) {
  json input = SmallFragments();
  input["context"]["groups"] = {{{"block_ids", {0, 1, 2, int64_t{9223372036854775807}}}}};
  EXPECT_THAT(RunCommand("fragments", input.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("context.groups[0].block_ids[3]: must be -1 (not held) or a "
                                 "block id in [0, 9007199254740991]")));
  input["context"]["groups"] = {{{"block_ids", {0, 1, 2, int64_t{9007199254740991}}}}};
  input["context"]["num_slots"] = int64_t{9007199254740992};  // 2^53 slots of 1 KiB
  EXPECT_THAT(RunCommand("fragments", input.dump()), IsOk());
  input["context"]["num_slots"] = int64_t{9007199254740993};
  EXPECT_THAT(RunCommand("fragments", input.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("context.num_slots: must be an integer in [1, "
                                 "9007199254740992], got 9007199254740993")));
  input["context"]["num_slots"] = 8;
  input["context"]["groups"] = {{{"block_ids", {0, 1, 2, 7}}}};
  EXPECT_THAT(RunCommand("fragments", input.dump()), IsOk());
}

// Regression: issue 8, finding 5. Eight rank pairs of 2^63 bytes: the total
// wrapped at 2^64 (1.38e19 reported for 3.2e19... here 7.4e19).
TEST(KvplanHostile, BytesPast64BitsAreRefused) {
  const json input = {{"model",
                       {{"num_layers", 1},
                        {"num_kv_heads", 8},
                        {"head_size", 1 << 20},
                        {"element_bytes", 8},
                        {"tokens_per_block", 1 << 20}}},
                      {"request", {{"prompt_len", int64_t{1} << 39}}},
                      {"context", {{"tp", 8}}},
                      {"generation", {{"tp", 8}}},
                      {"max_fragments_listed", 0}};
  EXPECT_THAT(RunCommand("fragments", input.dump()),
              StatusIs(absl::StatusCode::kOutOfRange,
                       HasSubstr("scenario totals overflow 64 bits")));
}

// Regression: issue 8, semantics gap 1, through the tool.
TEST(KvplanHostile, RepeatedBlockIdsAreRejectedOnEitherSide) {
  EXPECT_THAT(RunCommand("pair", R"({"tokens_per_block": 8, "prompt_len": 32,
                                     "windows": [null], "src": [[1, 2, 3, 4]],
                                     "dst": [[5, 6, 5, 8]]})"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("destination block list repeats a block: group=0 block=5 "
                                 "index=0 other_index=2")));
  json input = TransferInput();
  input["context"]["groups"][0]["block_ids"][7] = 3;
  EXPECT_THAT(RunCommand("transfer", input.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("source block list repeats a block: request=0 group=0 "
                                 "block=3 index=3 other_index=7")));
  json fragments = SmallFragments();
  fragments["generation"]["groups"] = {{{"block_ids", {4, 4, 5, 6}}}};
  EXPECT_THAT(RunCommand("fragments", fragments.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("destination block list repeats a block")));
}

// Regression: issue 8, semantics gap 2, through the tool.
TEST(KvplanHostile, EveryLayerIsInExactlyOneGroup) {
  json input = SmallFragments();
  input["model"]["groups"] = {{{"layers", {0}}}, {{"window", 8}, {"layers", {0, 1}}}};
  EXPECT_THAT(RunCommand("fragments", input.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layer in two attention groups: layer=0 group=0 "
                                 "other_group=1")));
  input["model"]["groups"] = {{{"layers", {1}}}};
  EXPECT_THAT(RunCommand("fragments", input.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layer in no attention group and not a state layer: layer=0")));
}

// Regression: issue 8, semantics gap 3: "window": null was rejected where
// leaving the field out was accepted, though null counts as absent.
TEST(KvplanHostile, NullCountsAsAbsentEverywhere) {
  json input = SmallFragments();
  input["model"]["groups"] = {{{"window", 6}, {"layers", {0, 1}}}};
  input["generation"]["groups"] = {{{"window", nullptr}, {"block_ids", {0, 1, 2, 3}}}};
  EXPECT_THAT(RunCommand("fragments", input.dump()), IsOk());
  input["generation"]["groups"] = {{{"window", 8}, {"block_ids", {0, 1, 2, 3}}}};
  EXPECT_THAT(RunCommand("fragments", input.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("generation.groups[0].window: must match "
                                 "model.groups[0].window, got 8 vs 6")));
  json slice = SliceInput("context", nullptr, {{{"kind", nullptr}, {"block_ids", {1, 2, 3, 4}}}});
  slice["token_range"] = nullptr;
  slice["generation_only"] = nullptr;
  EXPECT_THAT(RunCommand("slice", slice.dump()), IsOk());
  json transfer = TransferInput();
  transfer["generation"]["side"] = nullptr;
  EXPECT_THAT(RunCommand("transfer", transfer.dump()), IsOk());
  // V1's count given as null is absent: required when reuse is on.
  slice["reuse"] = {{"enabled", true}, {"adapter", "v1"}, {"prepopulated_prompt_len", nullptr}};
  EXPECT_THAT(RunCommand("slice", slice.dump()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("reuse.prepopulated_prompt_len: missing required field")));
}

}  // namespace
}  // namespace kvx::kvplan
