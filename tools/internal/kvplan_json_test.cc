#include "tools/internal/kvplan_json.h"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"

namespace kvx::kvplan_internal {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;
using ::testing::SizeIs;

// Every byte printable ASCII: one line, whatever the terminal.
bool Printable(const std::string& text) {
  for (const char c : text) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

TEST(Escape, WritesEveryOtherByteAsAnEscape) {
  EXPECT_EQ(Escape("tokens_per_block"), "tokens_per_block");
  EXPECT_EQ(Escape("a\\b"), "a\\\\b");
  EXPECT_EQ(Escape("a\nb\r\tc"), "a\\nb\\r\\tc");
  // \v, U+0085 (NEL) and U+2028 (LINE SEPARATOR) end a line for some readers.
  EXPECT_EQ(Escape("a\vb\xc2\x85" "c\xe2\x80\xa8"), "a\\x0bb\\xc2\\x85c\\xe2\\x80\\xa8");
  EXPECT_EQ(Escape(std::string("a\0b", 3)), "a\\x00b");
}

// Regression: issue 8, finding 6 (a 10 MB key was echoed whole).
TEST(Escape, CutsLongTextAndSaysHowLongItWas) {
  const std::string key(10 << 20, 'k');
  const std::string escaped = Escape(key);
  EXPECT_EQ(escaped, absl::StrCat(std::string(kMaxEchoBytes, 'k'), "...(10485760 bytes)"));
  EXPECT_THAT(Escape(std::string(100, '\n'), 4), "\\n\\n\\n\\n...(100 bytes)");
}

TEST(OneLine, KeepsEscapedTextAndCapsTheMessage) {
  const std::string escaped = Escape("x\xe2\x80\xa8y");
  EXPECT_EQ(OneLine(escaped), escaped);
  EXPECT_EQ(OneLine("a\nb\xc2\x85"), "a\\x0ab\\xc2\\x85");
  const std::string line = OneLine(std::string(5000, 'm'));
  EXPECT_EQ(line.size(), kMaxMessageBytes + 3);
  EXPECT_TRUE(Printable(OneLine(std::string("\x01\x7f\xff\v", 4))));
}

// Regression: issue 8, finding 1. A number past double range threw
// nlohmann's out_of_range out of kvplan: SIGABRT, exit 134.
TEST(ParseInput, NumberPastDoubleRangeIsMalformed) {
  for (const char* input : {"{\"tokens_per_block\": 1e400}", "[-1e400]", "1E+99999"}) {
    SCOPED_TRACE(input);
    EXPECT_THAT(ParseInput(input), StatusIs(absl::StatusCode::kInvalidArgument,
                                            HasSubstr("malformed JSON: number overflow")));
  }
  EXPECT_THAT(ParseInput("[1e300, -1e300, 9223372036854775808, -9223372036854775809]"),
              IsOk());
}

// Regression: issue 8, finding 7. nlohmann stops at a NUL byte and accepted
// whatever came before it, ignoring the garbage after.
TEST(ParseInput, RejectsANulByte) {
  EXPECT_THAT(ParseInput(std::string("{\"a\": 1}\0garbage", 16)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("malformed JSON: NUL byte at offset=8")));
  EXPECT_THAT(ParseInput(std::string("\0", 1)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("offset=0")));
}

// Regression: issue 8, finding 8 (`kvplan align /dev/zero` died of bad_alloc).
TEST(ParseInput, RefusesInputPastTheBound) {
  std::string input(kMaxInputBytes + 1, ' ');
  input[0] = '1';
  EXPECT_THAT(ParseInput(input),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("input larger than max_bytes=16777216: bytes=16777217")));
  input.pop_back();
  EXPECT_THAT(ParseInput(input), IsOk());
}

TEST(ParseInput, BoundsTheNesting) {
  const std::string deepest = std::string(kMaxDepth, '[') + std::string(kMaxDepth, ']');
  EXPECT_THAT(ParseInput(deepest), IsOk());
  EXPECT_THAT(ParseInput("[" + deepest + "]"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("input nests deeper than max_depth=32")));
  // A million levels: refused at level 33, not parsed.
  EXPECT_THAT(ParseInput(std::string(1 << 20, '[')),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_depth")));
}

// Regression: issue 8, finding 2. The duplicate-key check compared each key with
// every other key of its object: 200k keys took more than 30 s. Now linear (and
// so is nlohmann's parse: its callback parser rescanned the parent array at the
// end of every child, quadratic in [{}, {}, ...]).
TEST(ParseInput, ManyKeysAndManyObjectsParseInLinearTime) {
  std::string keys = "{";
  for (int i = 0; i < 200000; ++i) absl::StrAppend(&keys, i == 0 ? "" : ",", "\"k", i, "\":0");
  keys += "}";
  ASSERT_LT(keys.size(), kMaxInputBytes);
  EXPECT_THAT(ParseInput(keys), IsOk());
  EXPECT_THAT(ParseInput(keys.substr(0, keys.size() - 1) + ",\"k199999\":1}"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("k199999: field given twice in one object")));
  std::string objects = "[";
  for (int i = 0; i < 300000; ++i) objects += i == 0 ? "{}" : ",{}";
  objects += "]";
  ASSERT_OK_AND_ASSIGN(json value, ParseInput(objects));
  EXPECT_THAT(value, SizeIs(300000));
}

TEST(ParseInput, DuplicateKeysAreRejectedPerObjectAndEscaped) {
  EXPECT_THAT(ParseInput(R"({"a": {"b": 1}, "c": {"b": 2}})"), IsOk());
  EXPECT_THAT(ParseInput("{\"a\\n\\u2028\": 1, \"a\\n\\u2028\": 2}"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("a\\n\\xe2\\x80\\xa8: field given twice in one object")));
  // A syntax error wins over an earlier duplicate.
  EXPECT_THAT(ParseInput(R"({"a": 1, "a": 2)"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("malformed JSON")));
}

TEST(ParseInput, MalformedTextIsEscapedAndCut) {
  const std::string input = absl::StrCat("[\"", std::string(1 << 20, 'x'), "\xe2\x80\xa8");
  absl::StatusOr<json> value = ParseInput(input);
  ASSERT_THAT(value, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("malformed JSON")));
  EXPECT_TRUE(Printable(std::string(value.status().message())));
  EXPECT_LT(value.status().message().size(), 400u);
}

TEST(Fields, UnknownKeysAreNamedEscapedAndNullIsAbsent) {
  ASSERT_OK_AND_ASSIGN(json input, ParseInput("{\"tpb\\u000b\": 1, \"window\": null}"));
  EXPECT_THAT(Fields::Open(input, "side", {"window"}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("side.tpb\\x0b: unknown field (expected one of window)")));
  ASSERT_OK_AND_ASSIGN(Fields fields, Fields::Open(input, "", {"tpb\v", "window"}));
  EXPECT_NE(fields.Find("window"), nullptr);
  EXPECT_EQ(fields.Optional("window"), nullptr);
  EXPECT_THAT(fields.OptionalTokens("window", 1), IsOk());
  EXPECT_THAT(fields.Tokens("window", 1),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("window: must be an integer in [1, 9007199254740991], got null")));
}

TEST(AsInt, StatesTheRangeItWanted) {
  EXPECT_THAT(AsInt(json(uint64_t{1} << 63), "n", 0, 10),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("n: must be an integer in [0, 10], got 9223372036854775808 "
                                 "which does not fit in int64")));
  EXPECT_THAT(AsInt(json(-1), "n", 0, std::numeric_limits<int64_t>::max()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("n: must be an integer >= 0, got -1")));
  EXPECT_THAT(AsInt(json("\xe2\x80\xa8"), "n", 0, 1),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("got string \"\\xe2\\x80\\xa8\"")));
}

// Regression: issue 8, semantics gap 4. Block ids and slot counts share one bound,
// so a default num_slots (largest id + 1) is always one an input could give.
TEST(AsBlockList, BlockIdsEndWhereSlotCountsDo) {
  EXPECT_EQ(kMaxSlots, kMaxBlockId + 1);
  EXPECT_THAT(AsBlockList(json::array({kMaxBlockId}), "ids", false), IsOk());
  EXPECT_THAT(AsBlockList(json::array({kMaxBlockId + 1}), "ids", false),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("ids[0]: must be a block id in [0, 9007199254740991], got "
                                 "9007199254740992")));
  EXPECT_THAT(AsBlockList(json::array({-1}), "table", true), IsOk());
}

}  // namespace
}  // namespace kvx::kvplan_internal
