// Do not include directly: detail of tools/kvplan.h.
// IWYU pragma: private, include "tools/kvplan.h"
//
// The one place kvplan reads JSON. ParseInput turns untrusted bytes into a value
// within documented bounds (KVPLAN.md, "Bounds and errors"); Fields reads one object's
// keys by name and rejects the ones it does not know; the As* readers turn values
// into the planner's types with errors that name the field. Every nlohmann
// exception stays in this library, and every piece of input text that reaches a
// message goes through Escape: a message is one line of printable ASCII.
//
//   absl::StatusOr<json> input = ParseInput(R"({"tokens_per_block": 8})");
//   absl::StatusOr<Fields> fields = Fields::Open(*input, "", {"tokens_per_block"});
//   absl::StatusOr<int64_t> tpb = fields->Tokens("tokens_per_block", 1);  // 8
//
// Thread safety: pure functions and plain values.

#ifndef KVX_TOOLS_INTERNAL_KVPLAN_JSON_H_
#define KVX_TOOLS_INTERNAL_KVPLAN_JSON_H_

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "transfer/slice.h"

namespace kvx::kvplan_internal {

using json = nlohmann::json;
// Output keeps the contract's key order.
using ordered_json = nlohmann::ordered_json;

// Bounds on what the input may hold (KVPLAN.md, "Bounds and errors").
//
// The largest input: far past a 128k-token request of 64 layer groups (about 5 MB
// of block ids), small enough that parsing stays within a few hundred MB.
inline constexpr size_t kMaxInputBytes = size_t{16} << 20;
// Objects and arrays nest at most this deep (kvplan's inputs need 5 levels).
inline constexpr int kMaxDepth = 32;
// Token counts and positions: 0 <= n <= 2^53 - 1, JSON's safe integer range, far
// past any prompt and small enough that the core's block arithmetic cannot overflow.
inline constexpr int64_t kMaxTokens = (int64_t{1} << 53) - 1;
// Block ids: 0 <= id <= 2^53 - 1, so that every id has a slot count (id + 1 <= 2^53)
// and survives a JSON reader that holds numbers as doubles; num_slots <= 2^53.
inline constexpr int64_t kMaxBlockId = kMaxTokens;
inline constexpr int64_t kMaxSlots = kMaxBlockId + 1;
// Layer groups of one list (each becomes objects of the output): as many as
// `fragments` allows layers, and far past any model.
inline constexpr size_t kMaxGroups = 65536;
// An echoed piece of input (a key, a string value) keeps at most this many bytes.
inline constexpr size_t kMaxEchoBytes = 64;
// A whole message keeps at most this many bytes.
inline constexpr size_t kMaxMessageBytes = 1024;

// `text` as printable ASCII: bytes 0x20-0x7e stay (a backslash doubles), \n \r \t
// are written so, any other byte (control, \v, the bytes of U+0085 and U+2028) as
// \xHH; past `max_bytes` of input the rest is replaced by "...(N bytes)".
std::string Escape(absl::string_view text, size_t max_bytes = kMaxEchoBytes);

// The last line of defence of the one-line contract: control and non-ASCII bytes
// as \xHH, cut to kMaxMessageBytes. Idempotent on Escape's output.
std::string OneLine(absl::string_view text);

// Parses one JSON document. InvalidArgument, never an exception, for: input over
// kMaxInputBytes; a NUL byte (nlohmann would stop reading there and accept what
// came before); malformed JSON, with line and column; a number past double range
// ("1e400"); nesting deeper than kMaxDepth; a key given twice in one object (as
// likely a mistake as a misspelt one, which is rejected too). Linear in the input.
absl::StatusOr<json> ParseInput(absl::string_view text);

// "<field>: <what>" as InvalidArgument.
absl::Status FieldError(absl::string_view field, absl::string_view what);

// "string \"8\"", "number 8.5", "boolean true", "array", "object", "null".
std::string Describe(const json& value);

// An integer in [min, max]. Errors say what was expected: `expected`, or by default
// "an integer in [min, max]" ("an integer >= min" when max is the int64 maximum).
absl::StatusOr<int64_t> AsInt(const json& value, absl::string_view field, int64_t min,
                              int64_t max, absl::string_view expected = {});

// A token count or position: min <= n <= kMaxTokens.
absl::StatusOr<int64_t> AsTokens(const json& value, absl::string_view field, int64_t min);

// A block list of ids in [0, kMaxBlockId]; `allow_not_held` also admits -1 (not
// held, in positional tables).
absl::StatusOr<transfer::BlockList> AsBlockList(const json& value, absl::string_view field,
                                                bool allow_not_held);

// OK when `value` is an array of at most kMaxGroups entries; else "<field>: must be
// an array of at most 65536 <what>, got ...".
absl::Status CheckGroupArray(const json& value, absl::string_view field,
                             absl::string_view what);

// An array of block lists, one per layer group.
absl::StatusOr<std::vector<transfer::BlockList>> AsGroupLists(const json& value,
                                                              absl::string_view field);

// An attention window: null (full attention) or 1..kMaxTokens tokens.
absl::StatusOr<std::optional<int64_t>> AsWindow(const json& value, absl::string_view field);

// One JSON object of the input with the keys it may have. Unknown keys are rejected
// so that a typo ("tokens_per_blok") never silently becomes a default. An optional
// field given as null counts as absent; a required one given as null is an error.
class Fields {
 public:
  // `path` names the object in errors ("" for the top level, "context.reuse").
  static absl::StatusOr<Fields> Open(const json& value, std::string path,
                                     const std::vector<absl::string_view>& allowed);

  // "path.key".
  std::string Name(absl::string_view key) const;

  // The value of `key` as given (null included), nullptr when absent.
  const json* Find(absl::string_view key) const;
  // The value of an optional `key`: nullptr when absent or null.
  const json* Optional(absl::string_view key) const;
  absl::StatusOr<const json*> Required(absl::string_view key) const;

  // A required integer in [min, max].
  absl::StatusOr<int64_t> Int(absl::string_view key, int64_t min, int64_t max) const;
  absl::StatusOr<std::optional<int64_t>> OptionalInt(absl::string_view key, int64_t min,
                                                     int64_t max,
                                                     absl::string_view expected = {}) const;
  absl::StatusOr<int64_t> Tokens(absl::string_view key, int64_t min) const;
  absl::StatusOr<std::optional<int64_t>> OptionalTokens(absl::string_view key,
                                                        int64_t min) const;
  absl::StatusOr<bool> Bool(absl::string_view key) const;
  absl::StatusOr<bool> OptionalBool(absl::string_view key, bool default_value) const;
  // A required string, one of `choices`.
  absl::StatusOr<std::string> String(absl::string_view key,
                                     const std::vector<absl::string_view>& choices) const;

 private:
  Fields(const json& value, std::string path) : value_(&value), path_(std::move(path)) {}

  const json* value_;
  std::string path_;
};

// `token_range`: absent or null, or [start, end] with 0 <= start < end and, when
// `prompt_len` is given, end <= prompt_len.
absl::StatusOr<std::optional<transfer::TokenRange>> OptionalTokenRange(
    const Fields& fields, std::optional<int64_t> prompt_len);

// [start, end] or null.
ordered_json RangeJson(const std::optional<transfer::TokenRange>& range);

// {"src_start_token", "dst_start_token", "src", "dst"}: one group of `pair` and
// `transfer` output.
ordered_json PairingJson(const transfer::GroupPairing& pairing);

}  // namespace kvx::kvplan_internal

#endif  // KVX_TOOLS_INTERNAL_KVPLAN_JSON_H_
