// kvplan fragments: the byte ranges one request moves between every (context rank,
// generation rank) pair (SEMANTICS.md sections 4-6), through transfer::PlanScenario.
// The input is compact: a model and each instance's sharding expand to every rank's
// page table in the standard layout of transfer/scenario.h. What only a file can
// hold is bounded here (model and identity-table sizes); what the planner would
// build is bounded by transfer::ScenarioLimits.

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "cache_reuse/adapter.h"
#include "tools/internal/kvplan_command.h"
#include "tools/internal/kvplan_json.h"
#include "tools/internal/kvplan_slice_input.h"
#include "transfer/fragments.h"
#include "transfer/scenario.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::kvplan_internal {
namespace {

using cache_reuse::LayerGroupSpec;
using cache_reuse::Side;

// What one run may be asked for: far past any deployment, small enough that a run
// stays within a few hundred MB.
constexpr int64_t kMaxLayers = int64_t{1} << 16;
constexpr int64_t kMaxTpSize = 4096;
// A side without block tables gets identity tables: groups x cdiv(end, tpb) ids.
constexpr int64_t kMaxIdentityIds = int64_t{1} << 19;
// Fragments listed over all pairs (each one an object in the output).
constexpr int64_t kMaxFragmentsListed = int64_t{1} << 17;
// Rank pairs planned (each an object in the output); the planner's other bounds
// (transfer::ScenarioLimits) keep their defaults.
constexpr int64_t kMaxRankPairs = int64_t{1} << 16;

constexpr char kUsage[] = R"(
  fragments The byte ranges one request moves between every (context rank,
            generation rank) pair, before and after coalescing (sections 4-6).
            Every rank uses the standard layout of transfer/scenario.h: one pool
            per model group, a slot holds the rank's layers of the group, each K
            then V (MLA: the latent), each [head][token-in-block][dim].
            in:  {"model": {"num_layers", "num_kv_heads", "head_size",
                            "element_bytes", "tokens_per_block", "mla"?: bool,
                            "groups"?: [{"window"?: null | W,
                                         "layers"?: [increasing layer ids]}]},
                  "request": {"prompt_len", "token_range"?},
                  "context": {side}, "generation": {side},
                  "max_fragments_listed"?: n}
            model.groups defaults to one full-attention group of every layer;
            "layers" may be left out only by a single group; every layer is in
            exactly one group.
            side: {"tp", "pp_layers"?: [layers per PP stage] (default all on one),
                   "attention_dp"?: bool, "dp_rank"?: n (default 0; the request's
                   rank when attention_dp), "num_slots"?: n (default: the largest
                   block id of the side's slice + 1), "generation_only"?,
                   "reuse"?, "groups"?: [{"window"?, "block_ids": [ids]}, ...]}
            reuse and groups are those of a slice input: positional tables, one per
            model group (a window, if given and not null, must be the model's);
            groups absent: identity tables 0..cdiv(end, tpb)-1. Each side's slice
            is built as in transfer (the generation side with its reuse), then
            paired and planned.
            out: {"pairs": [{"context_rank", "generation_rank",
                             "writes": false for a replica that only reports,
                             "fragments_before_coalescing",
                             "fragments_after_coalescing",
                             "fragments": [{"src_pool", "src_offset", "dst_pool",
                                            "dst_offset", "bytes"}, ...],
                             "bytes"}, ...],
                  "totals": {"rank_pairs", "fragments_before_coalescing",
                             "fragments_after_coalescing", "bytes"},
                  "block_ids": {"context": [[...]], "generation": [[...]]},
                  "cached_tokens": {"context": [...], "generation": [...]}}
            Ranks are pp_rank * tp + tp_rank; offsets are bytes from the start
            of the pool. max_fragments_listed caps each pair's "fragments" list
            (counts and bytes still cover all, counted without building the
            list; 0: counts only); absent: every fragment.
            Bounds: num_layers <= 65536, tp <= 4096, tp x stages <= 65536,
            identity tables <= 2^19 ids over the groups, fragments listed <= 2^17
            over all pairs, rank pairs planned <= 2^16, and the planner's
            (transfer::ScenarioLimits): 2^21 layout entries (each rank counts its
            groups, PP stages and layers, each rank pair both its ranks' counts),
            2^22 rank pairs examined.
)";

// Strictly increasing layer ids in [0, num_layers).
absl::StatusOr<std::vector<int64_t>> AsLayerIds(const json& value, absl::string_view field,
                                                int64_t num_layers) {
  if (!value.is_array()) {
    return FieldError(field, absl::StrCat("must be an array of layer ids, got ", Describe(value)));
  }
  std::vector<int64_t> ids;
  for (size_t i = 0; i < value.size(); ++i) {
    const std::string name = absl::StrCat(field, "[", i, "]");
    absl::StatusOr<int64_t> id = AsInt(value[i], name, 0, num_layers - 1);
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
    absl::StatusOr<int64_t> number = fields->Int(key, 1, max);
    if (!number.ok()) return number.status();
    *target = *number;
  }
  absl::StatusOr<bool> mla = fields->OptionalBool("mla", false);
  if (!mla.ok()) return mla.status();
  model.is_mla = *mla;

  const json* groups = fields->Optional("groups");
  if (groups == nullptr) {
    model.groups = {transfer::GroupSpec{std::nullopt, transfer::AllLayers(model.num_layers)}};
    return model;
  }
  const std::string name = fields->Name("groups");
  if (absl::Status s = CheckGroupArray(*groups, name, "layer groups"); !s.ok()) return s;
  if (groups->empty()) return FieldError(name, "must list at least one layer group");
  for (size_t g = 0; g < groups->size(); ++g) {
    const std::string path = absl::StrCat(name, "[", g, "]");
    absl::StatusOr<Fields> group = Fields::Open((*groups)[g], path, {"window", "layers"});
    if (!group.ok()) return group.status();
    transfer::GroupSpec spec;
    if (const json* window = group->Optional("window"); window != nullptr) {
      absl::StatusOr<std::optional<int64_t>> parsed = AsWindow(*window, group->Name("window"));
      if (!parsed.ok()) return parsed.status();
      spec.window = *parsed;
    }
    const json* layers = group->Optional("layers");
    if (layers == nullptr) {
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

absl::StatusOr<std::vector<int64_t>> ParsePpLayers(const Fields& fields,
                                                   const transfer::ModelSpec& model) {
  const json* pp = fields.Optional("pp_layers");
  if (pp == nullptr) return std::vector<int64_t>{model.num_layers};
  const std::string name = fields.Name("pp_layers");
  if (!pp->is_array() || pp->empty() || static_cast<int64_t>(pp->size()) > model.num_layers) {
    return FieldError(name, absl::StrCat("must be an array of 1 to num_layers=", model.num_layers,
                                         " layer counts, got ", Describe(*pp)));
  }
  std::vector<int64_t> pp_layers;
  int64_t sum = 0;
  for (size_t i = 0; i < pp->size(); ++i) {
    absl::StatusOr<int64_t> n = AsInt((*pp)[i], absl::StrCat(name, "[", i, "]"), 1, kMaxLayers);
    if (!n.ok()) return n.status();
    pp_layers.push_back(*n);
    sum += *n;  // at most num_layers entries of at most 2^16 each
  }
  if (sum != model.num_layers) {
    return FieldError(name, absl::StrCat("must add up to model.num_layers, got ", sum, " vs ",
                                         model.num_layers));
  }
  return pp_layers;
}

// The identity table over the slice's blocks, for every group.
absl::Status FillIdentityTables(const Fields& fields, const transfer::ModelSpec& model,
                                const Shared& shared, std::vector<transfer::BlockList>* tables) {
  const int64_t total = transfer::CeilDiv(SliceEnd(shared), shared.tokens_per_block);
  const int64_t groups = static_cast<int64_t>(model.groups.size());
  if (total > kMaxIdentityIds / groups) {
    return FieldError(fields.Name("groups"),
                      absl::StrCat("missing, and the default identity tables would hold ",
                                   total, " blocks x ", groups, " groups (max ",
                                   kMaxIdentityIds, " ids); give block_ids"));
  }
  transfer::BlockList identity(total);
  for (int64_t b = 0; b < total; ++b) identity[b] = b;
  tables->assign(model.groups.size(), identity);
  return absl::OkStatus();
}

// A window given (and not null) on a side's group must be the model's; left out or
// null, the model's applies.
absl::Status CheckSideGroups(const Fields& fields, const transfer::ModelSpec& model,
                             const std::vector<LayerGroupSpec>& parsed) {
  const std::string name = fields.Name("groups");
  if (parsed.size() != model.groups.size()) {
    return FieldError(name, absl::StrCat("must list one block table per model group: groups=",
                                         parsed.size(), " model_groups=", model.groups.size()));
  }
  const json& groups_json = **fields.Required("groups");
  for (size_t g = 0; g < parsed.size(); ++g) {
    const std::string path = absl::StrCat(name, "[", g, "]");
    if (parsed[g].kind == LayerGroupSpec::Kind::kMamba) {
      return FieldError(absl::StrCat(path, ".kind"),
                        "fragments plans attention groups only (the model's groups)");
    }
    // ParseGroups checked groups[g] is an object.
    const auto window = groups_json[g].find("window");
    const bool given = window != groups_json[g].end() && !window->is_null();
    if (given && parsed[g].window != model.groups[g].window) {
      auto describe = [](std::optional<int64_t> w) {
        return w ? absl::StrCat(*w) : std::string("null");
      };
      return FieldError(absl::StrCat(path, ".window"),
                        absl::StrCat("must match model.groups[", g, "].window, got ",
                                     describe(parsed[g].window), " vs ",
                                     describe(model.groups[g].window)));
    }
  }
  return absl::OkStatus();
}

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
  absl::StatusOr<int64_t> tp = fields->Int("tp", 1, kMaxTpSize);
  if (!tp.ok()) return tp.status();
  absl::StatusOr<std::vector<int64_t>> pp_layers = ParsePpLayers(*fields, model);
  if (!pp_layers.ok()) return pp_layers.status();
  // Every rank gets a page table: bound the instance, not just each factor.
  if (*tp * static_cast<int64_t>(pp_layers->size()) > transfer::kMaxInstanceRanks) {
    return FieldError(fields->Name("tp"),
                      absl::StrCat("tp x pp stages must be at most ", transfer::kMaxInstanceRanks,
                                   ", got tp=", *tp, " pp=", pp_layers->size()));
  }
  out.instance.topology = transfer::MakeTopology(*tp, *std::move(pp_layers));
  absl::StatusOr<bool> dp = fields->OptionalBool("attention_dp", false);
  if (!dp.ok()) return dp.status();
  out.instance.topology.attention_dp = *dp;
  absl::StatusOr<std::optional<int64_t>> dp_rank = fields->OptionalInt(
      "dp_rank", 0, *tp - 1, absl::StrCat("an integer in [0, tp-1=", *tp - 1, "]"));
  if (!dp_rank.ok()) return dp_rank.status();
  out.dp_rank = dp_rank->value_or(0);
  absl::StatusOr<std::optional<int64_t>> num_slots =
      fields->OptionalInt("num_slots", 1, kMaxSlots);
  if (!num_slots.ok()) return num_slots.status();
  out.instance.num_slots = num_slots->value_or(0);

  SliceInput& input = out.slice;
  input.shared = shared;
  input.side = side;
  if (absl::Status s = ParseCacheAnswers(*fields, &input); !s.ok()) return s;
  for (const transfer::GroupSpec& group : model.groups) {
    input.groups.push_back(group.window ? LayerGroupSpec::Windowed(*group.window)
                                        : LayerGroupSpec::Full());
  }
  if (fields->Optional("groups") == nullptr) {
    if (absl::Status s = FillIdentityTables(*fields, model, shared, &input.tables); !s.ok()) {
      return s;
    }
    return out;
  }
  absl::StatusOr<std::vector<LayerGroupSpec>> parsed = ParseGroups(*fields, &input.tables);
  if (!parsed.ok()) return parsed.status();
  if (absl::Status s = CheckSideGroups(*fields, model, *parsed); !s.ok()) {
    return s;
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
  absl::StatusOr<std::optional<transfer::TokenRange>> range =
      OptionalTokenRange(*request, *prompt_len);
  if (!range.ok()) return range.status();
  const Shared shared{model->tokens_per_block, *prompt_len, *range};

  absl::StatusOr<FragmentsSide> context =
      ParseFragmentsSide(*fields, "context", *model, shared, Side::kContext);
  if (!context.ok()) return context.status();
  absl::StatusOr<FragmentsSide> generation =
      ParseFragmentsSide(*fields, "generation", *model, shared, Side::kGeneration);
  if (!generation.ok()) return generation.status();
  absl::StatusOr<std::optional<int64_t>> max_listed = fields->OptionalInt(
      "max_fragments_listed", 0, std::numeric_limits<int64_t>::max());
  if (!max_listed.ok()) return max_listed.status();

  // The same slice builder as `transfer` (SEMANTICS.md section 4).
  absl::StatusOr<cache_reuse::BuiltSlice> src = BuildSide(context->slice, "context");
  if (!src.ok()) return src.status();
  absl::StatusOr<cache_reuse::BuiltSlice> dst = BuildSide(generation->slice, "generation");
  if (!dst.ok()) return dst.status();

  transfer::Scenario scenario;
  scenario.model = *model;
  scenario.context = context->instance;
  scenario.generation = generation->instance;
  scenario.request.request_id = kRequestId;
  scenario.request.prompt_len = *prompt_len;
  scenario.request.context_dp_rank = context->dp_rank;
  scenario.request.generation_dp_rank = generation->dp_rank;
  scenario.max_fragments_listed = *max_listed;
  // Each listed fragment and each rank pair becomes an object of the output.
  scenario.limits.max_fragments_held = kMaxFragmentsListed;
  scenario.limits.max_rank_pairs_planned = kMaxRankPairs;
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
    out["fragments_after_coalescing"] = pair.fragments_after_coalescing;
    ordered_json listed = ordered_json::array();
    for (const transfer::Fragment& f : pair.plan.fragments) listed.push_back(FragmentJson(f));
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

}  // namespace

const Command kFragmentsCommand = {"fragments", kUsage, &Fragments};

}  // namespace kvx::kvplan_internal
