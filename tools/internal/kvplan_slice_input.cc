#include "tools/internal/kvplan_slice_input.h"

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "cache_reuse/adapter.h"
#include "cache_reuse/v1_adapter.h"
#include "cache_reuse/v2_adapter.h"
#include "tools/internal/kvplan_json.h"
#include "transfer/slice.h"

namespace kvx::kvplan_internal {
namespace {

using cache_reuse::LayerGroupSpec;
using cache_reuse::Side;
using transfer::BlockList;

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

// "reuse" of a side: which adapter, whether enabled, and its count.
absl::StatusOr<ReuseInput> ParseReuse(const Fields& side) {
  ReuseInput reuse;
  const json* value = side.Optional("reuse");
  if (value == nullptr) return reuse;  // reuse disabled
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
  absl::StatusOr<bool> enabled = fields->Bool("enabled");
  if (!enabled.ok()) return enabled.status();
  reuse.enabled = *enabled;
  reuse.adapter = v1 ? ReuseInput::Adapter::kV1 : ReuseInput::Adapter::kV2;

  // The count is required when reuse is on; when off it may be left out. V2's
  // null is a value (the manager does not know the request), not absence.
  const json* count = v1 ? fields->Optional(count_key) : fields->Find(count_key);
  if (count == nullptr) {
    if (reuse.enabled) return FieldError(fields->Name(count_key), "missing required field");
    return reuse;
  }
  if (count->is_null()) return reuse;  // V2: unknown request
  absl::StatusOr<int64_t> n = AsTokens(*count, fields->Name(count_key), 0);
  if (!n.ok()) return n.status();
  if (v1) {
    reuse.prepopulated_prompt_len = *n;
  } else {
    reuse.num_committed_tokens = *n;
  }
  return reuse;
}

}  // namespace

absl::StatusOr<Shared> ParseShared(const Fields& fields) {
  absl::StatusOr<int64_t> tpb = fields.Tokens("tokens_per_block", 1);
  if (!tpb.ok()) return tpb.status();
  absl::StatusOr<int64_t> prompt_len = fields.Tokens("prompt_len", 0);
  if (!prompt_len.ok()) return prompt_len.status();
  absl::StatusOr<std::optional<transfer::TokenRange>> range =
      OptionalTokenRange(fields, *prompt_len);
  if (!range.ok()) return range.status();
  return Shared{*tpb, *prompt_len, *range};
}

int64_t SliceEnd(const Shared& shared) {
  return shared.token_range ? shared.token_range->end() : shared.prompt_len;
}

absl::Status ParseCacheAnswers(const Fields& side, SliceInput* input) {
  absl::StatusOr<bool> generation_only = side.OptionalBool("generation_only", true);
  if (!generation_only.ok()) return generation_only.status();
  input->generation_only = *generation_only;
  absl::StatusOr<ReuseInput> reuse = ParseReuse(side);
  if (!reuse.ok()) return reuse.status();
  input->reuse = *reuse;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<LayerGroupSpec>> ParseGroups(const Fields& side,
                                                        std::vector<BlockList>* tables) {
  absl::StatusOr<const json*> value = side.Required("groups");
  if (!value.ok()) return value.status();
  const std::string name = side.Name("groups");
  if (absl::Status s = CheckGroupArray(**value, name, "layer groups"); !s.ok()) return s;
  std::vector<LayerGroupSpec> groups;
  for (size_t g = 0; g < (*value)->size(); ++g) {
    const json& group_json = (**value)[g];
    const std::string path = absl::StrCat(name, "[", g, "]");
    absl::StatusOr<Fields> fields = Fields::Open(group_json, path, {"kind", "window", "block_ids"});
    if (!fields.ok()) return fields.status();
    std::string kind = "attention";
    if (fields->Optional("kind") != nullptr) {
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
    if (const json* window_json = fields->Optional("window"); window_json != nullptr) {
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
    absl::StatusOr<std::optional<transfer::TokenRange>> range =
        OptionalTokenRange(*fields, outer->prompt_len);
    if (!range.ok()) return range.status();
    if (*range && *range != outer->token_range) {
      return FieldError(fields->Name("token_range"), "must agree with the top-level token_range");
    }
    input.side = fixed_side;
    if (fields->Optional("side") != nullptr) {
      const char* expected = fixed_side == Side::kContext ? "context" : "generation";
      absl::StatusOr<std::string> side = fields->String("side", {expected});
      if (!side.ok()) return side.status();
    }
  }
  if (absl::Status s = ParseCacheAnswers(*fields, &input); !s.ok()) return s;
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

absl::StatusOr<cache_reuse::BuiltSlice> BuildSide(const SliceInput& input,
                                                  const char* side_name) {
  absl::StatusOr<cache_reuse::BuiltSlice> built = BuildSliceFromInput(input);
  if (!built.ok()) {
    return absl::Status(built.status().code(),
                        absl::StrCat(side_name, ": ", built.status().message()));
  }
  return built;
}

}  // namespace kvx::kvplan_internal
