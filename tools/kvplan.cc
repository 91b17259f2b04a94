#include "tools/kvplan.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "cache_reuse/adapter.h"
#include "cache_reuse/v1_adapter.h"
#include "cache_reuse/v2_adapter.h"
#include "nlohmann/json.hpp"
#include "transfer/fragments.h"
#include "transfer/scenario.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::kvplan {
namespace {

using json = nlohmann::json;
// Output keeps the contract's key order.
using ordered_json = nlohmann::ordered_json;
using cache_reuse::LayerGroupSpec;
using cache_reuse::Side;
using transfer::BlockList;
using transfer::TokenRange;

// The request id the tool hands to the core; it shows up as request=0 in errors.
constexpr int64_t kRequestId = 0;

absl::Status FieldError(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// "string \"8\"", "number 8.5", "boolean true", "array", "object", "null".
std::string Describe(const json& value) {
  if (value.is_array() || value.is_object() || value.is_null()) return value.type_name();
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 40) text = absl::StrCat(text.substr(0, 37), "...");
  return absl::StrCat(value.type_name(), " ", text);
}

absl::StatusOr<int64_t> AsInt(const json& value, absl::string_view field, int64_t min, int64_t max,
                              absl::string_view expected) {
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

// Token counts and positions: 0 <= n <= kMaxTokens (or >= 1 with min 1).
absl::StatusOr<int64_t> AsTokens(const json& value, absl::string_view field, int64_t min) {
  return AsInt(value, field, min, kMaxTokens, min > 0 ? "an integer > 0" : "an integer >= 0");
}

// A block list. `allow_not_held`: -1 marks a block the manager does not hold
// (positional tables of `slice`); every other id is >= 0.
absl::StatusOr<BlockList> AsBlockList(const json& value, absl::string_view field,
                                      bool allow_not_held) {
  if (!value.is_array()) {
    return FieldError(field, absl::StrCat("must be an array of block ids, got ", Describe(value)));
  }
  BlockList ids;
  ids.reserve(value.size());
  for (size_t i = 0; i < value.size(); ++i) {
    absl::StatusOr<int64_t> id =
        AsInt(value[i], absl::StrCat(field, "[", i, "]"),
              allow_not_held ? cache_reuse::kEvictedBlock : 0, std::numeric_limits<int64_t>::max(),
              allow_not_held ? "a block id >= 0 or -1 (not held)" : "a block id >= 0");
    if (!id.ok()) return id.status();
    ids.push_back(*id);
  }
  return ids;
}

// An array of block lists, one per layer group.
absl::StatusOr<std::vector<BlockList>> AsGroupLists(const json& value, absl::string_view field) {
  if (!value.is_array()) {
    return FieldError(field,
                      absl::StrCat("must be an array of block lists, got ", Describe(value)));
  }
  std::vector<BlockList> lists;
  for (size_t g = 0; g < value.size(); ++g) {
    absl::StatusOr<BlockList> list =
        AsBlockList(value[g], absl::StrCat(field, "[", g, "]"), /*allow_not_held=*/false);
    if (!list.ok()) return list.status();
    lists.push_back(*std::move(list));
  }
  return lists;
}

// An attention window: null (full attention) or > 0 tokens.
absl::StatusOr<std::optional<int64_t>> AsWindow(const json& value, absl::string_view field) {
  if (value.is_null()) return std::nullopt;
  absl::StatusOr<int64_t> window = AsInt(value, field, 1, kMaxTokens, "null or an integer > 0");
  if (!window.ok()) return window.status();
  return *window;
}

// One JSON object of the input, with the keys it may have. Unknown keys are
// rejected so that a typo ("tokens_per_blok") never silently becomes a default.
class Fields {
 public:
  static absl::StatusOr<Fields> Open(const json& value, std::string path,
                                     std::vector<absl::string_view> allowed) {
    const std::string name = path.empty() ? "input" : path;
    if (!value.is_object()) {
      return FieldError(name, absl::StrCat("must be a JSON object, got ", Describe(value)));
    }
    for (const auto& item : value.items()) {
      if (std::find(allowed.begin(), allowed.end(), item.key()) == allowed.end()) {
        return FieldError(Join(path, item.key()), absl::StrCat("unknown field (expected one of ",
                                                               absl::StrJoin(allowed, ", "), ")"));
      }
    }
    return Fields(value, std::move(path));
  }

  std::string Name(absl::string_view key) const { return Join(path_, key); }

  // The value of `key`, nullptr when absent. null counts as absent for optional
  // fields (Optional*), as a value for required ones.
  const json* Find(absl::string_view key) const {
    auto it = value_->find(std::string(key));
    return it == value_->end() ? nullptr : &*it;
  }

  absl::StatusOr<const json*> Required(absl::string_view key) const {
    const json* value = Find(key);
    if (value == nullptr) return FieldError(Name(key), "missing required field");
    return value;
  }

  // A required integer in [min, max]; `expected` says so in words.
  absl::StatusOr<int64_t> Int(absl::string_view key, int64_t min, int64_t max,
                              absl::string_view expected) const {
    absl::StatusOr<const json*> value = Required(key);
    if (!value.ok()) return value.status();
    return AsInt(**value, Name(key), min, max, expected);
  }

  absl::StatusOr<std::optional<int64_t>> OptionalInt(absl::string_view key, int64_t min,
                                                     int64_t max,
                                                     absl::string_view expected) const {
    const json* value = Find(key);
    if (value == nullptr || value->is_null()) return std::nullopt;
    absl::StatusOr<int64_t> number = AsInt(*value, Name(key), min, max, expected);
    if (!number.ok()) return number.status();
    return *number;
  }

  absl::StatusOr<int64_t> Tokens(absl::string_view key, int64_t min) const {
    absl::StatusOr<const json*> value = Required(key);
    if (!value.ok()) return value.status();
    return AsTokens(**value, Name(key), min);
  }

  absl::StatusOr<std::optional<int64_t>> OptionalTokens(absl::string_view key, int64_t min) const {
    const json* value = Find(key);
    if (value == nullptr || value->is_null()) return std::nullopt;
    absl::StatusOr<int64_t> tokens = AsTokens(*value, Name(key), min);
    if (!tokens.ok()) return tokens.status();
    return *tokens;
  }

  absl::StatusOr<bool> OptionalBool(absl::string_view key, bool default_value) const {
    const json* value = Find(key);
    if (value == nullptr || value->is_null()) return default_value;
    if (!value->is_boolean()) {
      return FieldError(Name(key), absl::StrCat("must be true or false, got ", Describe(*value)));
    }
    return value->get<bool>();
  }

  absl::StatusOr<std::string> String(absl::string_view key,
                                     const std::vector<absl::string_view>& choices) const {
    absl::StatusOr<const json*> value = Required(key);
    if (!value.ok()) return value.status();
    const std::string expected = absl::StrCat("one of \"", absl::StrJoin(choices, "\", \""), "\"");
    if (!(*value)->is_string()) {
      return FieldError(Name(key), absl::StrCat("must be ", expected, ", got ", Describe(**value)));
    }
    std::string text = (*value)->get<std::string>();
    if (std::find(choices.begin(), choices.end(), text) == choices.end()) {
      return FieldError(Name(key), absl::StrCat("must be ", expected, ", got ", Describe(**value)));
    }
    return text;
  }

 private:
  Fields(const json& value, std::string path) : value_(&value), path_(std::move(path)) {}

  static std::string Join(absl::string_view path, absl::string_view key) {
    return path.empty() ? std::string(key) : absl::StrCat(path, ".", key);
  }

  const json* value_;
  std::string path_;
};

// `token_range`: absent or null, or [start, end] with 0 <= start < end and, when
// `prompt_len` is given, end <= prompt_len.
absl::StatusOr<std::optional<TokenRange>> OptionalTokenRange(const Fields& fields,
                                                             std::optional<int64_t> prompt_len) {
  const json* value = fields.Find("token_range");
  if (value == nullptr || value->is_null()) return std::nullopt;
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
  return TokenRange::Create(*start, *end).value();
}

// The slice's token range as the core defaults it (section 4 step 2).
std::optional<TokenRange> DefaultRange(std::optional<TokenRange> range, int64_t prompt_len) {
  if (range || prompt_len == 0) return range;
  return TokenRange::Create(0, prompt_len).value();
}

ordered_json RangeJson(const std::optional<TokenRange>& range) {
  if (!range) return nullptr;
  return ordered_json::array({range->start(), range->end()});
}

// -------------------------------------------------------------------------------
// align

absl::StatusOr<ordered_json> Align(const json& input) {
  absl::StatusOr<Fields> fields = Fields::Open(
      input, "", {"tokens_per_block", "src", "dst", "src_start_token", "dst_start_token"});
  if (!fields.ok()) return fields.status();
  absl::StatusOr<int64_t> tpb = fields->Tokens("tokens_per_block", 1);
  if (!tpb.ok()) return tpb.status();
  absl::StatusOr<const json*> src_json = fields->Required("src");
  if (!src_json.ok()) return src_json.status();
  absl::StatusOr<BlockList> src = AsBlockList(**src_json, "src", false);
  if (!src.ok()) return src.status();
  absl::StatusOr<const json*> dst_json = fields->Required("dst");
  if (!dst_json.ok()) return dst_json.status();
  absl::StatusOr<BlockList> dst = AsBlockList(**dst_json, "dst", false);
  if (!dst.ok()) return dst.status();
  absl::StatusOr<int64_t> src_start = fields->Tokens("src_start_token", 0);
  if (!src_start.ok()) return src_start.status();
  absl::StatusOr<int64_t> dst_start = fields->Tokens("dst_start_token", 0);
  if (!dst_start.ok()) return dst_start.status();

  absl::StatusOr<transfer::AlignedBlocks> aligned =
      transfer::AlignBlocks(*src, *src_start, *dst, *dst_start, *tpb);
  if (!aligned.ok()) return aligned.status();
  ordered_json out;
  out["src"] = aligned->src;
  out["dst"] = aligned->dst;
  return out;
}

// -------------------------------------------------------------------------------
// pair

ordered_json PairingJson(const transfer::GroupPairing& pairing) {
  ordered_json group;
  group["src_start_token"] = pairing.src_start_token;
  group["dst_start_token"] = pairing.dst_start_token;
  group["src"] = pairing.src;
  group["dst"] = pairing.dst;
  return group;
}

absl::StatusOr<ordered_json> Pair(const json& input) {
  absl::StatusOr<Fields> fields = Fields::Open(input, "",
                                               {"tokens_per_block", "prompt_len", "token_range",
                                                "windows", "src", "dst", "dst_start_token"});
  if (!fields.ok()) return fields.status();
  absl::StatusOr<int64_t> tpb = fields->Tokens("tokens_per_block", 1);
  if (!tpb.ok()) return tpb.status();
  absl::StatusOr<int64_t> prompt_len = fields->Tokens("prompt_len", 0);
  if (!prompt_len.ok()) return prompt_len.status();
  // A pair slice may be any range; only slice and transfer tie it to the prompt.
  absl::StatusOr<std::optional<TokenRange>> range = OptionalTokenRange(*fields, std::nullopt);
  if (!range.ok()) return range.status();

  absl::StatusOr<const json*> windows_json = fields->Required("windows");
  if (!windows_json.ok()) return windows_json.status();
  if (!(*windows_json)->is_array()) {
    return FieldError("windows", absl::StrCat("must be an array of null or windows, got ",
                                              Describe(**windows_json)));
  }
  std::vector<std::optional<int64_t>> windows;
  for (size_t g = 0; g < (*windows_json)->size(); ++g) {
    absl::StatusOr<std::optional<int64_t>> window =
        AsWindow((**windows_json)[g], absl::StrCat("windows[", g, "]"));
    if (!window.ok()) return window.status();
    windows.push_back(*window);
  }

  transfer::KVSlice src;
  transfer::KVSlice dst;
  for (auto [side, slice] : {std::pair{"src", &src}, std::pair{"dst", &dst}}) {
    absl::StatusOr<const json*> lists_json = fields->Required(side);
    if (!lists_json.ok()) return lists_json.status();
    absl::StatusOr<std::vector<BlockList>> lists = AsGroupLists(**lists_json, side);
    if (!lists.ok()) return lists.status();
    if (lists->size() != windows.size()) {
      return FieldError(side, absl::StrCat("must list one block list per layer group: ", side,
                                           "_groups=", lists->size(), " windows=", windows.size()));
    }
    slice->token_range = DefaultRange(*range, *prompt_len);
    slice->block_ids_per_layer_group = *std::move(lists);
  }
  absl::StatusOr<std::optional<int64_t>> hint = fields->OptionalTokens("dst_start_token", 0);
  if (!hint.ok()) return hint.status();

  transfer::PairingOptions options;
  options.tokens_per_block = *tpb;
  options.prompt_len = *prompt_len;
  options.windows = std::move(windows);
  options.dst_start_token = *hint;
  absl::StatusOr<std::vector<transfer::GroupPairing>> pairings =
      transfer::PairSliceBlocks(src, dst, options);
  if (!pairings.ok()) return pairings.status();

  ordered_json groups = ordered_json::array();
  for (const transfer::GroupPairing& pairing : *pairings) groups.push_back(PairingJson(pairing));
  ordered_json out;
  out["groups"] = std::move(groups);
  return out;
}

// -------------------------------------------------------------------------------
// slice

// The cache-manager answers a slice input describes.
struct ReuseInput {
  enum class Adapter { kV1, kV2 };
  bool enabled = false;
  Adapter adapter = Adapter::kV1;
  int64_t prepopulated_prompt_len = 0;          // V1
  std::optional<int64_t> num_committed_tokens;  // V2; nullopt: unknown request
};

// A V1-style manager over the input's positional tables.
class JsonBlockTableManager final : public cache_reuse::BlockTableCacheManager {
 public:
  // `tables` must outlive the manager.
  JsonBlockTableManager(const std::vector<BlockList>* tables, int64_t prepopulated)
      : tables_(tables), prepopulated_(prepopulated) {}

  absl::StatusOr<int64_t> PrepopulatedPromptLen(int64_t request_id) const override {
    return prepopulated_;
  }
  absl::StatusOr<BlockList> BlockTable(int64_t request_id, int layer_group) const override {
    if (layer_group < 0 || static_cast<size_t>(layer_group) >= tables_->size()) {
      return absl::OutOfRangeError(absl::StrCat("no such layer group: group=", layer_group));
    }
    return (*tables_)[layer_group];
  }
  absl::Status StoreBlocksForReuse(int64_t request_id) override { return absl::OkStatus(); }

 private:
  const std::vector<BlockList>* const tables_;
  const int64_t prepopulated_;
};

// A V2-style manager that, like an engine freeing a window's stale head, keeps
// only what follows the leading not-held entries of each positional table.
class JsonPagedManager final : public cache_reuse::PagedCacheManager {
 public:
  // `tables` must outlive the manager.
  JsonPagedManager(const std::vector<BlockList>* tables, std::optional<int64_t> committed)
      : tables_(tables), committed_(committed) {}

  std::optional<int64_t> NumCommittedTokens(int64_t request_id) const override {
    return committed_;
  }
  absl::StatusOr<cache_reuse::ValidPages> Pages(int64_t request_id,
                                                int layer_group) const override {
    if (layer_group < 0 || static_cast<size_t>(layer_group) >= tables_->size()) {
      return absl::OutOfRangeError(absl::StrCat("no such layer group: group=", layer_group));
    }
    return cache_reuse::SplitPositionalTable((*tables_)[layer_group]);
  }
  bool HasCache(int64_t request_id) const override { return committed_.has_value(); }
  absl::Status Commit(int64_t request_id) override { return absl::OkStatus(); }

 private:
  const std::vector<BlockList>* const tables_;
  const std::optional<int64_t> committed_;
};

absl::StatusOr<ReuseInput> ParseReuse(const Fields& side) {
  ReuseInput reuse;
  const json* value = side.Find("reuse");
  if (value == nullptr || value->is_null()) return reuse;  // reuse disabled
  const std::string path = side.Name("reuse");
  // Look at the adapter first: it decides which count field is allowed.
  absl::StatusOr<Fields> probe = Fields::Open(
      *value, path, {"enabled", "adapter", "prepopulated_prompt_len", "num_committed_tokens"});
  if (!probe.ok()) return probe.status();
  absl::StatusOr<std::string> adapter = probe->String("adapter", {"v1", "v2"});
  if (!adapter.ok()) return adapter.status();
  const bool v1 = *adapter == "v1";
  const absl::string_view count_key = v1 ? "prepopulated_prompt_len" : "num_committed_tokens";
  absl::StatusOr<Fields> fields = Fields::Open(*value, path, {"enabled", "adapter", count_key});
  if (!fields.ok()) return fields.status();

  absl::StatusOr<const json*> enabled = fields->Required("enabled");
  if (!enabled.ok()) return enabled.status();
  if (!(*enabled)->is_boolean()) {
    return FieldError(fields->Name("enabled"),
                      absl::StrCat("must be true or false, got ", Describe(**enabled)));
  }
  reuse.enabled = (*enabled)->get<bool>();
  reuse.adapter = v1 ? ReuseInput::Adapter::kV1 : ReuseInput::Adapter::kV2;

  // The count is required when reuse is on; when off it may be left out.
  const json* count = fields->Find(count_key);
  if (count == nullptr) {
    if (reuse.enabled) return FieldError(fields->Name(count_key), "missing required field");
    return reuse;
  }
  if (v1) {
    absl::StatusOr<int64_t> n = AsTokens(*count, fields->Name(count_key), 0);
    if (!n.ok()) return n.status();
    reuse.prepopulated_prompt_len = *n;
  } else if (!count->is_null()) {
    absl::StatusOr<int64_t> n =
        AsInt(*count, fields->Name(count_key), 0, kMaxTokens, "null or an integer >= 0");
    if (!n.ok()) return n.status();
    reuse.num_committed_tokens = *n;
  }
  return reuse;
}

// The request-wide fields a transfer input gives once for both sides.
struct Shared {
  int64_t tokens_per_block = 0;
  int64_t prompt_len = 0;
  std::optional<TokenRange> token_range;
};

// tokens_per_block, prompt_len and token_range (ending within the prompt), all
// required but the range.
absl::StatusOr<Shared> ParseShared(const Fields& fields) {
  absl::StatusOr<int64_t> tpb = fields.Tokens("tokens_per_block", 1);
  if (!tpb.ok()) return tpb.status();
  absl::StatusOr<int64_t> prompt_len = fields.Tokens("prompt_len", 0);
  if (!prompt_len.ok()) return prompt_len.status();
  absl::StatusOr<std::optional<TokenRange>> range = OptionalTokenRange(fields, *prompt_len);
  if (!range.ok()) return range.status();
  return Shared{*tpb, *prompt_len, *range};
}

// One side's slice input, validated.
struct SliceInput {
  Shared shared;
  Side side = Side::kContext;
  bool generation_only = true;
  ReuseInput reuse;
  std::vector<LayerGroupSpec> groups;
  std::vector<BlockList> tables;           // positional, one per group (empty for Mamba)
  std::optional<int64_t> dst_start_token;  // transfer's generation side only
};

absl::StatusOr<std::vector<LayerGroupSpec>> ParseGroups(const Fields& side,
                                                        std::vector<BlockList>* tables) {
  absl::StatusOr<const json*> value = side.Required("groups");
  if (!value.ok()) return value.status();
  const std::string name = side.Name("groups");
  if (!(*value)->is_array()) {
    return FieldError(name,
                      absl::StrCat("must be an array of layer groups, got ", Describe(**value)));
  }
  std::vector<LayerGroupSpec> groups;
  for (size_t g = 0; g < (*value)->size(); ++g) {
    const json& group_json = (**value)[g];
    const std::string path = absl::StrCat(name, "[", g, "]");
    absl::StatusOr<Fields> fields = Fields::Open(group_json, path, {"kind", "window", "block_ids"});
    if (!fields.ok()) return fields.status();
    std::string kind = "attention";
    if (fields->Find("kind") != nullptr) {
      absl::StatusOr<std::string> given = fields->String("kind", {"attention", "mamba"});
      if (!given.ok()) return given.status();
      kind = *given;
    }
    if (kind == "mamba") {
      // A Mamba group holds a state, not blocks: nothing of it is planned here.
      if (absl::StatusOr<Fields> mamba = Fields::Open(group_json, path, {"kind"}); !mamba.ok()) {
        return mamba.status();
      }
      groups.push_back(LayerGroupSpec::Mamba());
      tables->emplace_back();
      continue;
    }
    std::optional<int64_t> window;
    if (const json* window_json = fields->Find("window"); window_json != nullptr) {
      absl::StatusOr<std::optional<int64_t>> parsed =
          AsWindow(*window_json, fields->Name("window"));
      if (!parsed.ok()) return parsed.status();
      window = *parsed;
    }
    absl::StatusOr<const json*> ids = fields->Required("block_ids");
    if (!ids.ok()) return ids.status();
    absl::StatusOr<BlockList> table =
        AsBlockList(**ids, fields->Name("block_ids"), /*allow_not_held=*/true);
    if (!table.ok()) return table.status();
    groups.push_back(window ? LayerGroupSpec::Windowed(*window) : LayerGroupSpec::Full());
    tables->push_back(*std::move(table));
  }
  return groups;
}

// Parses a slice input at `path`. With `outer` (a transfer's side), the request-wide
// fields may be left out and must agree with `outer` when present, and the side is
// fixed to `fixed_side`.
absl::StatusOr<SliceInput> ParseSliceInput(const json& value, const std::string& path,
                                           const Shared* outer, Side fixed_side) {
  std::vector<absl::string_view> allowed = {"tokens_per_block", "prompt_len", "token_range", "side",
                                            "generation_only",  "reuse",      "groups"};
  const bool generation_of_transfer = outer != nullptr && fixed_side == Side::kGeneration;
  if (generation_of_transfer) allowed.push_back("dst_start_token");
  absl::StatusOr<Fields> fields = Fields::Open(value, path, allowed);
  if (!fields.ok()) return fields.status();

  SliceInput input;
  if (outer == nullptr) {
    absl::StatusOr<Shared> shared = ParseShared(*fields);
    if (!shared.ok()) return shared.status();
    input.shared = *shared;
    absl::StatusOr<std::string> side = fields->String("side", {"context", "generation"});
    if (!side.ok()) return side.status();
    input.side = *side == "context" ? Side::kContext : Side::kGeneration;
  } else {
    input.shared = *outer;
    for (auto [key, min, expected] : {std::tuple{"tokens_per_block", 1, outer->tokens_per_block},
                                      std::tuple{"prompt_len", 0, outer->prompt_len}}) {
      absl::StatusOr<std::optional<int64_t>> own = fields->OptionalTokens(key, min);
      if (!own.ok()) return own.status();
      if (*own && **own != expected) {
        return FieldError(fields->Name(key), absl::StrCat("must agree with the top-level ", key,
                                                          ", got ", **own, " vs ", expected));
      }
    }
    absl::StatusOr<std::optional<TokenRange>> range =
        OptionalTokenRange(*fields, outer->prompt_len);
    if (!range.ok()) return range.status();
    if (*range && *range != outer->token_range) {
      return FieldError(fields->Name("token_range"), "must agree with the top-level token_range");
    }
    input.side = fixed_side;
    if (fields->Find("side") != nullptr) {
      const char* expected = fixed_side == Side::kContext ? "context" : "generation";
      absl::StatusOr<std::string> side = fields->String("side", {expected});
      if (!side.ok()) return side.status();
    }
  }
  absl::StatusOr<bool> generation_only = fields->OptionalBool("generation_only", true);
  if (!generation_only.ok()) return generation_only.status();
  input.generation_only = *generation_only;
  absl::StatusOr<ReuseInput> reuse = ParseReuse(*fields);
  if (!reuse.ok()) return reuse.status();
  input.reuse = *reuse;
  absl::StatusOr<std::vector<LayerGroupSpec>> groups = ParseGroups(*fields, &input.tables);
  if (!groups.ok()) return groups.status();
  input.groups = *std::move(groups);
  if (generation_of_transfer) {
    absl::StatusOr<std::optional<int64_t>> hint = fields->OptionalTokens("dst_start_token", 0);
    if (!hint.ok()) return hint.status();
    input.dst_start_token = *hint;
  }
  return input;
}

absl::StatusOr<cache_reuse::BuiltSlice> BuildSliceFromInput(const SliceInput& input) {
  cache_reuse::SliceRequest request;
  request.request_id = kRequestId;
  request.prompt_len = input.shared.prompt_len;
  request.tokens_per_block = input.shared.tokens_per_block;
  request.side = input.side;
  request.generation_only = input.generation_only;
  request.token_range = input.shared.token_range;
  const cache_reuse::ReuseOptions options{input.reuse.enabled};
  if (input.reuse.adapter == ReuseInput::Adapter::kV2) {
    JsonPagedManager manager(&input.tables, input.reuse.num_committed_tokens);
    cache_reuse::V2Adapter adapter(&manager, options);
    return cache_reuse::BuildSlice(adapter, request, input.groups);
  }
  JsonBlockTableManager manager(&input.tables, input.reuse.prepopulated_prompt_len);
  cache_reuse::V1Adapter adapter(&manager, options);
  return cache_reuse::BuildSlice(adapter, request, input.groups);
}

absl::StatusOr<ordered_json> Slice(const json& input_json) {
  absl::StatusOr<SliceInput> input =
      ParseSliceInput(input_json, "", /*outer=*/nullptr, Side::kContext);
  if (!input.ok()) return input.status();
  absl::StatusOr<cache_reuse::BuiltSlice> built = BuildSliceFromInput(*input);
  if (!built.ok()) return built.status();
  ordered_json out;
  out["token_range"] = RangeJson(built->slice.token_range);
  out["cached_tokens"] = built->cached_tokens;
  out["block_ids"] = built->slice.block_ids_per_layer_group;
  return out;
}

// -------------------------------------------------------------------------------
// transfer

// Why each block of one group's slice does or does not move. Over the slice's
// blocks [0, total_blocks), in order: skipped_window (wholly outside the window),
// skipped_cached (the generation side holds them already), skipped_hint (before
// the receiver's dst_start_token), then the moved blocks. They add up to
// total_blocks; the core's pairing is checked against that.
struct GroupCounts {
  int64_t total_blocks = 0;
  int64_t moved = 0;
  int64_t skipped_cached = 0;
  int64_t skipped_window = 0;
  int64_t skipped_hint = 0;

  void Add(const GroupCounts& other) {
    total_blocks += other.total_blocks;
    moved += other.moved;
    skipped_cached += other.skipped_cached;
    skipped_window += other.skipped_window;
    skipped_hint += other.skipped_hint;
  }

  ordered_json ToJson() const {
    ordered_json out;
    out["total_blocks"] = total_blocks;
    out["moved"] = moved;
    out["skipped_cached"] = skipped_cached;
    out["skipped_window"] = skipped_window;
    out["skipped_hint"] = skipped_hint;
    return out;
  }
};

absl::StatusOr<GroupCounts> CountGroup(const SliceInput& input, const LayerGroupSpec& spec,
                                       size_t group, const BlockList& generation_list,
                                       const transfer::GroupPairing& pairing) {
  GroupCounts counts;
  if (spec.kind == LayerGroupSpec::Kind::kMamba) return counts;
  const int64_t tpb = input.shared.tokens_per_block;
  const int64_t end =
      input.shared.token_range ? input.shared.token_range->end() : input.shared.prompt_len;
  counts.total_blocks = transfer::CeilDiv(end, tpb);
  absl::StatusOr<transfer::WindowBlocks> window =
      transfer::ComputeWindowBlocks(input.shared.prompt_len, spec.window, tpb);
  if (!window.ok()) return window.status();
  counts.skipped_window = std::min(window->stale_end, counts.total_blocks);
  // Built lists are suffixes of [0, total_blocks): the length says where they start.
  const int64_t held_until = counts.total_blocks - static_cast<int64_t>(generation_list.size());
  counts.skipped_cached = std::max<int64_t>(0, held_until - counts.skipped_window);
  const int64_t hint_block = std::min(counts.total_blocks, pairing.dst_start_token / tpb);
  counts.skipped_hint =
      std::max<int64_t>(0, hint_block - std::max(counts.skipped_window, held_until));
  counts.moved = static_cast<int64_t>(pairing.src.size());
  // The context side sends [stale_end, total), so every block is accounted for
  // exactly once; anything else is a disagreement between this tool and the core.
  if (counts.skipped_window + counts.skipped_cached + counts.skipped_hint + counts.moved !=
      counts.total_blocks) {
    return absl::InternalError(absl::StrCat(
        "block counts do not add up: group=", group, " total_blocks=", counts.total_blocks,
        " moved=", counts.moved, " skipped_cached=", counts.skipped_cached,
        " skipped_window=", counts.skipped_window, " skipped_hint=", counts.skipped_hint));
  }
  return counts;
}

absl::StatusOr<ordered_json> Transfer(const json& input) {
  absl::StatusOr<Fields> fields = Fields::Open(input, "",
                                               {"tokens_per_block", "prompt_len", "token_range",
                                                "dst_start_token", "context", "generation"});
  if (!fields.ok()) return fields.status();
  absl::StatusOr<Shared> parsed_shared = ParseShared(*fields);
  if (!parsed_shared.ok()) return parsed_shared.status();
  const Shared& shared = *parsed_shared;

  absl::StatusOr<const json*> context_json = fields->Required("context");
  if (!context_json.ok()) return context_json.status();
  absl::StatusOr<SliceInput> context =
      ParseSliceInput(**context_json, "context", &shared, Side::kContext);
  if (!context.ok()) return context.status();
  absl::StatusOr<const json*> generation_json = fields->Required("generation");
  if (!generation_json.ok()) return generation_json.status();
  absl::StatusOr<SliceInput> generation =
      ParseSliceInput(**generation_json, "generation", &shared, Side::kGeneration);
  if (!generation.ok()) return generation.status();

  absl::StatusOr<std::optional<int64_t>> hint = fields->OptionalTokens("dst_start_token", 0);
  if (!hint.ok()) return hint.status();
  if (*hint && generation->dst_start_token && **hint != *generation->dst_start_token) {
    return FieldError("generation.dst_start_token",
                      absl::StrCat("must agree with the top-level dst_start_token, got ",
                                   *generation->dst_start_token, " vs ", **hint));
  }
  if (!*hint) *hint = generation->dst_start_token;

  // Both sides must describe the same model: same groups, same windows.
  if (context->groups.size() != generation->groups.size()) {
    return FieldError(
        "generation.groups",
        absl::StrCat("must list the same layer groups as context.groups: "
                     "context_groups=",
                     context->groups.size(), " generation_groups=", generation->groups.size()));
  }
  std::vector<std::optional<int64_t>> windows;
  for (size_t g = 0; g < context->groups.size(); ++g) {
    const LayerGroupSpec& c = context->groups[g];
    const LayerGroupSpec& d = generation->groups[g];
    if (c.kind != d.kind || c.window != d.window) {
      auto describe = [](const LayerGroupSpec& spec) {
        if (spec.kind == LayerGroupSpec::Kind::kMamba) return std::string("mamba");
        return spec.window ? absl::StrCat("window ", *spec.window) : std::string("full");
      };
      return FieldError(absl::StrCat("generation.groups[", g, "]"),
                        absl::StrCat("must match context.groups[", g, "]: context=", describe(c),
                                     " generation=", describe(d)));
    }
    windows.push_back(c.kind == LayerGroupSpec::Kind::kMamba ? std::nullopt : c.window);
  }

  absl::StatusOr<cache_reuse::BuiltSlice> src = BuildSliceFromInput(*context);
  if (!src.ok())
    return absl::Status(src.status().code(), absl::StrCat("context: ", src.status().message()));
  absl::StatusOr<cache_reuse::BuiltSlice> dst = BuildSliceFromInput(*generation);
  if (!dst.ok())
    return absl::Status(dst.status().code(), absl::StrCat("generation: ", dst.status().message()));

  transfer::PairingOptions options;
  options.tokens_per_block = shared.tokens_per_block;
  options.prompt_len = shared.prompt_len;
  options.windows = windows;
  options.dst_start_token = *hint;
  options.request_id = kRequestId;
  absl::StatusOr<std::vector<transfer::GroupPairing>> pairings =
      transfer::PairSliceBlocks(src->slice, dst->slice, options);
  if (!pairings.ok()) return pairings.status();

  ordered_json groups = ordered_json::array();
  GroupCounts totals;
  for (size_t g = 0; g < pairings->size(); ++g) {
    const LayerGroupSpec& spec = context->groups[g];
    absl::StatusOr<GroupCounts> counts =
        CountGroup(*context, spec, g, dst->slice.block_ids_per_layer_group[g], (*pairings)[g]);
    if (!counts.ok()) return counts.status();
    totals.Add(*counts);
    ordered_json group = PairingJson((*pairings)[g]);
    if (spec.kind == LayerGroupSpec::Kind::kMamba) {
      group["kind"] = "mamba";
    } else {
      group["window"] = spec.window ? ordered_json(*spec.window) : ordered_json(nullptr);
    }
    group.update(counts->ToJson());
    groups.push_back(std::move(group));
  }
  ordered_json out;
  out["groups"] = std::move(groups);
  out["totals"] = totals.ToJson();
  out["token_range"] = RangeJson(src->slice.token_range);
  out["cached_tokens"] = {{"context", src->cached_tokens}, {"generation", dst->cached_tokens}};
  return out;
}

// -------------------------------------------------------------------------------
// fragments

// Bounds that keep one run of the tool in memory: far past any deployment.
constexpr int64_t kMaxLayers = int64_t{1} << 16;
constexpr int64_t kMaxTpSize = 4096;
constexpr int64_t kMaxRanks = 65536;  // tp x pp stages of one instance
// A side without block tables gets the identity table of cdiv(end, tpb) blocks.
constexpr int64_t kMaxIdentityBlocks = int64_t{1} << 20;

// Strictly increasing layer ids in [0, num_layers).
absl::StatusOr<std::vector<int64_t>> AsLayerIds(const json& value, absl::string_view field,
                                                int64_t num_layers) {
  if (!value.is_array()) {
    return FieldError(field, absl::StrCat("must be an array of layer ids, got ", Describe(value)));
  }
  std::vector<int64_t> ids;
  for (size_t i = 0; i < value.size(); ++i) {
    const std::string name = absl::StrCat(field, "[", i, "]");
    absl::StatusOr<int64_t> id =
        AsInt(value[i], name, 0, num_layers - 1,
              absl::StrCat("a layer id in [0, ", num_layers - 1, "]"));
    if (!id.ok()) return id.status();
    if (!ids.empty() && *id <= ids.back()) {
      return FieldError(name, absl::StrCat("layer ids must increase, got ", *id, " after ",
                                           ids.back()));
    }
    ids.push_back(*id);
  }
  return ids;
}

absl::StatusOr<transfer::ModelSpec> ParseModel(const json& value) {
  absl::StatusOr<Fields> fields =
      Fields::Open(value, "model",
                   {"num_layers", "num_kv_heads", "head_size", "element_bytes",
                    "tokens_per_block", "mla", "groups"});
  if (!fields.ok()) return fields.status();
  transfer::ModelSpec model;
  for (auto [key, target] : {std::pair{"num_layers", &model.num_layers},
                             std::pair{"num_kv_heads", &model.num_kv_heads},
                             std::pair{"head_size", &model.head_size},
                             std::pair{"element_bytes", &model.element_bytes},
                             std::pair{"tokens_per_block", &model.tokens_per_block}}) {
    const int64_t max = absl::string_view(key) == "num_layers" ? kMaxLayers : kMaxTokens;
    absl::StatusOr<int64_t> number =
        fields->Int(key, 1, max, absl::StrCat("an integer in [1, ", max, "]"));
    if (!number.ok()) return number.status();
    *target = *number;
  }
  absl::StatusOr<bool> mla = fields->OptionalBool("mla", false);
  if (!mla.ok()) return mla.status();
  model.is_mla = *mla;

  const json* groups = fields->Find("groups");
  if (groups == nullptr || groups->is_null()) {
    model.groups = {transfer::GroupSpec{std::nullopt, transfer::AllLayers(model.num_layers)}};
    return model;
  }
  const std::string name = fields->Name("groups");
  if (!groups->is_array() || groups->empty()) {
    return FieldError(name, absl::StrCat("must be a non-empty array of layer groups, got ",
                                         Describe(*groups)));
  }
  for (size_t g = 0; g < groups->size(); ++g) {
    const std::string path = absl::StrCat(name, "[", g, "]");
    absl::StatusOr<Fields> group = Fields::Open((*groups)[g], path, {"window", "layers"});
    if (!group.ok()) return group.status();
    transfer::GroupSpec spec;
    if (const json* window = group->Find("window"); window != nullptr) {
      absl::StatusOr<std::optional<int64_t>> parsed = AsWindow(*window, group->Name("window"));
      if (!parsed.ok()) return parsed.status();
      spec.window = *parsed;
    }
    const json* layers = group->Find("layers");
    if (layers == nullptr || layers->is_null()) {
      if (groups->size() > 1) {
        return FieldError(group->Name("layers"),
                          "missing required field (only a single group may omit it)");
      }
      spec.global_layer_ids = transfer::AllLayers(model.num_layers);
    } else {
      absl::StatusOr<std::vector<int64_t>> ids =
          AsLayerIds(*layers, group->Name("layers"), model.num_layers);
      if (!ids.ok()) return ids.status();
      spec.global_layer_ids = *std::move(ids);
    }
    model.groups.push_back(std::move(spec));
  }
  return model;
}

// One instance of a fragments input: its sharding and its slice input.
struct FragmentsSide {
  transfer::InstanceSpec instance;
  int64_t dp_rank = 0;
  SliceInput slice;
};

absl::StatusOr<FragmentsSide> ParseFragmentsSide(const Fields& top, absl::string_view key,
                                                 const transfer::ModelSpec& model,
                                                 const Shared& shared, Side side) {
  absl::StatusOr<const json*> value = top.Required(key);
  if (!value.ok()) return value.status();
  absl::StatusOr<Fields> fields = Fields::Open(
      **value, std::string(key),
      {"tp", "pp_layers", "attention_dp", "dp_rank", "num_slots", "generation_only", "reuse",
       "groups"});
  if (!fields.ok()) return fields.status();
  FragmentsSide out;
  absl::StatusOr<int64_t> tp =
      fields->Int("tp", 1, kMaxTpSize, absl::StrCat("an integer in [1, ", kMaxTpSize, "]"));
  if (!tp.ok()) return tp.status();
  std::vector<int64_t> pp_layers = {model.num_layers};
  if (const json* pp = fields->Find("pp_layers"); pp != nullptr && !pp->is_null()) {
    const std::string name = fields->Name("pp_layers");
    if (!pp->is_array() || pp->empty() || static_cast<int64_t>(pp->size()) > model.num_layers) {
      return FieldError(name, absl::StrCat("must be an array of 1 to num_layers=",
                                           model.num_layers, " layer counts, got ",
                                           Describe(*pp)));
    }
    pp_layers.clear();
    int64_t sum = 0;
    for (size_t i = 0; i < pp->size(); ++i) {
      absl::StatusOr<int64_t> n =
          AsInt((*pp)[i], absl::StrCat(name, "[", i, "]"), 1, kMaxLayers, "an integer > 0");
      if (!n.ok()) return n.status();
      pp_layers.push_back(*n);
      sum += *n;
    }
    if (sum != model.num_layers) {
      return FieldError(name, absl::StrCat("must add up to model.num_layers, got ", sum, " vs ",
                                           model.num_layers));
    }
  }
  // Every rank gets a page table: bound the instance, not just each factor.
  if (*tp * static_cast<int64_t>(pp_layers.size()) > kMaxRanks) {
    return FieldError(fields->Name("tp"),
                      absl::StrCat("tp x pp stages must be at most ", kMaxRanks, ", got tp=", *tp,
                                   " pp=", pp_layers.size()));
  }
  out.instance.topology = transfer::MakeTopology(*tp, std::move(pp_layers));
  absl::StatusOr<bool> dp = fields->OptionalBool("attention_dp", false);
  if (!dp.ok()) return dp.status();
  out.instance.topology.attention_dp = *dp;
  absl::StatusOr<std::optional<int64_t>> dp_rank =
      fields->OptionalInt("dp_rank", 0, *tp - 1, absl::StrCat("an integer in [0, tp-1=", *tp - 1, "]"));
  if (!dp_rank.ok()) return dp_rank.status();
  out.dp_rank = dp_rank->value_or(0);
  absl::StatusOr<std::optional<int64_t>> num_slots =
      fields->OptionalInt("num_slots", 1, kMaxTokens, "an integer > 0");
  if (!num_slots.ok()) return num_slots.status();
  out.instance.num_slots = num_slots->value_or(0);

  SliceInput& input = out.slice;
  input.shared = shared;
  input.side = side;
  absl::StatusOr<bool> generation_only = fields->OptionalBool("generation_only", true);
  if (!generation_only.ok()) return generation_only.status();
  input.generation_only = *generation_only;
  absl::StatusOr<ReuseInput> reuse = ParseReuse(*fields);
  if (!reuse.ok()) return reuse.status();
  input.reuse = *reuse;
  for (const transfer::GroupSpec& group : model.groups) {
    input.groups.push_back(group.window ? LayerGroupSpec::Windowed(*group.window)
                                        : LayerGroupSpec::Full());
  }
  const json* groups = fields->Find("groups");
  if (groups == nullptr || groups->is_null()) {
    // The identity table over the slice's blocks.
    const int64_t end = shared.token_range ? shared.token_range->end() : shared.prompt_len;
    const int64_t total = transfer::CeilDiv(end, shared.tokens_per_block);
    if (total > kMaxIdentityBlocks) {
      return FieldError(fields->Name("groups"),
                        absl::StrCat("missing, and the default identity tables would hold ", total,
                                     " blocks (max ", kMaxIdentityBlocks, "); give block_ids"));
    }
    BlockList identity(total);
    for (int64_t b = 0; b < total; ++b) identity[b] = b;
    input.tables.assign(model.groups.size(), identity);
    return out;
  }
  absl::StatusOr<std::vector<LayerGroupSpec>> parsed = ParseGroups(*fields, &input.tables);
  if (!parsed.ok()) return parsed.status();
  if (parsed->size() != model.groups.size()) {
    return FieldError(fields->Name("groups"),
                      absl::StrCat("must list one block table per model group: groups=",
                                   parsed->size(), " model_groups=", model.groups.size()));
  }
  for (size_t g = 0; g < parsed->size(); ++g) {
    const std::string path = absl::StrCat(fields->Name("groups"), "[", g, "]");
    if ((*parsed)[g].kind == LayerGroupSpec::Kind::kMamba) {
      return FieldError(absl::StrCat(path, ".kind"),
                        "fragments plans attention groups only (the model's groups)");
    }
    // A window may be left out here (the model's applies) but must not differ.
    if ((*groups)[g].contains("window") && (*parsed)[g].window != model.groups[g].window) {
      auto describe = [](std::optional<int64_t> w) {
        return w ? absl::StrCat(*w) : std::string("null");
      };
      return FieldError(absl::StrCat(path, ".window"),
                        absl::StrCat("must match model.groups[", g, "].window, got ",
                                     describe((*parsed)[g].window), " vs ",
                                     describe(model.groups[g].window)));
    }
  }
  return out;
}

ordered_json FragmentJson(const transfer::Fragment& f) {
  ordered_json out;
  out["src_pool"] = f.src_pool;
  out["src_offset"] = f.src_offset;
  out["dst_pool"] = f.dst_pool;
  out["dst_offset"] = f.dst_offset;
  out["bytes"] = f.bytes;
  return out;
}

absl::StatusOr<ordered_json> Fragments(const json& input) {
  absl::StatusOr<Fields> fields = Fields::Open(
      input, "", {"model", "context", "generation", "request", "max_fragments_listed"});
  if (!fields.ok()) return fields.status();
  absl::StatusOr<const json*> model_json = fields->Required("model");
  if (!model_json.ok()) return model_json.status();
  absl::StatusOr<transfer::ModelSpec> model = ParseModel(**model_json);
  if (!model.ok()) return model.status();

  absl::StatusOr<const json*> request_json = fields->Required("request");
  if (!request_json.ok()) return request_json.status();
  absl::StatusOr<Fields> request = Fields::Open(**request_json, "request",
                                                {"prompt_len", "token_range"});
  if (!request.ok()) return request.status();
  absl::StatusOr<int64_t> prompt_len = request->Tokens("prompt_len", 0);
  if (!prompt_len.ok()) return prompt_len.status();
  absl::StatusOr<std::optional<TokenRange>> range = OptionalTokenRange(*request, *prompt_len);
  if (!range.ok()) return range.status();
  const Shared shared{model->tokens_per_block, *prompt_len, *range};

  absl::StatusOr<FragmentsSide> context =
      ParseFragmentsSide(*fields, "context", *model, shared, Side::kContext);
  if (!context.ok()) return context.status();
  absl::StatusOr<FragmentsSide> generation =
      ParseFragmentsSide(*fields, "generation", *model, shared, Side::kGeneration);
  if (!generation.ok()) return generation.status();
  absl::StatusOr<std::optional<int64_t>> max_listed = fields->OptionalInt(
      "max_fragments_listed", 0, std::numeric_limits<int64_t>::max(), "an integer >= 0");
  if (!max_listed.ok()) return max_listed.status();

  // The same slice builder as `transfer` (SEMANTICS.md section 4).
  absl::StatusOr<cache_reuse::BuiltSlice> src = BuildSliceFromInput(context->slice);
  if (!src.ok())
    return absl::Status(src.status().code(), absl::StrCat("context: ", src.status().message()));
  absl::StatusOr<cache_reuse::BuiltSlice> dst = BuildSliceFromInput(generation->slice);
  if (!dst.ok())
    return absl::Status(dst.status().code(), absl::StrCat("generation: ", dst.status().message()));

  transfer::Scenario scenario;
  scenario.model = *model;
  scenario.context = context->instance;
  scenario.generation = generation->instance;
  scenario.request.request_id = kRequestId;
  scenario.request.prompt_len = *prompt_len;
  scenario.request.context_dp_rank = context->dp_rank;
  scenario.request.generation_dp_rank = generation->dp_rank;
  absl::StatusOr<transfer::ScenarioPlan> plan =
      transfer::PlanScenario(scenario, src->slice, dst->slice);
  if (!plan.ok()) return plan.status();

  ordered_json pairs = ordered_json::array();
  for (const transfer::RankPairPlan& pair : plan->pairs) {
    ordered_json out;
    out["context_rank"] = pair.context_rank;
    out["generation_rank"] = pair.generation_rank;
    out["writes"] = pair.writes;
    out["fragments_before_coalescing"] = pair.plan.fragments_before_coalescing;
    out["fragments_after_coalescing"] = pair.plan.fragments.size();
    ordered_json listed = ordered_json::array();
    for (const transfer::Fragment& f : pair.plan.fragments) {
      if (*max_listed && static_cast<int64_t>(listed.size()) >= **max_listed) break;
      listed.push_back(FragmentJson(f));
    }
    out["fragments"] = std::move(listed);
    out["bytes"] = pair.plan.total_bytes;
    pairs.push_back(std::move(out));
  }
  ordered_json out;
  out["pairs"] = std::move(pairs);
  ordered_json totals;
  totals["rank_pairs"] = plan->pairs.size();
  totals["fragments_before_coalescing"] = plan->fragments_before_coalescing;
  totals["fragments_after_coalescing"] = plan->fragments_after_coalescing;
  totals["bytes"] = plan->total_bytes;
  out["totals"] = std::move(totals);
  out["block_ids"] = {{"context", src->slice.block_ids_per_layer_group},
                      {"generation", dst->slice.block_ids_per_layer_group}};
  out["cached_tokens"] = {{"context", src->cached_tokens}, {"generation", dst->cached_tokens}};
  return out;
}

// No newline may split the one-line reason on stderr.
std::string OneLine(absl::string_view text) {
  std::string line(text);
  std::replace_if(
      line.begin(), line.end(), [](char c) { return c == '\n' || c == '\r'; }, ' ');
  return line;
}

}  // namespace

bool IsCommand(absl::string_view command) {
  return command == "align" || command == "pair" || command == "slice" || command == "transfer" ||
         command == "fragments";
}

absl::StatusOr<std::string> RunCommand(absl::string_view command, absl::string_view input_json) {
  if (!IsCommand(command)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown command: ", OneLine(command),
                                                   " (expected align, pair, slice, transfer or fragments)"));
  }
  // nlohmann keeps the last of two equal keys; a duplicated field is as likely a
  // mistake as a misspelt one, so it is rejected too. One set of keys per open
  // object.
  std::vector<std::vector<std::string>> keys_per_object;
  std::optional<std::string> duplicate;
  const json::parser_callback_t on_event = [&](int /*depth*/, json::parse_event_t event,
                                               json& parsed) {
    if (event == json::parse_event_t::object_start) {
      keys_per_object.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      keys_per_object.pop_back();
    } else if (event == json::parse_event_t::key && !keys_per_object.empty()) {
      std::vector<std::string>& keys = keys_per_object.back();
      const std::string key = parsed.get<std::string>();
      if (std::find(keys.begin(), keys.end(), key) != keys.end()) {
        if (!duplicate) duplicate = key;
      } else {
        keys.push_back(key);
      }
    }
    return true;
  };
  json input;
  try {
    input = json::parse(input_json.begin(), input_json.end(), on_event);
  } catch (const json::parse_error& e) {
    // e.what() is "[json.exception.parse_error.101] parse error at line 1, ...".
    absl::string_view what = e.what();
    if (const size_t pos = what.find("] "); pos != absl::string_view::npos) {
      what.remove_prefix(pos + 2);
    }
    return absl::InvalidArgumentError(OneLine(absl::StrCat("malformed JSON: ", what)));
  }
  if (duplicate) {
    return absl::InvalidArgumentError(
        OneLine(absl::StrCat(*duplicate, ": field given twice in one object")));
  }
  absl::StatusOr<ordered_json> out;
  try {
    if (command == "align") {
      out = Align(input);
    } else if (command == "pair") {
      out = Pair(input);
    } else if (command == "slice") {
      out = Slice(input);
    } else if (command == "fragments") {
      out = Fragments(input);
    } else {
      out = Transfer(input);
    }
  } catch (const json::exception& e) {
    // Every access above checks the type first; reaching here is a kvplan bug.
    return absl::InternalError(OneLine(absl::StrCat("unexpected JSON error: ", e.what())));
  }
  if (!out.ok()) return absl::Status(out.status().code(), OneLine(out.status().message()));
  return absl::StrCat(out->dump(), "\n");
}

}  // namespace kvx::kvplan
