#include "tools/internal/kvplan_json.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "transfer/slice.h"

namespace kvx::kvplan_internal {
namespace {

constexpr char kHex[] = "0123456789abcdef";

void AppendHexByte(unsigned char c, std::string* out) {
  out->append("\\x");
  out->push_back(kHex[c >> 4]);
  out->push_back(kHex[c & 0xf]);
}

// nlohmann's what() is "[json.exception.parse_error.101] parse error at line 1, ...".
absl::string_view WithoutExceptionId(absl::string_view what) {
  if (const size_t pos = what.find("] "); what.substr(0, 1) == "[" && pos != what.npos) {
    what.remove_prefix(pos + 2);
  }
  return what;
}

// The first pass over the input: syntax, number range, nesting depth and keys
// given twice, without building anything. nlohmann's own DOM callback rescans a
// parent array at every child's end (quadratic for [{}, {}, ...]); a SAX pass
// followed by the plain DOM parser is linear.
class InputChecker final : public json::json_sax_t {
 public:
  // The first problem found, if any.
  const std::optional<std::string>& error() const { return error_; }

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }

  bool start_object(std::size_t) override {
    keys_.emplace_back();
    return Enter();
  }
  bool key(string_t& key) override {
    if (!keys_.back().insert(key).second && !duplicate_) duplicate_ = key;
    return true;
  }
  bool end_object() override {
    keys_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) override { return Enter(); }
  bool end_array() override {
    --depth_;
    return true;
  }

  bool parse_error(std::size_t, const std::string&,
                   const nlohmann::detail::exception& ex) override {
    // "1e400" arrives here too (out_of_range.406, "number overflow parsing").
    error_ = absl::StrCat("malformed JSON: ", Escape(WithoutExceptionId(ex.what()), 256));
    return false;
  }

  // Called once the whole input parsed.
  void Finish() {
    if (!error_ && duplicate_) {
      error_ = absl::StrCat(Escape(*duplicate_), ": field given twice in one object");
    }
  }

 private:
  bool Enter() {
    if (++depth_ <= kMaxDepth) return true;
    error_ = absl::StrCat("input nests deeper than max_depth=", kMaxDepth);
    return false;  // stops the parser
  }

  int depth_ = 0;
  std::vector<absl::flat_hash_set<std::string>> keys_;  // one set per open object
  std::optional<std::string> duplicate_;
  std::optional<std::string> error_;
};

std::string Range(int64_t min, int64_t max) {
  if (max == std::numeric_limits<int64_t>::max()) return absl::StrCat(">= ", min);
  return absl::StrCat("in [", min, ", ", max, "]");
}

std::string Join(absl::string_view path, absl::string_view key) {
  return path.empty() ? std::string(key) : absl::StrCat(path, ".", key);
}

}  // namespace

std::string Escape(absl::string_view text, size_t max_bytes) {
  std::string out;
  const absl::string_view shown = text.substr(0, max_bytes);
  out.reserve(shown.size() + 16);
  for (const char ch : shown) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '\\':
        out.append("\\\\");
        break;
      case '\n':
        out.append("\\n");
        break;
      case '\r':
        out.append("\\r");
        break;
      case '\t':
        out.append("\\t");
        break;
      default:
        if (c >= 0x20 && c < 0x7f) {
          out.push_back(ch);
        } else {
          AppendHexByte(c, &out);
        }
    }
  }
  if (text.size() > shown.size()) absl::StrAppend(&out, "...(", text.size(), " bytes)");
  return out;
}

std::string OneLine(absl::string_view text) {
  std::string out;
  for (const char ch : text) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (out.size() >= kMaxMessageBytes) {
      out.append("...");
      break;
    }
    if (c >= 0x20 && c < 0x7f) {
      out.push_back(ch);
    } else {
      AppendHexByte(c, &out);
    }
  }
  return out;
}

absl::StatusOr<json> ParseInput(absl::string_view text) {
  if (text.size() > kMaxInputBytes) {
    return absl::InvalidArgumentError(absl::StrCat("input larger than max_bytes=",
                                                   kMaxInputBytes, ": bytes=", text.size()));
  }
  if (const size_t nul = text.find('\0'); nul != text.npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed JSON: NUL byte at offset=", nul, " (JSON text has none)"));
  }
  try {
    InputChecker checker;
    json::sax_parse(text.begin(), text.end(), &checker);
    checker.Finish();
    if (checker.error()) return absl::InvalidArgumentError(*checker.error());
    // The checker accepted it: the DOM parser will too.
    json value = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
    if (value.is_discarded()) return absl::InternalError("JSON accepted once, then rejected");
    return value;
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed JSON: ", Escape(WithoutExceptionId(e.what()), 256)));
  }
}

absl::Status FieldError(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

std::string Describe(const json& value) {
  if (value.is_array() || value.is_object() || value.is_null()) return value.type_name();
  if (value.is_string()) {
    return absl::StrCat("string \"", Escape(value.get_ref<const std::string&>()), "\"");
  }
  // A number or a boolean: nlohmann writes it in plain ASCII, at most ~25 bytes.
  return absl::StrCat(value.type_name(), " ", value.dump());
}

absl::StatusOr<int64_t> AsInt(const json& value, absl::string_view field, int64_t min,
                              int64_t max, absl::string_view expected_text) {
  const std::string expected = expected_text.empty()
                                   ? absl::StrCat("an integer ", Range(min, max))
                                   : std::string(expected_text);
  int64_t number = 0;
  if (value.is_number_unsigned()) {
    // nlohmann stores every non-negative integer as unsigned; past int64 is ours to
    // reject.
    const uint64_t u = value.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return FieldError(
          field, absl::StrCat("must be ", expected, ", got ", u, " which does not fit in int64"));
    }
    number = static_cast<int64_t>(u);
  } else if (value.is_number_integer()) {
    number = value.get<int64_t>();
  } else {
    return FieldError(field, absl::StrCat("must be ", expected, ", got ", Describe(value)));
  }
  if (number < min || number > max) {
    return FieldError(field, absl::StrCat("must be ", expected, ", got ", number));
  }
  return number;
}

absl::StatusOr<int64_t> AsTokens(const json& value, absl::string_view field, int64_t min) {
  return AsInt(value, field, min, kMaxTokens);
}

absl::StatusOr<transfer::BlockList> AsBlockList(const json& value, absl::string_view field,
                                                bool allow_not_held) {
  const std::string expected =
      absl::StrCat(allow_not_held ? "-1 (not held) or " : "", "a block id ", Range(0, kMaxBlockId));
  if (!value.is_array()) {
    return FieldError(field, absl::StrCat("must be an array of block ids, got ", Describe(value)));
  }
  transfer::BlockList ids;
  ids.reserve(value.size());
  for (size_t i = 0; i < value.size(); ++i) {
    absl::StatusOr<int64_t> id = AsInt(value[i], absl::StrCat(field, "[", i, "]"),
                                       allow_not_held ? -1 : 0, kMaxBlockId, expected);
    if (!id.ok()) return id.status();
    ids.push_back(*id);
  }
  return ids;
}

absl::Status CheckGroupArray(const json& value, absl::string_view field,
                             absl::string_view what) {
  if (value.is_array() && value.size() <= kMaxGroups) return absl::OkStatus();
  return FieldError(field, absl::StrCat("must be an array of at most ", kMaxGroups, " ", what,
                                        ", got ",
                                        value.is_array() ? absl::StrCat(value.size(), " of them")
                                                         : Describe(value)));
}

absl::StatusOr<std::vector<transfer::BlockList>> AsGroupLists(const json& value,
                                                              absl::string_view field) {
  if (absl::Status s = CheckGroupArray(value, field, "block lists"); !s.ok()) return s;
  std::vector<transfer::BlockList> lists;
  for (size_t g = 0; g < value.size(); ++g) {
    absl::StatusOr<transfer::BlockList> list =
        AsBlockList(value[g], absl::StrCat(field, "[", g, "]"), /*allow_not_held=*/false);
    if (!list.ok()) return list.status();
    lists.push_back(*std::move(list));
  }
  return lists;
}

absl::StatusOr<std::optional<int64_t>> AsWindow(const json& value, absl::string_view field) {
  if (value.is_null()) return std::nullopt;
  absl::StatusOr<int64_t> window = AsInt(value, field, 1, kMaxTokens,
                                         absl::StrCat("null or an integer ", Range(1, kMaxTokens)));
  if (!window.ok()) return window.status();
  return *window;
}

absl::StatusOr<Fields> Fields::Open(const json& value, std::string path,
                                    const std::vector<absl::string_view>& allowed) {
  if (!value.is_object()) {
    return FieldError(path.empty() ? "input" : path,
                      absl::StrCat("must be a JSON object, got ", Describe(value)));
  }
  for (const auto& item : value.items()) {
    if (std::find(allowed.begin(), allowed.end(), item.key()) == allowed.end()) {
      return FieldError(Join(path, Escape(item.key())),
                        absl::StrCat("unknown field (expected one of ",
                                     absl::StrJoin(allowed, ", "), ")"));
    }
  }
  return Fields(value, std::move(path));
}

std::string Fields::Name(absl::string_view key) const { return Join(path_, key); }

const json* Fields::Find(absl::string_view key) const {
  auto it = value_->find(std::string(key));
  return it == value_->end() ? nullptr : &*it;
}

const json* Fields::Optional(absl::string_view key) const {
  const json* value = Find(key);
  return value == nullptr || value->is_null() ? nullptr : value;
}

absl::StatusOr<const json*> Fields::Required(absl::string_view key) const {
  const json* value = Find(key);
  if (value == nullptr) return FieldError(Name(key), "missing required field");
  return value;
}

absl::StatusOr<int64_t> Fields::Int(absl::string_view key, int64_t min, int64_t max) const {
  absl::StatusOr<const json*> value = Required(key);
  if (!value.ok()) return value.status();
  return AsInt(**value, Name(key), min, max);
}

absl::StatusOr<std::optional<int64_t>> Fields::OptionalInt(absl::string_view key, int64_t min,
                                                           int64_t max,
                                                           absl::string_view expected) const {
  const json* value = Optional(key);
  if (value == nullptr) return std::nullopt;
  absl::StatusOr<int64_t> number = AsInt(*value, Name(key), min, max, expected);
  if (!number.ok()) return number.status();
  return *number;
}

absl::StatusOr<int64_t> Fields::Tokens(absl::string_view key, int64_t min) const {
  return Int(key, min, kMaxTokens);
}

absl::StatusOr<std::optional<int64_t>> Fields::OptionalTokens(absl::string_view key,
                                                              int64_t min) const {
  return OptionalInt(key, min, kMaxTokens);
}

absl::StatusOr<bool> Fields::Bool(absl::string_view key) const {
  absl::StatusOr<const json*> value = Required(key);
  if (!value.ok()) return value.status();
  if (!(*value)->is_boolean()) {
    return FieldError(Name(key), absl::StrCat("must be true or false, got ", Describe(**value)));
  }
  return (*value)->get<bool>();
}

absl::StatusOr<bool> Fields::OptionalBool(absl::string_view key, bool default_value) const {
  if (Optional(key) == nullptr) return default_value;
  return Bool(key);
}

absl::StatusOr<std::string> Fields::String(absl::string_view key,
                                           const std::vector<absl::string_view>& choices) const {
  absl::StatusOr<const json*> value = Required(key);
  if (!value.ok()) return value.status();
  const json& given = **value;
  if (given.is_string()) {
    const std::string& text = given.get_ref<const std::string&>();
    if (std::find(choices.begin(), choices.end(), text) != choices.end()) return text;
  }
  return FieldError(Name(key), absl::StrCat("must be one of \"", absl::StrJoin(choices, "\", \""),
                                            "\", got ", Describe(given)));
}

absl::StatusOr<std::optional<transfer::TokenRange>> OptionalTokenRange(
    const Fields& fields, std::optional<int64_t> prompt_len) {
  const json* value = fields.Optional("token_range");
  if (value == nullptr) return std::nullopt;
  const std::string name = fields.Name("token_range");
  if (!value->is_array() || value->size() != 2) {
    return FieldError(name, absl::StrCat("must be [start, end], got ", Describe(*value)));
  }
  absl::StatusOr<int64_t> start = AsTokens((*value)[0], absl::StrCat(name, "[0]"), 0);
  if (!start.ok()) return start.status();
  absl::StatusOr<int64_t> end = AsTokens((*value)[1], absl::StrCat(name, "[1]"), 0);
  if (!end.ok()) return end.status();
  if (*start >= *end) {
    return FieldError(name,
                      absl::StrCat("must satisfy start < end, got start=", *start, " end=", *end));
  }
  if (prompt_len && *end > *prompt_len) {
    return FieldError(name, absl::StrCat("must end at or before the prompt's end, got end=", *end,
                                         " prompt_len=", *prompt_len));
  }
  return transfer::TokenRange::Create(*start, *end);
}

ordered_json RangeJson(const std::optional<transfer::TokenRange>& range) {
  if (!range) return nullptr;
  return ordered_json::array({range->start(), range->end()});
}

ordered_json PairingJson(const transfer::GroupPairing& pairing) {
  ordered_json group;
  group["src_start_token"] = pairing.src_start_token;
  group["dst_start_token"] = pairing.dst_start_token;
  group["src"] = pairing.src;
  group["dst"] = pairing.dst;
  return group;
}

}  // namespace kvx::kvplan_internal
